"""Frozen-prefix cache: compute the hidden states entering block n once, then run only blocks ≥ n.

An edit of block 25 of a 30-block model spends 25/30 of every forward on blocks whose weights
never change. When every trainable parameter lies in blocks ≥ n (or in the LM head),
`PrefixCache` stores, per distinct token sequence, the hidden states that enter block n, and
`feeding` runs the model's own forward with blocks 0..n-1 taken out of its block list and those
states handed to block n. The model's forward still builds its attention masks and position
embeddings, so nothing architecture-specific is re-implemented; the cache is keyed by the token
ids, so shuffling, padding and FTA's mixed batches need no bookkeeping, and one cache serves every
point of a sweep that edits the same blocks of the same model.

The frozen blocks run in eval mode when their states are cached: **no dropout below block n**
(an explicit choice: their output is computed once). Training with dropout in the frozen blocks
means turning the cache off (`EditConfig.prefix_cache: false`).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

import psutil
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import BlockLayout, block_list, eval_mode, layout_for, model_kind, table_layout
from ..collators import PRESERVE_KEY, FactCollator
from .heads import head_modules, object_positions_only


logger = logging.getLogger(__name__)

DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MEMORY_SHARE = 0.8  # refuse a cache that would take more than this share of the available memory


class _Captured(Exception):
    """Stops a forward once the input of block n is captured."""


def first_editable_block(model: PreTrainedModel, layout: BlockLayout | None = None) -> int:
    """The n below which nothing trains: 0 when something before the blocks (e.g. the embeddings) trains.

    Trainable parameters outside the blocks are allowed only in the LM head (they run after the
    blocks) when not tied to the embeddings; anything else — embeddings, or parameters the table
    does not place — means 0. `layout`: the edit's (a user's `blocks_path`), else the table's.
    """
    layout = layout or layout_for(model)
    if layout.shared_blocks:
        return 0  # ALBERT: every layer runs the same weights, so nothing below an edited block is frozen
    blocks = block_list(model, layout)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable:
        return 0
    # Head parameters run after the blocks, unless tied to the embeddings (they live in the base model).
    in_base = {id(p) for p in model.base_model.parameters()}
    placed = {id(p) for module in head_modules(model) or [] for p in module.parameters()} - in_base
    first = None
    for index, block in enumerate(blocks):
        ids = {id(p) for p in block.parameters()}
        placed |= ids
        if first is None and ids & trainable:
            first = index
    if trainable - placed:
        return 0
    return first if first is not None else len(blocks) - 1


def unsafe_reason(model: PreTrainedModel, block: int) -> str | None:
    """Why the model's forward, with blocks 0..block-1 taken out of its list, would not compute what the
    full forward computes from block `block` on (the table's `positional_config` / `prefix_breakers`),
    or None when it would."""
    layout = table_layout(model)
    if layout is None:
        return None
    config = model.config
    for name in layout.prefix_breakers:
        if getattr(config, name, None):
            return (
                f"its forward mixes states across blocks outside them when {name} is set ({getattr(config, name)!r})"
            )
    for name in layout.positional_config:
        values = list(getattr(config, name, None) or [])
        if values and values[block:] != values[: len(values) - block]:
            return (
                f"its forward reads config.{name} by block index, and {name} does not repeat from block {block} "
                f"({values[block:]} after the cut, {values[: len(values) - block]} before)"
            )
    return None


@functools.cache
def _say_once(message: str) -> None:
    logger.warning(message)


class PrefixCache:
    """Hidden states entering block `block` of `model`, per token sequence, stored on the CPU.

    Args:
        model: the transformers LM; its embeddings and blocks below `block` must stay frozen and
            unchanged while the cache is used (checked on every use).
        block: n ≥ 1, the first block that runs.
        dtype: storage dtype ('auto': the model's; 'float16'/'bfloat16' halve the memory, at that
            precision's rounding of the cached states).
    """

    def __init__(self, model: PreTrainedModel, block: int, dtype: str = "auto", layout: BlockLayout | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"Unknown prefix cache dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
        self.blocks = block_list(model, layout or layout_for(model))
        if not 1 <= block < len(self.blocks):
            raise ValueError(f"The prefix cache needs a block in [1, {len(self.blocks)}); got {block}.")
        reason = unsafe_reason(model, block)
        if reason is not None:
            raise ValueError(f"No prefix cache for {type(model).__name__}: {reason}. Set prefix_cache: false.")
        self.model = model
        self.block = block
        self.dtype = DTYPES[dtype] or next(model.parameters()).dtype
        self.kind = model_kind(model)
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.batch_size = 64  # of the prefix forward passes; add_facts sets it
        # The frozen prefix: every base-model parameter outside blocks ≥ n (tied embeddings included).
        kept = {id(p) for b in list(self.blocks)[block:] for p in b.parameters()}
        self._prefix_params = [p for p in model.base_model.parameters() if id(p) not in kept]
        self._signature = self._prefix_signature()

    @classmethod
    def for_model(
        cls, model: PreTrainedModel, dtype: str = "auto", layout: BlockLayout | None = None
    ) -> PrefixCache | None:
        """A cache for the model's current trainable set, or None when nothing below the edit is frozen."""
        block = first_editable_block(model, layout)
        if block < 1:
            return None
        reason = unsafe_reason(model, block)
        if reason is not None:
            _say_once(
                f"{type(model).__name__} runs without the prefix cache "
                f"(the straightforward loop, same results): {reason}."
            )
            return None
        return cls(model, block, dtype, layout)

    def _prefix_signature(self) -> list[tuple[int, int]]:
        return [(p.data_ptr(), p._version) for p in self._prefix_params]

    def check_unchanged(self) -> None:
        if any(p.requires_grad for p in self._prefix_params):
            raise ValueError(
                f"The prefix cache holds the inputs of block {self.block}, but a parameter below it now trains: "
                "build a new cache for this selection (or set prefix_cache: false)."
            )
        if self._prefix_signature() != self._signature:
            # Written to since the states were computed (e.g. DDP's start-up broadcast from rank 0, or
            # a resumed run loading its checkpoint): they are derived data, so compute them again.
            logger.info("The weights below block %d changed: the prefix cache is refilled.", self.block)
            keys = list(self.states)
            self.states.clear()
            self._signature = self._prefix_signature()
            self._fill(keys)

    def estimate_bytes(self, tokens: int) -> int:
        """Bytes the states of `tokens` tokens take in the cache."""
        hidden = self.model.config.hidden_size
        return tokens * hidden * torch.empty((), dtype=self.dtype).element_size()

    def add_facts(
        self,
        tokenizer: PreTrainedTokenizerBase,
        facts: Iterable[Mapping],
        batch_size: int = 64,
        show_progress: bool = False,
        object_key: str = "object",
        collator: FactCollator | None = None,
    ) -> None:
        """Compute the states of every fact (or FTA group) not cached yet, in batches, after a memory check.

        `collator`: the one training encodes with (its EOS or target suffix make the sequences trained)."""
        collator = collator or FactCollator(tokenizer, self.kind)
        sequences: dict[tuple[int, ...], None] = {}
        for fact in facts:
            texts, objects = fact["text"], fact[object_key]
            flags = fact.get(PRESERVE_KEY) if isinstance(texts, list) else None
            if not isinstance(texts, list):  # an FTA row is a group of facts
                texts, objects = [texts], [objects]
            for text, obj, kept in zip(texts, objects, flags or [False] * len(texts)):
                row = {collator.text_key: text, collator.object_key: obj}
                key = tuple(collator.encode(row, kept)["input_ids"])
                if key not in self.states:
                    sequences[key] = None
        missing = list(sequences)
        if not missing:
            return
        need = self.estimate_bytes(sum(len(s) for s in missing))
        available = psutil.virtual_memory().available
        logger.info("Prefix cache: %d sequences, %.1f MiB of block-%d inputs.", len(missing), need / 2**20, self.block)
        if need > MEMORY_SHARE * available:
            raise MemoryError(
                f"The prefix cache for {len(missing)} facts needs {need / 2**30:.2f} GiB but only "
                f"{available / 2**30:.2f} GiB of memory is available: set prefix_cache_dtype float16 (half the size), "
                "evaluate fewer unmodified facts (max_unmodified_eval), or set prefix_cache: false."
            )
        self.batch_size = batch_size
        self._fill(missing, show_progress)

    def _fill(self, keys: list[tuple[int, ...]], show_progress: bool = False) -> None:
        """Compute these sequences' states in a canonical order and batching (sorted, `batch_size`
        at a time), so a set of facts gets bit-identical states however it reaches the cache —
        up front, from a training batch, or refilled on a resumed run."""
        ordered = sorted(set(keys), key=lambda key: (len(key), key))
        steps = range(0, len(ordered), self.batch_size)
        for start in tqdm(steps, desc=f"caching block-{self.block} inputs", disable=not show_progress):
            chunk = ordered[start : start + self.batch_size]
            width = max(len(s) for s in chunk)
            input_ids = torch.tensor([list(s) + [0] * (width - len(s)) for s in chunk])  # padding is masked out
            attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
            self._compute(input_ids, attention_mask)

    @torch.no_grad()
    def _compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Run the model up to block n (eval mode, no dropout) and store each row's states."""
        captured: list[torch.Tensor] = []

        def capture(module, args):
            captured.append(args[0])
            raise _Captured

        device = next(self.model.parameters()).device
        handle = self.blocks[self.block].register_forward_pre_hook(capture)
        try:
            with eval_mode(self.model):
                self.model.base_model(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    **self.kind.forward_kwargs,
                )
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"{type(self.model).__name__}'s forward never reached block {self.block}.")
        hidden = captured[0].to("cpu", self.dtype)
        for i, length in enumerate(attention_mask.sum(1).tolist()):
            self.states[tuple(input_ids[i, :length].tolist())] = hidden[i, :length].clone()

    def batch_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, length, hidden] block-n inputs of a right-padded batch (computed now where missing)."""
        lengths = attention_mask.sum(1).tolist()
        keys = [tuple(row[:length].tolist()) for row, length in zip(input_ids.cpu(), lengths)]
        missing = [key for key in keys if key not in self.states]
        if missing:
            self._fill(missing)
        first = self.states[keys[0]]
        out = torch.zeros(len(keys), input_ids.shape[1], first.shape[-1], dtype=first.dtype)
        for i, key in enumerate(keys):
            out[i, : len(key)] = self.states[key]
        return out

    @contextmanager
    def feeding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[None]:
        """Inside: the model's forward on this batch runs blocks ≥ n only, from the cached states.

        Fails when a parameter below block n trains; refills the cache when one was written to.
        """
        self.check_unchanged()
        if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError(
                "The prefix cache needs right-padded batches (hf_memedit's FactCollator pads on the right)."
            )
        parameter = next(self.model.parameters())
        states = self.batch_states(input_ids, attention_mask).to(parameter.device, parameter.dtype)

        def feed(module, args):
            if args[0].shape != states.shape:
                raise RuntimeError(
                    f"Block {self.block} received hidden states of shape {tuple(args[0].shape)}, the cache has "
                    f"{tuple(states.shape)}: this model's forward does not match hf_memedit's block table."
                )
            return (states,) + tuple(args[1:])

        saved = self.blocks._modules
        self.blocks._modules = OrderedDict((str(i), m) for i, m in enumerate(list(saved.values())[self.block :]))
        handle = saved[str(self.block)].register_forward_pre_hook(feed)
        try:
            yield
        finally:
            handle.remove()
            self.blocks._modules = saved

    def __len__(self) -> int:
        return len(self.states)


@contextmanager
def fast_forward(
    model: PreTrainedModel,
    prefix: PrefixCache | None,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    positions: torch.Tensor | None,
) -> Iterator[None]:
    """Inside: the model's forward on this batch runs from `prefix` (when given) and returns logits
    only at `positions` (when given) — the two fast paths, as training and evaluation use them."""
    with ExitStack() as stack:
        if prefix is not None:
            stack.enter_context(prefix.feeding(input_ids, attention_mask))
        if positions is not None:
            stack.enter_context(object_positions_only(model, positions))
        yield
