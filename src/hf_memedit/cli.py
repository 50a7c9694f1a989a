"""`memedit` (and `train_edit.py`): edit, sweep or evaluate from a YAML in trainer_configs/ plus overrides.

    memedit edit  --config trainer_configs/demo_smollm2.yaml [--delta 2e-3 --edit_blocks -1 ...]
    memedit sweep --config trainer_configs/bert_tiny_sweep.yaml
    memedit compare --config trainer_configs/compare_smollm2_geo.yaml
    memedit eval  --config trainer_configs/demo_smollm2.yaml [--edit_dir runs/x/edit]
    accelerate launch train_edit.py --config ...        (= memedit edit; DDP with --multi_gpu)

Every key of the YAML is a field of `JobConfig` or `EditConfig` (`memedit edit --help` lists them
all); a command-line option overrides the YAML.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import json
import os
import re
import sys
import time
import types
import typing
from dataclasses import fields
from typing import Any

import yaml
from accelerate import PartialState
from huggingface_hub.errors import HfHubHTTPError
from transformers import HfArgumentParser

from .edit_config import EditConfig
from .evaluation.metrics import edit_metrics, evaluate_splits
from .evaluation.results import METRIC_LABELS, RESULTS_JSON, ResultsRecord, format_percent
from .experiments import (
    JobConfig,
    RunOutcome,
    load_model_and_tokenizer,
    load_run_base,
    prepare_benchmark,
    run_edit,
)
from .experiments.compare import run_compare
from .experiments.grid import run_sweep
from .hub import push_edit, push_folder
from .model import EditModel
from .run_folder import check_writable, verify_run


COMMANDS = {
    "edit": "Run one edit in the configured setting and write the run folder (the default job).",
    "sweep": "Run a grid over δ × blocks (× norms), or kNN-LM's ε; pick on validation, report test, write a table and plots.",
    "compare": "Run every editing method with a small validation sweep each; write a table and a plot side by side.",
    "eval": "Evaluate the model (optionally with an edit applied) on the benchmark; write results.",
    "push": "Share a run folder on the Hub as delta, full or peft (or an exported benchmark as a dataset repo).",
}


class MemeditParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are one line naming the command (usage only with --help)."""

    def error(self, message: str):
        raise ValueError(f"{message} (`{self.prog} --help` lists every option)")


def build_parser(command: str) -> HfArgumentParser:
    parser = MemeditParser(
        (JobConfig, EditConfig), prog=f"memedit {command}", description=COMMANDS[command],
        epilog="Every option can also be a key of the --config YAML; the command line wins.",
    )
    parser.add_argument("--config", default=None, help="YAML file of options (see trainer_configs/).")
    if command == "eval":
        parser.add_argument("--edit_dir", default=None, help="An edit folder (save_pretrained of EditModel) to apply first.")
        parser.add_argument(
            "--eval_name", default=None,
            help="Results go to <output_dir>/eval/<eval_name> (default: the UTC time), never over a run's own record.",
        )
    return parser


def _field_types() -> dict[str, Any]:
    # The declared hints, not `field.type`: HfArgumentParser rewrites the latter (dict | str -> str).
    return {
        f.name: typing.get_type_hints(cls)[f.name] for cls in (JobConfig, EditConfig) for f in fields(cls) if f.init
    }


def _accepts(annotation: Any, kind: type) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, kind) for a in typing.get_args(annotation))
    return (origin or annotation) is kind


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}): keep one", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_config(path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML config; `base_config: other.yaml` (relative to this file) supplies defaults it overrides."""
    if os.path.abspath(path) in _seen:
        raise ValueError(f"{path}: base_config chain loops back to itself.")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ValueError(f"Config file {path} does not exist.") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option: value, not a {type(data).__name__}.")
    base = data.pop("base_config", None)
    if base is None:
        return data
    merged = read_config(os.path.join(os.path.dirname(path), base), _seen + (os.path.abspath(path),))
    merged.update(data)
    return merged


def yaml_to_argv(path: str) -> tuple[list[str], dict[str, None]]:
    """The YAML as command-line arguments (so argparse checks every value's type), plus the keys set to null."""
    data = read_config(path)
    known = _field_types()
    argv, nulls = [], {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{path}: unknown key {key!r}.{hint} `memedit edit --help` lists every option.")
        annotation = known[key]
        if value is None:
            nulls[key] = None
        elif isinstance(value, dict):
            if not _accepts(annotation, dict):
                raise ValueError(f"{path}: {key} takes a single value, not a mapping.")
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, list):
            if not _accepts(annotation, list):
                raise ValueError(f"{path}: {key} takes a single value, not a list ({value!r}).")
            argv += [f"--{key}", *map(str, value)]
        else:
            if _accepts(annotation, list) and not _accepts(annotation, str):
                value = [value]
                argv += [f"--{key}", *map(str, value)]
            else:
                argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv, nulls


def parse(command: str, argv: list[str]) -> tuple[JobConfig, EditConfig, argparse.Namespace]:
    """Parse `--config` YAML + overrides into (JobConfig, EditConfig, the command's own options)."""
    parser = build_parser(command)
    argv = _join_negative_values(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    yaml_argv: list[str] = []
    if known.config and not {"-h", "--help"} & set(argv):
        yaml_argv, nulls = yaml_to_argv(known.config)
        parser.set_defaults(**nulls)
    # A config's own checks (δ ≤ 0, unknown setting...) raise ValueError: everything is checked before loading.
    job, args, extra = parser.parse_args_into_dataclasses(yaml_argv + argv)
    return job, args, extra


_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.IGNORECASE)


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--delta -1e-3` as `--delta=-1e-3`: argparse reads a negative number in exponent form as an
    option, so the option's own check ("δ must be positive") could never speak."""
    joined: list[str] = []
    for token in argv:
        if joined and _NUMBER.match(token) and joined[-1].startswith("--") and "=" not in joined[-1]:
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def format_summary(outcome: RunOutcome, args: EditConfig, show_examples: int = 5) -> str:
    metrics = outcome.record.metrics
    rows = [(label, format_percent(metrics[key])) for key, label in METRIC_LABELS.items() if key in metrics]
    if outcome.trainer is not None:
        rows.append(("constraint", f"{args.norm}, δ = {args.delta if args.delta is not None else '∞'}, blocks {', '.join(args.edit_blocks)}"))
        rows.append((f"max ‖θ − θ0‖ ({args.norm if args.norm != 'none' else 'linf'})", f"{outcome.trainer.projector.distance():.3g}"))
    rows.append(("facts (modified / unmodified)", f"{metrics.get('n_modified')} / {metrics.get('n_unmodified')}"))
    rows.append(("wall time", f"{outcome.record.seconds:.1f} s"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if outcome.examples:
        lines += ["", "edited facts (old -> new) [prediction after the edit], learned ones first:"]
        for fact in sorted(outcome.examples, key=lambda f: not f["correct"])[:show_examples]:
            mark = "ok" if fact["correct"] else "missed"
            lines.append(f"  {fact['text'].replace('[Y]', '___')}  {fact['old']} -> {fact['new']}  [{fact['predicted']}, {mark}]")
    lines += ["", f"run folder: {os.path.abspath(args.output_dir)}"]
    return "\n".join(lines)


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


def _run(command: str, rest: list[str]) -> None:
    if command == "push":
        _push(rest)
        return
    job, args, extra = parse(command, rest)
    if command == "edit":
        outcome = run_edit(job, args)
        if outcome.trainer is None or outcome.trainer.is_world_process_zero():
            print(format_summary(outcome, args, job.show_examples))
    elif command == "sweep":
        run_sweep(job, args)
        print(open(os.path.join(args.output_dir, "sweep.md"), encoding="utf-8").read())
        print(f"plots: {os.path.join(args.output_dir, 'tradeoff.png')}, {os.path.join(args.output_dir, 'avg_acc_per_block.png')}")
    elif command == "compare":
        run_compare(job, args)
        print(open(os.path.join(args.output_dir, "compare.md"), encoding="utf-8").read())
        print(f"plot: {os.path.join(args.output_dir, 'compare.png')}")
    else:
        _evaluate(job, args, extra.edit_dir, extra.eval_name)


class _OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(f"{message} (`{self.prog} --help` lists every option)")


def _push(argv: list[str]) -> None:
    parser = _OneLineArgumentParser(prog="memedit push", description=COMMANDS["push"])
    parser.add_argument("folder", help="A run folder written by `memedit edit`, or (--repo_type dataset) an export_benchmark folder.")
    parser.add_argument("--repo_id", required=True, help="Target repo, e.g. your-name/smollm2-capitals-edit.")
    parser.add_argument("--format", default="delta", choices=["delta", "full", "peft"],
                        help="delta: changed tensors only (small); full: complete checkpoint; peft: stock PEFT adapter.")
    parser.add_argument("--repo_type", default="model", choices=["model", "dataset"], help="dataset: push a benchmark export.")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--license", default=None, help="Licence for the card (default: the base model's when known).")
    parser.add_argument("--token", default=None, help="Hub token (default: the `hf auth login` token or HF_TOKEN).")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co).")
    options = parser.parse_args(argv)
    if not os.path.isdir(options.folder):
        raise ValueError(f"{options.folder} is not a folder.")
    if options.repo_type == "dataset":
        url = push_folder(options.folder, options.repo_id, repo_type="dataset", private=options.private,
                          token=options.token, endpoint=options.endpoint)
    else:
        base_model, tokenizer = None, None
        if options.format in ("full", "peft"):  # the package holds the edited model: load its base
            verify_run(options.folder)
            base_model, tokenizer = load_run_base(options.folder, ResultsRecord.load(options.folder))
        url = push_edit(options.folder, options.repo_id, format=options.format, private=options.private,
                        token=options.token, endpoint=options.endpoint, license=options.license,
                        base_model=base_model, tokenizer=tokenizer)
    print(f"pushed: {url}")


def _evaluate(job: JobConfig, args: EditConfig, edit_dir: str | None, name: str | None) -> None:
    folder = os.path.join(args.output_dir, "eval", name or time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    if os.path.exists(os.path.join(folder, RESULTS_JSON)):
        raise ValueError(f"{folder} already holds an evaluation: choose another --eval_name.")
    check_writable(folder)
    model, tokenizer = load_model_and_tokenizer(job)
    splits = prepare_benchmark(job, model, tokenizer)
    show = dict(batch_size=args.per_device_eval_batch_size, show_progress=True)
    before = None
    if edit_dir:
        before = evaluate_splits(model, tokenizer, splits, original=True, **show)
        model = EditModel.from_pretrained(model, edit_dir).merge_and_unload()
    metrics = edit_metrics(splits, evaluate_splits(model, tokenizer, splits, **show), before)
    record = ResultsRecord(metrics, config={"edit_dir": edit_dir}, seed=args.seed, model=job.model_name_or_path,
                           benchmark={"name": job.benchmark, "m": job.m, "seed": job.benchmark_seed})
    record.save(folder)
    print(record.to_markdown())
    print(f"results: {os.path.join(folder, RESULTS_JSON)}")
