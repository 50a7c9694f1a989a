"""The one parser of every `memedit` command: `HfArgumentParser` over JobConfig's groups, the compare methods'
arguments and `EditConfig`, that reads a YAML (`--config`, with `base_config` inheritance) and the command line over
it, as TRL's `TrlParser` does, and whose errors are one line."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import types
import typing
from dataclasses import fields
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..edit_config import EditConfig
from ..experiments import JobConfig
from ..experiments.facts_edit import FACTS_RECIPE
from ..experiments.job_config import BENCHMARK_ONLY, GROUPS, GridArguments
from ..experiments.methods import ARGUMENTS, method_arguments


DATACLASSES = (*GROUPS, *ARGUMENTS, EditConfig)  # what a command line and a YAML set, in --help's order


class MemeditParser(HfArgumentParser):
    """`HfArgumentParser` over JobConfig's groups, the methods' arguments and `EditConfig` with `--config`: the YAML
    (and its `base_config` chain) under the command line, as TRL's `TrlParser`; errors are one line."""

    def __init__(self, command: str, description: str, own: tuple[type, ...] = ()):
        """`own`: the command's own argument dataclasses (`memedit stream`'s `StreamOptions`), parsed after the
        shared ones, from the command line and the YAML alike."""
        super().__init__(
            (*DATACLASSES, *own),
            prog=f"memedit {command}",
            description=description,
            epilog="Every option can also be a key of the --config YAML; the command line wins.",
        )
        self.add_argument("--config", default=None, help="YAML file of options (see trainer_configs/).")
        self.command, self.own = command, own

    def error(self, message: str):
        raise ValueError(f"{message} (`{self.prog} --help` lists every option)")

    def parse_args_and_config(self, argv: list[str]) -> tuple[Any, ...]:
        """(JobConfig, EditConfig, each of the command's `own` dataclasses, the command's other options) from
        `--config` YAML + overrides; with `--facts` and no config, over the default recipe of a facts edit
        (`FACTS_RECIPE`).

        A config's own checks (δ ≤ 0, unknown setting...) raise ValueError: everything that can be
        checked without the model is checked here, before anything loads."""
        argv = _join_negative_values(argv)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        pre.add_argument("--facts", default=None)
        known, _ = pre.parse_known_args(argv)
        yaml_argv: list[str] = []
        if known.config and not {"-h", "--help"} & set(argv):
            yaml_argv, nulls = yaml_to_argv(known.config, (*DATACLASSES, *self.own))
            self.set_defaults(**nulls)
        elif known.facts:  # facts without a config: the default recipe of a facts edit
            self.set_defaults(**FACTS_RECIPE)
        *parsed, extra = self.parse_args_into_dataclasses(yaml_argv + argv)
        groups, args, own = parsed[: len(DATACLASSES) - 1], parsed[len(DATACLASSES) - 1], parsed[len(DATACLASSES) :]
        arguments = groups[len(GROUPS) :]
        job = JobConfig.from_groups(
            *groups[: len(GROUPS)], method_args={f.name: getattr(a, f.name) for a in arguments for f in fields(a)}
        )
        method_arguments(job)  # what only the methods can check (compare_deltas' keys), before anything loads
        given = self._given(argv)
        if self.command in ("edit", "stream"):
            _refuse_grid_options(given, self.prog)
        if job.facts:
            if self.command not in ("edit", "stream"):  # sweeps, compares and evaluations pick and score on halves
                raise ValueError(
                    f"facts are edited by `memedit edit` or `memedit stream`; `{self.prog}` runs on a benchmark: "
                    "leave out facts."
                )
            _refuse_benchmark_options(given)
        return (job, args, *own, extra)

    def _given(self, argv: list[str]) -> set[str]:
        """The fields a command line sets, however each option was spelled: `--sweep_deltas`, `--sweep-deltas`, or
        a prefix argparse accepts (`--sweep_delt`)."""
        given = set()
        for token in argv:
            if not token.startswith("--"):
                continue
            option = token.split("=", 1)[0]
            action = self._option_string_actions.get(option)
            if action is None:  # argparse's abbreviation: the one option the prefix starts
                matches = {a for name, a in self._option_string_actions.items() if name.startswith(option)}
                action = matches.pop() if len(matches) == 1 else None
            if action is not None:
                given.add(action.dest)
        return given


# What only a sweep or a compare reads: its grid, its picks and its methods' own arguments.
GRID_ONLY = frozenset(f.name for cls in (GridArguments, *ARGUMENTS) for f in fields(cls))


def _refuse_grid_options(given: set[str], prog: str) -> None:
    """A sweep's or compare's option on the command line of one edit or one stream would be ignored: refused, so
    nobody reads a result as held-out or swept when it was not. (A YAML may carry them: a compare's config can be
    reused for one edit.)"""
    grid = sorted(given & GRID_ONLY)
    if grid:
        options = ", ".join(f"--{name}" for name in grid)
        raise ValueError(
            f"{options} set a sweep's or compare's grid, picks or methods, which `{prog}` does not read (it makes "
            f"the one edit its config describes): leave {options} out, or run `memedit sweep` or `memedit compare`."
        )


def _refuse_benchmark_options(given: set[str]) -> None:
    """Facts replace the config's benchmark and its options; the same options given on the command line beside them
    say the user meant a benchmark too, which one run cannot be."""
    benchmark = sorted(given & set(BENCHMARK_ONLY))
    if benchmark:
        options = ", ".join(f"--{name}" for name in benchmark)
        raise ValueError(
            f"{options} choose a benchmark's facts, and facts replace the benchmark: leave {options} out, "
            "or leave out facts to edit the benchmark."
        )


def _field_types(dataclasses: tuple[type, ...] = DATACLASSES) -> dict[str, Any]:
    # The declared hints, not `field.type`: HfArgumentParser rewrites the latter (dict | str -> str).
    return {f.name: typing.get_type_hints(cls)[f.name] for cls in dataclasses for f in fields(cls) if f.init}


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
                    None,
                    None,
                    f"key {key!r} is given twice (lines {seen[key]} and {line}): keep one",
                    key_node.start_mark,
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


def yaml_to_argv(path: str, dataclasses: tuple[type, ...] = DATACLASSES) -> tuple[list[str], dict[str, None]]:
    """The YAML as command-line arguments (so argparse checks every value's type), plus the keys set to null."""
    data = read_config(path)
    known = _field_types(dataclasses)
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


class OneLineArgumentParser(argparse.ArgumentParser):
    """A plain argparse parser (for commands that take no config) whose errors are one line too."""

    def error(self, message: str):
        raise ValueError(f"{message} (`{self.prog} --help` lists every option)")
