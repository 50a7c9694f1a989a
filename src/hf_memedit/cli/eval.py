"""`memedit eval`: the model (optionally with an edit applied) on the benchmark, into its own folder."""

from __future__ import annotations

import os

from ..evaluation.results import RESULTS_JSON
from ..experiments import run_eval
from .parser import MemeditParser


DESCRIPTION = "Evaluate the model (optionally with an edit applied) on the benchmark; write results."


def make_parser() -> MemeditParser:
    parser = MemeditParser("eval", DESCRIPTION)
    parser.add_argument(
        "--edit_dir",
        default=None,
        help="An edit to apply first: a run's edit/ folder, a delta package or its Hub id (checked whole before any "
        "write, see docs/sharing.md).",
    )
    parser.add_argument(
        "--eval_name",
        default=None,
        help="Results go to <output_dir>/eval/<eval_name> (default: the UTC time), never over a run's own record.",
    )
    return parser


def main(argv: list[str]) -> None:
    job, args, extra = make_parser().parse_args_and_config(argv)
    record, folder = run_eval(job, args, extra.edit_dir, extra.eval_name)
    print(record.to_markdown())
    print(f"results: {os.path.join(folder, RESULTS_JSON)}")
