"""`memedit push`: share a run folder on the Hub (or an exported benchmark as a dataset repo)."""

from __future__ import annotations

import os

from ..evaluation.results import ResultsRecord
from ..experiments import load_run_base
from ..hub import push_edit, push_folder
from ..run_folder import verify_run
from .parser import OneLineArgumentParser


DESCRIPTION = "Share a run folder on the Hub as delta, full or peft (or an exported benchmark as a dataset repo)."


def make_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="memedit push", description=DESCRIPTION)
    parser.add_argument(
        "folder", help="A run folder written by `memedit edit`, or (--repo_type dataset) an export_benchmark folder."
    )
    parser.add_argument("--repo_id", required=True, help="Target repo, e.g. your-name/smollm2-capitals-edit.")
    parser.add_argument(
        "--format",
        default="delta",
        choices=["delta", "full", "peft"],
        help="delta: changed tensors only (small); full: complete checkpoint; peft: stock PEFT adapter.",
    )
    parser.add_argument(
        "--repo_type", default="model", choices=["model", "dataset"], help="dataset: push a benchmark export."
    )
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--license", default=None, help="Licence for the card (default: the base model's when known).")
    parser.add_argument("--token", default=None, help="Hub token (default: the `hf auth login` token or HF_TOKEN).")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co).")
    return parser


def main(argv: list[str]) -> None:
    options = make_parser().parse_args(argv)
    if not os.path.isdir(options.folder):
        raise ValueError(f"{options.folder} is not a folder.")
    if options.repo_type == "dataset":
        url = push_folder(
            options.folder,
            options.repo_id,
            repo_type="dataset",
            private=options.private,
            token=options.token,
            endpoint=options.endpoint,
        )
    else:
        base_model, tokenizer = None, None
        if options.format in ("full", "peft"):  # the package holds the edited model: load its base
            verify_run(options.folder)
            base_model, tokenizer = load_run_base(options.folder, ResultsRecord.load(options.folder))
        url = push_edit(
            options.folder,
            options.repo_id,
            format=options.format,
            private=options.private,
            token=options.token,
            endpoint=options.endpoint,
            license=options.license,
            base_model=base_model,
            tokenizer=tokenizer,
        )
    print(f"pushed: {url}")
