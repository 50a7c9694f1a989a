"""Object-position-only logits: run the LM head only where a loss or a prediction needs it.

A fact of 12 tokens needs logits at 1–3 positions, and the LM head of a 50k-vocabulary model is
the largest single matmul of the forward. `object_positions_only` makes the model's own forward
return logits `[n_positions, vocab]` instead of `[batch, length, vocab]`, through a forward
pre-hook on the first head module of the block table: the hook lives on the module, so the same
code path works under DDP's wrapped forward, in training and in evaluation.

The same reasoning reaches into the last block: the head reads its output only at those
positions, and everything in it but attention's mixing works position by position — the query
projection, the attention's output projection, the feed-forward — so those run on those rows
only (`_RowStage`). The keys and values stay whole: attention reads them at every position.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from ..architectures import ModelKind, block_list, table_layout


def head_modules(model: PreTrainedModel) -> list[nn.Module] | None:
    """The modules mapping the base model's last hidden state to logits, in order, or None when unknown
    (also where a configuration builds another head than the table's, e.g. DeBERTa-v2 with legacy=False)."""
    layout = table_layout(model)
    if layout is None or not layout.head:
        return None
    try:
        return [model.get_submodule(path) for path in layout.head]
    except AttributeError:
        return None


def logit_positions(labels: torch.Tensor, kind: str) -> torch.Tensor:
    """[batch, length] bool: the positions whose logits score an object token.

    Masked LM: the masks themselves. Causal LM: the position before each object token (the
    logit at i predicts token i + 1).
    """
    needed = labels != -100
    shift = ModelKind(kind).logit_shift
    return torch.cat([needed[:, shift:], torch.zeros_like(needed[:, :shift])], dim=1) if shift else needed


def object_targets(labels: torch.Tensor, kind: str) -> torch.Tensor:
    """The object token ids in the order `object_positions_only` returns their logits (row-major)."""
    labels = labels[:, ModelKind(kind).logit_shift :]
    return labels[labels != -100]


class _RowStage:
    """Runs one row-wise stage of the last block (`BlockLayout.row_wise`) on the rows at `positions` only.

    Every argument of the stage's modules shaped like the hidden states is cut to those rows (as
    one `[1, n, hidden]` sequence); the last module's output is scattered back into zeros. What the
    stage computes is then right at `positions` — the only rows the head reads — and not elsewhere.
    A call on other shapes (e.g. a feed-forward chunked along the sequence) runs unchanged.
    """

    def __init__(self, modules: list[nn.Module], positions: torch.Tensor):
        self.positions = positions
        self.active = False
        first, last = modules[0], modules[-1]
        self.handles = [first.register_forward_pre_hook(self.gather_input)]
        if last is not first:
            self.handles.append(last.register_forward_pre_hook(self.gather_rest))
        self.handles.append(last.register_forward_hook(self.scatter))

    def rows(self, tensor):
        return tensor[self.positions.to(tensor.device)].unsqueeze(0)

    def fits(self, value) -> bool:
        return isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[:2] == self.positions.shape

    def gather_input(self, module, args):
        self.active = bool(args) and self.fits(args[0])
        return self.gather_rest(module, args)

    def gather_rest(self, module, args):
        if self.active:
            return tuple(self.rows(arg) if self.fits(arg) else arg for arg in args)

    def scatter(self, module, args, output):
        if not self.active:
            return None
        self.active = False
        full = output.new_zeros(*self.positions.shape, output.shape[-1])
        full[self.positions.to(output.device)] = output[0]
        return full

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _last_block_stages(model: PreTrainedModel) -> list[list[nn.Module]]:
    """The last block's row-wise stages, or none where its output feeds more than the head
    (shared blocks: ALBERT runs the same module at every layer)."""
    layout = table_layout(model)
    if layout is None or layout.shared_blocks:
        return []
    last = block_list(model, layout)[-1]
    return [[last.get_submodule(path) for path in stage] for stage in layout.row_wise]


@contextmanager
def object_positions_only(model: PreTrainedModel, positions: torch.Tensor) -> Iterator[None]:
    """Inside: `model(...)` returns logits only at `positions` ([batch, length] bool), as `[n, vocab]`.

    The last block's row-wise stages (its query and attention-output projections and its
    feed-forward) then run at `positions` only, so the model's hidden states after it are valid
    only there: take nothing but the logits from such a forward.
    """
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
    stages = [_RowStage(modules, positions) for modules in _last_block_stages(model)]
    try:
        yield
    finally:
        handle.remove()
        for stage in stages:
            stage.remove()
