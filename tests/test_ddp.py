import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_rank_ddp_keeps_the_bound_and_identical_parameters(tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    command = launcher + [
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(ROOT / "tests" / "ddp_edit.py"), str(tmp_path),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert [r["backend"] for r in records] == ["gloo", "gloo"]
    assert records[0]["digest"] == records[1]["digest"]  # identical parameters on both ranks
    for record in records:
        assert record["projections"] == 4
        assert 0 < record["distance"] <= 1e-3 + 1e-6  # the bound, to float32 rounding at |θ0| ≈ 1
        assert record["changed"]
        assert record["threads_joined"] >= 2  # Gloo's worker threads ended before interpreter exit
