"""The editing methods `memedit compare` runs, one module each (ROME's `ALG_DICT`, PEFT's method registry).

A method's module defines `METHOD = Method(...)` (`experiments.method`): its name (the module's), its label, its
own arguments dataclass, and the function that makes its grid points; a new method is one new module here. This
registry imports every module of the folder; `JobConfig` reads the same names from the folder
(`job_config.method_names`) without importing any method. `METHODS` is in the order of the compare's table.
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import Any

from ..job_config import COMPARE_METHODS, JobConfig
from ..method import Method


def _load() -> dict[str, Method]:
    methods = []
    for name in COMPARE_METHODS:
        method = importlib.import_module(f"{__name__}.{name}").METHOD
        if method.name != name:
            raise ImportError(
                f"{__name__}.{name} defines the method {method.name!r}: a method is named after its module."
            )
        methods.append(method)
    return {method.name: method for method in sorted(methods, key=lambda method: method.order)}


METHODS = _load()
# The methods' arguments dataclasses, each once (two methods may share one), in the table's order.
ARGUMENTS = tuple(dict.fromkeys(method.arguments for method in METHODS.values() if method.arguments is not None))


def method_arguments(job: JobConfig) -> dict[type, Any]:
    """Each arguments dataclass of `ARGUMENTS`, filled from `job.method_args` (its defaults for the rest). Checks
    what only the methods know: the names in `method_args`, and the keys of `compare_deltas`."""
    names = {f.name for arguments in ARGUMENTS for f in fields(arguments)}
    unknown = sorted(set(job.method_args) - names)
    if unknown:
        raise ValueError(f"Unknown method arguments {unknown}: the methods take {', '.join(sorted(names))}.")
    grids = {"linf", *(method.grid for method in METHODS.values() if method.grid)}
    unknown = sorted(set(job.compare_deltas or {}) - grids)
    if unknown:
        raise ValueError(f"compare_deltas has unknown keys {unknown}: use {', '.join(sorted(grids))}.")
    return {
        arguments: arguments(
            **{f.name: job.method_args[f.name] for f in fields(arguments) if f.name in job.method_args}
        )
        for arguments in ARGUMENTS
    }


__all__ = ["ARGUMENTS", "METHODS", "Method", "method_arguments"]
