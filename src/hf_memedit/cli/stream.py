"""`memedit stream`: facts edited as a stream of batches, in arrival order, into one run folder; run again to resume
a killed stream, or with a longer facts file to extend a finished one."""

from __future__ import annotations

import os

from ..evaluation.results import DRIFT_LABELS, METRIC_LABELS, format_metric
from ..experiments.stream import CENTERS, STREAM_PLOT, STREAM_RECORD, StreamOptions, StreamOutcome, run_stream
from .parser import MemeditParser


DESCRIPTION = "Edit facts as a stream of batches, each trained once from where the last left the model (resumable)."


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(f"expected true or false, got {value!r}")
    return value.lower() == "true"


def make_parser() -> MemeditParser:
    parser = MemeditParser("stream", DESCRIPTION)
    group = parser.add_argument_group("stream (memedit stream only; command line only)")
    group.add_argument("--batch_size", type=int, required=True, help="Facts per batch of the stream (b).")
    group.add_argument(
        "--stream_center",
        default="theta0",
        choices=CENTERS,
        help="The ball's centre: theta0 (‖θ_T − θ0‖ ≤ δ for the whole stream) or previous (the state "
        "before each batch: each batch's step bounded, the stream's drift not).",
    )
    group.add_argument(
        "--stream_preserve_earlier",
        type=_bool,
        default=True,
        help="Mix earlier batches' facts, with their new objects, into later batches (true|false).",
    )
    group.add_argument(
        "--stream_earlier_ratio",
        type=float,
        default=1.0,
        help="Earlier facts per fact of the batch in every training batch.",
    )
    group.add_argument(
        "--stream_replay",
        type=_bool,
        default=False,
        help="LocFT-BF's breadth-first track: batch k trains on the facts of batches 1..k (true|false).",
    )
    return parser


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
    job, args, extra = make_parser().parse_args_and_config(argv)
    options = StreamOptions(
        extra.batch_size,
        extra.stream_center,
        extra.stream_preserve_earlier,
        extra.stream_earlier_ratio,
        extra.stream_replay,
    )
    outcome = run_stream(job, args, options)
    print(format_summary(outcome, args.output_dir))
