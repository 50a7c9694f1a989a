"""Sweeps over δ × blocks (× norms): pick the best Ā on a validation split, report test too, plot.

The unmodified test facts are split once (seeded) into validation and test halves; every grid
point is scored on both, with A_M on the modified facts. The points of one block share one
frozen-prefix cache, so the facts' states below that block are computed once, not once per δ. The paper picked on test; we report the
pick by validation and, for comparison, the pick by test. Each finished point is appended to
`points.jsonl`, so a resumed sweep recomputes nothing. FT (for ft+ settings) runs once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import datasets
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..architectures import model_kind
from ..benchmarks.common import MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST, UNMODIFIED_TRAIN, data_fingerprint
from ..blocks import BlockSelectorConfig
from ..edit_config import EditConfig
from ..edit_trainer import ConstrainedEditTrainer
from ..evaluation.metrics import edit_metrics, evaluate_splits, generate_splits, generation_metrics, next_token_drift
from ..fast_paths.prefix import PrefixCache, first_editable_block
from ..fisher import diagonal_fisher
from ..io import atomic_write_text, read_json
from ..keys import KeyStatistics
from ..knn import KnnDatastore, epsilon_grid
from ..model import get_edit_model
from ..preservation import known_evidence
from ..run_folder import claim_run_folder
from .job_config import JobConfig
from .loading import holdout, load_model_and_tokenizer, prepare_benchmark
from .reports import TEST, VALIDATION, write_report
from .settings import (
    drift_samples,
    edit_train_dataset,
    locality_split,
    preservation_texts,
    preserve_objective,
    starting_model,
)


logger = logging.getLogger(__name__)

POINTS = "points.jsonl"
CONTEXT = "points_context.json"  # the settings every point of points.jsonl was made with


class _PointProgress(ProgressCallback):
    """A grid point's training bar, with its log lines sent to the logger instead of stdout: a sweep
    prints one line per point, and each point's training loss is kept in its row."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logger.info("step %d: %s", state.global_step, logs)


def grid(job: JobConfig, args: EditConfig) -> list[dict[str, Any]]:
    norms = job.sweep_norms or [args.norm]
    blocks = job.sweep_blocks or list(args.edit_blocks)
    deltas = job.sweep_deltas or [args.delta]
    points = []
    for block in blocks:  # block outermost: consecutive points share one prefix cache
        for norm in norms:
            for delta in ([None] if norm == "none" else deltas):
                points.append({"norm": norm, "block": str(block), "delta": delta})
    return points


def point_key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def load_points(folder: str) -> dict[str, dict]:
    path = os.path.join(folder, POINTS)
    done = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    done[point_key(row["point"])] = row
    return done


# What never changes a point's result: where and how things are written and shown, and the grid
# itself (each point carries its own block, norm and δ). Every other field keys the points.
_UNKEYED = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "disable_tqdm", "report_to", "run_name", "project",
    "local_rank", "skip_memory_metrics", "debug", "do_train", "do_eval", "do_predict", "push_to_hub",
    "per_device_eval_batch_size", "prefix_cache", "prefix_cache_dtype", "edit_blocks", "norm", "delta",
    "show_examples", "ft_dir", "sweep_deltas", "sweep_blocks", "sweep_norms", "compare_methods", "compare_deltas",
    "knn_epsilons", "ddp_timeout", "use_cpu", "device_map", "offload_folder",
}
_UNKEYED_PREFIXES = ("logging_", "log_", "save_", "eval_", "hub_", "trackio_", "dataloader_")


def point_context(job: JobConfig, args: EditConfig) -> dict[str, Any]:
    """Every setting that changes a grid point's result, and the benchmark's identity (its files' hash)."""
    values = {**dataclasses.asdict(job), **args.to_dict(), "data_fingerprint": data_fingerprint(job.data_dir)}
    values["eval_before_edit"] = args.eval_before_edit  # a prefix above would drop it; it does not change a point
    kept = {key: value for key, value in values.items() if key not in _UNKEYED and not key.startswith(_UNKEYED_PREFIXES)}
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


def _field_defaults() -> dict[str, Any]:
    """Each JobConfig / EditConfig field's default, as `point_context` writes values."""
    defaults = {}
    for cls in (JobConfig, EditConfig):
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
        defaults = _field_defaults()
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


def save_points(folder: str, done: dict[str, dict]) -> None:
    atomic_write_text(os.path.join(folder, POINTS), "".join(json.dumps(r) + "\n" for r in done.values()))


class GridRunner:
    """θ0 of one model on one benchmark, split into validation and test views: scores edits and kNN-LM.

    Loads the model and the benchmark once, starts from the setting's θ0 (FT runs once), evaluates
    θ0 once, and shares across points what does not change between them: the frozen-prefix cache
    of each first edited block and the Fisher diagonal of each selection.
    """

    def __init__(self, job: JobConfig, args: EditConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None):
        if model is None:
            model, tokenizer = load_model_and_tokenizer(job)
        self.job, self.args, self.tokenizer = job, args, tokenizer
        splits = prepare_benchmark(job, model, tokenizer)
        self.model = starting_model(model, tokenizer, splits, job, args)
        # Every point is scored on the same facts, disjoint from what any point may preserve.
        self.splits, self.locality = locality_split(splits, job, args, always=True)
        validation, test = holdout(self.splits[UNMODIFIED_TEST], job.validation_fraction, job.benchmark_seed)
        self.views = {
            VALIDATION: datasets.DatasetDict({MODIFIED_TEST: self.splits[MODIFIED_TEST], UNMODIFIED_TEST: validation}),
            TEST: datasets.DatasetDict({
                MODIFIED_TRAIN: self.splits[MODIFIED_TRAIN], MODIFIED_TEST: self.splits[MODIFIED_TEST], UNMODIFIED_TEST: test,
            }),
        }
        self._before: dict[str, dict] | None = None
        self._generated_before: dict[str, dict] | None = None
        self._caches: dict[int, PrefixCache] = {}
        self._fishers: dict[tuple[str, ...], dict] = {}
        self._known: datasets.Dataset | None = None
        self._keys: dict[tuple, KeyStatistics] = {}
        self._drift_samples: list[list[int]] | None = None

    def known(self) -> datasets.Dataset:
        """The preservation evidence θ0 answers right (for preserve 'answers'), found once."""
        if self._known is None:
            self._known = known_evidence(self.model, self.tokenizer, self.splits[UNMODIFIED_TRAIN], self.args.per_device_eval_batch_size)
        return self._known

    def before(self) -> dict[str, dict]:
        """θ0's results on both views (the modified facts on their original objects)."""
        if self._before is None:
            self._before = {
                name: evaluate_splits(self.model, self.tokenizer, view, original=True,
                                      batch_size=self.args.per_device_eval_batch_size, show_progress=True)
                for name, view in self.views.items()
            }
        if self.args.generation_eval and self._generated_before is None:
            self._generated_before = {
                name: generate_splits(self.model, self.tokenizer, view, self.args.per_device_eval_batch_size)
                for name, view in self.views.items()
            }
        return self._before

    def generation(self, name: str, view: datasets.DatasetDict) -> dict:
        """Generation-based A_M and retention of the model now on one view, against θ0's (`before`)."""
        generated = generate_splits(self.model, self.tokenizer, view, self.args.per_device_eval_batch_size)
        return generation_metrics(generated.get(MODIFIED_TEST, []), generated.get(UNMODIFIED_TEST, []),
                                  self._generated_before[name].get(UNMODIFIED_TEST, []))

    def point_args(self, point: dict[str, Any], output_dir: str) -> tuple[datasets.Dataset, EditConfig]:
        """The training data and args of an edit point: norm, block, delta, and optionally modules,
        preserve (a preservation objective), keys (a key constraint) and any of `POINT_ARGS`."""
        args = dataclasses.replace(
            self.args, output_dir=output_dir, edit_blocks=[point["block"]], norm=point["norm"], delta=point["delta"],
            edit_modules=point.get("modules"), eval_strategy="no", save_strategy="no", eval_before_edit=False,
            key_constraint=point.get("keys", self.args.key_constraint),
            **{key: point[key] for key in POINT_ARGS if key in point},
        )
        objective = point.get("preserve", preserve_objective(self.job, self.args))
        args = dataclasses.replace(args, preserve_objective=objective)
        return edit_train_dataset(self.splits, objective, args, self.known() if objective == "answers" else None)

    def selection_size(self, block: str) -> int:
        """How many parameters an edit of `block` trains."""
        edit = get_edit_model(self.model, BlockSelectorConfig(blocks=[block]))
        size = edit.get_nb_trainable_parameters()[0]
        edit.unload()
        return size

    def fisher(self, block: str) -> dict:
        """The diagonal Fisher at θ0 of the parameters of `block`, estimated once."""
        edit = get_edit_model(self.model, BlockSelectorConfig(blocks=[block]))
        names = tuple(edit.theta0)
        edit.unload()
        if names not in self._fishers:
            self._fishers[names] = diagonal_fisher(
                self.model, self.tokenizer, self.splits[UNMODIFIED_TRAIN], list(names), samples=self.args.fisher_samples,
                seed=self.args.seed, show_progress=True,
            )
        return self._fishers[names]

    def edit(self, point: dict[str, Any], output_dir: str) -> dict:
        """Train one point from θ0, score it on both views, and return the model to θ0."""
        train_dataset, train_args = self.point_args(point, output_dir)
        before = self.before()
        edit = get_edit_model(self.model, train_args.block_selector_config())
        first = first_editable_block(self.model, edit.selector_config.layout(self.model))
        fisher = self.fisher(point["block"]) if train_args.norm == "fisher" and not point.get("modules") else None
        trainer = ConstrainedEditTrainer(
            edit, train_args, train_dataset=train_dataset, processing_class=self.tokenizer,
            fisher_dataset=self.splits[UNMODIFIED_TRAIN], fisher=fisher, prefix_cache=self._caches.get(first),
            keys=self._keys.get(_keys_key(edit, train_args)), preserve_texts=preservation_texts(self.splits),
        )
        if trainer.keys is not None:
            self._keys[_keys_key(edit, train_args)] = trainer.keys
        if trainer.prefix_cache is not None:
            self._caches[first] = trainer.prefix_cache
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        if not train_args.disable_tqdm:
            trainer.add_callback(_PointProgress)
        held_out = self._drift_samples = self._drift_samples or drift_samples(self.model, self.tokenizer, self.args)
        trained = trainer.train()
        row = {"point": point, "distance": trainer.projector.distance(), "train_loss": trained.training_loss}
        if held_out is not None:
            row["drift"] = next_token_drift(self.model, self.tokenizer, held_out, trainer.at_theta0,
                                            self.args.per_device_eval_batch_size)
        for name, view in self.views.items():
            metrics = edit_metrics(view, trainer.fact_results(view), before[name], self.tokenizer, trainer.kind)
            if self.args.generation_eval:
                metrics.update(self.generation(name, view))
            row[name] = {k: v for k, v in metrics.items() if k != "per_relation"}
        self.model = edit.unload()  # back to θ0 for the next point
        return row

    def knn(self, epsilons: list[float] | None, metric: str) -> list[dict]:
        """kNN-LM at every ε (default: `epsilon_grid` over the distances seen): one row per ε, no training."""
        before = self.before()
        store = KnnDatastore.build(self.model, self.tokenizer, self.splits[MODIFIED_TRAIN], metric=metric)
        lookups = {
            name: {split: store.lookup(self.model, self.tokenizer, facts) for split, facts in view.items()}
            for name, view in self.views.items()
        }
        if epsilons is None:
            seen = lookups[VALIDATION][MODIFIED_TEST].distances + lookups[VALIDATION][UNMODIFIED_TEST].distances
            epsilons = epsilon_grid(seen)
        rows = []
        for epsilon in epsilons:
            row: dict[str, Any] = {"point": {"method": "knn", "metric": metric, "epsilon": epsilon}}
            for name, view in self.views.items():
                results = {split: found.at(epsilon) for split, found in lookups[name].items()}
                metrics = edit_metrics(view, results, before[name], self.tokenizer, model_kind(self.model))
                row[name] = {k: v for k, v in metrics.items() if k != "per_relation"}
            rows.append(row)
        return rows


# Training knobs a grid point may set for itself (compare methods such as FT-L and LocFT-BF).
POINT_ARGS = ("learning_rate", "max_steps", "stop_at_loss", "num_train_epochs", "per_device_train_batch_size",
              "nullspace_threshold", "nullspace_energy", "output_rho", "eos_target", "skip_below_loss", "stop_at_epoch_loss",
              "loss_reduction", "preserve_corpus", "preserve_ratio", "preserve_weight")


def _keys_key(edit, args: EditConfig) -> tuple:
    """What the preserved keys of a point depend on: its layers and its corpus."""
    return (tuple(edit.theta0), args.preserve_corpus, args.preserve_corpus_column, args.preserve_corpus_samples,
            args.preserve_corpus_length)


def run_sweep(job: JobConfig, args: EditConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> list[dict]:
    """Run every grid point not yet in `<output_dir>/points.jsonl`; write the table and the plots.

    With `setting: knn` the grid is kNN-LM's ε (`knn_epsilons`, default: quantiles of the distances).
    """
    folder = args.output_dir
    with claim_run_folder(folder, args.overwrite_output_dir, resuming=True, lock=PartialState().is_main_process):
        done = open_points(folder, job, args)
        runner = GridRunner(job, args, model, tokenizer)
        if job.setting == "knn":
            rows = runner.knn(job.knn_epsilons, job.knn_metric)
            save_points(folder, {point_key(r["point"]): r for r in rows})
            write_report(folder, rows, job, args, runner.locality)
            return rows
        for index, point in enumerate(grid(job, args)):
            if point_key(point) in done:
                continue
            print(f"[sweep {index + 1}] norm={point['norm']} block={point['block']} delta={point['delta']}", flush=True)
            done[point_key(point)] = runner.edit(point, os.path.join(folder, "points", f"{index:03d}"))
            save_points(folder, done)
        rows = [done[point_key(p)] for p in grid(job, args)]
        write_report(folder, rows, job, args, runner.locality)
        return rows
