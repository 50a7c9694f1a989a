"""`memedit compare`: every editing method with a small validation sweep each, side by side."""

from __future__ import annotations

import os

from ..experiments import run_compare
from .parser import parse


def main(argv: list[str]) -> None:
    job, args, _ = parse("compare", argv)
    run_compare(job, args)
    print(open(os.path.join(args.output_dir, "compare.md"), encoding="utf-8").read())
    print(f"plot: {os.path.join(args.output_dir, 'compare.png')}")
