"""Sweeps over δ × blocks (× norms): pick the best Ā on a validation split, report test too, plot.

The unmodified test facts are split once (seeded) into validation and test halves; every grid
point is scored on both, with A_M on the modified facts. The points of one block share one
frozen-prefix cache, so the facts' states below that block are computed once, not once per δ. The paper picked on test; we report the
pick by validation and, for comparison, the pick by test. Each finished point is appended to
`points.jsonl`, so a resumed sweep recomputes nothing. FT (for ft+ settings) runs once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import datasets

from .benchmarks.common import MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST, UNMODIFIED_TRAIN
from .config import EditConfig
from .io import atomic_write_text
from .job import JobConfig, edit_train_dataset, holdout, load_model_and_tokenizer, prepare_benchmark, starting_model
from .metrics import edit_metrics
from .prefix import PrefixCache
from .results import format_percent, library_versions
from .trainer import ConstrainedEditTrainer

POINTS = "points.jsonl"
VALIDATION, TEST = "validation", "test"


def grid(job: JobConfig, args: EditConfig) -> list[dict[str, Any]]:
    norms = job.sweep_norms or [args.norm]
    blocks = job.sweep_blocks or list(args.edit_blocks)
    deltas = job.sweep_deltas or [args.delta]
    points = []
    for block in blocks:  # block outermost: consecutive points share one prefix cache
        for norm in norms:
            for delta in ([None] if norm == "none" else deltas):
                points.append({"norm": norm, "block": str(block), "delta": delta})
    return points


def point_key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def load_points(folder: str) -> dict[str, dict]:
    path = os.path.join(folder, POINTS)
    done = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    done[point_key(row["point"])] = row
    return done


def run_sweep(job: JobConfig, args: EditConfig, model=None, tokenizer=None) -> list[dict]:
    """Run every grid point not yet in `<output_dir>/points.jsonl`; write the table and the plots."""
    folder = args.output_dir
    os.makedirs(folder, exist_ok=True)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(job)
    splits = prepare_benchmark(job, model, tokenizer)
    model = starting_model(model, tokenizer, splits, job, args)
    validation, test = holdout(splits[UNMODIFIED_TEST], job.validation_fraction, job.benchmark_seed)
    views = {
        VALIDATION: datasets.DatasetDict({MODIFIED_TEST: splits[MODIFIED_TEST], UNMODIFIED_TEST: validation}),
        TEST: datasets.DatasetDict({MODIFIED_TRAIN: splits[MODIFIED_TRAIN], MODIFIED_TEST: splits[MODIFIED_TEST], UNMODIFIED_TEST: test}),
    }
    done = load_points(folder)
    before: dict[str, Any] | None = None
    cache: tuple[str, PrefixCache | None] | None = None  # (block, its prefix cache): every δ and norm reuses it
    for index, point in enumerate(grid(job, args)):
        if point_key(point) in done:
            continue
        print(f"[sweep {index + 1}] norm={point['norm']} block={point['block']} delta={point['delta']}", flush=True)
        point_args = dataclasses.replace(
            args, output_dir=os.path.join(folder, "points", f"{index:03d}"), edit_blocks=[point["block"]],
            norm=point["norm"], delta=point["delta"], eval_strategy="no", save_strategy="no", eval_before_edit=False,
        )
        train_dataset, train_args = edit_train_dataset(splits, job, point_args)
        trainer = ConstrainedEditTrainer(
            model, train_args, train_dataset=train_dataset, processing_class=tokenizer,
            fisher_dataset=splits[UNMODIFIED_TRAIN], prefix_cache=cache[1] if cache and cache[0] == point["block"] else None,
        )
        cache = (point["block"], trainer.prefix_cache)
        if before is None:  # θ0 is the same for every point: evaluate it once
            before = {name: trainer.fact_results(view, original=True) for name, view in views.items()}
        trainer.train()
        row = {"point": point, "distance": trainer.projector.distance()}
        for name, view in views.items():
            metrics = edit_metrics(view, trainer.fact_results(view), before[name])
            row[name] = {k: v for k, v in metrics.items() if k != "per_relation"}
        model = trainer.edit_model.unload()  # back to θ0 for the next point
        done[point_key(point)] = row
        atomic_write_text(os.path.join(folder, POINTS), "".join(json.dumps(r) + "\n" for r in done.values()))
    rows = [done[point_key(p)] for p in grid(job, args)]
    write_report(folder, rows, job, args)
    return rows


def best(rows: list[dict], by: str) -> dict:
    return max(rows, key=lambda r: (r[by]["avg_acc"] if r[by]["avg_acc"] is not None else -1.0))


def write_report(folder: str, rows: list[dict], job: JobConfig, args: EditConfig) -> None:
    """`sweep.md` (every point, the picks) and the plots `tradeoff.png`, `avg_acc_per_block.png`."""
    lines = [
        f"# Sweep: {job.model_name_or_path}, {job.benchmark} m={job.m}, setting {job.setting}",
        "",
        "| norm | block | δ | A_M | A_F\\S val | Ā val | A_F\\S test | Ā test | retention test | agreement test |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, v, t = r["point"], r[VALIDATION], r[TEST]
        lines.append(
            f"| {p['norm']} | {p['block']} | {p['delta'] if p['delta'] is not None else '∞'} | {format_percent(t['a_m'])} | "
            f"{format_percent(v['a_fs'])} | {format_percent(v['avg_acc'])} | {format_percent(t['a_fs'])} | "
            f"{format_percent(t['avg_acc'])} | {format_percent(t.get('retention'))} | {format_percent(t.get('agreement'))} |"
        )
    for label, by in (("picked on validation (reported on test)", VALIDATION), ("picked on test (as the paper did)", TEST)):
        chosen = best(rows, by)
        p = chosen["point"]
        lines += ["", f"Best {label}: norm {p['norm']}, block {p['block']}, δ {p['delta']} → "
                  f"Ā test {format_percent(chosen[TEST]['avg_acc'])} (A_M {format_percent(chosen[TEST]['a_m'])}, "
                  f"A_F\\S {format_percent(chosen[TEST]['a_fs'])})."]
    lines += ["", "Library versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()) + "."]
    atomic_write_text(os.path.join(folder, "sweep.md"), "\n".join(lines) + "\n")
    atomic_write_text(os.path.join(folder, "sweep.json"), json.dumps(
        {"rows": rows, "best_by_validation": best(rows, VALIDATION)["point"], "best_by_test": best(rows, TEST)["point"]}, indent=2
    ))
    plot_sweep(folder, rows, job)


def plot_sweep(folder: str, rows: list[dict], job: JobConfig) -> tuple[str, str]:
    """The A_M-vs-A_F\\S trade-off per block (one point per δ) and the best Ā per block."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Sweep plots need matplotlib: pip install 'hf_memedit[demo]'.") from None
    series: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        series.setdefault((r["point"]["norm"], r["point"]["block"]), []).append(r)

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for (norm, block), points in series.items():
        points = sorted(points, key=lambda r: r["point"]["delta"] or float("inf"))
        xs = [100 * (r[TEST]["a_fs"] or 0) for r in points]
        ys = [100 * (r[TEST]["a_m"] or 0) for r in points]
        ax.plot(xs, ys, marker="o", label=f"block {block} ({norm})")
        for x, y, r in zip(xs, ys, points):
            ax.annotate(f"{r['point']['delta']:g}" if r["point"]["delta"] else "∞", (x, y), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("A_F\\S, unmodified facts (%, test)")
    ax.set_ylabel("A_M, modified facts (%)")
    ax.set_title(f"Trade-off over δ: {job.benchmark}, m = {job.m}, {job.setting}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    tradeoff = os.path.join(folder, "tradeoff.png")
    fig.tight_layout()
    fig.savefig(tradeoff, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    labels, val_best, test_of_val = [], [], []
    for (norm, block), points in series.items():
        chosen = best(points, VALIDATION)
        labels.append(f"{block}\n{norm}")
        val_best.append(100 * (chosen[VALIDATION]["avg_acc"] or 0))
        test_of_val.append(100 * (chosen[TEST]["avg_acc"] or 0))
    positions = range(len(labels))
    ax.bar([p - 0.2 for p in positions], val_best, width=0.4, label="Ā validation (δ picked here)")
    ax.bar([p + 0.2 for p in positions], test_of_val, width=0.4, label="Ā test at that δ")
    ax.set_xticks(list(positions), labels)
    ax.set_xlabel("edited block (norm)")
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
