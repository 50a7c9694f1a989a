import json

import pytest

from .helpers import ROOT, accelerate_launch


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
