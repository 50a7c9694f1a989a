"""Which facts a model gets right: every object token must be the argmax at its position.

One batched, teacher-forced forward pass per batch of facts, for both model kinds, with the LM
head run only at the positions that predict object tokens (for the architectures in the block
table; others, or `full_logits=True`, compute logits everywhere):

- masked LM: the object's tokens are masked; each mask must predict its token (the paper);
- causal LM: the argmax at the position before each object token must be that token. When every
  earlier object token is right, the prefix fed in is exactly what greedy decoding would have
  generated, so "all object tokens right" is greedy exact match — without running `generate`.

Optionally the argmax runs over a candidate vocabulary instead of the full one (as LAMA does).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import eval_mode, model_kind
from ..collators import PLACEHOLDER, FactCollator
from ..fast_paths.heads import head_modules, logit_positions, object_targets
from ..fast_paths.prefix import PrefixCache, fast_forward


@dataclass
class FactResults:
    """Per-fact outcome of `evaluate_facts`, in the order the facts were given.

    `predicted` holds the argmax ids at the object positions (teacher-forced for causal LMs): two
    evaluations agree on a fact when these are equal. `margins` holds, per fact, the smallest gap over
    its object tokens between the object token's logit and the best other one (in the candidates, when
    given): how firmly the model predicts the fact, negative where it is wrong. Empty where not scored
    by logits (kNN-LM). Two results are equal when their outcomes are: margins are floats, which the fast
    paths reproduce only within rounding, so they are compared apart.
    """

    correct: list[bool]
    predicted: list[list[int]]
    margins: list[float] = field(default_factory=list, compare=False)

    def __len__(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def candidate_vocabulary(tokenizer: PreTrainedTokenizerBase, objects: Iterable[str]) -> list[int]:
    """The sorted token ids the given objects are written with: a LAMA-style restricted vocabulary."""
    ids: set[int] = set()
    for obj in objects:
        ids.update(tokenizer(obj, add_special_tokens=False)["input_ids"])
        ids.update(tokenizer(" " + obj, add_special_tokens=False)["input_ids"])  # BPE: the in-context form
    return sorted(ids)


@torch.no_grad()
def evaluate_facts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Iterable[Mapping],
    batch_size: int = 64,
    candidates: Sequence[int] | None = None,
    show_progress: bool = False,
    text_key: str = "text",
    object_key: str = "object",
    full_logits: bool = False,
    prefix: PrefixCache | None = None,
) -> FactResults:
    """Whether `model` predicts each fact's object, and what it predicts.

    Args:
        facts: rows with a `text` holding the `[Y]` placeholder and an `object` (a benchmark split,
            a `datasets.Dataset`, or a list of dicts).
        candidates: token ids to take the argmax over (default: the full vocabulary).
        full_logits: compute the LM head at every position (the straightforward way, for comparison).
        prefix: a `PrefixCache` of the model's frozen blocks: only the blocks above it run.
    Facts run in batches sorted by length (less padding); results come back in the input order.
    """
    facts = list(facts)
    allowed = _candidate_tensor(candidates, model, next(model.parameters()).device)
    correct: list[bool] = [False] * len(facts)
    predicted: list[list[int]] = [[] for _ in facts]
    margins: list[float] = [0.0] * len(facts)
    for fact_index, logits, wanted in object_logits(
        model, tokenizer, facts, batch_size, show_progress, text_key, object_key, full_logits, prefix
    ):
        scores = logits if logits.dtype == torch.float64 else logits.float()
        if allowed is not None:  # tokens outside the candidates can be neither predicted nor a rival
            scores = torch.full_like(scores, -torch.inf).index_copy_(1, allowed, scores[:, allowed])
        ids = scores.argmax(-1)
        correct[fact_index] = bool(torch.equal(ids, wanted))
        predicted[fact_index] = ids.tolist()
        rivals = scores.scatter(1, wanted[:, None], -torch.inf).amax(-1)
        margins[fact_index] = (scores.gather(1, wanted[:, None]).squeeze(1) - rivals).min().item()
    return FactResults(correct, predicted, margins)


@torch.no_grad()
def object_log_probs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Iterable[Mapping],
    batch_size: int = 64,
    object_key: str = "object",
) -> list[float]:
    """Each fact's log p(object | text), teacher-forced: the sum over the object's tokens of their log-probabilities
    (a causal LM: each given the ones before it; a masked LM: at its masks). CounterFact's efficacy score compares
    these for the new and the old object (`evaluation.metrics.preference_metrics`)."""
    facts = list(facts)
    found = [0.0] * len(facts)
    for index, logits, wanted in object_logits(model, tokenizer, facts, batch_size, object_key=object_key):
        found[index] = float(logits.double().log_softmax(-1).gather(1, wanted[:, None]).sum())
    return found


@torch.no_grad()
def object_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Mapping],
    batch_size: int = 64,
    show_progress: bool = False,
    text_key: str = "text",
    object_key: str = "object",
    full_logits: bool = False,
    prefix: PrefixCache | None = None,
    desc: str = "evaluating facts",
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(fact index, logits `[object tokens, vocab]`, object token ids) for every fact, teacher-forced.

    The one forward loop of scoring: facts run in batches sorted by length (less padding), with the
    LM head only at the object positions where the block table knows the head.
    """
    if not facts:
        raise ValueError("No facts to evaluate: the split is empty. Check the benchmark split or its filter.")
    kind = model_kind(model)
    collator = FactCollator(tokenizer, kind, text_key=text_key, object_key=object_key)
    device = next(model.parameters()).device
    object_only = not full_logits and head_modules(model) is not None
    order = sorted(range(len(facts)), key=lambda i: len(facts[i][text_key]))
    with eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress):
            index = order[start : start + batch_size]
            batch = collator([facts[i] for i in index])
            labels = batch.pop("labels").to(device)
            inputs = {k: v.to(device) for k, v in batch.items()}
            mask = logit_positions(labels, kind)  # causal: the logit at position i predicts token i + 1
            targets = object_targets(labels, kind)
            with fast_forward(
                model, prefix, inputs["input_ids"], inputs["attention_mask"], mask if object_only else None
            ):
                logits = model(**inputs, **kind.forward_kwargs).logits
            if not object_only:
                logits = logits[mask]
            counts = mask.sum(1).tolist()
            yield from zip(index, logits.split(counts), targets.split(counts))


def _candidate_tensor(candidates: Sequence[int] | None, model: PreTrainedModel, device) -> torch.Tensor | None:
    if candidates is None:
        return None
    ids = sorted({int(i) for i in candidates})
    vocab = model.get_output_embeddings().weight.shape[0]
    if not ids:
        raise ValueError("The candidate vocabulary is empty: pass None for the full vocabulary.")
    if ids[0] < 0 or ids[-1] >= vocab:
        raise ValueError(f"Candidate token ids must lie in [0, {vocab}); got {ids[0]}..{ids[-1]}.")
    return torch.tensor(ids, device=device)


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _answer_span(generated: str, obj: str) -> str:
    """The answer in a continuation: up to the first newline, and the first period unless the object has one."""
    answer = generated.split("\n", 1)[0]
    if "." not in obj:
        answer = answer.split(".", 1)[0]
    return answer


def answer_matches(answer: str, obj: str, comma: bool = False) -> bool:
    """Whether a generated answer (`generate_answers`) is the object, after SQuAD's normalisation; with `comma`, the
    answer cut at its first comma first, unless the object has one (`COMMA_STOP_RULE`: "Vanuatu, and it's a city"
    is "Vanuatu")."""
    if comma and "," not in obj:
        answer = answer.split(",", 1)[0]
    return normalize_answer(answer) == normalize_answer(obj)


def answer_contains(answer: str, obj: str) -> bool:
    """Whether a generated answer holds the object as whole words, after SQuAD's normalisation: how a chat model's
    sentence ("The capital is Astana") is scored."""
    return f" {normalize_answer(obj)} " in f" {normalize_answer(answer)} "


STOP_RULE = (
    "greedy decoding from the text before the object, cut at EOS, the first newline, or the first period "
    "unless the object has one (at most the object's tokens + 4), then exact match after SQuAD's "
    "normalisation (case, punctuation, articles)"
)
"""How `generate_answers` answers and `answer_matches` scores: what every figure 'by greedy generation' means."""
COMMA_STOP_RULE = (
    "the same answers cut at their first comma too, unless the object has one (EOS, newline, '.' or ',', as LocFT-BF "
    "scores), then the same exact match"
)
"""What every figure 'by greedy generation, stopped at a comma' means (`answer_matches(..., comma=True)`)."""


def generation_scoring(metrics: Mapping) -> dict[str, str]:
    """The stop rules, named where `metrics` hold figures by greedy generation (results.md's "How it was scored")."""
    rules = {"by greedy generation": STOP_RULE} if "gen_a_m" in metrics else {}
    if "gen_a_m_comma" in metrics:
        rules["by greedy generation, stopped at a comma"] = COMMA_STOP_RULE
    return rules


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Iterable[Mapping],
    batch_size: int = 32,
    object_key: str = "object",
    extra_tokens: int = 4,
    show_progress: bool = False,
) -> list[str]:
    """Each fact's answer by greedy decoding from its prompt (the text before the object), cut at EOS, the first
    newline, or the first period unless the object has one: what generation-based scoring compares, and what a
    user reads to see why a fact learned under teacher forcing is not produced (e.g. the model runs on).

    Causal LMs only; at most the object's length plus `extra_tokens` tokens are generated.
    """
    facts = list(facts)
    if not model_kind(model).generates:
        raise ValueError("Generation-based scoring needs a causal LM; a masked LM is scored by its masks.")
    if not facts:
        raise ValueError("No facts to generate for: the split is empty.")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts, lengths = [], []
    for fact in facts:
        prefix = fact["text"].split(PLACEHOLDER, 1)[0].rstrip(" ")
        prompts.append(tokenizer(prefix)["input_ids"])
        lengths.append(len(tokenizer(" " + fact[object_key], add_special_tokens=False)["input_ids"]))
    answers = [""] * len(facts)
    order = sorted(range(len(facts)), key=lambda i: len(prompts[i]))
    with eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="generating answers", disable=not show_progress):
            index = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in index)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in index], device=device)
            mask = torch.tensor(
                [[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in index], device=device
            )
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max(lengths[i] for i in index) + extra_tokens,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row, i in enumerate(index):
                generated = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                answers[i] = _answer_span(generated, facts[i][object_key]).strip()
    return answers


def generate_facts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Iterable[Mapping],
    object_key: str = "object",
    **options,
) -> list[bool]:
    """Generation-based scoring ("The Mirage of Model Editing"; LocFT-BF's): whether each fact's greedy answer
    (`generate_answers`, which takes `options`) is its object after normalisation. Unlike teacher forcing, the
    answer's length and content are not given: the model must stop by itself."""
    facts = list(facts)
    answers = generate_answers(model, tokenizer, facts, object_key=object_key, **options)
    return [answer_matches(answer, fact[object_key]) for answer, fact in zip(answers, facts)]
