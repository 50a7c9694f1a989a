"""`memedit sweep`: a grid over δ × blocks (× norms), or kNN-LM's ε; its table and plots."""

from __future__ import annotations

import os

from ..experiments import run_sweep
from .parser import parse


def main(argv: list[str]) -> None:
    job, args, _ = parse("sweep", argv)
    run_sweep(job, args)
    print(open(os.path.join(args.output_dir, "sweep.md"), encoding="utf-8").read())
    print(f"plots: {os.path.join(args.output_dir, 'tradeoff.png')}, {os.path.join(args.output_dir, 'avg_acc_per_block.png')}")
