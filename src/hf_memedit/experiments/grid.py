"""`GridRunner`: the points of a sweep or compare scored from one θ0, each on a validation and a test half.

The facts are split once into validation and test halves by a seeded hash of their subject (`validation_views`),
the modified facts too: every grid point is scored on both, each half with its own modified and unmodified facts.
The points of one block share one frozen-prefix cache, so the facts' states below that block are computed once,
not once per δ. θ0 (FT for the ft+ settings, which runs once) is a `Theta0Context`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import datasets
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..architectures import model_kind
from ..benchmarks.common import CONSISTENCY, MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST, UNMODIFIED_TRAIN
from ..blocks import BlockSelectorConfig
from ..edit_config import EditConfig
from ..edit_trainer import ConstrainedEditTrainer
from ..evaluation.metrics import edit_metrics, generate_splits, generation_metrics, next_token_drift
from ..fast_paths.prefix import PrefixCache, first_editable_block
from ..fisher import diagonal_fisher
from ..keys import KeyStatistics
from ..knn import KnnDatastore, epsilon_grid
from ..model import get_edit_model
from ..preservation import Locality
from .context import Theta0Context
from .folds import fold_views, relation_folds
from .grid_point import GridPoint
from .job_config import JobConfig
from .loading import holdout
from .picks import TEST, VALIDATION
from .settings import refuse_pick_on_test


logger = logging.getLogger(__name__)


class _PointProgress(ProgressCallback):
    """A grid point's training bar, with its log lines sent to the logger instead of stdout: a sweep
    prints one line per point, and each point's training loss is kept in its row."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logger.info("step %d: %s", state.global_step, logs)


class GridRunner:
    """Scores grid points from one θ0 (a `Theta0Context`), on its validation and test views: trains each edit point
    from θ0 and returns the model to θ0, or looks kNN-LM's ε up.

    Shares across points what does not change between them: the frozen-prefix cache of each first edited block,
    the Fisher diagonal and the preserved keys of each selection, and kNN-LM's distances of each metric.
    """

    def __init__(
        self,
        job: JobConfig,
        args: EditConfig,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        refuse_pick_on_test(args)
        # Every point is scored on the same facts, disjoint from what any point may preserve.
        self.context = Theta0Context(job, args, model, tokenizer, split_always=True)
        self.views = validation_views(self.context.splits, job.validation_fraction, job.benchmark_seed)
        per_relation = bool((job.benchmark_options or {}).get("per_relation"))
        self.folds = (
            relation_folds(self.context.splits, job.relation_folds, job.benchmark_seed, per_relation)
            if job.relation_folds
            else []
        )
        self.views.update(fold_views(self.context.splits, self.folds))
        self._caches: dict[int, PrefixCache] = {}
        self._fishers: dict[tuple[str, ...], dict] = {}
        self._keys: dict[tuple, KeyStatistics] = {}
        self._lookups: dict[str, dict[str, dict]] = {}

    @property
    def model(self) -> PreTrainedModel:
        return self.context.model

    @property
    def args(self) -> EditConfig:
        return self.context.args

    @property
    def locality(self) -> Locality:
        return self.context.locality

    def before(self) -> dict[str, dict]:
        """θ0's results on both views (the modified facts on their original objects), and its greedy answers."""
        before = {name: self.context.before(name, view) for name, view in self.views.items()}
        for name, view in self.views.items():
            self.context.generated_before(name, view)
        return before

    def train_set(self, point: GridPoint, output_dir: str) -> tuple[datasets.Dataset, EditConfig]:
        """The training data and args of an edit point: its norm, block and δ, and whatever else it sets."""
        objective = point.settings.get("preserve_objective", self.context.objective)
        args = dataclasses.replace(point.train_args(self.args, output_dir), preserve_objective=objective)
        return self.context.train_set(args, objective)

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
                self.model,
                self.context.tokenizer,
                self.context.splits[UNMODIFIED_TRAIN],
                list(names),
                samples=self.args.fisher_samples,
                seed=self.args.seed,
                show_progress=True,
            )
        return self._fishers[names]

    def score(self, point: GridPoint, output_dir: str) -> dict:
        """The row of one point, scored on both views: an edit trained from θ0, or a kNN-LM ε looked up."""
        return self.knn(point) if point.is_knn else self.edit(point, output_dir)

    def edit(self, point: GridPoint, output_dir: str) -> dict:
        """Train one point from θ0, score it on both views, and return the model to θ0."""
        context, tokenizer = self.context, self.context.tokenizer
        train_dataset, train_args = self.train_set(point, output_dir)
        before = self.before()
        edit = get_edit_model(self.model, train_args.block_selector_config())
        first = first_editable_block(self.model, edit.selector_config.layout(self.model))
        fisher = self.fisher(point.block) if train_args.norm == "fisher" and not point.modules else None
        trainer = ConstrainedEditTrainer(
            edit,
            train_args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            fisher_dataset=context.splits[UNMODIFIED_TRAIN],
            fisher=fisher,
            prefix_cache=self._caches.get(first),
            keys=self._keys.get(_keys_key(edit, train_args)),
            preserve_texts=context.preservation_texts(),
        )
        if trainer.keys is not None:
            self._keys[_keys_key(edit, train_args)] = trainer.keys
        if trainer.prefix_cache is not None:
            self._caches[first] = trainer.prefix_cache
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        if not train_args.disable_tqdm:
            trainer.add_callback(_PointProgress)
        held_out = context.drift_samples()
        trained = trainer.train()
        row = {"point": point.to_dict(), "distance": trainer.projector.distance(), "train_loss": trained.training_loss}
        if held_out is not None:
            row["drift"] = next_token_drift(self.model, tokenizer, held_out, trainer.at_theta0, context.batch_size)
        for name, view in self.views.items():
            metrics = edit_metrics(view, trainer.fact_results(view), before[name], tokenizer, trainer.kind)
            answers_before = context.generated_before(name, view)
            if answers_before is not None:
                generated = generate_splits(self.model, tokenizer, view, context.batch_size)
                metrics.update(generation_metrics(view, generated, answers_before))
            row[name] = {k: v for k, v in metrics.items() if k != "per_relation"}
        context.model = edit.unload()  # back to θ0 for the next point
        return row

    def knn_epsilons(self, metric: str) -> list[float]:
        """kNN-LM's default ε grid (`epsilon_grid`): quantiles of the distances seen on the validation facts."""
        seen = self._knn_lookups(metric)[VALIDATION]
        return epsilon_grid(seen[MODIFIED_TEST].distances + seen[UNMODIFIED_TEST].distances)

    def knn(self, point: GridPoint) -> dict:
        """kNN-LM at the point's metric and ε: no training, every fact's neighbour looked up once per metric."""
        before = self.before()
        row: dict[str, Any] = {"point": point.to_dict()}
        for name, view in self.views.items():
            results = {
                split: found.at(point.epsilon) for split, found in self._knn_lookups(point.metric)[name].items()
            }
            metrics = edit_metrics(view, results, before[name], self.context.tokenizer, model_kind(self.model))
            row[name] = {k: v for k, v in metrics.items() if k != "per_relation"}
        return row

    def _knn_lookups(self, metric: str) -> dict[str, dict]:
        if metric not in self._lookups:
            model, tokenizer = self.model, self.context.tokenizer
            store = KnnDatastore.build(model, tokenizer, self.context.splits[MODIFIED_TRAIN], metric=metric)
            self._lookups[metric] = {
                name: {split: store.lookup(model, tokenizer, facts) for split, facts in view.items()}
                for name, view in self.views.items()
            }
        return self._lookups[metric]


def validation_views(splits: datasets.DatasetDict, fraction: float, seed: int) -> dict[str, datasets.DatasetDict]:
    """The validation and test views of the splits, cut by `holdout` (a seeded hash of the subject), the modified
    facts included: each half has its own modified facts, so A_M is validated on other facts than it is reported on,
    as A_F\\S is. The test view also holds the test half's training phrasings (A_M on them: reliability)."""
    halves = {
        name: holdout(splits[name], fraction, seed)
        for name in (MODIFIED_TRAIN, MODIFIED_TEST, UNMODIFIED_TEST, CONSISTENCY)
        if name in splits
    }
    empty = [half for index, half in enumerate((VALIDATION, TEST)) if not len(halves[MODIFIED_TEST][index])]
    if empty:
        raise ValueError(
            f"The {' and '.join(empty)} half holds none of the {len(splits[MODIFIED_TEST])} modified test "
            f"phrasings (validation_fraction {fraction}): ask for a larger m, or another validation_fraction."
        )
    views = {
        VALIDATION: {name: pair[0] for name, pair in halves.items() if name != MODIFIED_TRAIN},
        TEST: {name: pair[1] for name, pair in halves.items()},
    }
    return {
        half: datasets.DatasetDict({name: split for name, split in view.items() if len(split)})
        for half, view in views.items()
    }


def _keys_key(edit, args: EditConfig) -> tuple:
    """What the preserved keys of a point depend on: its layers and its corpus."""
    return (
        tuple(edit.theta0),
        args.preserve_corpus,
        args.preserve_corpus_column,
        args.preserve_corpus_samples,
        args.preserve_corpus_length,
    )
