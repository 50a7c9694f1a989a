"""`memedit edit` (and `train_edit.py`): one edit in the configured setting, written as a run folder."""

from __future__ import annotations

import os

from ..blocks import resolved_blocks
from ..edit_config import EditConfig, constraint_record, describe_constraint
from ..evaluation.results import DRIFT_LABELS, METRIC_LABELS, format_metric
from ..experiments import JobConfig, RunOutcome, load_config, run_edit
from ..experiments.facts_source import FactsFile
from ..experiments.loading import load_tokenizer
from ..facts import describe_facts
from .parser import MemeditParser


def format_summary(outcome: RunOutcome, args: EditConfig, show_examples: int = 5) -> str:
    metrics = outcome.record.metrics
    rows = [(label, format_metric(metrics, key)) for key, label in METRIC_LABELS.items() if key in metrics]
    rows += [(label, f"{metrics[key]:.4g}") for key, label in DRIFT_LABELS.items() if key in metrics]
    if outcome.trainer is not None:
        edit = outcome.trainer.edit_model
        blocks = resolved_blocks(edit.model, edit.selector_config)  # "-5" of 30 blocks is 25
        rows.append(("constraint", describe_constraint({**constraint_record(vars(args)), "blocks": blocks})))
        rows.append(
            (
                f"max ‖θ − θ0‖ ({args.norm if args.norm != 'none' else 'linf'})",
                f"{outcome.trainer.projector.distance():.3g}",
            )
        )
    rows.append(("facts (modified / unmodified)", f"{metrics.get('n_modified')} / {metrics.get('n_unmodified')}"))
    if outcome.record.locality.get("description"):
        rows.append(("locality measured on", outcome.record.locality["description"]))
    rows.append(("wall time", f"{outcome.record.seconds:.1f} s"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if outcome.record.scoring:
        lines += ["", "how it was scored:"] + [f"  {what}: {how}" for what, how in outcome.record.scoring.items()]
    if outcome.examples:
        generated = "generated" in outcome.examples[0]
        lines += [
            "",
            "edited facts (old -> new) [prediction after the edit"
            + ("; what greedy generation answers, before -> after" if generated else "")
            + "], learned ones first:",
        ]
        for fact in sorted(outcome.examples, key=lambda f: not f["correct"])[:show_examples]:
            mark = "ok" if fact["correct"] else "missed"
            answer = (
                (
                    f"; {fact['generated_before']!r} -> {fact['generated']!r}, "
                    f"{'ok' if fact['generated_correct'] else 'missed'}"
                )
                if generated
                else ""
            )
            lines.append(
                f"  {fact['text'].replace('[Y]', '___')}  {fact['old']} "
                f"-> {fact['new']}  [{fact['predicted']}, {mark}{answer}]"
            )
            if "question_answer" in fact:
                lines.append(
                    f"    asked as a question: {fact['question_answer_before']!r} -> {fact['question_answer']!r}, "
                    f"{'ok' if fact['question_correct'] else 'missed'}"
                )
    lost = outcome.record.lost
    if lost:
        lines += [
            "",
            f"unmodified facts the edit lost ({len(lost)}; all in results.md) [prediction after the edit; "
            "logit margin before it], those now giving a new object first:",
        ]
        for fact in sorted(lost, key=lambda f: not f["bleed"])[:show_examples]:
            mark = ", a new object" if fact["bleed"] else ""
            margin = f"; margin {fact['margin_before']:.2f}" if fact.get("margin_before") is not None else ""
            lines.append(
                f"  {fact['text'].replace('[Y]', '___')}  {fact['object']}  [{fact['predicted']}{mark}{margin}]"
            )
    lines += ["", f"run folder: {os.path.abspath(args.output_dir)}"]
    return "\n".join(lines)


DESCRIPTION = "Run one edit in the configured setting and write the run folder (the default job)."


def make_parser() -> MemeditParser:
    parser = MemeditParser("edit", DESCRIPTION)
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="With --facts: check the facts file against the model's tokenizer and context and print "
        "what would be edited; nothing is trained or written.",
    )
    return parser


def dry_run(job: JobConfig) -> str:
    """What an edit of the job's facts would change, every record checked (`FactsFile.check`), from the model's
    tokenizer and config alone: no weight is loaded, no run folder touched."""
    if not job.facts:
        raise ValueError("--dry_run checks a facts file: give --facts FILE.")
    config, _ = load_config(job)
    source = FactsFile(job.facts, job.train_on_paraphrases, fallback_keep=job.fallback_keep)
    source.check(load_tokenizer(job), config)
    records, made = source.records, source.n_fallback_keep
    text = describe_facts(records)
    if made:
        text += (
            f"\n\n{made} of the keep prompts are made for the facts that give none: their prompt with other "
            "subjects of the file (θ0's answers to them are kept)."
        )
    held = "trained on" if job.train_on_paraphrases else "held out to score generalisation"
    return text + f"\n\nParaphrases are {held}. Nothing was trained or written (dry run)."


def main(argv: list[str]) -> None:
    job, args, extra = make_parser().parse_args_and_config(argv)
    if extra.dry_run:
        print(dry_run(job))
        return
    outcome = run_edit(job, args)
    if outcome.trainer is None or outcome.trainer.is_world_process_zero():
        print(format_summary(outcome, args, job.show_examples))
