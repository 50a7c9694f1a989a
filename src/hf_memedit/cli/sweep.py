"""`memedit sweep`: a grid over δ × blocks (× norms), or kNN-LM's ε; its table and plots."""

from __future__ import annotations

import os

from ..experiments import run_sweep
from .parser import MemeditParser


DESCRIPTION = (
    "Run a grid over δ × blocks (× norms), or kNN-LM's ε; pick on validation, report test, write a table and plots."
)


def make_parser() -> MemeditParser:
    return MemeditParser("sweep", DESCRIPTION)


def main(argv: list[str]) -> None:
    job, args, _ = make_parser().parse_args_and_config(argv)
    run_sweep(job, args)
    print(open(os.path.join(args.output_dir, "sweep.md"), encoding="utf-8").read())
    print(
        f"plots: {os.path.join(args.output_dir, 'tradeoff.png')}, "
        f"{os.path.join(args.output_dir, 'avg_acc_per_block.png')}"
    )
