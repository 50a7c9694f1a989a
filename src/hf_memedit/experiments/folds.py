"""The cross-relation protocol (`relation_folds`): a recipe picked on some relations, reported on relations it never
saw while being picked.

The relations of the facts are dealt into k folds (`relation_folds`). Every grid point is scored on each fold's facts
(`fold_views`: one more view per fold beside the validation and test halves; an edit trains on every modified fact,
so one training per point serves every fold). Fold j's pick is the point that is best on the other folds' facts
(their figures pooled by the facts they rest on, `pooled`), and it is reported on fold j's own facts: each method gets
k held-out figures, one per fold, whose mean and spread are its headline (`fold_picks`, `fold_summary`; written
by `reports.fold_report`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from statistics import mean
from typing import Any

import datasets

from ..benchmarks.common import CONSISTENCY, MODIFIED_TEST, UNMODIFIED_TEST, hash_share
from .picks import best


logger = logging.getLogger(__name__)

FOLD_VIEW = "relations/{}"  # the view of fold j's facts, as a grid row holds it
# What a fold's pick is reported on, across folds (mean and range), and its header.
SUMMARY_HEADERS = (
    ("a_m", "A_M"),
    ("retention", "retention"),
    ("gen_a_m", "gen A_M"),
    ("gen_a_m_comma", "gen A_M, comma stop"),
    ("agreement", "agreement"),
)
SUMMARY = tuple(key for key, _ in SUMMARY_HEADERS)


def relation_folds(splits: datasets.DatasetDict, folds: int, seed: int, per_relation: bool = False) -> list[list[str]]:
    """The relations of the facts dealt into `folds` folds: the edited relations first, in the order of a seeded hash
    of their name, then the relations only scored for locality; so every fold holds an edited relation, and a
    relation's fold depends on the relations present, not on their facts. A fold with under half its even share of
    the modified facts is said, with the fix (`per_relation`: whether the facts were drawn relation by relation)."""
    edited = set(splits[MODIFIED_TEST]["relation"])
    scored = set(splits[UNMODIFIED_TEST]["relation"]) if UNMODIFIED_TEST in splits else set()
    if len(edited) < folds:
        raise ValueError(
            f"relation_folds {folds}: the modified facts hold {len(edited)} relations "
            f"({', '.join(sorted(edited))}), and every fold needs one: give relation_folds {len(edited)} or fewer, "
            'more relations, or draw the facts relation by relation (benchmark_options {"per_relation": true}).'
        )
    order = sorted(edited, key=lambda r: hash_share(r, seed, "relation_fold")) + sorted(
        scored - edited, key=lambda r: hash_share(r, seed, "relation_fold")
    )
    dealt = [sorted(order[j::folds]) for j in range(folds)]
    modified = splits[MODIFIED_TEST]  # a fact may have several test prompts (zsRE): counted once
    counts = Counter(relation for _, relation in dict.fromkeys(zip(modified["uuid"], modified["relation"])))
    shares = [sum(counts[relation] for relation in fold) for fold in dealt]
    if 2 * folds * min(shares) < sum(shares):
        fix = (
            "they are drawn relation by relation already, so some relations have few facts that can be modified "
            "(with modify_known: few the model knows); choose other relations or fewer folds"
            if per_relation
            else 'draw them relation by relation for even shares (benchmark_options {"per_relation": true})'
        )
        logger.warning(
            "relation_folds %d: the folds hold %s of the %d modified facts, so a held-out figure may rest on a few; "
            "%s.",
            folds,
            " / ".join(map(str, shares)),
            sum(shares),
            fix,
        )
    return dealt


def fold_views(splits: datasets.DatasetDict, folds: Sequence[Sequence[str]]) -> dict[str, datasets.DatasetDict]:
    """Per fold, its relations' modified and unmodified test facts (and consistency facts): `FOLD_VIEW` by index."""
    views = {}
    for index, relations in enumerate(folds):
        wanted = set(relations)
        view = {}
        for name in (MODIFIED_TEST, UNMODIFIED_TEST, CONSISTENCY):
            if name in splits:
                rows = [i for i, relation in enumerate(splits[name]["relation"]) if relation in wanted]
                if rows:
                    view[name] = splits[name].select(rows)
        views[FOLD_VIEW.format(index)] = datasets.DatasetDict(view)
    return views


def _weighted(parts: list[tuple[float | None, int]]) -> float | None:
    counted = [(value, count) for value, count in parts if value is not None and count]
    total = sum(count for _, count in counted)
    return sum(value * count for value, count in counted) / total if total else None


def pooled(row: dict, views: Sequence[str]) -> dict[str, Any]:
    """A point's A_M, A_F\\S, Ā and retention over the facts of several views together: each view's share weighted
    by the facts it rests on (modified, unmodified, known before the edit)."""
    figures = [row[name] for name in views if name in row]
    a_m = _weighted([(f.get("a_m"), f.get("n_modified", 0)) for f in figures])
    a_fs = _weighted([(f.get("a_fs"), f.get("n_unmodified", 0)) for f in figures])
    return {
        "a_m": a_m,
        "a_fs": a_fs,
        "avg_acc": None if a_m is None or a_fs is None else (a_m + a_fs) / 2,
        "retention": _weighted([(f.get("retention"), f.get("n_known", 0)) for f in figures]),
        "n_known": sum(f.get("n_known", 0) for f in figures),
    }


def fold_picks(rows: list[dict], folds: Sequence[Sequence[str]], min_retention: float | None) -> list[dict]:
    """Per fold: the point picked on the other folds' facts (`picks.best` on their pooled figures), and its figures on
    the fold's own facts, which the pick never saw."""
    out = []
    names = [FOLD_VIEW.format(index) for index in range(len(folds))]
    for index, relations in enumerate(folds):
        others = [name for name in names if name != names[index]]
        candidates = [{"row": row, "picked_on": pooled(row, others)} for row in rows]
        chosen = best(candidates, "picked_on", min_retention)
        out.append(
            {
                "fold": index,
                "relations": list(relations),
                "point": chosen["row"]["point"],
                "picked_on": chosen["picked_on"],
                "held_out": chosen["row"].get(names[index], {}),
            }
        )
    return out


def fold_summary(picks: list[dict]) -> dict[str, dict[str, float | None]]:
    """Each held-out figure across the folds: its mean, lowest and highest (folds without it left out)."""
    summary = {}
    for key in SUMMARY:
        values = [pick["held_out"].get(key) for pick in picks if pick["held_out"].get(key) is not None]
        summary[key] = (
            {"mean": mean(values), "min": min(values), "max": max(values), "folds": len(values)} if values else None
        )
    return summary
