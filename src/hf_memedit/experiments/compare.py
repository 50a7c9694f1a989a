"""`memedit compare`: the editing methods side by side on one model and benchmark, each tuned on validation.

Every method is scored on the same unmodified facts, disjoint from any preservation data
(`preserve_fraction`, see `hf_memedit.preservation`). Every method gets a small sweep; its point with the best Ā
on the validation half of the facts is reported on the test half, each half with its own modified and unmodified
facts (cut by subject, `grid.validation_views`). The methods, one module each in `experiments/methods/`:

- `ftm_linf`: FTM under L∞, δ × blocks (`sweep_deltas` × `sweep_blocks`);
- `ftm_unconstrained`: FTM with no constraint (the paper's δ = ∞);
- `ftm_l2`, `ftm_fisher`: FTM under L2 / the Fisher ellipsoid; by default their δ are the smallest ball /
  ellipsoid that holds each L∞ box (δ√n, δ²ΣF), so the scales match;
- `fta`: L∞ with as many unmodified as modified evidences per batch;
- `ftm_answers`: L∞ with known same-relation neighbours, labelled with θ0's own answers, in every
  batch (`preserve_objective: answers`);
- `ftm_kl`: L∞ with same-relation neighbours scored by KL(θ0 ‖ θ) (`preserve_objective: kl`);
- `ftm_nullspace`, `ftm_kl_nullspace`: L∞ ∩ the null space of the preserved keys (`key_constraint`), the latter
  with the KL objective too;
- `locft_bf`: LocFT-BF (ICLR 2026), its recipe on one MLP output projection, its layer swept;
- `ftl`: FT-L as ROME and EasyEdit run it — the MLP output projection of `ftl_block`, lr 5e-4,
  25 steps, early stop at loss 1e-2, ε swept (5e-4 is theirs);
- `knn`: kNN-LM (Appendix F), ε swept over quantiles of the distances.

The compare runs in two steps. First the block: the methods that edit one block (the FTM variants but L∞, and FTA)
edit `compare_block`, or with 'auto' the block of FTM, L∞'s best point on validation, whose points then train first
(`choose_block`) whether or not ftm_linf is among `compare_methods`. Then each method's points, in the table's order.

Writes compare.md (the table, then every point), compare.json, points.jsonl (a resumed compare
recomputes nothing), compare.png (the A_M / A_F\\S trade-off of every point, picks marked) and
frontier.png (per method: A_M against retention, its Pareto front and its pick).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..edit_config import EditConfig
from ..evaluation.results import format_percent, format_versions, plotting
from ..files import atomic_write_text, read_json
from ..preservation import Locality
from ..run_folder import claim_run_folder
from .grid import GridRunner
from .grid_point import GridPoint, point_of
from .job_config import COMPARE_METHODS, JobConfig
from .method import Method, MethodContext
from .methods import METHODS, method_arguments
from .picks import TEST, VALIDATION, best, pick_rule
from .points import open_points, save_points
from .reports import Column, fold_report, known_facts_note, metric, percent, point, shared_settings, table


LABELS = {name: method.label for name, method in METHODS.items()}
BLOCK_STAGE = "ftm_linf"  # the method whose best point on validation is the compare's block under compare_block auto


def run_compare(
    job: JobConfig,
    args: EditConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """Run every method's sweep (resuming from points.jsonl); write the table and the plot; return the picks."""
    folder = args.output_dir
    with claim_run_folder(folder, args.overwrite_output_dir, resuming=True, lock=PartialState().is_main_process):
        done = open_points(folder, job, args)
        return _compare(job, args, GridRunner(job, args, model, tokenizer), done, folder)


def _compare(
    job: JobConfig, args: EditConfig, runner: GridRunner, done: dict[str, dict], folder: str
) -> dict[str, Any]:
    chosen = [method for name, method in METHODS.items() if name in (job.compare_methods or COMPARE_METHODS)]
    arguments = method_arguments(job)

    def score(method: Method, point: GridPoint) -> dict:
        if point.key not in done:
            print(f"[compare] {method.label}: {point.describe()}", flush=True)
            done[point.key] = runner.score(point, os.path.join(folder, "points", f"{len(done):03d}"))
            save_points(folder, done)
        return done[point.key]

    grids = dict(job.compare_deltas or {})
    context = MethodContext(
        runner,
        linf=grids.get("linf") or job.sweep_deltas or [args.delta or 1e-3],
        grids=grids,
        blocks=[str(block) for block in job.sweep_blocks or args.edit_blocks],
    )
    context.block = choose_block(job, context, score) if any(method.edits_block for method in chosen) else None
    rows = {}
    for method in chosen:
        method_context = dataclasses.replace(context, arguments=arguments.get(method.arguments))
        rows[method.name] = [score(method, point) for point in method.grid_points(method_context)]
    picks = {method: best(method_rows, VALIDATION, job.pick_min_retention) for method, method_rows in rows.items()}
    write_compare(folder, rows, picks, job, args, context.block, runner.locality, runner.folds)
    return picks


def choose_block(job: JobConfig, context: MethodContext, score: Callable[[Method, GridPoint], dict]) -> str:
    """The block the block-editing methods edit: `compare_block`, or with 'auto' the block of FTM, L∞'s best point
    on validation (its points scored first: they are ftm_linf's own, trained once)."""
    if job.compare_block != "auto":
        return job.compare_block
    stage = METHODS[BLOCK_STAGE]
    rows = [score(stage, point) for point in stage.grid_points(context)]
    return point_of(best(rows, VALIDATION, job.pick_min_retention)).block


def merge_compares(lanes: list[str], job: JobConfig, args: EditConfig) -> dict[str, Any]:
    """Merge compares run as lanes (one process per group of `compare_methods`, e.g. side by side on one GPU)
    into `args.output_dir`, and write its table and plots without training anything.

    Every lane must hold points made with the settings of `job` and `args` (the same check a resumed compare
    makes), have scored the same locality facts and edited the same block; each lane's methods are picked as
    `memedit compare` picks them."""
    if not lanes:
        raise ValueError("merge_compares needs the folders of at least one compare lane.")
    done: dict[str, dict] = {}
    localities, blocks, reported, folds = [], set(), set(), []
    for lane in lanes:
        written = read_json(
            os.path.join(lane, "compare.json"),
            f"{lane} holds no compare.json: let that lane's compare finish (it resumes) first.",
        )
        done.update(open_points(lane, job, args))
        localities.append(written["locality"])
        blocks.add(written.get("block"))
        reported.update(written.get("rows") or {})
        folds.append((written.get("relation_folds") or {}).get("relations", []))
    if any(dealt != folds[0] for dealt in folds):
        raise ValueError(
            f"The lanes {', '.join(lanes)} dealt their relations into other folds: they are not one compare."
        )
    if any(locality != localities[0] for locality in localities):
        raise ValueError(f"The lanes {', '.join(lanes)} scored different locality facts: they are not one compare.")
    blocks.discard(None)  # a lane none of whose methods edits the compare's block
    if len(blocks) > 1:
        raise ValueError(
            f"The lanes {', '.join(lanes)} edited different blocks ({', '.join(sorted(blocks))}): give every "
            "lane the same compare_block."
        )
    unknown = sorted(reported - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown compare methods ({', '.join(map(str, unknown))}) in {', '.join(lanes)}.")
    fields = {f.name for f in dataclasses.fields(Locality)}
    locality = Locality(**{key: value for key, value in localities[0].items() if key in fields})
    folder = args.output_dir
    with claim_run_folder(folder, args.overwrite_output_dir, resuming=True, lock=PartialState().is_main_process):
        merged = {**open_points(folder, job, args), **done}
        rows: dict[str, list[dict]] = {name: [] for name in METHODS if name in reported}  # the table's order
        for row in merged.values():
            rows.get(point_of(row).method, []).append(row)
        picks = {method: best(method_rows, VALIDATION, job.pick_min_retention) for method, method_rows in rows.items()}
        save_points(folder, merged)
        write_compare(folder, rows, picks, job, args, next(iter(blocks), None), locality, folds[0])
    return picks


def write_compare(
    folder: str,
    rows: dict[str, list[dict]],
    picks: dict[str, dict],
    job: JobConfig,
    args: EditConfig,
    block: str | None,
    locality: Locality,
    folds: Sequence[Sequence[str]] = (),
) -> None:
    """compare.md, compare.json and the plots; with `folds` (`relation_folds`) the held-out-relation section too."""
    lines = [
        f"# Compare: {job.model_name_or_path}, {job.benchmark} m={job.m}, starting from {job.setting}",
        "",
        f"Each method's point with {pick_rule(job.pick_min_retention)} on the validation half of the facts; "
        "metrics on the test half.",
        f"Locality measured on {locality.describe()}; these and the modified facts split by subject into validation "
        "and test halves. "
        f"{known_facts_note([r for method_rows in rows.values() for r in method_rows])}",
        shared_settings(args),
        "",
        *table(_pick_columns(rows), picks.values()),
    ]
    before = next(iter(picks.values()))[TEST].get("a_fs_before")
    if block is None:
        where = "Each point edits the block it names."
    else:
        rule = "the best L∞ block on validation" if job.compare_block == "auto" else "compare_block"
        where = f"FTM variants and FTA edit block {block} ({rule})."
    lines += [
        "",
        f"A_F\\S before any edit: {format_percent(before)}. {where}",
        "",
        "## Every point",
        "",
        *table(POINT_COLUMNS, (row for method_rows in rows.values() for row in method_rows)),
    ]
    written = {"picks": picks, "rows": rows, "block": block, "locality": locality.to_dict()}
    if folds:
        section, written["relation_folds"] = fold_report(rows, folds, job.pick_min_retention, LABELS)
        lines[lines.index("## Every point") - 1 : lines.index("## Every point") - 1] = section
    lines += ["", f"Library versions: {format_versions()}."]
    atomic_write_text(os.path.join(folder, "compare.md"), "\n".join(lines) + "\n")
    atomic_write_text(os.path.join(folder, "compare.json"), json.dumps(written, indent=2))
    plot_compare(folder, rows, picks, job)
    plot_frontier(folder, rows, picks, job)


def _label(row: dict) -> str:
    return LABELS[point_of(row).method]


def _drift(name: str) -> Callable[[dict], str]:
    def cell(row: dict) -> str:
        value = (row.get("drift") or {}).get(name)
        return "–" if value is None else f"{value:.3g}"

    return cell


def _pick_columns(rows: dict[str, list[dict]]) -> tuple[Column, ...]:
    """The columns of the table of picks, one row per method (its points counted in `rows`)."""
    return (
        ("method", _label),
        ("picked on validation", point),
        ("A_M", percent(TEST, "a_m")),
        ("A_F\\S", percent(TEST, "a_fs")),
        ("Ā", percent(TEST, "avg_acc")),
        ("retention", metric(TEST, "retention")),
        ("retention, edited relations", metric(TEST, "retention_edited")),
        ("agreement", percent(TEST, "agreement")),
        ("bleed", percent(TEST, "bleed")),
        ("gen A_M", percent(TEST, "gen_a_m")),
        ("gen A_M, comma stop", percent(TEST, "gen_a_m_comma")),
        ("gen retention", metric(TEST, "gen_retention")),
        ("drift KL", _drift("drift_kl")),
        ("ppl ratio", _drift("perplexity_ratio")),
        ("points", lambda row: str(len(rows[point_of(row).method]))),
    )


POINT_COLUMNS = (
    ("method", _label),
    ("point", point),
    ("A_M", percent(TEST, "a_m")),
    ("Ā val", percent(VALIDATION, "avg_acc")),
    ("retention val", metric(VALIDATION, "retention")),
    ("A_F\\S test", percent(TEST, "a_fs")),
    ("Ā test", percent(TEST, "avg_acc")),
    ("retention test", metric(TEST, "retention")),
    ("edited relations val", metric(VALIDATION, "retention_edited")),
    ("edited relations test", metric(TEST, "retention_edited")),
)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (both maximised), by increasing first coordinate."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def plot_frontier(folder: str, rows: dict[str, list[dict]], picks: dict[str, dict], job: JobConfig) -> str:
    """frontier.png: per method, A_M against retention (test) of every point, its Pareto front and its pick."""
    plt = plotting()
    methods = [m for m in rows if any(r[TEST].get("retention") is not None for r in rows[m])]
    columns = min(3, max(1, len(methods)))
    lines = -(-len(methods) // columns) if methods else 1
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.6 * lines), squeeze=False)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, method in zip(axes.flat, methods):
        points = [
            (100 * r[TEST]["retention"], 100 * (r[TEST]["a_m"] or 0))
            for r in rows[method]
            if r[TEST].get("retention") is not None
        ]
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=18, alpha=0.6)
        front = pareto_front(points)
        ax.plot(
            [p[0] for p in front],
            [p[1] for p in front],
            color="C1",
            linewidth=1.2,
            marker="o",
            markersize=7,
            markerfacecolor="none",
            label="Pareto front",
        )  # circled, so a front of one point shows too
        chosen = picks[method][TEST]
        if chosen.get("retention") is not None:
            ax.scatter(
                [100 * chosen["retention"]],
                [100 * (chosen["a_m"] or 0)],
                marker="*",
                s=160,
                color="C3",
                edgecolor="black",
                zorder=3,
                label="picked on validation",
            )
        ax.set_title(LABELS[method], fontsize=9)
        ax.set_xlabel("retention (%, test)", fontsize=8)
        ax.set_ylabel("A_M (%)", fontsize=8)
        ax.set_xlim(0, 102)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(f"A_M against retention: {job.benchmark}, m = {job.m}", fontsize=10)
    path = os.path.join(folder, "frontier.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compare(folder: str, rows: dict[str, list[dict]], picks: dict[str, dict], job: JobConfig) -> str:
    """A_M against A_F\\S (test) for every point of every method; each method's pick drawn large."""
    plt = plotting()
    fig, ax = plt.subplots(figsize=(7.2, 5.4))
    for index, (method, method_rows) in enumerate(rows.items()):
        color = f"C{index}"
        xs = [100 * (r[TEST]["a_fs"] or 0) for r in method_rows]
        ys = [100 * (r[TEST]["a_m"] or 0) for r in method_rows]
        ax.scatter(xs, ys, color=color, alpha=0.45, s=22)
        chosen = picks[method][TEST]
        ax.scatter(
            [100 * (chosen["a_fs"] or 0)],
            [100 * (chosen["a_m"] or 0)],
            color=color,
            s=110,
            edgecolor="black",
            label=f"{LABELS[method]} (Ā {format_percent(chosen['avg_acc'])})",
        )
    before = next(iter(picks.values()))[TEST].get("a_fs_before")
    if before is not None:
        ax.axvline(100 * before, color="grey", linestyle="--", linewidth=1, label="A_F\\S before the edit")
    ax.set_xlabel("A_F\\S, unmodified facts (%, test)")
    ax.set_ylabel("A_M, modified facts (%)")
    ax.set_title(
        f"Methods compared: {job.benchmark}, m = {job.m}\n(small: every point swept; large: picked on validation)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    path = os.path.join(folder, "compare.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
