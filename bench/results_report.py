"""A results report in markdown, written from run folders alone, so a figure cannot drift from its run.

    python bench/results_report.py runs/demo_seed0 runs/demo_seed1 runs/demo_seed2 \
        --title "The demo, three seeds" --output docs/results/2027-01-demo.md

Each folder is one run of `memedit edit` / `train_edit.py` (or `memedit eval`'s `eval/<name>`): its results.json
(`hf_memedit.evaluation.results.ResultsRecord`) is the only source of every cell. The report holds one row per
run (model, method, seed, m, A_M on the training and on the test phrasing, retention with the facts it rests on,
A_M by generation with its stop rule, drift, wall time), the spread over seeds of runs that differ only in their
seed, each stream's batches (`memedit stream`'s stream.json: each batch's efficacy right after it and at the end, the
earlier batches', retention), and each run's locality facts, constraint and library versions.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from statistics import mean
from typing import Any

from hf_memedit.edit_config import constraint_record, describe_constraint
from hf_memedit.evaluation.results import RESULTS_JSON, ResultsRecord, format_metric, format_percent, format_versions
from hf_memedit.experiments.stream import read_stream
from hf_memedit.files import atomic_write_text


NORMS = {"linf": "L∞", "l2": "L2", "fisher": "Fisher", "none": "unconstrained"}
# What generation-based scoring compares (hf_memedit.evaluation.scoring.generate_answers): the greedy answer up to
# EOS, the first newline, or the first period unless the object has one, after SQuAD's normalisation.
GENERATION_STOP = "EOS, newline or period"
GENERATION_COMMA_STOP = "stopped at a comma too"
COLUMNS = (
    "run",
    "model",
    "method",
    "seed",
    "m",
    "A_M, training phrasing",
    "A_M, test phrasing",
    "retention",
    "gen A_M (stop)",
    "drift KL",
    "ppl ratio",
    "wall time",
)
# Config keys that do not make two runs different edits: runs differing only in these are seeds of one edit.
NOT_THE_EDIT = {"seed", "output_dir", "edit_dir", "eval_name"}


def load_runs(folders: Sequence[str]) -> list[tuple[str, ResultsRecord]]:
    """(name, record) per run folder; a folder that is not a run stops with one line naming it."""
    runs = []
    for folder in folders:
        if not os.path.isfile(os.path.join(folder, RESULTS_JSON)):
            raise ValueError(
                f"{folder} holds no {RESULTS_JSON}: give run folders written by `memedit edit`, "
                "train_edit.py or `memedit eval` (its eval/<name>)."
            )
        runs.append((os.path.basename(os.path.normpath(folder)) or folder, ResultsRecord.load(folder)))
    return runs


def describe_method(config: dict[str, Any]) -> str:
    """The edit in a few words: setting, ball, key constraint, preservation, blocks ("ftm · L∞ 0.03 ∩ null
    space 0.7 · KL · block 25")."""
    norm = config.get("norm") or "none"
    parts = [str(config.get("setting", "?"))]
    ball = NORMS.get(norm, norm) + (
        f" {config['delta']:g}" if norm != "none" and config.get("delta") is not None else ""
    )
    key = config.get("key_constraint")
    if key == "nullspace":
        energy = config.get("nullspace_energy")
        ball += (
            f" ∩ null space {energy:g}"
            if energy is not None
            else f" ∩ null space τ {config.get('nullspace_threshold'):g}"
        )
    elif key == "output":
        ball += f" ∩ output ρ {config.get('output_rho'):g}"
    parts.append(ball)
    objective = config.get("preserve_objective") or "none"
    if objective != "none":
        weight = config.get("preserve_weight")
        parts.append(objective if weight in (None, 1, 1.0) else f"{objective} λ {weight:g}")
    blocks = config.get("edit_blocks")
    if blocks:
        parts.append(("block " if len(blocks) == 1 else "blocks ") + ", ".join(map(str, blocks)))
    return " · ".join(parts)


def generation_cell(record: ResultsRecord) -> str:
    """A_M by greedy generation with its stop rule, and whether the targets taught the model to stop."""
    if "gen_a_m" not in record.metrics:
        return "–"
    taught = [
        *(["EOS targets"] if record.config.get("eos_target") else []),
        *([f"targets end with {record.config['target_suffix']!r}"] if record.config.get("target_suffix") else []),
    ]
    taught = " and ".join(taught) or "no EOS targets"
    cell = f"{format_percent(record.metrics['gen_a_m'])} ({GENERATION_STOP}; {taught})"
    if "gen_a_m_comma" in record.metrics:
        cell += f"; {format_percent(record.metrics['gen_a_m_comma'])} ({GENERATION_COMMA_STOP})"
    return cell


def _number(value: Any, digits: str = ".4g") -> str:
    return "–" if value is None else format(value, digits)


def run_row(name: str, record: ResultsRecord) -> list[str]:
    metrics = record.metrics
    return [
        name,
        record.model or str(record.config.get("model_name_or_path", "?")),
        describe_method(record.config),
        _number(record.seed, ""),
        _number(record.benchmark.get("m", record.config.get("m")), ""),
        format_percent(metrics.get("a_m_train")),
        format_percent(metrics.get("a_m")),
        format_metric(metrics, "retention"),
        generation_cell(record),
        _number(metrics.get("drift_kl")),
        _number(metrics.get("perplexity_ratio")),
        "–" if record.seconds is None else f"{record.seconds:.0f} s",
    ]


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def _edit_key(record: ResultsRecord) -> tuple:
    """What makes an edit, less its seed: model, benchmark and every config value but the seed and paths."""
    config = sorted((key, repr(value)) for key, value in record.config.items() if key not in NOT_THE_EDIT)
    benchmark = sorted((key, repr(value)) for key, value in record.benchmark.items())
    return record.model, tuple(benchmark), tuple(config)


def _spread(values: list[float]) -> str:
    low, high = min(values), max(values)
    span = format_percent(low) if low == high else f"{format_percent(low)}–{format_percent(high)}"
    return f"{span} (mean {format_percent(mean(values))})"


def seed_rows(runs: list[tuple[str, ResultsRecord]]) -> list[list[str]]:
    """One row per edit run with two seeds or more: the range and mean of A_M and retention over its seeds."""
    groups: dict[tuple, list[tuple[str, ResultsRecord]]] = defaultdict(list)
    for name, record in runs:
        groups[_edit_key(record)].append((name, record))
    rows = []
    for members in groups.values():
        seeds = sorted({record.seed for _, record in members if record.seed is not None})
        if len(seeds) < 2:
            continue
        first = members[0][1]
        row = [", ".join(name for name, _ in members), describe_method(first.config), ", ".join(map(str, seeds))]
        for key in ("a_m", "retention"):
            values = [record.metrics[key] for _, record in members if record.metrics.get(key) is not None]
            row.append(_spread(values) if values else "–")
        rows.append(row)
    return rows


# A facts-file run's own figures (`memedit edit --facts`): what the facts gave beside the benchmark's columns.
FACTS_COLUMNS = (
    ("paraphrase_a_m", "generalisation: unseen paraphrases"),
    ("gen_paraphrase_a_m", "… by generation"),
    ("gen_retention", "neighbourhood kept by generation"),
    ("question_a_m", "questions (chat template)"),
)


def facts_rows(runs: list[tuple[str, ResultsRecord]]) -> list[list[str]]:
    """One row per run of a facts file with the figures only a facts file gives, each with what it rests on."""
    rows = []
    for name, record in runs:
        if not any(key in record.metrics for key, _ in FACTS_COLUMNS[:1]):
            continue
        rows.append([name] + [format_metric(record.metrics, key) for key, _ in FACTS_COLUMNS])
    return rows


def load_streams(folders: Sequence[str]) -> dict[str, dict]:
    """name → stream record (stream.json) of each run folder that holds a stream."""
    streams = {}
    for folder in folders:
        record = read_stream(folder)
        if record is not None:
            streams[os.path.basename(os.path.normpath(folder)) or folder] = record
    return streams


def _shares(*values: Any) -> str:
    """Shares as percentages, '/'-joined (teacher-forced / by generation at a comma)."""
    return " / ".join(format_percent(value) for value in values)


def stream_summary_rows(streams: dict[str, dict]) -> list[list[str]]:
    """One row per stream: its options, and what the first batch kept: its efficacy right after it and at the end."""
    rows = []
    for name, record in streams.items():
        key, batches = record["key"], record["batches"]
        first = batches[0] if batches else {}
        end = (record.get("final_by_batch") or [None])[0], (record.get("gen_final_by_batch_comma") or [None])[0]
        rows.append(
            [
                name,
                record["track"],
                f"{len(batches)} × {key['batch_size']}",
                str(key["center"]),
                "all (replay)" if key.get("replay") else "yes" if key.get("preserve_earlier") else "no",
                "yes" if key.get("earlier_keys") else "no",
                _shares(first.get("efficacy"), first.get("gen_efficacy_comma")),
                _shares(*end) if record.get("finished") else "–",
            ]
        )
    return rows


def stream_batch_rows(record: dict) -> list[list[str]]:
    """One row per batch of a stream: right after it (this batch, the earlier ones, retention), and at the end."""
    finals = record.get("final_by_batch") or []
    gen_finals = record.get("gen_final_by_batch_comma") or []
    rows = []
    for index, batch in enumerate(record["batches"]):
        rows.append(
            [
                str(batch["batch"]),
                _shares(batch.get("efficacy"), batch.get("gen_efficacy_comma")),
                _shares(batch.get("earlier_efficacy"), batch.get("gen_earlier_efficacy_comma")),
                f"{format_percent(batch.get('retention'))} (of {batch.get('n_known', 0)})",
                _shares(
                    finals[index] if index < len(finals) else None,
                    gen_finals[index] if index < len(gen_finals) else None,
                ),
                _number(batch.get("distance_to_theta0")),
                "–" if batch.get("seconds") is None else f"{batch['seconds']:.0f} s",
            ]
        )
    return rows


STREAM_SCORING = (
    "Each share is teacher-forced / by greedy generation stopped at EOS, newline, '.' or ',' (a fact right when every "
    "object token is the argmax / when its answer is the new object); retention is teacher-forced, on the unmodified "
    "facts θ0 knew, disjoint from all preservation data."
)


def report(runs: list[tuple[str, ResultsRecord]], title: str, streams: dict[str, dict] | None = None) -> str:
    lines = [
        f"# {title}",
        "",
        f"Written by `python bench/results_report.py` from each run folder's {RESULTS_JSON} alone. A_M is scored "
        "on the training phrasing and on the test phrasing (the paper's A_M; for a facts file, the fact's own "
        "prompt, so both are the same unless the paraphrases were trained on); retention "
        "is the share of the unmodified facts known before the edit that are still right, with how many facts "
        "it rests on. Drift: next-token KL(θ0 ‖ θ) and perplexity ratio on held-out samples of θ0.",
        "",
    ]
    lines += _table(COLUMNS, [run_row(name, record) for name, record in runs])
    facts = facts_rows(runs)
    if facts:
        lines += ["", "## Facts files", ""]
        lines += _table(("run", *(label for _, label in FACTS_COLUMNS)), facts)
    if streams:
        lines += ["", "## Streams", "", STREAM_SCORING, ""]
        lines += _table(
            (
                "run",
                "track",
                "batches",
                "ball's centre",
                "earlier facts trained on",
                "earlier keys in the null space",
                "first batch right after it",
                "first batch at the end",
            ),
            stream_summary_rows(streams),
        )
        for name, record in streams.items():
            lines += ["", f"### {name}, batch by batch", ""]
            lines += _table(
                (
                    "batch",
                    "this batch right after it",
                    "earlier batches after it",
                    "retention after it",
                    "this batch at the end",
                    "max |θ − θ0|",
                    "time",
                ),
                stream_batch_rows(record),
            )
    seeds = seed_rows(runs)
    if seeds:
        lines += ["", "## Over seeds", ""]
        lines += _table(("runs", "method", "seeds", "A_M, test phrasing", "retention"), seeds)
    lines += ["", "## The runs", ""]
    for name, record in runs:
        benchmark = ", ".join(f"{key} {value}" for key, value in record.benchmark.items())
        lines.append(f"- **{name}**: {describe_constraint(constraint_record(record.config))}; benchmark {benchmark}.")
        if record.locality.get("description"):
            lines.append(f"  Locality measured on {record.locality['description']}.")
        lines.append(f"  Versions: {format_versions(record.versions)}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders, each holding a results.json")
    parser.add_argument("--title", default="Results", help="the report's heading")
    parser.add_argument("--output", help="also write the report to this markdown file (never over an existing one)")
    args = parser.parse_args(argv)
    try:
        text = report(load_runs(args.runs), args.title, load_streams(args.runs))
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"results_report: {error}")
    if args.output:
        if os.path.exists(args.output):
            sys.exit(f"results_report: {args.output} exists; give a new file name (reports are never overwritten).")
        atomic_write_text(args.output, text)
    print(text, end="")


if __name__ == "__main__":
    main()
