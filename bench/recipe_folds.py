"""Which recipe should be the default? Picked on held-out relations across compares that differ in a setting a
compare does not sweep (issue 39: `target_suffix`, `eos_target`, ...).

Each compare folder is one lane, run with the same `relation_folds`, facts and locality facts (checked). Every point
of every lane is a candidate recipe. Prints, as markdown: each recipe's own figures on each held-out fold (mean and
range across the folds: the point reported on every fold), then the cross-lane pick — per fold, the recipe that is
best on the other folds' facts by the compare's rule (`--min_retention` as `pick_min_retention`), reported on the fold
it never saw — and each recipe on every fact of both halves (counts, not fold means). Nothing is trained.

    python bench/recipe_folds.py runs/r39_a runs/r39_b [--min_retention 0.9] [--output runs/r39.md]
"""

from __future__ import annotations

import argparse
import json
import os

from hf_memedit.experiments.compare import LABELS
from hf_memedit.experiments.grid_point import point_of
from hf_memedit.experiments.reports import fold_report
from hf_memedit.files import atomic_write_text


def lane_settings(folders: list[str]) -> dict[str, dict]:
    """Per lane, the shared settings in which the lanes differ (their `points_context.json`)."""
    contexts = {}
    for folder in folders:
        path = os.path.join(folder, "points_context.json")
        contexts[folder] = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                contexts[folder] = json.load(handle)
    keys = sorted({key for context in contexts.values() for key in context})
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in contexts.values()}) > 1]
    return {folder: {key: context.get(key) for key in differ} for folder, context in contexts.items()}


def settable(key: str, value) -> bool:
    """Whether a grid point can hold this setting (then its description names it)."""
    try:
        point_of({"point": {"norm": "linf", "block": "0", "delta": 1.0, key: value}})
    except ValueError:
        return False
    return True


def read_lanes(folders: list[str]) -> tuple[list[list[str]], dict[str, list[dict]]]:
    """The folds the lanes share, and every point of every lane as its own candidate, by label (the point with the
    lane's settings where the lanes differ)."""
    folds, locality, candidates = None, None, {}
    settings = lane_settings(folders)
    values = {key: value for lane in settings.values() for key, value in lane.items() if value is not None}
    held = {key for key, value in values.items() if settable(key, value)}  # the rest is named beside the point
    for folder in folders:
        path = os.path.join(folder, "compare.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{folder}: no compare.json; let that compare finish (it resumes) first.")
        with open(path, encoding="utf-8") as handle:
            written = json.load(handle)
        dealt = (written.get("relation_folds") or {}).get("relations")
        if not dealt:
            raise SystemExit(f"{folder}: a compare without relation_folds; run it with --relation_folds K.")
        if folds is not None and (dealt != folds or written["locality"] != locality):
            raise SystemExit(f"{folder}: other folds or locality facts than {folders[0]}: not the same protocol.")
        folds, locality = dealt, written["locality"]
        for method, rows in written["rows"].items():
            for row in rows:
                lane = settings[folder]
                own = {key: value for key, value in lane.items() if key in held and value is not None}
                row = {**row, "point": {**own, **row["point"]}}
                label = f"{LABELS.get(method, method)}: {point_of(row).describe()}"
                named = ", ".join(f"{key} {value!r}" for key, value in lane.items() if key not in held)
                label += f" [{named}]" if named else ""
                candidates[label if label not in candidates else f"{label} [{folder}]"] = [row]  # never one lost
    return folds, candidates


HALVES = ("validation", "test")
# Each recipe on every fact of both halves: (header, figure, what it is a share of).
POOLED = (
    ("A_M", "a_m", "n_modified"),
    ("retention", "retention", "n_known"),
    ("gen A_M", "gen_a_m", "n_modified"),
    ("gen A_M, comma stop", "gen_a_m_comma", "n_modified"),
    ("agreement", "agreement", "n_unmodified"),
)


def pooled_cell(row: dict, key: str, count: str) -> str:
    """A figure over both halves, weighted by what each half's share rests on: "k of n" with its percent."""
    parts = [(row[half][key], row[half][count]) for half in HALVES if row[half].get(key) is not None]
    total = sum(n for _, n in parts)
    if not total:
        return "–"
    share = sum(value * n for value, n in parts) / total
    return f"{100 * share:.2f}% ({round(share * total)} of {total})"


def report(folders: list[str], min_retention: float | None) -> tuple[str, dict]:
    """The markdown report, and the cross-lane pick's JSON (`fold_report`'s: per fold the pick and its figures)."""
    folds, candidates = read_lanes(folders)
    each, _ = fold_report(candidates, folds, min_retention, {})
    every = [row for rows in candidates.values() for row in rows]
    pick, picked = fold_report({"picked among them": every}, folds, min_retention, {})
    text = "\n".join(
        [
            f"# Recipes on held-out relations: {len(candidates)} candidates from {', '.join(folders)}",
            "",
            "## Each recipe on every fold",
            *each[2:],
            "",
            "## The pick among them",
            *pick[2:],
            "",
            "## Each recipe on every fact (validation and test halves pooled; not held out)",
            "",
            "| recipe | " + " | ".join(header for header, _, _ in POOLED) + " |",
            "|---|" + "---|" * len(POOLED),
            *(
                f"| {label} | " + " | ".join(pooled_cell(row, key, count) for _, key, count in POOLED) + " |"
                for label, (row,) in candidates.items()
            ),
            "",
        ]
    )
    return text, picked["methods"]["picked among them"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="compare folders (lanes) run with the same relation_folds")
    parser.add_argument("--min_retention", type=float, default=None, help="as pick_min_retention")
    parser.add_argument("--output", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    text, _ = report(args.folders, args.min_retention)
    print(text, end="")
    if args.output:
        atomic_write_text(args.output, text)


if __name__ == "__main__":
    main()
