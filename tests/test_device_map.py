"""accelerate's device_map: frozen blocks offloaded (to disk here, as accelerate's own CPU tests do), the
edited block where accelerate put it; the same edit as in memory, and a clear refusal to edit offloaded weights."""

import json

import pytest
import torch
from datasets import Dataset

from hf_memedit import ConstrainedEditTrainer, EditConfig
from hf_memedit.experiments import JobConfig, load_model_and_tokenizer

from .helpers import FACTS, TINY


CAUSAL_FACTS = [f for f in FACTS if not f["text"].startswith("[Y]")]
OFFLOADED = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture
def base(tmp_path, bpe_tokenizer):
    folder = tmp_path / "base"
    TINY["llama"](3, vocab=len(bpe_tokenizer)).double().save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    return folder


def _train(model, tokenizer, out, block="2"):
    args = EditConfig(
        output_dir=str(out),
        edit_blocks=[block],
        norm="linf",
        delta=1e-2,
        max_steps=3,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = ConstrainedEditTrainer(
        model, args, train_dataset=Dataset.from_list(CAUSAL_FACTS), processing_class=tokenizer
    )
    trainer.train()
    return trainer


def test_an_edit_beside_offloaded_blocks_equals_the_edit_in_memory(base, tmp_path):
    job = JobConfig(
        model_name_or_path=str(base), device_map=json.dumps(OFFLOADED), offload_folder=str(tmp_path / "off")
    )
    assert job.device_map == OFFLOADED  # a JSON object on the command line becomes the mapping
    placed, tokenizer = load_model_and_tokenizer(job)
    assert placed.hf_device_map == OFFLOADED
    assert placed.model.layers[0].mlp.down_proj.weight.device.type == "meta"  # its weights live on disk
    plain, _ = load_model_and_tokenizer(JobConfig(model_name_or_path=str(base)))
    spread = _train(placed, tokenizer, tmp_path / "a")
    whole = _train(plain, tokenizer, tmp_path / "b")
    assert spread.prefix_cache is not None and spread.prefix_cache.block == 2  # the offloaded blocks ran once
    changed = spread.edit_model.changed_tensors()
    assert changed and changed.keys() == whole.edit_model.changed_tensors().keys()
    for name, value in changed.items():  # float64, the same operations: reordering at most
        torch.testing.assert_close(value, whole.edit_model.trainable_parameters()[name], rtol=0, atol=1e-9, msg=name)
        gap = (value - spread.edit_model.theta0[name]).abs().max().item()
        assert gap <= 1e-2 + 1e-12


def test_editing_an_offloaded_block_is_refused(base, tmp_path, bpe_tokenizer):
    job = JobConfig(model_name_or_path=str(base), device_map=OFFLOADED, offload_folder=str(tmp_path / "off"))
    model, tokenizer = load_model_and_tokenizer(job)
    with pytest.raises(ValueError, match=r"offloaded by the device_map \(to disk\).*Give the edited blocks a device"):
        _train(model, tokenizer, tmp_path / "out", block="1")


def test_hub_kernels_stay_off_unless_asked(base, monkeypatch):
    """transformers ≥ 5.2x swaps layers for kernels fetched from the Hub on GPUs unless told not to: offline that
    load fails ("not available in the local cache"), online it runs code from the Hub. hf_memedit loads with them
    off, and `use_kernels` turns them on."""
    from transformers import PreTrainedModel

    asked = []
    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", lambda self, use, *a, **k: asked.append(use))
    load_model_and_tokenizer(JobConfig(model_name_or_path=str(base)))
    load_model_and_tokenizer(JobConfig(model_name_or_path=str(base), use_kernels=True))
    assert asked == [False, True]
