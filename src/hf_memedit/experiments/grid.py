"""Sweeps over δ × blocks (× norms): pick the best Ā on a validation split, report test too, plot.

The facts are split once into validation and test halves by a seeded hash of their subject (`validation_views`),
the modified facts too: every grid point is scored on both, each half with its own modified and unmodified facts.
The points of one block share one frozen-prefix cache, so the facts' states below that block are computed once,
not once per δ. The paper picked on test; we report the pick by validation and, for comparison, the pick by test. Each finished point is appended to
`points.jsonl` (experiments.points), so a resumed sweep recomputes nothing. FT (for ft+ settings) runs once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import datasets
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..architectures import model_kind
from ..benchmarks.common import CONSISTENCY, MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST, UNMODIFIED_TRAIN
from ..blocks import BlockSelectorConfig
from ..edit_config import EditConfig
from ..edit_trainer import ConstrainedEditTrainer
from ..evaluation.metrics import edit_metrics, evaluate_splits, generate_splits, generation_metrics, next_token_drift
from ..fast_paths.prefix import PrefixCache, first_editable_block
from ..fisher import diagonal_fisher
from ..keys import KeyStatistics
from ..knn import KnnDatastore, epsilon_grid
from ..model import get_edit_model
from ..preservation import NeighbourRisk, known_evidence, neighbour_risk
from ..run_folder import claim_run_folder
from .job_config import JobConfig
from .loading import holdout, load_model_and_tokenizer, prepare_benchmark
from .points import KNN, GridPoint, open_points, point_of, save_points
from .reports import TEST, VALIDATION, write_report
from .settings import (
    drift_samples,
    edit_train_dataset,
    locality_split,
    preservation_neighbours,
    preservation_texts,
    preserve_objective,
    refuse_pick_on_test,
    starting_model,
)


logger = logging.getLogger(__name__)

class _PointProgress(ProgressCallback):
    """A grid point's training bar, with its log lines sent to the logger instead of stdout: a sweep
    prints one line per point, and each point's training loss is kept in its row."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logger.info("step %d: %s", state.global_step, logs)


def grid(job: JobConfig, args: EditConfig) -> list[GridPoint]:
    norms = job.sweep_norms or [args.norm]
    blocks = job.sweep_blocks or list(args.edit_blocks)
    deltas = job.sweep_deltas or [args.delta]
    return [  # block outermost: consecutive points share one prefix cache
        GridPoint(norm=norm, block=block, delta=delta)
        for block in blocks for norm in norms for delta in ([None] if norm == "none" else deltas)
    ]


class GridRunner:
    """θ0 of one model on one benchmark, split into validation and test views: scores edits and kNN-LM.

    Loads the model and the benchmark once, starts from the setting's θ0 (FT runs once), evaluates
    θ0 once, and shares across points what does not change between them: the frozen-prefix cache
    of each first edited block and the Fisher diagonal of each selection.
    """

    def __init__(self, job: JobConfig, args: EditConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None):
        refuse_pick_on_test(args)
        if model is None:
            model, tokenizer = load_model_and_tokenizer(job)
        self.job, self.args, self.tokenizer = job, args, tokenizer
        self.model = starting_model(model, tokenizer, job, args)
        # Every point is scored on the same facts, disjoint from what any point may preserve.
        self.splits, self.locality = locality_split(prepare_benchmark(job, self.model, tokenizer), job, args, always=True)
        self.views = validation_views(self.splits, job.validation_fraction, job.benchmark_seed)
        self._before: dict[str, dict] | None = None
        self._generated_before: dict[str, dict] | None = None
        self._caches: dict[int, PrefixCache] = {}
        self._fishers: dict[tuple[str, ...], dict] = {}
        self._known: datasets.Dataset | None = None
        self._risks: dict[str, NeighbourRisk] = {}
        self._keys: dict[tuple, KeyStatistics] = {}
        self._drift_samples: list[list[int]] | None = None

    def known(self) -> datasets.Dataset:
        """The preservation evidence θ0 answers right (for preserve 'answers'), found once."""
        if self._known is None:
            self._known = known_evidence(self.model, self.tokenizer, self.splits[UNMODIFIED_TRAIN], self.args.per_device_eval_batch_size)
        return self._known

    def risk(self, objective: str) -> NeighbourRisk | None:
        """How readily the edit's new objects take each neighbour of `objective` over (for preserve_risk), found once."""
        if objective == "none" or self.args.preserve_risk == 0:
            return None
        if objective not in self._risks:
            neighbours = preservation_neighbours(self.splits, objective, self.known() if objective == "answers" else None)
            self._risks[objective] = neighbour_risk(self.model, self.tokenizer, neighbours, self.splits[MODIFIED_TRAIN],
                                                    self.args.per_device_eval_batch_size)
        return self._risks[objective]

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
        return generation_metrics(view, generated, self._generated_before[name])

    def point_args(self, point: GridPoint, output_dir: str) -> tuple[datasets.Dataset, EditConfig]:
        """The training data and args of an edit point: its norm, block and δ, and whatever else it sets."""
        args = dataclasses.replace(
            self.args, output_dir=output_dir, edit_blocks=[point.block], norm=point.norm, delta=point.delta,
            edit_modules=list(point.modules) if point.modules else None, eval_strategy="no", save_strategy="no",
            eval_before_edit=False, key_constraint=point.keys if point.keys is not None else self.args.key_constraint,
            **point.overrides(),
        )
        objective = point.preserve if point.preserve is not None else preserve_objective(self.job, self.args)
        args = dataclasses.replace(args, preserve_objective=objective)
        known = self.known() if objective == "answers" else None
        return edit_train_dataset(self.splits, objective, args, known, self.risk(objective))

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

    def edit(self, point: GridPoint, output_dir: str) -> dict:
        """Train one point from θ0, score it on both views, and return the model to θ0."""
        train_dataset, train_args = self.point_args(point, output_dir)
        before = self.before()
        edit = get_edit_model(self.model, train_args.block_selector_config())
        first = first_editable_block(self.model, edit.selector_config.layout(self.model))
        fisher = self.fisher(point.block) if train_args.norm == "fisher" and not point.modules else None
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
        row = {"point": point.to_dict(), "distance": trainer.projector.distance(), "train_loss": trained.training_loss}
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
            row: dict[str, Any] = {"point": GridPoint(method=KNN, metric=metric, epsilon=epsilon).to_dict()}
            for name, view in self.views.items():
                results = {split: found.at(epsilon) for split, found in lookups[name].items()}
                metrics = edit_metrics(view, results, before[name], self.tokenizer, model_kind(self.model))
                row[name] = {k: v for k, v in metrics.items() if k != "per_relation"}
            rows.append(row)
        return rows


def validation_views(splits: datasets.DatasetDict, fraction: float, seed: int) -> dict[str, datasets.DatasetDict]:
    """The validation and test views of the splits, cut by `holdout` (a seeded hash of the subject), the modified
    facts included: each half has its own modified facts, so A_M is validated on other facts than it is reported on,
    as A_F\\S is. The test view also holds the test half's training phrasings (A_M on them: reliability)."""
    halves = {name: holdout(splits[name], fraction, seed) for name in (MODIFIED_TRAIN, MODIFIED_TEST, UNMODIFIED_TEST, CONSISTENCY)
              if name in splits}
    empty = [half for index, half in enumerate((VALIDATION, TEST)) if not len(halves[MODIFIED_TEST][index])]
    if empty:
        raise ValueError(f"The {' and '.join(empty)} half holds none of the {len(splits[MODIFIED_TEST])} modified test "
                         f"phrasings (validation_fraction {fraction}): ask for a larger m, or another validation_fraction.")
    views = {VALIDATION: {name: pair[0] for name, pair in halves.items() if name != MODIFIED_TRAIN},
             TEST: {name: pair[1] for name, pair in halves.items()}}
    return {half: datasets.DatasetDict({name: split for name, split in view.items() if len(split)}) for half, view in views.items()}


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
            save_points(folder, {point_of(r).key: r for r in rows})
            write_report(folder, rows, job, args, runner.locality)
            return rows
        for index, point in enumerate(grid(job, args)):
            if point.key in done:
                continue
            print(f"[sweep {index + 1}] norm={point.norm} block={point.block} delta={point.delta}", flush=True)
            done[point.key] = runner.edit(point, os.path.join(folder, "points", f"{index:03d}"))
            save_points(folder, done)
        rows = [done[p.key] for p in grid(job, args)]
        write_report(folder, rows, job, args, runner.locality)
        return rows
