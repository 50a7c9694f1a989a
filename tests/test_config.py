import pytest
import yaml
from transformers import HfArgumentParser

from hf_memedit import EditConfig


def _parse(tmp_path, **values):
    path = tmp_path / "edit.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), **values}))
    return HfArgumentParser(EditConfig).parse_yaml_file(str(path))[0]


def test_yaml_fields(tmp_path):
    config = _parse(tmp_path, edit_blocks=["embeddings", "-1"], norm="l2", delta="1e-3", l2_scope="per_tensor")
    assert config.edit_blocks == ["embeddings", "-1"]
    # YAML reads 1e-3 (no dot) as a string: it still becomes the float δ.
    assert config.delta == 1e-3 and isinstance(config.delta, float)
    assert config.block_selector_config().blocks == ["embeddings", -1]
    assert config.remove_unused_columns is False


def test_unconstrained_is_spelled_explicitly(tmp_path):
    config = _parse(tmp_path, norm="none", delta=None)
    assert config.delta is None
    with pytest.raises(ValueError, match="norm 'none' is unconstrained but delta=0.001 is set"):
        _parse(tmp_path, norm="none", delta=1e-3)


@pytest.mark.parametrize("delta", [0, -0.5, "abc", ".inf"])
def test_bad_delta(tmp_path, delta):
    with pytest.raises(ValueError, match="delta must be a positive"):
        _parse(tmp_path, delta=delta)


def test_bad_norm_blocks_scope(tmp_path):
    with pytest.raises(ValueError, match="Unknown norm 'l1'"):
        _parse(tmp_path, norm="l1")
    with pytest.raises(ValueError, match="Unknown l2_scope"):
        _parse(tmp_path, norm="l2", l2_scope="block")
    with pytest.raises(ValueError, match="Unknown block 'last'"):
        _parse(tmp_path, edit_blocks=["last"])


def test_unknown_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="delt"):
        _parse(tmp_path, delt=1e-3)


def test_fsdp1_and_deepspeed_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"supports FSDP2 only \(fsdp_config: \{fsdp_version: 2\}\)"):
        EditConfig(output_dir=str(tmp_path), fsdp=True)
    fsdp = dict(fsdp=True, fsdp_config={"fsdp_version": 2}, save_strategy="no")
    fsdp2 = EditConfig(output_dir=str(tmp_path), norm="l2", delta=1.0, **fsdp)
    assert fsdp2.fsdp_config["version"] == 2
    with pytest.raises(ValueError, match="Under FSDP, norm 'fisher'.*work on whole tensors"):
        EditConfig(output_dir=str(tmp_path), norm="fisher", **fsdp)
    with pytest.raises(ValueError, match="key_constraint 'nullspace' is refused"):
        EditConfig(output_dir=str(tmp_path), key_constraint="nullspace", **fsdp)
    with pytest.raises(ValueError, match="checkpoints during the edit are not supported yet.*save_strategy: no"):
        EditConfig(output_dir=str(tmp_path), fsdp=True, fsdp_config={"fsdp_version": 2})
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        EditConfig(output_dir=str(tmp_path), deepspeed={"zero_optimization": {"stage": 2}})


def test_command_line_flags(tmp_path):
    (config,) = HfArgumentParser(EditConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--edit_blocks", "0", "3", "--norm", "l2", "--delta", "0.5"]
    )
    assert config.edit_blocks == ["0", "3"] and config.norm == "l2" and config.delta == 0.5
    help_text = HfArgumentParser(EditConfig).format_help()
    for flag in ("--edit_blocks", "--norm", "--delta", "--l2_scope", "--blocks_path"):
        assert flag in help_text


def test_no_pinned_memory_without_an_accelerator(tmp_path):
    """Pinned memory only serves copies to an accelerator: on the CPU it is off, so torch does not warn each run."""
    import torch

    assert EditConfig(output_dir=str(tmp_path), use_cpu=True).dataloader_pin_memory is False
    expected = torch.accelerator.is_available()
    assert EditConfig(output_dir=str(tmp_path)).dataloader_pin_memory is expected
