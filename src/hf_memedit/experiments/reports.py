"""What a sweep writes for people: sweep.md, sweep.json, the trade-off and per-block plots; and the lines the
compare's report shares with it (the knobs every point trains with, the known facts retention rests on, the
held-out-relation section of `relation_folds`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..edit_config import EditConfig
from ..evaluation.results import format_metric, format_percent, format_versions, plotting
from ..files import atomic_write_text
from .folds import SUMMARY_HEADERS, fold_picks, fold_summary
from .grid_point import point_of
from .picks import TEST, VALIDATION, best, pick_rule


if TYPE_CHECKING:
    from ..preservation import Locality
    from .job_config import JobConfig


Column = tuple[str, Callable[[dict], str]]  # a table's header, and a row's cell


def table(columns: Sequence[Column], rows: Iterable[dict]) -> list[str]:
    """The lines of a markdown table of `rows`, one column per (header, cell of a row)."""
    return [
        "| " + " | ".join(header for header, _ in columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows),
    ]


def percent(half: str, name: str) -> Callable[[dict], str]:
    """A cell: the metric `name` of a row on `half`, as a percentage."""
    return lambda row: format_percent(row[half].get(name))


def metric(half: str, name: str) -> Callable[[dict], str]:
    """A cell: the metric `name` of a row on `half`, as the results show it (a share: of how many)."""
    return lambda row: format_metric(row[half], name)


def point(row: dict) -> str:
    """A cell: the row's point in words."""
    return point_of(row).describe()


SWEEP_COLUMNS = (
    ("point", point),
    ("A_M", percent(TEST, "a_m")),
    ("A_F\\S val", percent(VALIDATION, "a_fs")),
    ("Ā val", percent(VALIDATION, "avg_acc")),
    ("retention val", metric(VALIDATION, "retention")),
    ("A_F\\S test", percent(TEST, "a_fs")),
    ("Ā test", percent(TEST, "avg_acc")),
    ("retention test", metric(TEST, "retention")),
    ("agreement test", percent(TEST, "agreement")),
)


# The training knobs a point's description leaves out: a report names them, so its table can be made again.
SHARED_KNOBS = (
    "learning_rate",
    "max_steps",
    "per_device_train_batch_size",
    "seed",
    "preserve_ratio",
    "preserve_weight",
    "preserve_risk",
    "preserve_fraction",
    "eos_target",
    "loss_reduction",
)


def shared_settings(args: EditConfig) -> str:
    """The knobs every point trains with, unless the point sets its own (then its row in the JSON says so)."""
    knobs = SHARED_KNOBS if args.max_steps > 0 else (*SHARED_KNOBS, "num_train_epochs")
    text = ", ".join(f"{name} {getattr(args, name)}" for name in knobs)
    if args.target_suffix is not None:  # named only when set (the reports written before it read the same)
        text += f", target_suffix {args.target_suffix!r}"
    return (
        f"Every point trains with {text}; a point may set its own (in a compare FT-L, LocFT-BF and FTA do: each "
        "point's settings are in the JSON)."
    )


# Below this many known facts on validation, one fact moves validation retention by more than 3 points.
FEW_KNOWN_FACTS = 30


def known_facts_note(rows: Iterable[dict]) -> str:
    """How many facts θ0 knew on each half, which retention is a share of; a warning when validation has few."""
    counts = {
        half: sorted({r[half]["n_known"] for r in rows if r[half].get("n_known") is not None})
        for half in (VALIDATION, TEST)
    }
    if not counts[VALIDATION] or not counts[TEST]:
        return ""

    def span(values: list[int]) -> str:
        return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"

    text = (
        f"Retention is a share of the facts θ0 knew: {span(counts[VALIDATION])} "
        f"on validation, {span(counts[TEST])} on test"
    )
    fewest = counts[VALIDATION][0]
    if 0 < fewest < FEW_KNOWN_FACTS:
        text += (
            f"; with {fewest} on validation one fact moves validation retention by {100 / fewest:.1f} points, so "
            "picks that weigh retention rest on few facts"
        )
    return text + "."


def write_report(
    folder: str,
    rows: list[dict],
    job: JobConfig,
    args: EditConfig,
    locality: Locality,
    folds: Sequence[Sequence[str]] = (),
) -> None:
    """`sweep.md` (every point, the picks; with `folds`, `relation_folds`, each fold's pick on held-out relations),
    `sweep.json` and the plots `tradeoff.png`, `avg_acc_per_block.png`."""
    lines = [
        f"# Sweep: {job.model_name_or_path}, {job.benchmark} m={job.m}, setting {job.setting}",
        "",
        f"Locality measured on {locality.describe()}; these and the modified facts split by subject into validation "
        "and test halves. "
        f"A pick is {pick_rule(job.pick_min_retention)}. {known_facts_note(rows)}",
        shared_settings(args),
        "",
        *table(SWEEP_COLUMNS, rows),
    ]
    for label, by in (
        ("picked on validation (reported on test)", VALIDATION),
        ("picked on test (as the paper did)", TEST),
    ):
        chosen = best(rows, by, job.pick_min_retention)
        lines += [
            "",
            f"Best {label}: {point_of(chosen).describe()} → "
            f"Ā test {format_percent(chosen[TEST]['avg_acc'])} (A_M {format_percent(chosen[TEST]['a_m'])}, "
            f"A_F\\S {format_percent(chosen[TEST]['a_fs'])}).",
        ]
    written = {
        "rows": rows,
        "locality": locality.to_dict(),
        "best_by_validation": best(rows, VALIDATION, job.pick_min_retention)["point"],
        "best_by_test": best(rows, TEST, job.pick_min_retention)["point"],
    }
    if folds:
        section, written["relation_folds"] = fold_report({"sweep": rows}, folds, job.pick_min_retention, {})
        lines += section
    lines += ["", f"Library versions: {format_versions()}."]
    atomic_write_text(os.path.join(folder, "sweep.md"), "\n".join(lines) + "\n")
    atomic_write_text(os.path.join(folder, "sweep.json"), json.dumps(written, indent=2))
    plot_sweep(folder, rows, job)


def plot_sweep(folder: str, rows: list[dict], job: JobConfig) -> tuple[str, str]:
    """The A_M-vs-A_F\\S trade-off per block (one point per δ) and the best Ā per block."""
    plt = plotting()
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(point_of(r).series, []).append(r)

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, points in series.items():
        points = sorted(points, key=lambda r: point_of(r).radius)
        xs = [100 * (r[TEST]["a_fs"] or 0) for r in points]
        ys = [100 * (r[TEST]["a_m"] or 0) for r in points]
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, r in zip(xs, ys, points):
            radius = point_of(r).radius
            ax.annotate(
                f"{radius:.3g}" if radius != float("inf") else "∞",
                (x, y),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
    ax.set_xlabel("A_F\\S, unmodified facts (%, test)")
    ax.set_ylabel("A_M, modified facts (%)")
    ax.set_title(f"Trade-off over {'ε' if job.setting == 'knn' else 'δ'}: {job.benchmark}, m = {job.m}, {job.setting}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    tradeoff = os.path.join(folder, "tradeoff.png")
    fig.tight_layout()
    fig.savefig(tradeoff, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    labels, val_best, test_of_val = [], [], []
    for name, points in series.items():
        chosen = best(points, VALIDATION, job.pick_min_retention)
        labels.append(name.replace(" (", "\n("))
        val_best.append(100 * (chosen[VALIDATION]["avg_acc"] or 0))
        test_of_val.append(100 * (chosen[TEST]["avg_acc"] or 0))
    positions = range(len(labels))
    ax.bar([p - 0.2 for p in positions], val_best, width=0.4, label="Ā validation (δ picked here)")
    ax.bar([p + 0.2 for p in positions], test_of_val, width=0.4, label="Ā test at that δ")
    ax.set_xticks(list(positions), labels)
    ax.set_xlabel("edited block (norm), or kNN-LM")
    ax.set_ylabel("Ā = (A_M + A_F\\S) / 2 (%)")
    ax.set_title("Best Ā per block")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower center")
    ax.grid(axis="y", alpha=0.3)
    per_block = os.path.join(folder, "avg_acc_per_block.png")
    fig.tight_layout()
    fig.savefig(per_block, dpi=120)
    plt.close(fig)
    return tradeoff, per_block


def _counted(figures: dict, key: str, count: str) -> str:
    """A share with the facts it rests on ("62.50% (5 of 8)")."""
    value, total = figures.get(key), figures.get(count)
    return format_percent(value) + (f" ({round(value * total)} of {total})" if value is not None and total else "")


def _spread(figure: dict[str, float | None] | None) -> str:
    if figure is None:
        return "–"
    low, high = format_percent(figure["min"]), format_percent(figure["max"])
    return f"{format_percent(figure['mean'])} ({low}–{high})"


def fold_report(
    rows: dict[str, list[dict]], folds: Sequence[Sequence[str]], min_retention: float | None, labels: dict[str, str]
) -> tuple[list[str], dict[str, Any]]:
    """The held-out-relation section of a sweep's or compare's report (its markdown lines) and its JSON: per method
    (`rows` by method), each fold's pick and held-out figures, and their mean and range across the folds."""
    results = {}
    for method, method_rows in rows.items():
        picks = fold_picks(method_rows, folds, min_retention)
        results[method] = {"folds": picks, "summary": fold_summary(picks)}
    dealt = "; ".join(f"fold {index}: {', '.join(relations)}" for index, relations in enumerate(folds))
    lines = [
        "",
        f"## Held-out relations ({len(folds)} folds)",
        "",
        f"The relations dealt into folds ({dealt}). Fold j's pick is {pick_rule(min_retention)} on the other folds' "
        "facts (pooled by the facts each figure rests on) and is reported on fold j's facts, which it never saw: "
        "mean across the folds (lowest–highest). Every fold's facts are scored by every point (an edit trains on "
        "every modified fact); retention on the unmodified facts of the fold's relations that θ0 knew.",
        "",
        *table(
            [("method", lambda item: labels.get(item[0], item[0]))]
            + [(header, lambda item, key=key: _spread(item[1]["summary"][key])) for key, header in SUMMARY_HEADERS],
            results.items(),
        ),
        "",
        *table(
            (
                ("method", lambda item: labels.get(item[0], item[0])),
                ("fold", lambda item: str(item[1]["fold"])),
                ("picked on the other folds", lambda item: point_of(item[1]).describe()),
                ("A_M", lambda item: _counted(item[1]["held_out"], "a_m", "n_modified")),
                ("retention", lambda item: format_metric(item[1]["held_out"], "retention")),
                ("gen A_M, comma stop", lambda item: format_percent(item[1]["held_out"].get("gen_a_m_comma"))),
            ),
            ((method, pick) for method, result in results.items() for pick in result["folds"]),
        ),
    ]
    return lines, {"relations": [list(relations) for relations in folds], "methods": results}
