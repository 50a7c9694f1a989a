"""The paper's settings: the model an edit starts from (FT, RI, as loaded) and the edit's training data (FTA mixes)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Mapping

import datasets
import torch
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..benchmarks.common import MODIFIED_TRAIN, UNMODIFIED_TRAIN
from ..edit_config import EditConfig
from ..edit_trainer import ConstrainedEditTrainer
from ..io import atomic_write_text
from .job_config import FT_SETTINGS, JobConfig


logger = logging.getLogger(__name__)


FT_MARKER = "memedit_ft.json"


def mixed_batches(modified: datasets.Dataset, unmodified: datasets.Dataset, per_side: int, epochs: float, seed: int) -> datasets.Dataset:
    """FTA: groups of `per_side` modified + `per_side` unmodified evidences, each collated as one batch."""
    if len(unmodified) == 0:
        raise ValueError("FTA needs unmodified training evidence, and the benchmark has none.")
    rng = random.Random(seed)
    groups = []
    passes = max(1, round(epochs))
    for _ in range(passes):
        order = list(range(len(modified)))
        rng.shuffle(order)
        for start in range(0, len(order), per_side):
            chosen = [modified[i] for i in order[start : start + per_side]]
            chosen += [unmodified[i] for i in rng.sample(range(len(unmodified)), min(per_side, len(unmodified)))]
            groups.append({"text": [row["text"] for row in chosen], "object": [row["object"] for row in chosen]})
    return datasets.Dataset.from_list(groups)


def random_init(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """RI: a randomly initialised model of the same architecture and config."""
    torch.manual_seed(seed)
    return type(model)(model.config).to(model.device)


def finetune(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, splits: Mapping[str, datasets.Dataset], job: JobConfig, args: EditConfig) -> PreTrainedModel:
    """FT: unconstrained fine-tuning on the unmodified facts' evidence, saved to `ft_dir` and reused."""
    folder = job.ft_dir or os.path.join(args.output_dir, "ft")
    key = {
        "model": job.model_name_or_path, "gguf_file": job.gguf_file, "revision": job.revision,
        "benchmark": job.benchmark, "m": job.m, "benchmark_seed": job.benchmark_seed,
        "benchmark_options": job.benchmark_options, "ft_blocks": job.ft_blocks, "ft_learning_rate": job.ft_learning_rate,
        "ft_epochs": job.ft_epochs, "seed": args.seed, "n_unmodified_train": len(splits[UNMODIFIED_TRAIN]),
        "batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "modify_known": job.modify_known,
    }
    marker = os.path.join(folder, FT_MARKER)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            if json.load(handle) == key:
                logger.info("Reusing the FT model in %s.", folder)
                return type(model).from_pretrained(folder, use_safetensors=True).to(model.device)
        logger.warning("%s holds an FT model made from other inputs; fine-tuning afresh.", folder)
    if len(splits[UNMODIFIED_TRAIN]) == 0:
        raise ValueError("FT needs unmodified training evidence, and the benchmark has none.")
    ft_args = dataclasses.replace(
        args, output_dir=os.path.join(folder, "trainer"), edit_blocks=list(job.ft_blocks), norm="none", delta=None,
        learning_rate=job.ft_learning_rate, num_train_epochs=job.ft_epochs, max_steps=-1,
        eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
    )
    trainer = ConstrainedEditTrainer(model, ft_args, train_dataset=splits[UNMODIFIED_TRAIN], processing_class=tokenizer)
    trainer.train()
    model = trainer.edit_model.merge_and_unload()
    if PartialState().is_main_process:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        atomic_write_text(marker, json.dumps(key, indent=2, sort_keys=True))
    PartialState().wait_for_everyone()
    return model


def starting_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, splits: Mapping[str, datasets.Dataset], job: JobConfig, args: EditConfig) -> PreTrainedModel:
    """The model the edit starts from in this setting (θ0)."""
    if job.setting in FT_SETTINGS:
        return finetune(model, tokenizer, splits, job, args)
    if job.setting == "ri+ftm":
        return random_init(model, args.seed)
    return model


def edit_train_dataset(splits: Mapping[str, datasets.Dataset], mixed: bool, args: EditConfig) -> tuple[datasets.Dataset, EditConfig]:
    """The training data of the edit, and the args to train it with (FTA, `mixed`: one group per batch)."""
    if mixed:
        per_side = args.per_device_train_batch_size
        groups = mixed_batches(splits[MODIFIED_TRAIN], splits[UNMODIFIED_TRAIN], per_side, args.num_train_epochs, args.seed)
        return groups, dataclasses.replace(args, per_device_train_batch_size=1, num_train_epochs=1.0)
    return splits[MODIFIED_TRAIN], args


