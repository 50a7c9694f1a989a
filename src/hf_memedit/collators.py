"""Turn facts ("text with a [Y] placeholder", "object") into model inputs with object-only labels.

Masked LM: the object's tokens become as many mask tokens, labelled with the object's ids.
Causal LM: the text is cut before the object; the object's tokens are appended and labelled, so
each object token is scored at its own position (teacher forcing), not all at the last prompt
token (rome#41, EasyEdit#173).

The object's tokens are found through the tokenizer's character offsets on the text with the
object written in, so they are the tokens the model sees in context (" Paris" for BPE models).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from .architectures import ModelKind


logger = logging.getLogger(__name__)

PLACEHOLDER = "[Y]"
KINDS = tuple(kind.value for kind in ModelKind)
WEIGHT_KEY = "weight"  # in a group of facts (a list per key): each fact's loss weight
WEIGHTS_INPUT = "object_weights"  # the batch's per-row loss weights, when a group carries them
PRESERVE_KEY = "preserve"  # in a group: whether each fact is preservation data (not an edit)
PRESERVE_INPUT = "preserve_rows"  # the batch's per-row preservation flags, when a group carries them


class FactEncodingError(ValueError):
    """A fact that cannot become a training or evaluation example."""


def _object_span_text(text: str, obj: str, placeholder: str, kind: ModelKind) -> tuple[str, int, int]:
    """The text with the object written in, and the object's character span in it."""
    if placeholder not in text:
        raise FactEncodingError(f"text {text!r} has no placeholder {placeholder!r} where the object goes")
    if text.count(placeholder) > 1:
        raise FactEncodingError(f"text {text!r} has more than one placeholder {placeholder!r}")
    if not obj or not obj.strip():
        raise FactEncodingError(f"the object of {text!r} is empty")
    prefix, suffix = text.split(placeholder)
    return kind.write_object(prefix, obj, suffix)


@dataclass
class FactEncoder:
    """Encodes one fact for a masked or causal LM; raises `FactEncodingError` naming the fact."""

    tokenizer: PreTrainedTokenizerBase
    kind: ModelKind | str
    placeholder: str = PLACEHOLDER
    max_length: int | None = None
    append_eos: bool = False  # causal: the EOS token follows the object and is labelled (LocFT-BF's targets)
    _problems: dict[tuple[str, str], str | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown model kind {self.kind!r}: choose one of {', '.join(KINDS)}.")
        self.kind = ModelKind(self.kind)
        problem = self.kind.tokenizer_problem(self.tokenizer, self.append_eos)
        if problem:
            raise ValueError(problem)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(self.tokenizer).__name__} gives no character offsets; load a fast tokenizer "
                "(AutoTokenizer.from_pretrained(..., use_fast=True))."
            )

    def encode(self, text: str, obj: str) -> dict[str, list[int]]:
        full, start, end = _object_span_text(text, obj, self.placeholder, self.kind)
        encoding = self.tokenizer(full, return_offsets_mapping=True, add_special_tokens=True)
        ids = list(encoding["input_ids"])
        positions = [i for i, (s, e) in enumerate(encoding["offset_mapping"]) if e > s and s < end and e > start]
        if not positions:
            raise FactEncodingError(f"the object {obj!r} of {text!r} tokenizes to nothing")
        object_ids = [ids[i] for i in positions]
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in object_ids:
            raise FactEncodingError(
                f"the tokenizer cannot encode the object {obj!r} of {text!r} (it maps to {self.tokenizer.unk_token})"
            )
        if positions[0] < self.kind.logit_shift:
            raise FactEncodingError(
                f"the object {obj!r} of {text!r} is the first token and the tokenizer adds no BOS token, "
                "so a causal LM has nothing to predict it from. Use a phrasing with the object last."
            )
        ids, labels = self.kind.model_inputs(ids, positions, self.tokenizer, self.append_eos)
        if self.max_length is not None and len(ids) > self.max_length:
            raise FactEncodingError(f"{text!r} is {len(ids)} tokens long, more than max_length={self.max_length}")
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def problem(self, text: str, obj: str) -> str | None:
        """Why the fact cannot be encoded, or None. Remembered: a benchmark asks it of each phrasing more than once
        (before drawing the facts to modify, then of the splits)."""
        key = (text, obj)
        if key not in self._problems:
            try:
                self.encode(text, obj)
            except FactEncodingError as error:
                self._problems[key] = str(error)
            else:
                self._problems[key] = None
        return self._problems[key]


def filter_encodable(
    facts: Iterable[Mapping], encoder: FactEncoder, text_key: str = "text", object_key: str = "object"
) -> tuple[list[Mapping], list[tuple[int, str]]]:
    """Keep the facts `encoder` can encode; return them and (index, reason) for each one dropped."""
    kept, dropped = [], []
    for index, fact in enumerate(facts):
        problem = encoder.problem(fact[text_key], fact[object_key])
        if problem is None:
            kept.append(fact)
        else:
            dropped.append((index, problem))
    if dropped:
        logger.warning(
            "Skipped %d of %d facts that cannot be encoded; first: %s",
            len(dropped),
            len(dropped) + len(kept),
            dropped[0][1],
        )
    return kept, dropped


@dataclass
class FactCollator:
    """Collates raw facts into a padded batch (input_ids, attention_mask, labels = -100 but on objects).

    Always pads on the right, whatever the tokenizer's `padding_side`: a causal LM given no
    position ids numbers positions from the first token, so left padding would shift every
    position of the shorter facts (and change their predictions). A tokenizer without a pad token
    pads with EOS (the attention mask hides it).
    """

    tokenizer: PreTrainedTokenizerBase
    kind: ModelKind | str
    placeholder: str = PLACEHOLDER
    text_key: str = "text"
    object_key: str = "object"
    max_length: int | None = None
    append_eos: bool = False
    target_suffix: str = ""  # causal: text after every edit row's object, labelled with it (not preservation rows)

    def __post_init__(self):
        self.encoder = FactEncoder(self.tokenizer, self.kind, self.placeholder, self.max_length, self.append_eos)
        self._unsuffixed: set[str] = set()  # objects the suffix would change (warned once each)
        if self.target_suffix and not ModelKind(self.kind).generates:
            raise ValueError(
                "target_suffix teaches a causal LM where its answer ends: a masked LM has no such end (leave "
                "target_suffix out)."
            )
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def encode(self, fact: Mapping, preserve: bool = False) -> dict[str, list[int]]:
        """One fact's ids and labels; an edit row (not `preserve`) with its object followed by `target_suffix`,
        unless the tokenizer writes the two together as other tokens than the object's own (or cannot encode them):
        that row trains its object alone, as it is scored."""
        for key in (self.text_key, self.object_key):
            if key not in fact:
                raise FactEncodingError(f"fact {dict(fact)!r} has no {key!r} field")
        text, obj = fact[self.text_key], fact[self.object_key]
        plain = self.encoder.encode(text, obj)
        if preserve or not self.target_suffix:
            return plain
        end = len(plain["input_ids"]) - self.append_eos  # the object's last token (EOS follows it in both)
        try:
            suffixed = self.encoder.encode(text, obj + self.target_suffix)
            problem = None if suffixed["input_ids"][:end] == plain["input_ids"][:end] else "changes its tokens"
        except FactEncodingError as error:
            problem = f"cannot be encoded with it ({error})"
        if problem is None:
            return suffixed
        if obj not in self._unsuffixed:
            self._unsuffixed.add(obj)
            logger.warning(
                "target_suffix %r is not added after %r: the object followed by it %s, so that row trains the "
                "object alone, as scoring asks for it.",
                self.target_suffix,
                obj,
                problem,
            )
        return plain

    def __call__(self, facts: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        # A row whose text and object are lists is a group of facts that must share a batch (FTA,
        # preservation); its optional `weight` list becomes the batch's `object_weights`.
        flat: list[Mapping] = []
        weights: list[float] = []
        preserve: list[bool] = []
        for fact in facts:
            if isinstance(fact.get(self.text_key), list):
                flat += [
                    {self.text_key: t, self.object_key: o} for t, o in zip(fact[self.text_key], fact[self.object_key])
                ]
                weights += list(fact.get(WEIGHT_KEY) or [1.0] * len(fact[self.text_key]))
                preserve += list(fact.get(PRESERVE_KEY) or [False] * len(fact[self.text_key]))
            else:
                flat.append(fact)
                weights.append(1.0)
                preserve.append(False)
        facts = flat
        encoded = [self.encode(fact, kept) for fact, kept in zip(facts, preserve)]
        width = max(len(item["input_ids"]) for item in encoded)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for item in encoded:
            gap = width - len(item["input_ids"])
            for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", -100)):
                batch[key].append(item[key] + [fill] * gap)
        out = {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}
        if any(weight != 1.0 for weight in weights):
            out[WEIGHTS_INPUT] = torch.tensor(weights, dtype=torch.float32)
        if any(preserve):
            out[PRESERVE_INPUT] = torch.tensor(preserve, dtype=torch.bool)
        return out
