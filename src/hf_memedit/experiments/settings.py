"""The paper's settings: the model an edit starts from (FT, RI, as loaded), the facts locality is scored
on, and the edit's training data (preservation mixes, FTA's among them)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping

import datasets
import torch
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import model_kind
from ..benchmarks import benchmark_facts
from ..benchmarks.common import MODIFIED_TRAIN, UNMODIFIED_TRAIN
from ..collators import PLACEHOLDER, FactEncoder, filter_encodable
from ..edit_config import EditConfig
from ..edit_trainer import ConstrainedEditTrainer
from ..files import atomic_write_text
from ..keys import model_samples
from ..preservation import Locality, NeighbourRisk, disjoint_split, no_split, preservation_batches
from .job_config import FT_SETTINGS, FTA_SETTINGS, JobConfig


logger = logging.getLogger(__name__)


FT_MARKER = "memedit_ft.json"
DRIFT_SAMPLES = 32  # held-out samples of θ0 that general drift is measured on


def random_init(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """RI: a randomly initialised model of the same architecture and config."""
    torch.manual_seed(seed)
    return type(model)(model.config).to(model.device)


def ft_evidence(job: JobConfig, tokenizer: PreTrainedTokenizerBase, kind: str) -> datasets.Dataset:
    """FT's training data: the training evidence of every fact of the benchmark with its own object, the benchmark
    before any modification (the paper's FT: "fine-tune on the unmodified T-REx dataset", after which it reports
    accuracy on all facts). So FT does not depend on which facts are modified, and `modify_known` can judge the FT
    model, which is the one the edit starts from."""
    facts = benchmark_facts(job.benchmark, job.data_dir, job.benchmark_seed, **(job.benchmark_options or {}))
    rows, _ = filter_encodable(
        [{"text": text, "object": f.object} for f in facts for text in f.train_texts], FactEncoder(tokenizer, kind)
    )
    if not rows:
        raise ValueError(f"FT needs training evidence, and {job.benchmark} has none this tokenizer can encode.")
    return datasets.Dataset.from_list(list(rows))


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    job: JobConfig,
    args: EditConfig,
    reuse_only: bool = False,
) -> PreTrainedModel:
    """FT: unconstrained fine-tuning on every fact's evidence (`ft_evidence`), saved to `ft_dir` and reused.
    `reuse_only` (evaluation): the saved FT model of these inputs, or a clear error; nothing is trained or written."""
    folder = job.ft_dir or os.path.join(args.output_dir, "ft")
    evidence = ft_evidence(job, tokenizer, model_kind(model))
    key = {
        "model": job.model_name_or_path,
        "gguf_file": job.gguf_file,
        "revision": job.revision,
        "benchmark": job.benchmark,
        "data_dir": job.data_dir,
        "benchmark_seed": job.benchmark_seed,
        "benchmark_options": job.benchmark_options,
        "n_evidence": len(evidence),
        "ft_blocks": job.ft_blocks,
        "ft_learning_rate": job.ft_learning_rate,
        "ft_epochs": job.ft_epochs,
        "seed": args.seed,
        "batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
    }
    marker = os.path.join(folder, FT_MARKER)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            if json.load(handle) == key:
                logger.info("Reusing the FT model in %s.", folder)
                return (
                    type(model)
                    .from_pretrained(folder, use_safetensors=True, use_kernels=job.use_kernels)
                    .to(model.device)
                )
        if reuse_only:
            raise ValueError(
                f"{folder} holds an FT model made from other inputs than this config's: evaluate with the "
                "config the run was made with (and its ft_dir)."
            )
        logger.warning("%s holds an FT model made from other inputs; fine-tuning afresh.", folder)
    if reuse_only:
        raise ValueError(
            f"Setting {job.setting!r} edits an FT model, and {folder} holds none: give the run's ft_dir "
            "(by default <output_dir>/ft of the run), or run `memedit edit` first."
        )
    ft_args = dataclasses.replace(
        args,
        output_dir=os.path.join(folder, "trainer"),
        edit_blocks=list(job.ft_blocks),
        norm="none",
        delta=None,
        learning_rate=job.ft_learning_rate,
        num_train_epochs=job.ft_epochs,
        max_steps=-1,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        # The paper's FT learns the facts as they are, unconstrained, for its epochs: what the edit is told (where
        # its answers stop, which keys it keeps, when it stops) is not FT's, which the FT key does not record.
        key_constraint="none",
        target_suffix=None,
        eos_target=False,
        stop_at_loss=None,
        skip_below_loss=None,
        stop_at_epoch_loss=None,
    )
    trainer = ConstrainedEditTrainer(model, ft_args, train_dataset=evidence, processing_class=tokenizer)
    trainer.train()
    model = trainer.edit_model.merge_and_unload()
    if PartialState().is_main_process:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        atomic_write_text(marker, json.dumps(key, indent=2, sort_keys=True))
    PartialState().wait_for_everyone()
    return model


def starting_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    job: JobConfig,
    args: EditConfig,
    reuse_only: bool = False,
) -> PreTrainedModel:
    """The model the edit starts from in this setting (θ0): built before the benchmark's facts are drawn, so
    `modify_known` judges θ0; `reuse_only`: FT is read back, never trained."""
    if job.setting in FT_SETTINGS:
        return finetune(model, tokenizer, job, args, reuse_only)
    if job.setting == "ri+ftm":
        return random_init(model, args.seed)
    return model


def refuse_pick_on_test(args: EditConfig) -> None:
    """A run's eval_dataset is the benchmark's test facts: a checkpoint picked on them is a model picked on test."""
    if args.load_best_model_at_end:
        raise ValueError(
            "load_best_model_at_end would pick a checkpoint by its score on the test facts (the run's "
            "eval_dataset): leave it off, and pick δ and blocks on the validation half with memedit sweep."
        )


def drift_samples(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, args: EditConfig
) -> list[list[int]] | None:
    """θ0's own samples that general drift is measured on (`drift_eval`, causal LMs): seeded apart from the
    preservation corpus's samples (seed + 1), so no key or objective saw them. None where drift is off."""
    if not args.drift_eval or not model_kind(model).generates:
        return None
    return model_samples(model, tokenizer, DRIFT_SAMPLES, args.preserve_corpus_length, args.seed + 1)


def preserve_objective(job: JobConfig, args: EditConfig) -> str:
    """The preservation objective of this edit: the config's, or FTA's unmodified evidence for setting fta."""
    if args.preserve_objective == "none" and job.setting in FTA_SETTINGS:
        return "evidence"
    return args.preserve_objective


def uses_benchmark_facts(job: JobConfig, args: EditConfig) -> bool:
    """Whether the edit trains on, or is constrained by, the benchmark's unmodified facts."""
    keys_from_benchmark = args.key_constraint != "none" and args.preserve_corpus == "benchmark"
    return preserve_objective(job, args) != "none" or args.norm == "fisher" or keys_from_benchmark


def preservation_texts(splits: Mapping[str, datasets.Dataset]) -> list[str]:
    """The unmodified evidence set aside for preservation, with its objects written in:
    `preserve_corpus: benchmark`."""
    return [row["text"].replace(PLACEHOLDER, row["object"]) for row in splits[UNMODIFIED_TRAIN]]


def locality_split(
    splits: Mapping[str, datasets.Dataset], job: JobConfig, args: EditConfig, always: bool = False
) -> tuple[datasets.DatasetDict, Locality]:
    """The splits an edit trains and is scored on: disjoint preservation and locality facts when the
    edit uses the benchmark's unmodified facts (or `always`, for a sweep or compare whose points may)."""
    if always or uses_benchmark_facts(job, args):
        if args.preserve_fraction == 0:
            logger.warning(
                "preserve_fraction 0: locality is scored on the same facts the edit preserves (not disjoint)."
            )
        return disjoint_split(splits, args.preserve_fraction, job.benchmark_seed)
    return no_split(splits)


def preservation_neighbours(
    splits: Mapping[str, datasets.Dataset], objective: str, known: datasets.Dataset | None
) -> datasets.Dataset:
    """The facts a preservation objective mixes in: `known` (θ0's right answers) for 'answers', else the
    unmodified evidence."""
    if objective == "answers":
        if known is None:
            raise ValueError(
                "preserve_objective 'answers' needs the evidence θ0 answers right (preservation.known_evidence)."
            )
        return known
    return splits[UNMODIFIED_TRAIN]


def edit_train_dataset(
    splits: Mapping[str, datasets.Dataset],
    objective: str,
    args: EditConfig,
    known: datasets.Dataset | None = None,
    risk: NeighbourRisk | None = None,
) -> tuple[datasets.Dataset, EditConfig]:
    """The edit's training data, and the args to train it with (a preservation mix: one group per batch).

    `objective` 'evidence' mixes in the unmodified evidence (FTA); 'answers' mixes in `known`, the
    unmodified evidence θ0 predicts right (`preservation.known_evidence`). With `preserve_risk`, `risk` is
    `preservation.neighbour_risk` of those neighbours.
    """
    if objective == "none":
        return splits[MODIFIED_TRAIN], args
    groups = preservation_batches(
        splits[MODIFIED_TRAIN],
        preservation_neighbours(splits, objective, known),
        args.per_device_train_batch_size,
        args.preserve_ratio,
        args.preserve_weight,
        args.num_train_epochs,
        args.seed,
        args.preserve_same_relation and objective in ("answers", "kl"),
        risk,
        args.preserve_risk,
    )
    return groups, dataclasses.replace(args, per_device_train_batch_size=1, num_train_epochs=1.0)
