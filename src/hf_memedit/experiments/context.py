"""`Theta0Context`: θ0 of one job, built once and shared by whatever edits or scores from it.

One run (`run_edit`), a sweep or compare (`GridRunner`) and an evaluation (`run_eval`) all start the same way: load
the model, start from the setting's θ0 (FT, RI or as loaded), draw the facts on θ0, set the locality facts apart
from the preservation facts, and resolve the preservation objective. The context does that once, and finds what
costs a pass over the model (θ0's known facts and neighbour risk, the drift samples, θ0's scores) only when first
asked. The facts come from a `FactsSource`: the job's facts file (`facts_source.FactsFile`) or benchmark by default,
or splits made elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import datasets
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import model_kind
from ..benchmarks.common import MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST, UNMODIFIED_TRAIN
from ..caching import cached_json, tokenizer_hash, weights_hash
from ..edit_config import EditConfig
from ..evaluation.metrics import evaluate_splits, generate_splits
from ..preservation import NeighbourRisk, known_evidence, neighbour_risk
from .facts_source import FactsFile
from .job_config import JobConfig
from .loading import load_model_and_tokenizer, prepare_benchmark
from .settings import (
    drift_samples,
    edit_train_dataset,
    locality_split,
    preservation_neighbours,
    preservation_texts,
    preserve_objective,
    starting_model,
)


class FactsSource(Protocol):
    """Where a job's facts come from: the splits of `hf_memedit.benchmarks.SPLITS` (modified and unmodified facts,
    training and test phrasings), drawn for the model the edit starts from (θ0)."""

    def splits(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> datasets.DatasetDict: ...


@dataclass
class BenchmarkFacts:
    """The job's benchmark with exactly m modified facts θ0 can be trained and tested on (`prepare_benchmark`)."""

    job: JobConfig

    def splits(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> datasets.DatasetDict:
        return prepare_benchmark(self.job, model, tokenizer)


@dataclass
class GivenFacts:
    """Splits made elsewhere, as `prepare_benchmark` makes them for this θ0."""

    given: datasets.DatasetDict

    def splits(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> datasets.DatasetDict:
        return self.given


def job_facts(job: JobConfig, args: EditConfig) -> FactsSource:
    """The job's own facts: its facts file where it names one, else its benchmark."""
    if job.facts:
        return FactsFile(job.facts, job.train_on_paraphrases, args.per_device_eval_batch_size, job.fallback_keep)
    return BenchmarkFacts(job)


_UNSET = object()


class Theta0Context:
    """The model at θ0 and the facts drawn on it, with what every edit from θ0 shares.

    `split_always` sets locality facts apart even when this job's edit uses no benchmark fact (a grid, whose points
    may); `reuse_only` (evaluation) reads a setting's FT model back and never trains one.
    """

    def __init__(
        self,
        job: JobConfig,
        args: EditConfig,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        facts: FactsSource | None = None,
        *,
        split_always: bool = False,
        reuse_only: bool = False,
    ):
        if model is None:
            model, tokenizer = load_model_and_tokenizer(job)
        self.job, self.args, self.tokenizer = job, args, tokenizer
        self.model = starting_model(model, tokenizer, job, args, reuse_only)  # θ0, before the facts are drawn on it
        self.objective = preserve_objective(job, args)  # the run's; a grid point may set its own
        self.source = facts or job_facts(job, args)
        drawn = self.source.splits(self.model, tokenizer)
        self.splits, self.locality = locality_split(drawn, job, args, always=split_always)
        self._known: datasets.Dataset | None = None
        self._risks: dict[str, NeighbourRisk | None] = {}
        self._drift: Any = _UNSET
        self._before: dict[str, dict] = {}
        self._generated_before: dict[str, dict | None] = {}

    @property
    def batch_size(self) -> int:
        return self.args.per_device_eval_batch_size

    def known(self) -> datasets.Dataset:
        """The preservation evidence θ0 answers right (preserve_objective 'answers'), found once."""
        if self._known is None:
            self._known = known_evidence(self.model, self.tokenizer, self.splits[UNMODIFIED_TRAIN], self.batch_size)
        return self._known

    def risk(self, objective: str) -> NeighbourRisk | None:
        """How readily the edit's new objects take each neighbour of `objective` over (`preserve_risk`), found once."""
        if objective == "none" or self.args.preserve_risk == 0:
            return None
        if objective not in self._risks:
            neighbours = preservation_neighbours(
                self.splits, objective, self.known() if objective == "answers" else None
            )
            self._risks[objective] = neighbour_risk(
                self.model, self.tokenizer, neighbours, self.splits[MODIFIED_TRAIN], self.batch_size
            )
        return self._risks[objective]

    def train_set(self, args: EditConfig, objective: str | None = None) -> tuple[datasets.Dataset, EditConfig]:
        """The training data of an edit with `args` and `objective` (default: the run's), and the args to train it
        with (a preservation mix trains one group per batch)."""
        objective = objective or self.objective
        known = self.known() if objective == "answers" else None
        return edit_train_dataset(self.splits, objective, args, known, self.risk(objective))

    def preservation_texts(self) -> list[str]:
        """The unmodified evidence set aside for preservation, objects written in (`preserve_corpus: benchmark`)."""
        return preservation_texts(self.splits)

    def drift_samples(self) -> list[list[int]] | None:
        """θ0's own held-out samples general drift is measured on (`drift_eval`), drawn once; None where it is off."""
        if self._drift is _UNSET:
            self._drift = drift_samples(self.model, self.tokenizer, self.args)
        return self._drift

    def before(self, name: str, splits: datasets.DatasetDict) -> dict:
        """θ0's results on `splits` (the modified facts on their original objects), scored once per `name`."""
        if name not in self._before:
            self._before[name] = evaluate_splits(
                self.model, self.tokenizer, splits, original=True, batch_size=self.batch_size, show_progress=True
            )
        return self._before[name]

    def generated_before(self, name: str, splits: datasets.DatasetDict) -> dict | None:
        """θ0's greedy answers on `splits` (`generation_eval`), once per `name`; None where generation is off or the
        model is a masked LM (which is scored by its masks; generation_eval's help says causal LMs, as drift_eval)."""
        if not self.args.generation_eval or not model_kind(self.model).generates:
            return None
        if name not in self._generated_before:
            key = {  # θ0 answers the same prompts alike in every run: kept in the cache (`caching.cached_json`)
                "model": weights_hash(self.model),
                "tokenizer": tokenizer_hash(self.tokenizer),
                "device": next(self.model.parameters()).device.type,
                "batch_size": self.batch_size,
                "splits": {
                    split: [[row["text"], row["object"]] for row in splits[split]]
                    for split in (MODIFIED_TEST, UNMODIFIED_TEST)
                    if split in splits and len(splits[split])
                },
            }
            self._generated_before[name] = cached_json(
                "generated", key, lambda: generate_splits(self.model, self.tokenizer, splits, self.batch_size)
            )
        return self._generated_before[name]
