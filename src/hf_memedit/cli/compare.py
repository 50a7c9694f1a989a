"""`memedit compare`: every editing method with a small validation sweep each, side by side."""

from __future__ import annotations

import os

from ..experiments import run_compare
from .parser import MemeditParser


DESCRIPTION = "Run every editing method with a small validation sweep each; write a table and a plot side by side."


def make_parser() -> MemeditParser:
    return MemeditParser("compare", DESCRIPTION)


def main(argv: list[str]) -> None:
    job, args, _ = make_parser().parse_args_and_config(argv)
    run_compare(job, args)
    print(open(os.path.join(args.output_dir, "compare.md"), encoding="utf-8").read())
    print(f"plot: {os.path.join(args.output_dir, 'compare.png')}")
