"""`memedit` (and `train_edit.py`): edit, sweep, compare, evaluate or push, from a YAML in trainer_configs/ plus overrides.

    memedit edit  --config trainer_configs/demo_smollm2.yaml [--delta 2e-3 --edit_blocks -1 ...]
    memedit sweep --config trainer_configs/bert_tiny_sweep.yaml
    memedit compare --config trainer_configs/compare_smollm2_geo.yaml
    memedit eval  --config trainer_configs/demo_smollm2.yaml [--edit_dir runs/x/edit]
    memedit push  runs/x --repo_id you/x-edit
    memedit inspect Qwen/Qwen2.5-7B [--edit_blocks 20]   (the layout hf_memedit would use; config only)
    accelerate launch train_edit.py --config ...        (= memedit edit; DDP with --multi_gpu)

Every key of the YAML is a field of `JobConfig` (its four groups) or `EditConfig` (`memedit edit --help` lists them
all); a command-line option overrides the YAML. One module per command, each with its `main(argv)`.
"""

from __future__ import annotations

import gc
import importlib
import sys

from accelerate import PartialState
from huggingface_hub.errors import HfHubHTTPError

from .parser import parse, read_config


COMMANDS = {  # name -> what it does, from each command's module (its make_parser() and main(argv))
    name: importlib.import_module(f"{__name__}.{name}").DESCRIPTION for name in ("edit", "sweep", "compare", "eval", "push", "inspect")
}




def _run(command: str, rest: list[str]) -> None:
    importlib.import_module(f".{command}", __name__).main(rest)


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
    try:
        _run(command, rest)
    except ONE_LINE_ERRORS as error:  # bad input, a missing file, no network: one line, no traceback
        sys.exit(f"memedit {command}: error: {_describe(error)}")
    end_process_group()


# What a user can fix gets one line; a bug still shows its traceback.
ONE_LINE_ERRORS = (ValueError, ImportError, OSError, MemoryError, HfHubHTTPError)


def _describe(error: BaseException) -> str:
    """The error's message, with the file and the fix for the OS errors that carry a path."""
    if isinstance(error, PermissionError):
        return f"permission denied: {error.filename or error} (choose a path you can read and write)"
    if isinstance(error, HfHubHTTPError):
        return f"the Hugging Face Hub refused the request ({error}). Check the repo id, your token (`hf auth login`) and the network."
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.strerror or error}: {error.filename}"
    text = str(error) or type(error).__name__
    if isinstance(error, ConnectionError):
        return f"no connection to the Hugging Face Hub ({text}). Check the network, or unset HF_HUB_OFFLINE."
    return text


def end_process_group() -> None:
    """End a DDP run's process group while the interpreter is whole; call it once the run's trainer is released.

    A finished trainer's DDP wrapper still holds the group (often inside a reference cycle), so it is
    collected first: only then does destroying the group join Gloo's worker threads. Left to
    interpreter exit, a worker that frees the last collective's tensors needs the GIL after
    finalization began, and the process aborts after a successful run ("terminate called without
    an active exception", pytorch/pytorch#179291).
    """
    gc.collect()
    PartialState().destroy_process_group()



__all__ = ["COMMANDS", "end_process_group", "main", "parse", "read_config"]
