"""`memedit` (and `train_edit.py`): edit, sweep, compare, evaluate or push, from a YAML in
trainer_configs/ plus overrides.

    memedit edit  --config trainer_configs/demo_smollm2.yaml [--delta 2e-3 --edit_blocks -1 ...]
    memedit stream --facts facts.jsonl --batch_size 32 --output_dir runs/s   (batches in order; rerun to resume)
    memedit sweep --config trainer_configs/bert_tiny_sweep.yaml
    memedit compare --config trainer_configs/compare_smollm2_geo.yaml
    memedit eval  --config trainer_configs/demo_smollm2.yaml [--edit_dir runs/x/edit]
    memedit push  runs/x --repo_id you/x-edit
    memedit inspect Qwen/Qwen2.5-7B [--edit_blocks 20]   (the layout hf_memedit would use; config only)
    accelerate launch train_edit.py --config ...        (= memedit edit; DDP with --multi_gpu)

Every key of the YAML is a field of `JobConfig` (its four groups), of a compare method's arguments
(`experiments/methods/`), of `EditConfig` or of the command's own options (`memedit stream`'s `StreamOptions`;
`memedit <command> --help` lists them all); a command-line option overrides
the YAML. One module per command, each with its `make_parser()` and `main(argv)` (`MODULES`); `inspect`'s is
`layout.py`, since a module named `inspect` would shadow the standard library's.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any

from huggingface_hub.errors import HfHubHTTPError

from ..sharding import end_process_group
from .parser import read_config


MODULES = {
    "edit": "edit",
    "stream": "stream",
    "sweep": "sweep",
    "compare": "compare",
    "eval": "eval",
    "push": "push",
    "inspect": "layout",
}


def _module(command: str):
    """The module of `memedit <command>`."""
    return importlib.import_module(f".{MODULES[command]}", __name__)


COMMANDS = {name: _module(name).DESCRIPTION for name in MODULES}  # name -> what it does


def parse(command: str, argv: list[str]) -> tuple[Any, ...]:
    """`memedit <command>`'s parser (its module's `make_parser()`) applied to `argv`: (JobConfig, EditConfig, the
    command's own dataclasses, its other options)."""
    return _module(command).make_parser().parse_args_and_config(argv)


def _run(command: str, rest: list[str]) -> None:
    _module(command).main(rest)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: memedit {" + ",".join(COMMANDS) + "} --config FILE [options]\n\n"
        usage += "\n".join(f"  {name:<7} {text}" for name, text in COMMANDS.items())
        usage += "\n\n`memedit <command> --help` lists every option."
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"{usage}\n\nmemedit: error: unknown command {argv[0]!r}")
        print(usage)
        return
    command, rest = argv[0], argv[1:]
    exit_with: tuple = ()  # sys.exit's argument, when the command did not end normally
    try:
        _run(command, rest)
    except ONE_LINE_ERRORS as error:  # bad input, a missing file, no network: one line, no traceback
        exit_with = (f"memedit {command}: error: {_describe(error)}",)
    except SystemExit as error:  # --help, a usage error
        exit_with = (error.code,)
    except BaseException as error:  # a bug or an interrupt: its traceback, printed before the run is released
        traceback.print_exception(error)
        exit_with = (130 if isinstance(error, KeyboardInterrupt) else 1,)
    # Every path ends the process group once the run's frames (and the trainer they hold) are gone: a DDP or FSDP
    # rank that exits with its group alive can abort in Gloo's worker threads (see `end_process_group`).
    end_process_group()
    if exit_with:
        sys.exit(*exit_with)


# What a user can fix gets one line; a bug still shows its traceback.
ONE_LINE_ERRORS = (ValueError, ImportError, OSError, MemoryError, HfHubHTTPError)


def _describe(error: BaseException) -> str:
    """The error's message, with the file and the fix for the OS errors that carry a path."""
    if isinstance(error, PermissionError):
        return f"permission denied: {error.filename or error} (choose a path you can read and write)"
    if isinstance(error, HfHubHTTPError):
        return (
            f"the Hugging Face Hub refused the request ({error}). Check "
            "the repo id, your token (`hf auth login`) and the network."
        )
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.strerror or error}: {error.filename}"
    text = str(error) or type(error).__name__
    if isinstance(error, ConnectionError):
        return f"no connection to the Hugging Face Hub ({text}). Check the network, or unset HF_HUB_OFFLINE."
    return text


__all__ = ["COMMANDS", "main", "parse", "read_config"]
