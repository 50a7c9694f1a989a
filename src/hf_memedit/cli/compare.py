"""`memedit compare`: every editing method with a small validation sweep each, side by side."""

from __future__ import annotations

import os

from ..experiments import run_compare
from ..experiments.compare import merge_compares
from .parser import MemeditParser


DESCRIPTION = "Run every editing method with a small validation sweep each; write a table and a plot side by side."


def make_parser() -> MemeditParser:
    parser = MemeditParser("compare", DESCRIPTION)
    parser.add_argument(
        "--merge_lanes",
        nargs="+",
        default=None,
        metavar="FOLDER",
        help="Train nothing: merge these finished compares, run with the same options but each with its own "
        "--compare_methods (lanes, e.g. side by side on one GPU), into --output_dir and write its table and plots.",
    )
    return parser


def main(argv: list[str]) -> None:
    job, args, own = make_parser().parse_args_and_config(argv)
    if own.merge_lanes:
        merge_compares(own.merge_lanes, job, args)
    else:
        run_compare(job, args)
    print(open(os.path.join(args.output_dir, "compare.md"), encoding="utf-8").read())
    print(f"plot: {os.path.join(args.output_dir, 'compare.png')}")
