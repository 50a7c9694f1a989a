import os

import pytest
import torch
from transformers import BertForMaskedLM

from hf_memedit import ARCHITECTURES, BlockSelectorConfig, EditModel, get_edit_model
from hf_memedit.model import BASE_WEIGHTS_NAME, WEIGHTS_NAME

from .helpers import TINY, tiny_bert


def _perturb(edit: EditModel, scale: float = 1e-2) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in edit.trainable_parameters().values():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_save_load_merge_revert_round_trip(tmp_path):
    base_state = _state(tiny_bert(100, layers=3))
    edit = get_edit_model(tiny_bert(100, layers=3), BlockSelectorConfig(blocks=["1", "embeddings"]))
    _perturb(edit)
    edited_state = _state(edit.model)
    edit.save_pretrained(tmp_path / "edit")
    assert sorted(os.listdir(tmp_path / "edit")) == [BASE_WEIGHTS_NAME, "memedit_config.json", WEIGHTS_NAME]
    # Only the changed tensors are written: block 1 and the embeddings, nothing of blocks 0 and 2.
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "edit" / WEIGHTS_NAME)
    assert saved and all("layer.1." in n or "embeddings" in n for n in saved)
    assert set(saved) == set(edit.changed_tensors())

    # Apply to a fresh copy of the base: bit-identical to the edited model.
    fresh = tiny_bert(100, layers=3)
    loaded = EditModel.from_pretrained(fresh, tmp_path / "edit")
    assert loaded.selector_config.blocks == [1, "embeddings"]
    for key, value in _state(loaded.model).items():
        assert torch.equal(value, edited_state[key]), key

    # Revert restores θ0 bit for bit, and the edit can be applied again.
    plain = loaded.unload()
    assert isinstance(plain, BertForMaskedLM) and all(p.requires_grad for p in plain.parameters())
    for key, value in _state(plain).items():
        assert torch.equal(value, base_state[key]), key

    merged = EditModel.from_pretrained(plain, tmp_path / "edit").merge_and_unload()
    assert isinstance(merged, BertForMaskedLM) and all(p.requires_grad for p in merged.parameters())
    for key, value in _state(merged).items():
        assert torch.equal(value, edited_state[key]), key


def test_unchanged_tensors_are_not_written(tmp_path):
    edit = get_edit_model(tiny_bert(100, layers=2), BlockSelectorConfig(blocks=["0"]))
    name = next(iter(edit.theta0))
    with torch.no_grad():
        edit.trainable_parameters()[name].add_(1.0)
    edit.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert list(load_file(tmp_path / WEIGHTS_NAME)) == [name]


def test_wrong_base_is_refused_and_left_untouched(tmp_path):
    edit = get_edit_model(tiny_bert(100, layers=2, seed=0), BlockSelectorConfig(blocks=["0"]))
    _perturb(edit)
    edit.save_pretrained(tmp_path)
    other = tiny_bert(100, layers=2, seed=1)
    before = _state(other)
    with pytest.raises(ValueError, match="was made for a different base model"):
        EditModel.from_pretrained(other, tmp_path)
    for key, value in _state(other).items():
        assert torch.equal(value, before[key])
    assert all(p.requires_grad for p in other.parameters())
    # An edit already applied is refused too, and said so: stacking it twice would be wrong.
    applied = EditModel.from_pretrained(tiny_bert(100, layers=2, seed=0), tmp_path).merge_and_unload()
    with pytest.raises(ValueError, match="is already applied to the given model"):
        EditModel.from_pretrained(applied, tmp_path)


def test_other_architecture_is_refused(tmp_path):
    edit = get_edit_model(tiny_bert(100, layers=2), BlockSelectorConfig(blocks=["1"]))
    _perturb(edit)
    edit.save_pretrained(tmp_path)
    from transformers import BertConfig

    wider = BertForMaskedLM(
        BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ValueError, match="the edit was made for another model"):
        EditModel.from_pretrained(wider, tmp_path)


def test_missing_edit_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an edit saved by hf_memedit"):
        EditModel.from_pretrained(tiny_bert(100, layers=2), tmp_path)


def test_at_theta0_puts_the_base_values_in_and_the_edit_back_even_after_an_error():
    base_state = _state(tiny_bert(100, layers=2))
    edit = get_edit_model(tiny_bert(100, layers=2), BlockSelectorConfig(blocks=["1"]))
    _perturb(edit)
    edited_state = _state(edit.model)
    with edit.at_theta0():
        assert all(torch.equal(v, base_state[k]) for k, v in edit.model.state_dict().items())
    assert all(torch.equal(v, edited_state[k]) for k, v in edit.model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"), edit.at_theta0():
        raise RuntimeError("inside")
    assert all(torch.equal(v, edited_state[k]) for k, v in edit.model.state_dict().items())


def test_wrapping_twice_is_refused():
    edit = get_edit_model(tiny_bert(100, layers=2))
    with pytest.raises(ValueError, match="already an EditModel"):
        get_edit_model(edit)


def test_wrapper_forwards_to_the_model():
    model = tiny_bert(100, layers=2)
    edit = get_edit_model(model)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(edit(input_ids=ids).logits, model(input_ids=ids).logits)
    assert edit.selector_config.blocks == [0] and edit.config is model.config and edit.base_model is model.base_model


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_architecture_saves_applies_and_reverts_bit_for_bit(arch, tmp_path):
    """Each family of the block table: a base saved as safetensors and loaded back by its Auto class, an
    edit of one block (ALBERT: its shared layer) saved, applied to that fresh base, reverted and merged."""
    from hf_memedit.architectures import model_kind

    TINY[arch](3, vocab=300).save_pretrained(tmp_path / "base")
    kind = model_kind(TINY[arch](3, vocab=300))

    def fresh():
        return kind.auto_class.from_pretrained(tmp_path / "base")

    base_state = _state(fresh())
    blocks = ["all"] if ARCHITECTURES[arch].shared_blocks else ["1"]
    edit = get_edit_model(fresh(), BlockSelectorConfig(blocks=blocks))
    _perturb(edit)
    edited_state = _state(edit.model)
    assert any(not torch.equal(edited_state[k], base_state[k]) for k in base_state)
    edit.save_pretrained(tmp_path / "edit")

    loaded = EditModel.from_pretrained(fresh(), tmp_path / "edit")
    assert _state(loaded.model).keys() == edited_state.keys()
    assert all(torch.equal(value, edited_state[key]) for key, value in _state(loaded.model).items())
    plain = loaded.unload()
    assert all(torch.equal(value, base_state[key]) for key, value in _state(plain).items())
    merged = EditModel.from_pretrained(plain, tmp_path / "edit").merge_and_unload()
    assert all(torch.equal(value, edited_state[key]) for key, value in _state(merged).items())
