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


def test_recipe_folds_picks_across_lanes_on_held_out_relations(tmp_path, bpe_tokenizer, capsys):
    """bench/recipe_folds.py: two compare lanes differing in a setting a compare does not sweep (target_suffix); every
    point of both is a candidate, each reported on every fold, and per fold the pick is the best on the other folds
    over both lanes, reported on its own fold; lanes with other folds are refused."""
    import importlib.util
    import json

    from hf_memedit.experiments import run_compare
    from hf_memedit.experiments.folds import pooled

    from .helpers import TINY, tiny_fold_compare

    lanes = []
    for suffix in (None, "."):
        lanes.append(str(tmp_path / f"lane-{suffix}"))
        job, args = tiny_fold_compare(lanes[-1], ["ftm_linf"], {"per_relation": True}, target_suffix=suffix)
        run_compare(job, args, model=TINY["llama"](2, vocab=len(bpe_tokenizer)), tokenizer=bpe_tokenizer)
    spec = importlib.util.spec_from_file_location("recipe_folds", ROOT / "bench" / "recipe_folds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    module.main([*lanes, "--output", str(tmp_path / "report.md")])
    text = capsys.readouterr().out
    assert text == (tmp_path / "report.md").read_text()
    each, pick = text.split("## The pick among them")
    pick, everything = pick.split("## Each recipe on every fact")
    rows_all = table_rows(everything)
    assert len(rows_all) == 4 and all(row[1].endswith("of 12)") for row in rows_all)  # A_M over all 12 edits
    summary, per_fold = (chunk for chunk in each.split("\n\n") if chunk.startswith("|"))
    labels = [row[0] for row in table_rows(summary)]
    assert len(labels) == 4 and sum("targets end with '.'" in label for label in labels) == 2, labels
    rows = [row for lane in lanes for row in json.loads((Path(lane) / "compare.json").read_text())["rows"]["ftm_linf"]]
    folds = json.loads((Path(lanes[0]) / "compare.json").read_text())["relation_folds"]["relations"]
    views = [f"relations/{j}" for j in range(len(folds))]
    assert len(table_rows(per_fold)) == 4 * len(folds)
    _, pick_folds = (chunk for chunk in pick.split("\n\n") if chunk.startswith("|"))
    assert [line[1] for line in table_rows(pick_folds)] == [str(j) for j in range(len(folds))]
    _, picked = module.report(lanes, None)
    for j, chosen in enumerate(picked["folds"]):  # the best on the other folds, over both lanes' points
        others = [v for v in views if v != views[j]]
        best = max(pooled(r, others)["avg_acc"] for r in rows)
        assert chosen["picked_on"]["avg_acc"] == best
        assert chosen["held_out"] in [r[views[j]] for r in rows if pooled(r, others)["avg_acc"] == best]
    other = tmp_path / "other"
    other.mkdir()
    written = json.loads((Path(lanes[1]) / "compare.json").read_text())
    written["relation_folds"]["relations"] = list(reversed(written["relation_folds"]["relations"]))
    (other / "compare.json").write_text(json.dumps(written))
    with pytest.raises(SystemExit, match="other folds or locality facts"):
        module.main([lanes[0], str(other)])
