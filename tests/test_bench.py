"""The bench scripts run, on a small model: their tables, not their timings (those belong in bench/)."""

import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of a printed markdown table, header and rule left out."""
    lines = [line for line in stdout.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


@pytest.mark.slow
def test_projection_overhead_bench_prints_its_table_with_equal_unprojected_losses():
    done = subprocess.run(
        [sys.executable, "bench/projection_overhead.py", "--small", "--steps", "3", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = table_rows(done.stdout)
    assert [row[0] for row in rows] == ["Trainer", "no projection", "projection (L∞)"]
    losses = {row[0]: float(row[3]) for row in rows}
    # The same computation without the projection, up to the order of the loss's float32 sums
    # (transformers' loss reduces all positions, the trainer's the object positions).
    assert losses["no projection"] == pytest.approx(losses["Trainer"], rel=1e-5)
    assert rows[0][2] == "1.000x" and all(float(row[4]) >= 0 for row in rows)


def test_fsdp_check_needs_a_gpu_and_says_so():
    """accelerate runs FSDP on accelerators only: without one the GPU check stops with the reason."""
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is here: run bench/fsdp_check.py itself")
    done = subprocess.run(
        [sys.executable, "bench/fsdp_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "no CUDA device. accelerate runs FSDP on accelerators only" in done.stderr
