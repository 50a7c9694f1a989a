"""Object-position-only logits: run the LM head only where a loss or a prediction needs it.

A fact of 12 tokens needs logits at 1–3 positions, and the LM head of a 50k-vocabulary model is
the largest single matmul of the forward. `object_positions_only` makes the model's own forward
return logits `[n_positions, vocab]` instead of `[batch, length, vocab]`, through a forward
pre-hook on the first head module of the block table: the hook lives on the module, so the same
code path works under DDP's wrapped forward, in training and in evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from .architectures import ARCHITECTURES


def head_modules(model: PreTrainedModel) -> list[nn.Module] | None:
    """The modules mapping the base model's last hidden state to logits, in order, or None when unknown."""
    layout = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    if layout is None or not layout.head:
        return None
    return [model.get_submodule(path) for path in layout.head]


def logit_positions(labels: torch.Tensor, kind: str) -> torch.Tensor:
    """[batch, length] bool: the positions whose logits score an object token.

    Masked LM: the masks themselves. Causal LM: the position before each object token (the
    logit at i predicts token i + 1).
    """
    needed = labels != -100
    if kind == "causal":
        needed = torch.cat([needed[:, 1:], torch.zeros_like(needed[:, :1])], dim=1)
    return needed


def object_targets(labels: torch.Tensor, kind: str) -> torch.Tensor:
    """The object token ids in the order `object_positions_only` returns their logits (row-major)."""
    if kind == "causal":
        labels = labels[:, 1:]
    return labels[labels != -100]


@contextmanager
def object_positions_only(model: PreTrainedModel, positions: torch.Tensor) -> Iterator[None]:
    """Inside: `model(...)` returns logits only at `positions` ([batch, length] bool), as `[n, vocab]`."""
    heads = head_modules(model)
    if heads is None:
        raise ValueError(
            f"hf_memedit does not know the LM head of {type(model).__name__}: object-position-only logits "
            "need the architecture in the block table (hf_memedit.architectures)."
        )

    def select(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != positions.shape:
            raise RuntimeError(
                f"The LM head received hidden states of shape {tuple(hidden.shape)}, but the object positions "
                f"are {tuple(positions.shape)}: this model's forward does not match hf_memedit's head table."
            )
        return (hidden[positions.to(hidden.device)],) + tuple(args[1:])

    handle = heads[0].register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()
