"""The two halves of the facts a sweep or compare scores every point on, and the rule that picks a point on one."""

from __future__ import annotations

from ..evaluation.results import format_percent


VALIDATION, TEST = "validation", "test"  # the two halves of the facts, cut by subject (grid.validation_views)


def best(rows: list[dict], by: str, min_retention: float | None = None) -> dict:
    """The pick on the half `by`: the best Ā; with `min_retention`, the most A_M among the points that keep at
    least that share of what the model knew (ties: Ā), or, when none does, the point that keeps the most."""

    def score(name: str, row: dict) -> float:
        value = row[by].get(name)
        return value if value is not None else -1.0

    if min_retention is None:
        return max(rows, key=lambda r: score("avg_acc", r))
    kept = [r for r in rows if score("retention", r) >= min_retention]
    if not kept:
        return max(rows, key=lambda r: (score("retention", r), score("avg_acc", r)))
    return max(kept, key=lambda r: (score("a_m", r), score("avg_acc", r)))


def pick_rule(min_retention: float | None) -> str:
    """How `best` picks, in words, for the reports."""
    if min_retention is None:
        return "the best Ā = (A_M + A_F\\S) / 2"
    return (
        f"the most A_M among the points keeping at least {format_percent(min_retention)} of what the model knew "
        "(ties: Ā; where none does, the one keeping the most)"
    )
