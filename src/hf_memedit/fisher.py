"""The diagonal empirical Fisher information of the trainable parameters (the paper's Appendix C).

Fᵢ = mean over sampled unmodified facts of (∂ log p(object | text) / ∂θᵢ)², at θ0. One backward
pass per fact: the square of a batch's mean gradient is not the mean of squared per-fact
gradients. Dropout is off while it is computed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .architectures import eval_mode, model_kind
from .collators import FactCollator


def diagonal_fisher(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Mapping],
    names: Sequence[str],
    samples: int = 256,
    seed: int = 0,
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """F for the parameters `names`, from at most `samples` facts drawn with `seed`."""
    if len(facts) == 0:
        raise ValueError("The Fisher constraint needs unmodified facts to estimate F, and none were given.")
    chosen = sorted(random.Random(seed).sample(range(len(facts)), min(samples, len(facts))))
    collator = FactCollator(tokenizer, model_kind(model))
    params = dict(model.named_parameters())
    fisher = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in names}
    grad_state = {name: p.requires_grad for name, p in params.items()}
    try:
        with eval_mode(model):
            for name, param in params.items():
                param.requires_grad_(name in fisher)
            device = next(model.parameters()).device
            for index in tqdm(chosen, desc="diagonal Fisher", disable=not show_progress):
                batch = {k: v.to(device) for k, v in collator([facts[index]]).items()}
                model.zero_grad(set_to_none=True)
                # The model's loss is the mean over the object tokens of −log p; times their number it is
                # −log p(object | text), whose gradient the Fisher squares (not 1/n of it, for an n-token object).
                tokens = int((batch["labels"] != -100).sum())
                (model(**batch).loss * tokens).backward()
                for name in fisher:
                    if params[name].grad is not None:
                        fisher[name] += params[name].grad.float().pow(2)
        for name in fisher:
            fisher[name] /= len(chosen)
    finally:
        model.zero_grad(set_to_none=True)
        for name, param in params.items():
            param.requires_grad_(grad_state[name])
    return fisher
