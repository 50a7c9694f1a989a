"""Half-precision models: edited in their own dtype, with the L∞ bound exact in it, and no silent no-op edit."""

import logging

import pytest
import torch
from datasets import Dataset

from hf_memedit import ConstrainedEditTrainer, EditConfig
from hf_memedit.experiments import JobConfig, load_model_and_tokenizer
from hf_memedit.projection import frozen_by_resolution, linf_bounds

from .helpers import FACTS, TINY


CAUSAL_FACTS = [f for f in FACTS if not f["text"].startswith("[Y]")]


def _edit(model, tokenizer, out, delta, **kw):
    args = EditConfig(
        output_dir=out,
        edit_blocks=["1"],
        norm="linf",
        delta=delta,
        learning_rate=1e-2,
        max_steps=4,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        **kw,
    )
    return ConstrainedEditTrainer(
        model, args, train_dataset=Dataset.from_list(CAUSAL_FACTS), processing_class=tokenizer
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_edit_keeps_the_bound_in_its_dtype(arch, dtype, tmp_out, bpe_tokenizer):
    model = TINY[arch](2, vocab=len(bpe_tokenizer)).to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _edit(model, bpe_tokenizer, tmp_out, delta=1e-3)
    trainer.train()
    theta0 = trainer.edit_model.theta0
    assert all(t.dtype == dtype for t in theta0.values())  # θ0 is the stored values, bit for bit
    reached = 0.0
    for name, param in model.named_parameters():
        assert param.dtype == dtype
        if name in theta0:
            assert torch.equal(theta0[name], before[name])
            gap = (param.detach().double() - theta0[name].double()).abs().max().item()
            assert gap <= 1e-3, f"{name}: |θ − θ0| = {gap} > δ in {dtype}"
            reached = max(reached, gap)
        else:
            assert torch.equal(param.detach(), before[name]), f"{name} is frozen but changed"
    assert reached > 5e-4  # the edit moved weights up to the box, not a vacuous bound
    plain = trainer.edit_model.unload()
    assert all(torch.equal(p.detach(), before[n]) for n, p in plain.named_parameters())  # revert: exact


def test_bounds_lie_inside_the_box_where_rounding_to_nearest_would_not():
    spread = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.05
    theta0 = torch.cat([torch.tensor([0.0103, -0.7, 1.0, 3e-5]), spread]).to(torch.bfloat16)
    lower, upper = linf_bounds(theta0, 1e-3)
    exact = theta0.double()
    assert ((upper.double() - exact) <= 1e-3).all() and ((exact - lower.double()) <= 1e-3).all()
    nearest = (exact + 1e-3).to(torch.bfloat16)
    assert (nearest.double() - exact > 1e-3).any()  # what a plain θ0 + δ in bfloat16 would allow
    assert upper[0] > theta0[0] and upper[3] > theta0[3]  # small weights still move
    assert upper[2] == theta0[2] == lower[2]  # 1.0: its neighbours in bfloat16 are 2^-7 and 2^-8 away
    assert frozen_by_resolution(theta0[:4], 1e-3) == 2  # 1.0 and -0.7


def test_a_delta_below_the_resolution_is_refused_or_reported(tmp_out, bpe_tokenizer, caplog):
    model = TINY["llama"](2, vocab=len(bpe_tokenizer)).to(torch.bfloat16)
    # RMSNorm weights are all 1.0: no bfloat16 value lies within 1e-3 of them.
    with pytest.raises(
        ValueError, match=r"δ=0.001 is below bfloat16's resolution .* no weight can move.*torch_dtype: float32"
    ):
        _edit(model, bpe_tokenizer, tmp_out, delta=1e-3, edit_modules=["input_layernorm", "post_attention_layernorm"])
    with caplog.at_level(logging.WARNING, logger="hf_memedit.projection"):
        _edit(model, bpe_tokenizer, tmp_out, delta=1e-5, edit_modules=["mlp"])
    assert "δ=1e-05 is below bfloat16's resolution at the magnitude of" in caplog.text and "stay at θ0" in caplog.text


def test_torch_dtype_loads_the_model_in_that_dtype(tmp_path, bpe_tokenizer):
    folder = tmp_path / "base"
    TINY["qwen2"](2, vocab=len(bpe_tokenizer)).to(torch.bfloat16).save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    auto, _ = load_model_and_tokenizer(JobConfig(model_name_or_path=str(folder)))
    assert next(auto.parameters()).dtype == torch.bfloat16  # the checkpoint's own dtype is kept
    wide, _ = load_model_and_tokenizer(JobConfig(model_name_or_path=str(folder), torch_dtype="float32"))
    assert next(wide.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="Unknown torch_dtype 'bf16'"):
        JobConfig(torch_dtype="bf16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_l2_projection_holds_for_the_stored_values(dtype):
    from hf_memedit import project_l2_
    from hf_memedit.projection import l2_distance

    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        theta0 = {f"w{i}": (torch.randn(64, 32, generator=generator) * 0.05).to(dtype) for i in range(3)}
        params = {
            k: (v.float() + torch.randn(v.shape, generator=generator) * 0.01).to(dtype) for k, v in theta0.items()
        }
        project_l2_(params, theta0, 0.05)
        assert l2_distance(params, theta0).item() <= 0.05, (dtype, trial)
        assert l2_distance(params, theta0).item() > 0.049  # rescaled to the sphere, not far inside
