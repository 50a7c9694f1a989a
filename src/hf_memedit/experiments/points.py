"""The points of a sweep or compare, and their record on disk (`points.jsonl`, `points_context.json`).

A `GridPoint` is what one edit trains from θ0 (or one kNN-LM ε looks up). Its JSON form keys the
finished rows, so a resumed sweep recomputes nothing and a folder made with other settings is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..benchmarks.common import data_fingerprint
from ..files import atomic_write_text, read_json


if TYPE_CHECKING:
    from ..edit_config import EditConfig
    from .job_config import JobConfig  # job_config imports the method table, which makes GridPoints


logger = logging.getLogger(__name__)

POINTS = "points.jsonl"
CONTEXT = "points_context.json"  # the settings every point of points.jsonl was made with
KNN = "knn"  # the method of a kNN-LM point: a metric and an ε instead of norm, block and δ


def _override(text: str) -> Any:
    return field(default=None, metadata={"help": text, "override": True})


@dataclass(frozen=True)
class GridPoint:
    """One grid point. An edit point has a norm, a block and a δ (None: unbounded); every other field is None
    unless the point sets it, and an `override` field then replaces the run's `EditConfig` value."""

    norm: str | None = field(default=None, metadata={"help": "The constraint's norm (EditConfig.norm)."})
    block: str | None = field(default=None, metadata={"help": "The one block the point edits."})
    delta: float | None = field(default=None, metadata={"help": "The ball's radius; None: unconstrained."})
    method: str | None = field(default=None, metadata={"help": "The compare method that made it, or 'knn'."})
    metric: str | None = field(default=None, metadata={"help": "kNN-LM: the datastore's distance."})
    epsilon: float | None = field(default=None, metadata={"help": "kNN-LM: the distance threshold ε."})
    preserve: str | None = field(default=None, metadata={"help": "The preservation objective; None: the run's."})
    modules: tuple[str, ...] | None = field(default=None, metadata={"help": "The block's submodules trained; None: all."})
    keys: str | None = field(default=None, metadata={"help": "The key constraint; None: the run's."})
    learning_rate: float | None = _override("FT-L's and LocFT-BF's learning rate.")
    max_steps: int | None = _override("FT-L's steps (-1: LocFT-BF's epochs decide).")
    stop_at_loss: float | None = _override("FT-L's early stop.")
    num_train_epochs: float | None = _override("LocFT-BF's epochs.")
    per_device_train_batch_size: int | None = _override("LocFT-BF's batch.")
    nullspace_threshold: float | None = _override("The null space's absolute eigenvalue threshold.")
    nullspace_energy: float | None = _override("The share of the keys' second moment the null space removes.")
    output_rho: float | None = _override("The output ellipsoid's radius.")
    eos_target: bool | None = _override("EOS appended to the training targets.")
    skip_below_loss: float | None = _override("LocFT-BF's batch skip.")
    stop_at_epoch_loss: float | None = _override("LocFT-BF's early stop.")
    loss_reduction: str | None = _override("LocFT-BF's per-sequence loss.")
    preserve_corpus: str | None = _override("Where the preserved keys come from.")
    preserve_ratio: float | None = _override("Preservation facts per edit fact (FTA: 1).")
    preserve_weight: float | None = _override("The preservation loss's weight.")

    def __post_init__(self):
        if self.block is not None:
            object.__setattr__(self, "block", str(self.block))
        if self.modules is not None:
            object.__setattr__(self, "modules", tuple(self.modules))

    @property
    def is_knn(self) -> bool:
        return self.method == KNN

    def overrides(self) -> dict[str, Any]:
        """The `EditConfig` fields this point sets for itself."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("override") and getattr(self, f.name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form rows, points.jsonl and results keep: the fields set, and an edit point's norm, block, δ."""
        always = () if self.is_knn else ("norm", "block", "delta")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        record = {name: value for name, value in values.items() if value is not None or name in always}
        if self.modules is not None:
            record["modules"] = list(self.modules)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> GridPoint:
        unknown = set(record) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"A grid point with unknown fields {sorted(unknown)}: {record!r} was written by another "
                             "version of hf_memedit; run it again in a new --output_dir.")
        return cls(**record)

    @property
    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def series(self) -> str:
        """The curve the point belongs to in the plots: one per block and norm, or kNN-LM's metric."""
        return f"kNN-LM ({self.metric})" if self.is_knn else f"block {self.block} ({self.norm})"

    @property
    def radius(self) -> float:
        """What varies along a curve: δ (∞ when unconstrained) or kNN-LM's ε."""
        if self.is_knn:
            return self.epsilon
        return self.delta if self.delta is not None else float("inf")

    def describe(self) -> str:
        """The point in words: 'linf, block 25, δ 0.01' or 'kNN l2, ε 3.2'."""
        if self.is_knn:
            return f"kNN {self.metric}, ε {self.epsilon:.4g}"
        text = f"{self.norm}, block {self.block}"
        if self.modules:
            text += f" ({', '.join(self.modules)})"
        if self.keys not in (None, "none"):
            text += f", {self.keys} keys"
            if self.nullspace_energy is not None:
                text += f" ({self.nullspace_energy:.3g} of their energy removed)"
        if self.preserve not in (None, "none"):
            text += f", preserve {self.preserve}"
        if self.eos_target:
            text += ", EOS targets"
        return text + (f", δ {self.delta:.3g}" if self.delta is not None else ", δ ∞")


def point_of(row: dict[str, Any]) -> GridPoint:
    """The point a result row was made at."""
    return GridPoint.from_dict(row["point"])


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


# What never changes a point's result: where and how things are written and shown, and the grid
# itself (each point carries its own block, norm and δ). Every other field keys the points.
_UNKEYED = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "disable_tqdm", "report_to", "run_name", "project",
    "local_rank", "skip_memory_metrics", "debug", "do_train", "do_eval", "do_predict", "push_to_hub",
    "per_device_eval_batch_size", "prefix_cache", "prefix_cache_dtype", "edit_blocks", "norm", "delta",
    "show_examples", "ft_dir", "sweep_deltas", "sweep_blocks", "sweep_norms", "compare_methods", "compare_deltas",
    "knn_epsilons", "nullspace_energies", "pick_min_retention", "ddp_timeout", "use_cpu", "device_map", "offload_folder",
}
_UNKEYED_PREFIXES = ("logging_", "log_", "save_", "eval_", "hub_", "trackio_", "dataloader_")


def point_context(job: JobConfig, args: EditConfig) -> dict[str, Any]:
    """Every setting that changes a grid point's result, and the benchmark's identity (its files' hash)."""
    values = {**dataclasses.asdict(job), **args.to_dict(), "data_fingerprint": data_fingerprint(job.data_dir)}
    values["eval_before_edit"] = args.eval_before_edit  # a prefix above would drop it; it does not change a point
    kept = {key: value for key, value in values.items() if key not in _UNKEYED and not key.startswith(_UNKEYED_PREFIXES)}
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


def _field_defaults(job: JobConfig, args: EditConfig) -> dict[str, Any]:
    """Each JobConfig / EditConfig field's default, as `point_context` writes values."""
    defaults = {}
    for cls in (type(job), type(args)):
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
                f"{folder} holds points made with other settings (they differ in {', '.join(differ[:6]) or 'unknown settings'}): "
                "choose another --output_dir, or pass --overwrite_output_dir true to discard them."
            )
        logger.warning("overwrite_output_dir: discarding the %d points in %s made with other settings.", len(done), folder)
        done = {}
        save_points(folder, done)
    atomic_write_text(path, json.dumps(context, indent=2, sort_keys=True) + "\n")
    return done
