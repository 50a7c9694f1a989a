"""`memedit edit` (and `train_edit.py`): one edit in the configured setting, written as a run folder."""

from __future__ import annotations

import os

from ..edit_config import EditConfig, constraint_record, describe_constraint
from ..evaluation.results import DRIFT_LABELS, METRIC_LABELS, format_metric
from ..experiments import RunOutcome, run_edit
from .parser import MemeditParser


def format_summary(outcome: RunOutcome, args: EditConfig, show_examples: int = 5) -> str:
    metrics = outcome.record.metrics
    rows = [(label, format_metric(metrics, key)) for key, label in METRIC_LABELS.items() if key in metrics]
    rows += [(label, f"{metrics[key]:.4g}") for key, label in DRIFT_LABELS.items() if key in metrics]
    if outcome.trainer is not None:
        rows.append(("constraint", describe_constraint({**constraint_record(vars(args)), "blocks": args.edit_blocks})))
        rows.append((f"max ‖θ − θ0‖ ({args.norm if args.norm != 'none' else 'linf'})", f"{outcome.trainer.projector.distance():.3g}"))
    rows.append(("facts (modified / unmodified)", f"{metrics.get('n_modified')} / {metrics.get('n_unmodified')}"))
    if outcome.record.locality.get("description"):
        rows.append(("locality measured on", outcome.record.locality["description"]))
    rows.append(("wall time", f"{outcome.record.seconds:.1f} s"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if outcome.examples:
        generated = "generated" in outcome.examples[0]
        lines += ["", "edited facts (old -> new) [prediction after the edit" + ("; what greedy generation answers" if generated else "")
                  + "], learned ones first:"]
        for fact in sorted(outcome.examples, key=lambda f: not f["correct"])[:show_examples]:
            mark = "ok" if fact["correct"] else "missed"
            answer = f"; {fact['generated']!r}, {'ok' if fact['generated_correct'] else 'missed'}" if generated else ""
            lines.append(f"  {fact['text'].replace('[Y]', '___')}  {fact['old']} -> {fact['new']}  [{fact['predicted']}, {mark}{answer}]")
    lost = outcome.record.lost
    if lost:
        lines += ["", f"unmodified facts the edit lost ({len(lost)}; all in results.md) [prediction after the edit; "
                      "logit margin before it], those now giving a new object first:"]
        for fact in sorted(lost, key=lambda f: not f["bleed"])[:show_examples]:
            mark = ", a new object" if fact["bleed"] else ""
            margin = f"; margin {fact['margin_before']:.2f}" if fact.get("margin_before") is not None else ""
            lines.append(f"  {fact['text'].replace('[Y]', '___')}  {fact['object']}  [{fact['predicted']}{mark}{margin}]")
    lines += ["", f"run folder: {os.path.abspath(args.output_dir)}"]
    return "\n".join(lines)


DESCRIPTION = "Run one edit in the configured setting and write the run folder (the default job)."


def make_parser() -> MemeditParser:
    return MemeditParser("edit", DESCRIPTION)


def main(argv: list[str]) -> None:
    job, args, _ = make_parser().parse_args_and_config(argv)
    outcome = run_edit(job, args)
    if outcome.trainer is None or outcome.trainer.is_world_process_zero():
        print(format_summary(outcome, args, job.show_examples))
