"""The edit's loss: cross-entropy on the object tokens, per-row weights, and KL(θ0 ‖ θ) on preservation rows.

`ObjectTokenLoss` is a pure function of one batch: every per-batch input (row weights, which rows are scored by KL,
θ0's distributions on them) is an argument. `Theta0References` keeps θ0's distributions per preservation row, so
that each is computed once however often its row recurs in the batches.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from transformers.loss.loss_utils import fixed_cross_entropy

from .fast_paths.heads import logit_positions, object_targets


class ObjectTokenLoss:
    """Cross-entropy summed over the object tokens / `num_items_in_batch` (transformers' `fixed_cross_entropy`).

    Full logits (`[batch, length, vocab]`) are cut to the object positions first, so both fast and
    straightforward forwards reduce the same `[n, vocab]` rows in the same order. Half-precision
    logits are upcast to float32 as transformers' LM losses do; float64 logits keep their precision
    (transformers' losses would round them to float32). With `row_weights` each row's tokens count with its
    weight: Σ w·CE / num_items. `reduction` 'sequence' is LocFT-BF's loss instead: the (weighted) mean over facts of
    each fact's mean token loss, a per-batch mean (the trainer has `Trainer` divide it by the micro-batches each
    step accumulates). With `kl_rows` those rows' tokens contribute KL(θ0 ‖ θ) against `reference`, θ0's
    log-probabilities at exactly those rows' object positions (in batch order), instead of CE.
    """

    def __init__(self, kind: str, reduction: str = "token"):
        self.kind, self.reduction = kind, reduction

    def __call__(
        self,
        outputs,
        labels: torch.Tensor,
        num_items_in_batch=None,
        *,
        row_weights: torch.Tensor | None = None,
        kl_rows: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = outputs["logits"]
        positions = logit_positions(labels, self.kind).to(logits.device)
        if logits.dim() == 3:
            logits = logits[positions]
        if logits.dtype != torch.float64:
            logits = logits.float()
        targets = object_targets(labels, self.kind).to(logits.device)
        if row_weights is None and self.reduction == "token" and kl_rows is None:
            return fixed_cross_entropy(logits, targets, num_items_in_batch=num_items_in_batch)
        rows = positions.nonzero()[:, 0]
        weights = (
            torch.ones(len(positions), dtype=logits.dtype, device=logits.device)
            if row_weights is None
            else (row_weights.to(device=logits.device, dtype=logits.dtype))
        )
        per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        if kl_rows is not None:
            at = kl_rows.to(logits.device)[rows].nonzero()[:, 0]
            if reference is None or len(reference) != len(at):
                raise ValueError(
                    f"KL rows need θ0's log-probabilities at their {len(at)} object positions, got "
                    f"{None if reference is None else len(reference)}."
                )
            target = reference.to(device=logits.device, dtype=logits.dtype)
            kl = (target.exp() * (target - logits[at].log_softmax(-1))).sum(-1)
            per_token = per_token.index_put((at,), kl)
        if self.reduction == "sequence":  # each fact's mean token loss, averaged over the batch's facts
            sums = torch.zeros(len(positions), dtype=per_token.dtype, device=per_token.device).index_add_(
                0, rows, per_token
            )
            counts = positions.sum(1).to(per_token.dtype)
            present = counts > 0
            means = sums[present] / counts[present]
            return (means * weights[present]).sum() / weights[present].sum()
        total = (per_token * weights[rows]).sum()
        count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
        if torch.is_tensor(count):
            count = count.to(total.device)
        return total / count


class Theta0References:
    """θ0's log-probabilities at each preservation row's object positions, kept per row (by its tokens and object
    positions, which is all the distribution depends on), least recently used first out past `max_bytes`."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._values: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def key(input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> tuple:
        """A row's identity: its tokens (padding left out) and its object positions."""
        length = int(attention_mask.sum())
        return tuple(input_ids[:length].tolist()), tuple(positions.nonzero()[:, 0].tolist())

    def __contains__(self, key: tuple) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def add(self, key: tuple, value: torch.Tensor) -> None:
        value = value.detach().cpu()
        self._values[key] = value
        self._bytes += value.numel() * value.element_size()
        while self._bytes > self.max_bytes and len(self._values) > 1:
            _, dropped = self._values.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()

    def gather(self, keys: list[tuple]) -> torch.Tensor:
        """The rows' references, concatenated in the order given."""
        for key in keys:
            self._values.move_to_end(key)
        return torch.cat([self._values[key] for key in keys])
