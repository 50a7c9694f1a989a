"""`memedit stream`: facts edited as a stream of batches, in arrival order, into one run folder; run again to resume
a killed stream, or with a longer facts file to extend a finished one."""

from __future__ import annotations

import os

from ..evaluation.results import DRIFT_LABELS, METRIC_LABELS, format_metric
from ..experiments.stream import STREAM_PLOT, STREAM_RECORD, StreamOptions, StreamOutcome, run_stream
from .parser import MemeditParser


DESCRIPTION = "Edit facts as a stream of batches, each trained once from where the last left the model (resumable)."


def make_parser() -> MemeditParser:
    return MemeditParser("stream", DESCRIPTION, own=(StreamOptions,))


def format_summary(outcome: StreamOutcome, folder: str) -> str:
    metrics, record = outcome.record.metrics, outcome.stream
    rows = [(label, format_metric(metrics, key)) for key, label in METRIC_LABELS.items() if key in metrics]
    rows += [(label, f"{metrics[key]:.4g}") for key, label in DRIFT_LABELS.items() if key in metrics]
    batches = record["batches"]
    rows.append(("track", record["track"]))
    rows.append(("batches / facts", f"{len(batches)} / {sum(len(batch['facts']) for batch in batches)}"))
    rows.append(("max |θ − θ0| after the stream", f"{batches[-1]['distance_to_theta0']:.3g}" if batches else "–"))
    first = batches[0] if batches else None
    if first is not None and first.get("efficacy") is not None:
        rows.append(
            (
                "first batch: right after it → at the end",
                f"{first['efficacy']:.2%} → {record['final_by_batch'][0]:.2%}",
            )
        )
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += ["", f"run folder: {os.path.abspath(folder)} ({STREAM_RECORD}: each batch; {STREAM_PLOT}: the curve)"]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    job, args, options, _ = make_parser().parse_args_and_config(argv)
    outcome = run_stream(job, args, options)
    print(format_summary(outcome, args.output_dir))
