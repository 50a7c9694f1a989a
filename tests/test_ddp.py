import json

import pytest

from .helpers import ROOT, accelerate_launch, run_process


@pytest.mark.slow
def test_two_rank_ddp_keeps_the_bound_and_identical_parameters(tmp_path):
    result = accelerate_launch(ROOT / "tests" / "utils" / "ddp_edit.py", str(tmp_path))
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


@pytest.mark.slow
@pytest.mark.parametrize("norm, delta", [("linf", 1e-2), ("l2", 5e-2)])
def test_two_rank_fsdp2_keeps_the_bound_and_equals_one_process(norm, delta, tmp_path):
    """FSDP2 shards every block over 2 CPU ranks: L∞ projects each shard, L2 all-reduces one norm; the edit is
    the one-process edit (float64: reordered sums only), saved and reverted through the gathered tensors."""
    import sys

    import torch
    from safetensors.torch import load_file

    script = ROOT / "tests" / "utils" / "fsdp_edit.py"
    whole = run_process([sys.executable, str(script), str(tmp_path), norm, str(delta), "whole"])
    assert whole.returncode == 0, whole.stderr[-4000:]
    sharded = accelerate_launch(script, str(tmp_path), norm, str(delta), "shard")
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    records = {mode: json.loads((tmp_path / f"{mode}.json").read_text()) for mode in ("whole", "shard")}
    assert records["shard"]["world_size"] == 2
    for record in records.values():
        assert record["projections"] == 4 and record["changed"] and record["reverted"]
        assert record["distance"] <= delta * (1 + 1e-12)
    assert records["shard"]["distance"] == pytest.approx(records["whole"]["distance"], rel=1e-9)
    expected, actual = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "shard.safetensors")
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-9, msg=name)
    saved = load_file(tmp_path / "edit_shard" / "memedit_edit.safetensors")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[n], actual[n]) for n in saved)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["before", "prepared"])
def test_the_trainer_rebinds_its_projection_to_fsdp2_shards(order, tmp_path):
    """The trainer on a model whose blocks fully_shard wrapped (one gloo rank): the projector follows the sharded
    parameters, projects every step, and the edit is gathered and saved. `before`: wrapped by hand before the
    trainer; `prepared`: accelerate's order, sharded in `train()` after the optimizer was made (an H200 run of
    bench/fsdp_check.py found the box kept on the stale unsharded tensors there, distance 0, the shards unbounded)."""
    import os
    import sys

    from .helpers import free_port

    done = run_process(
        [sys.executable, str(ROOT / "tests" / "utils" / "fsdp_trainer.py"), str(tmp_path), order],
        env={**os.environ, "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["sharded"] and record["same_objects"] and record["projections"] == 3
    assert 0 < record["distance"] <= 1e-2 * (1 + 1e-6)
    assert record["changed"] and "memedit_edit.safetensors" in record["saved"]
