"""The paper's metric Ā = (A_M + A_F\\S) / 2, and what accuracy alone hides.

A fine-tune on cloze prompts can raise A_F\\S by teaching the answer format while it flips
individual facts, so beside the accuracies this reports, when the before-edit evaluation is
given, **retention** (of the unmodified facts right before, the share still right; with relation ids also
on the edited relations alone, `retention_edited`), **agreement** (the
share of unmodified facts whose predicted tokens did not change at all) and **bleed** (of the
facts lost, the share now predicting one of the edit's new objects: whether the edit leaks to
neighbours; judged on the first object token, since a teacher-forced prediction has as many tokens as the
fact's own object, not the new one's), and with a `consistency` split, **consistency** (of the facts an edit
changes logically, the share now given the object it implies: "Bucharest is the capital of [Y]" → Japan).

Every share is one of facts: a fact is right when each of its test phrasings is (`per_fact`).
All values are fractions in [0, 1]; a ratio with an empty denominator is None.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import eval_mode
from ..benchmarks.common import CONSISTENCY, MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST
from ..collators import FactEncoder
from ..fast_paths.prefix import PrefixCache
from .scoring import FactResults, answer_matches, evaluate_facts, generate_answers, object_log_probs


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if len(flags) else None


def _check_length(name: str, values: Sequence | None, expected: int, of: str) -> None:
    if values is not None and len(values) != expected:
        raise ValueError(
            f"{name} has {len(values)} entries but there are {expected} "
            f"{of} facts: give one per fact, in the same order."
        )


CONFIDENT_MARGIN = 1.0
"""Logit margin (nats) above which a known fact counts as known firmly: its object token at least e times as likely
as any other token, at every object position (`retention_confident`)."""


def avg_acc(
    modified_correct: Sequence[bool],
    unmodified_correct: Sequence[bool],
    *,
    modified_train_correct: Sequence[bool] | None = None,
    original_correct_before: Sequence[bool] | None = None,
    unmodified_correct_before: Sequence[bool] | None = None,
    unmodified_predicted: Sequence[Sequence[int]] | None = None,
    unmodified_predicted_before: Sequence[Sequence[int]] | None = None,
    unmodified_bleeds: Sequence[bool] | None = None,
    modified_relations: Sequence[str] | None = None,
    unmodified_relations: Sequence[str] | None = None,
    unmodified_margins_before: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A_M, A_F\\S, Ā and the counts; with before-edit results also A_F before, the drop, retention, agreement.

    Args:
        modified_correct: per modified fact, right on its new object on every test phrasing (`per_fact`): A_M is a
            share of facts, not of test questions.
        unmodified_correct: per unmodified fact, right after the edit (every test phrasing).
        modified_train_correct: per training phrasing of the modified facts (reliability; A_M on
            the test phrasing is generalization).
        original_correct_before: per modified fact, right on its *original* object before the edit.
        unmodified_correct_before: per unmodified fact, right before the edit.
        unmodified_predicted / unmodified_predicted_before: predicted object token ids after and
            before, for agreement.
        unmodified_bleeds: per unmodified fact, whether its prediction after the edit is one of the
            edit's new objects (with `unmodified_correct_before`, for bleed).
        modified_relations / unmodified_relations: relation ids, for a per-relation breakdown.
        unmodified_margins_before: per unmodified fact, its logit margin before the edit (`FactResults.margins`),
            for retention on the facts known by at least `CONFIDENT_MARGIN`.
    """
    n_m, n_u = len(modified_correct), len(unmodified_correct)
    if n_m == 0 and n_u == 0:
        raise ValueError("avg_acc got no facts: both the modified and the unmodified lists are empty.")
    for name, values, expected, of in (
        ("original_correct_before", original_correct_before, n_m, "modified"),
        ("modified_relations", modified_relations, n_m, "modified"),
        ("unmodified_correct_before", unmodified_correct_before, n_u, "unmodified"),
        ("unmodified_predicted", unmodified_predicted, n_u, "unmodified"),
        ("unmodified_predicted_before", unmodified_predicted_before, n_u, "unmodified"),
        ("unmodified_bleeds", unmodified_bleeds, n_u, "unmodified"),
        ("unmodified_relations", unmodified_relations, n_u, "unmodified"),
        ("unmodified_margins_before", unmodified_margins_before, n_u, "unmodified"),
    ):
        _check_length(name, values, expected, of)
    a_m, a_fs = _share(modified_correct), _share(unmodified_correct)
    result: dict[str, Any] = {
        "a_m": a_m,
        "a_fs": a_fs,
        "avg_acc": None if a_m is None or a_fs is None else (a_m + a_fs) / 2,
        "n_modified": n_m,
        "n_unmodified": n_u,
    }
    if modified_train_correct is not None:
        result["a_m_train"] = _share(modified_train_correct)
        result["n_modified_train"] = len(modified_train_correct)
    if unmodified_correct_before is not None:
        result["a_fs_before"] = a_fs_before = _share(unmodified_correct_before)
        result["a_fs_drop"] = None if a_fs_before is None or a_fs is None else a_fs_before - a_fs
        kept = [after for before, after in zip(unmodified_correct_before, unmodified_correct) if before]
        result["retention"] = _share(kept)
        result["n_known"] = len(kept)
        lost = [
            i
            for i, (before, after) in enumerate(zip(unmodified_correct_before, unmodified_correct))
            if before and not after
        ]
        result["n_lost"] = len(lost)
        if unmodified_bleeds is not None:
            result["bleed"] = _share([bool(unmodified_bleeds[i]) for i in lost])
        if original_correct_before is not None:
            result["a_f_before"] = _share(list(original_correct_before) + list(unmodified_correct_before))
        if unmodified_margins_before is not None:
            # The facts the model knew firmly: a thin margin flips under almost any change, so this says
            # whether an edit's losses are such near-ties or facts the model was sure of.
            firm = [
                after
                for before, after, margin in zip(
                    unmodified_correct_before, unmodified_correct, unmodified_margins_before
                )
                if before and margin >= CONFIDENT_MARGIN
            ]
            result["retention_confident"] = _share(firm)
            result["n_known_confident"] = len(firm)
    if (unmodified_predicted is None) != (unmodified_predicted_before is None):
        raise ValueError("Agreement needs both unmodified_predicted and unmodified_predicted_before.")
    if unmodified_predicted is not None:
        same = [list(a) == list(b) for a, b in zip(unmodified_predicted, unmodified_predicted_before)]
        result["agreement"] = _share(same)
    if unmodified_correct_before is not None and modified_relations is not None and unmodified_relations is not None:
        # Retention on the relations an edit changed: where it leaks. A locality-only relation (one the edit
        # never touches, e.g. `locality_relations`) can lift the overall figure; this one it cannot.
        edited = set(modified_relations)
        kept_edited = [
            after
            for before, after, relation in zip(unmodified_correct_before, unmodified_correct, unmodified_relations)
            if before and relation in edited
        ]
        result["retention_edited"] = _share(kept_edited)
        result["n_known_edited"] = len(kept_edited)
    if modified_relations is not None or unmodified_relations is not None:
        result["per_relation"] = _per_relation(
            modified_correct,
            modified_relations,
            unmodified_correct,
            unmodified_relations,
            unmodified_correct_before,
            unmodified_bleeds,
        )
    return result


def _per_relation(
    modified_correct,
    modified_relations,
    unmodified_correct,
    unmodified_relations,
    unmodified_correct_before=None,
    unmodified_bleeds=None,
) -> dict[str, dict]:
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"m": [], "u": [], "kept": [], "bleed": []})
    for key, flags, relations in (
        ("m", modified_correct, modified_relations),
        ("u", unmodified_correct, unmodified_relations),
    ):
        for flag, relation in zip(flags, relations or ()):
            groups[relation][key].append(bool(flag))
    if unmodified_correct_before is not None:
        bleeds = unmodified_bleeds if unmodified_bleeds is not None else [False] * len(unmodified_correct)
        for before, after, bled, relation in zip(
            unmodified_correct_before, unmodified_correct, bleeds, unmodified_relations or ()
        ):
            if before:
                groups[relation]["kept"].append(bool(after))
                if not after:
                    groups[relation]["bleed"].append(bool(bled))
    rows = {}
    for relation, g in sorted(groups.items()):
        rows[relation] = {
            "a_m": _share(g["m"]),
            "n_modified": len(g["m"]),
            "a_fs": _share(g["u"]),
            "n_unmodified": len(g["u"]),
        }
        if unmodified_correct_before is not None:
            rows[relation].update(retention=_share(g["kept"]), n_known=len(g["kept"]))
        if unmodified_bleeds is not None:
            rows[relation].update(bleed=_share(g["bleed"]), n_lost=len(g["bleed"]))
    return rows


def evaluate_splits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    splits: Mapping[str, Any],
    *,
    original: bool = False,
    batch_size: int = 64,
    show_progress: bool = False,
    prefix: PrefixCache | None = None,
) -> dict[str, FactResults]:
    """`evaluate_facts` on the benchmark splits that metrics use (modified_train/test, unmodified_test).

    With `original=True` the modified facts are scored on their original object: the before-edit view
    (`consistency` is scored on the object the edit implies, before as after).
    With `prefix`, the states entering the edited blocks are cached first (with a memory check).
    """
    results = {}
    for name in (MODIFIED_TRAIN, MODIFIED_TEST, UNMODIFIED_TEST, CONSISTENCY):
        if name in splits and len(splits[name]):
            object_key = "original_object" if original and name in (MODIFIED_TRAIN, MODIFIED_TEST) else "object"
            if prefix is not None:
                prefix.add_facts(tokenizer, splits[name], batch_size, show_progress, object_key=object_key)
            results[name] = evaluate_facts(
                model,
                tokenizer,
                splits[name],
                batch_size=batch_size,
                object_key=object_key,
                show_progress=show_progress,
                prefix=prefix,
            )
    if not results:
        raise ValueError(
            f"None of the splits {MODIFIED_TEST}, {UNMODIFIED_TEST}, {MODIFIED_TRAIN} holds facts "
            f"(got: {', '.join(splits) or 'nothing'}). Pass a benchmark from hf_memedit.benchmarks.load_benchmark."
        )
    return results


def bleed_flags(
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    modified: Sequence[Mapping],
    unmodified: Sequence[Mapping],
    predicted: Sequence[Sequence[int]],
) -> list[bool]:
    """Per unmodified fact: whether its predicted first object token starts one of the edit's new objects
    (and not its own object), i.e. the edit's answer leaked onto it."""
    encoder = FactEncoder(tokenizer, kind)

    def first(row) -> int:
        labels = encoder.encode(row["text"], row["object"])["labels"]
        return next(label for label in labels if label != -100)

    new_objects = {first(row) for row in modified}
    return [bool(ids) and ids[0] in new_objects and ids[0] != first(row) for row, ids in zip(unmodified, predicted)]


def fact_rows(split: Any) -> list[list[int]]:
    """The row indices of each fact of a split (rows sharing a uuid: a zsRE fact's two test questions), facts in the
    order of their first row; a row without a uuid is a fact of its own."""
    if isinstance(split, datasets.Dataset) and "uuid" in split.column_names:
        uuids = split["uuid"]
    else:
        uuids = [row.get("uuid", index) for index, row in enumerate(split)]
    rows: dict[Any, list[int]] = {}
    for index, uuid in enumerate(uuids):
        rows.setdefault(uuid, []).append(index)
    return list(rows.values())


def per_fact(results: FactResults, facts: Sequence[Sequence[int]]) -> FactResults:
    """Row results as fact results (`fact_rows`): a fact is right when every one of its phrasings is; its prediction
    is its rows' in order, its margin their smallest."""
    return FactResults(
        [all(results.correct[i] for i in rows) for rows in facts],
        [[token for i in rows for token in results.predicted[i]] for rows in facts],
        [min(results.margins[i] for i in rows) for rows in facts] if results.margins else [],
    )


def lost_facts(
    splits: Mapping[str, Any],
    after: Mapping[str, FactResults],
    before: Mapping[str, FactResults] | None,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
) -> list[dict[str, Any]]:
    """The unmodified facts right before the edit (every test phrasing) and wrong after it, in benchmark order, each
    by its first phrasing now wrong: what it predicts, whether that is one of the edit's new objects (`bleed_flags`),
    and the fact's margin before the edit (`FactResults.margins`: a near-tie flips under almost any change). The
    facts behind retention's and bleed's numbers, so a user can read what an edit broke; none without `before`."""
    if not before or UNMODIFIED_TEST not in after or UNMODIFIED_TEST not in before:
        return []
    now, then = after[UNMODIFIED_TEST], before[UNMODIFIED_TEST]
    facts = fact_rows(splits[UNMODIFIED_TEST])
    known_then, right_now = per_fact(then, facts).correct, per_fact(now, facts).correct
    lost = [rows for rows, was, still in zip(facts, known_then, right_now) if was and not still]
    if not lost:
        return []
    indices = [next(i for i in rows if not now.correct[i]) for rows in lost]
    rows = splits[UNMODIFIED_TEST].select(indices)
    predicted = [now.predicted[i] for i in indices]
    modified = list(splits[MODIFIED_TEST]) if MODIFIED_TEST in splits else []
    bleeds = bleed_flags(tokenizer, kind, modified, list(rows), predicted) if modified else [False] * len(indices)
    margins = [min(then.margins[i] for i in fact) if then.margins else None for fact in lost]
    return [
        {
            "uuid": row["uuid"],
            "relation": row["relation"],
            "subject": row["subject"],
            "text": row["text"],
            "object": row["object"],
            "predicted": tokenizer.decode(ids).strip(),
            "bleed": bleed,
            "margin_before": margin,
        }
        for row, ids, bleed, margin in zip(rows, predicted, bleeds, margins)
    ]


def edit_metrics(
    splits: Mapping[str, Any],
    after: Mapping[str, FactResults],
    before: Mapping[str, FactResults] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """`avg_acc` from `evaluate_splits` results after (and optionally before, `original=True`) the edit, per fact:
    a fact counts as right when every one of its test phrasings is (zsRE holds two for some facts), so A_M and
    A_F\\S are shares of facts, not of questions. A_M on the training phrasing stays a share of phrasings.

    With the `tokenizer` (and the model's `kind`), bleed is reported too. With a `consistency` split: `consistency`,
    the share of the facts an edit changes logically that the model now gives the implied object.
    """
    empty = FactResults([], [])
    facts = {name: fact_rows(splits[name]) for name in (MODIFIED_TEST, UNMODIFIED_TEST, CONSISTENCY) if name in after}

    def of(results: Mapping[str, FactResults] | None, name: str) -> FactResults:
        return per_fact(results[name], facts[name]) if results is not None and name in results else empty

    def relations(name: str) -> list[str]:
        return [splits[name]["relation"][rows[0]] for rows in facts.get(name, [])]

    modified, unmodified = of(after, MODIFIED_TEST), of(after, UNMODIFIED_TEST)
    kwargs: dict[str, Any] = {
        "modified_relations": relations(MODIFIED_TEST),
        "unmodified_relations": relations(UNMODIFIED_TEST),
    }
    if MODIFIED_TRAIN in after:
        kwargs["modified_train_correct"] = after[MODIFIED_TRAIN].correct
    if before is not None:
        previous = of(before, UNMODIFIED_TEST)
        kwargs.update(
            original_correct_before=of(before, MODIFIED_TEST).correct,
            unmodified_correct_before=previous.correct,
            unmodified_predicted=unmodified.predicted,
            unmodified_predicted_before=previous.predicted,
            unmodified_margins_before=previous.margins or None,
        )
        if tokenizer is not None and kind is not None and len(unmodified) and len(modified):
            rows = bleed_flags(
                tokenizer,
                kind,
                list(splits[MODIFIED_TEST]),
                list(splits[UNMODIFIED_TEST]),
                after[UNMODIFIED_TEST].predicted,
            )
            kwargs["unmodified_bleeds"] = [any(rows[i] for i in fact) for fact in facts[UNMODIFIED_TEST]]
    metrics = avg_acc(modified.correct, unmodified.correct, **kwargs)
    if CONSISTENCY in facts:
        metrics.update(consistency=_share(of(after, CONSISTENCY).correct), n_consistency=len(facts[CONSISTENCY]))
        if before is not None and CONSISTENCY in before:
            metrics["consistency_before"] = _share(of(before, CONSISTENCY).correct)
    return metrics


def generate_splits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, splits: Mapping[str, Any], batch_size: int = 32
) -> dict[str, list[str]]:
    """The greedy answers (`scoring.generate_answers`) to the modified and unmodified test facts."""
    return {
        name: generate_answers(model, tokenizer, splits[name], batch_size=batch_size, show_progress=True)
        for name in (MODIFIED_TEST, UNMODIFIED_TEST)
        if name in splits and len(splits[name])
    }


def generated_correct(split: Any, answers: Sequence[str], comma: bool = False) -> list[bool]:
    """Per fact (`fact_rows`), whether every one of its answers (`generate_answers`) is its object (`answer_matches`;
    with `comma`, the answers stopped at a comma too)."""
    rows = [answer_matches(answer, fact["object"], comma) for answer, fact in zip(answers, split)]
    return [all(rows[i] for i in fact) for fact in fact_rows(split)]


def generation_metrics(
    splits: Mapping[str, Any],
    answers: Mapping[str, Sequence[str]],
    answers_before: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """A_M (on the new objects) and A_F\\S by greedy generation from the answers (`generate_splits`), beside the
    teacher-forced scores, per fact as `edit_metrics`; with the answers before the edit also A_F\\S before, retention
    and bleed: of the facts lost, the share whose answer is now one of the edit's new objects, whole (teacher-forced
    bleed can judge only the first token). The `_comma` figures score the same answers stopped at a comma too
    (`scoring.COMMA_STOP_RULE`)."""

    def correct(found: Mapping[str, Sequence[str]], name: str, comma: bool = False) -> list[bool]:
        return generated_correct(splits[name], found[name], comma) if name in splits and name in found else []

    unmodified = correct(answers, UNMODIFIED_TEST)
    metrics = {"gen_a_m": _share(correct(answers, MODIFIED_TEST)), "gen_a_fs": _share(unmodified)}
    metrics["gen_a_m_comma"] = _share(correct(answers, MODIFIED_TEST, comma=True))
    if answers_before is not None:
        unmodified_before = correct(answers_before, UNMODIFIED_TEST)
        kept = [after for before, after in zip(unmodified_before, unmodified) if before]
        metrics.update(gen_a_fs_before=_share(unmodified_before), gen_retention=_share(kept), gen_n_known=len(kept))
        before, after = correct(answers_before, UNMODIFIED_TEST, True), correct(answers, UNMODIFIED_TEST, True)
        kept = [now for then, now in zip(before, after) if then]
        metrics.update(gen_retention_comma=_share(kept), gen_n_known_comma=len(kept))
        if MODIFIED_TEST in splits and UNMODIFIED_TEST in answers:
            new_objects = {fact["object"] for fact in splits[MODIFIED_TEST]}
            rows = list(splits[UNMODIFIED_TEST])
            lost = [
                fact
                for fact, before, after in zip(fact_rows(splits[UNMODIFIED_TEST]), unmodified_before, unmodified)
                if before and not after
            ]
            bled = [
                any(
                    answer_matches(answers[UNMODIFIED_TEST][i], obj)
                    for i in fact
                    for obj in new_objects - {rows[i]["object"]}
                )
                for fact in lost
            ]
            metrics.update(gen_bleed=_share(bled), gen_n_lost=len(lost))
    return metrics


def preference_metrics(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, splits: Mapping[str, Any], batch_size: int = 64
) -> dict[str, Any]:
    """CounterFact's efficacy score, for tables written that way (ROME, MEMIT, EasyEdit): the share of modified facts
    whose new object the model finds more likely than the old one, log p(new | text) > log p(old | text) over the
    objects' tokens, teacher-forced, on every test phrasing of the fact (`new_beats_old`). A weaker test than A_M:
    the new object need not be the model's answer, only likelier than the old."""
    rows = splits[MODIFIED_TEST] if MODIFIED_TEST in splits else None
    if not isinstance(rows, datasets.Dataset) or not len(rows) or "original_object" not in rows.column_names:
        return {}
    scored = [i for i, row in enumerate(rows) if row["original_object"] and row["original_object"] != row["object"]]
    if not scored:
        return {}
    subset = rows.select(scored)
    new = object_log_probs(model, tokenizer, subset, batch_size)
    old = object_log_probs(model, tokenizer, subset, batch_size, object_key="original_object")
    wins = dict(zip(scored, (n > o for n, o in zip(new, old))))
    facts = [fact for fact in fact_rows(rows) if all(i in wins for i in fact)]
    return {"new_beats_old": _share([all(wins[i] for i in fact) for fact in facts]), "n_new_beats_old": len(facts)}


AVG_ACC_METRIC_PATH = os.path.join(os.path.dirname(__file__), "evaluate_metrics", "avg_acc")
"""Folder of the `avg_acc` evaluate module: `evaluate.load(AVG_ACC_METRIC_PATH)` works offline."""


@torch.no_grad()
def next_token_drift(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sequences: Sequence[list[int]],
    at_theta0: Callable[[], AbstractContextManager],
    batch_size: int = 16,
) -> dict[str, float]:
    """General drift on held-out text: the mean next-token KL(θ0 ‖ θ) per token and the perplexity ratio
    ppl(θ) / ppl(θ0).

    `sequences` are token ids (e.g. θ0's own samples that no key or objective saw); `at_theta0` is a context
    manager that puts θ0's weights in place (the trainer's), so both models run on the same batches.
    """
    if not sequences:
        raise ValueError("No held-out text to measure drift on.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    kl_sum, nll, nll0, count = 0.0, 0.0, 0.0, 0
    with eval_mode(model):
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([list(s) + [pad] * (width - len(s)) for s in chunk], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double().log_softmax(-1)
            with at_theta0():
                logits0 = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double().log_softmax(-1)
            valid = mask[:, 1:].bool()
            targets = ids[:, 1:][valid]
            lp, lp0 = logits[valid], logits0[valid]
            kl_sum += float((lp0.exp() * (lp0 - lp)).sum())
            nll -= float(lp.gather(1, targets[:, None]).sum())
            nll0 -= float(lp0.gather(1, targets[:, None]).sum())
            count += int(valid.sum())
    return {"drift_kl": kl_sum / count, "perplexity_ratio": math.exp((nll - nll0) / count), "n_drift_tokens": count}
