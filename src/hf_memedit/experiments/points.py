"""The points of a sweep or compare on disk: `points.jsonl` (each finished row, keyed by its `GridPoint`) and
`points_context.json` (the settings they were made with), so a resumed sweep recomputes nothing and a folder made
with other settings is refused.

What keys the points (`point_context`): every setting that can change a point's result. JobConfig's groups and the
methods' arguments name theirs that cannot (`_unkeyed`: where output goes, devices, the grid itself); for the
training core's fields the rule is stated once below.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from transformers import TrainingArguments

from ..benchmarks.common import data_fingerprint
from ..edit_config import EditConfig
from ..files import atomic_write_text, read_json
from .grid_point import AXES, point_of
from .job_config import JobConfig
from .methods import method_arguments


logger = logging.getLogger(__name__)

POINTS = "points.jsonl"
CONTEXT = "points_context.json"  # the settings every point of points.jsonl was made with

# The fields of the training core that never change a point's result: TrainingArguments' fields for where and how
# output is written, logged, saved or pushed and on which devices (by name and prefix); and of EditConfig's own, a
# point's axes (each point carries its norm, block and δ), what `GridPoint.train_args` sets for every point, where
# the run folder is, and the prefix cache (exact).
TRAINING_OUTPUT = (
    "output_dir",
    "resume_from_checkpoint",
    "disable_tqdm",
    "report_to",
    "run_name",
    "project",
    "local_rank",
    "skip_memory_metrics",
    "debug",
    "do_train",
    "do_eval",
    "do_predict",
    "push_to_hub",
    "ddp_timeout",
    "use_cpu",
    "per_device_eval_batch_size",
)
TRAINING_OUTPUT_PREFIXES = ("logging_", "log_", "save_", "eval_", "hub_", "trackio_", "dataloader_")
EDIT_UNKEYED = (*AXES.values(), "eval_before_edit", "overwrite_output_dir", "prefix_cache", "prefix_cache_dtype")


def load_points(folder: str) -> dict[str, dict]:
    path = os.path.join(folder, POINTS)
    done = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    done[point_of(row).key] = row
    return done


def save_points(folder: str, done: dict[str, dict]) -> None:
    atomic_write_text(os.path.join(folder, POINTS), "".join(json.dumps(r) + "\n" for r in done.values()))


def _settings(job: JobConfig, args: EditConfig) -> tuple[dict[str, Any], set[str]]:
    """Every setting of the job, the methods' arguments and the args by name (as JSON holds them), and the names of
    those that never change a point's result."""
    arguments = method_arguments(job).values()
    values = {
        **{key: value for key, value in dataclasses.asdict(job).items() if key != "method_args"},
        **{key: value for instance in arguments for key, value in dataclasses.asdict(instance).items()},
        **args.to_dict(),
    }
    ours = {
        name
        for instance in (job, *arguments)
        for cls in type(instance).__mro__
        for name in vars(cls).get("_unkeyed", ())
    }
    training = {f.name for f in dataclasses.fields(TrainingArguments)}
    unkeyed = (
        ours
        | set(EDIT_UNKEYED)
        | {name for name in training if name in TRAINING_OUTPUT or name.startswith(TRAINING_OUTPUT_PREFIXES)}
    )
    return json.loads(json.dumps(values, default=str)), unkeyed


def point_context(job: JobConfig, args: EditConfig) -> dict[str, Any]:
    """Every setting that changes a grid point's result, and the benchmark's identity (its files' hash)."""
    values, unkeyed = _settings(job, args)
    kept = {key: value for key, value in values.items() if key not in unkeyed}
    return json.loads(
        json.dumps({**kept, "data_fingerprint": data_fingerprint(job.data_dir)}, sort_keys=True, default=str)
    )


def _field_defaults(job: JobConfig, args: EditConfig) -> dict[str, Any]:
    """Each setting's default, as `point_context` writes values."""
    defaults = {}
    for cls in (type(job), type(args), *(type(instance) for instance in method_arguments(job).values())):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
    return json.loads(json.dumps(defaults, default=str))


def open_points(folder: str, job: JobConfig, args: EditConfig) -> dict[str, dict]:
    """The finished points of `folder` when they were made with these settings; refuses to mix others in.

    With `overwrite_output_dir` points made with other settings are discarded instead.
    """
    context = point_context(job, args)
    path = os.path.join(folder, CONTEXT)
    done = load_points(folder)
    earlier = read_json(path, "") if os.path.isfile(path) else None
    if earlier is not None:  # a setting added since those points were made: they ran with its default
        defaults = _field_defaults(job, args)
        earlier = {**{key: defaults[key] for key in set(context) - set(earlier) if key in defaults}, **earlier}
    if (done or earlier is not None) and earlier != context:
        if not args.overwrite_output_dir:
            earlier = earlier or {}
            differ = sorted(key for key in set(earlier) | set(context) if earlier.get(key) != context.get(key))
            raise ValueError(
                f"{folder} holds points made with other settings (they differ in "
                f"{', '.join(differ[:6]) or 'unknown settings'}): choose another "
                "--output_dir, or pass --overwrite_output_dir true to discard them."
            )
        logger.warning(
            "overwrite_output_dir: discarding the %d points in %s made with other settings.", len(done), folder
        )
        done = {}
        save_points(folder, done)
    atomic_write_text(path, json.dumps(context, indent=2, sort_keys=True) + "\n")
    return done
