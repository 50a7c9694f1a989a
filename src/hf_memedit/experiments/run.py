"""One run of the main job (`memedit edit`): from its θ0 (`Theta0Context`: loaded, started as FTM / FT / RI, the
benchmark drawn on it), evaluate before, edit, evaluate after, and write the run folder as one whole."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import model_kind
from ..benchmarks.common import CONSISTENCY, MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST, UNMODIFIED_TRAIN
from ..edit_config import EditConfig, constraint_record
from ..edit_trainer import ConstrainedEditTrainer
from ..evaluation.metrics import (
    edit_metrics,
    evaluate_splits,
    generate_splits,
    generation_metrics,
    lost_facts,
    next_token_drift,
    preference_metrics,
)
from ..evaluation.results import ResultsRecord
from ..evaluation.scoring import FactResults, answer_contains, answer_matches, generation_scoring
from ..files import atomic_directory, atomic_write_text
from ..run_folder import begin_outputs, claim_run_folder, seal_run
from ..sharding import is_sharded
from .context import FactsSource, GivenFacts, Theta0Context, job_facts
from .facts_source import QUESTIONS, FactsFile, facts_answers, facts_metrics, facts_scoring
from .job_config import FT_SETTINGS, JobConfig
from .loading import load_config, load_tokenizer
from .settings import refuse_pick_on_test


@dataclass
class RunOutcome:
    record: ResultsRecord
    examples: list[dict]
    trainer: ConstrainedEditTrainer | None


def run_edit(
    job: JobConfig,
    args: EditConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    splits: datasets.DatasetDict | None = None,
    facts: FactsSource | None = None,
) -> RunOutcome:
    """Load, start (FTM / FT / RI), build the benchmark (or the job's facts file) on that θ0, evaluate before, edit,
    evaluate after, write the run folder. `splits`, when given, are the benchmark as `prepare_benchmark` makes it for
    this setting's θ0; `facts`, another source of them (`facts_source.FactsFile` of records in memory)."""
    if job.setting == "knn":
        raise ValueError(
            "setting 'knn' trains nothing and needs its ε chosen on validation facts: run `memedit sweep` "
            "(an ε sweep) or `memedit compare` with it."
        )
    refuse_pick_on_test(args)
    resume = resume_target(args.resume_from_checkpoint)
    source = GivenFacts(splits) if splits is not None else facts or job_facts(job, args)
    if isinstance(source, FactsFile):  # a bad facts file is refused before the run folder is claimed: nothing touched
        source.check(
            tokenizer if tokenizer is not None else load_tokenizer(job),
            model.config if model is not None else load_config(job)[0],
        )
    with claim_run_folder(
        args.output_dir, args.overwrite_output_dir, resuming=resume is not None, lock=PartialState().is_main_process
    ):
        start = time.perf_counter()
        context = Theta0Context(job, args, model, tokenizer, source)
        return _run_edit(context, resume, start)


def resume_target(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint`: None (start afresh), True ('true': the newest complete checkpoint), or a
    folder that exists."""
    if value is None or value is False or str(value).lower() in ("", "false", "none"):
        return None
    if value is True or str(value).lower() == "true":
        return True
    if not os.path.isdir(value):
        raise ValueError(
            f"resume_from_checkpoint {value} does not exist: give a checkpoint-N folder, or true for the last one."
        )
    return value


def _run_edit(context: Theta0Context, resume: str | bool | None, start: float) -> RunOutcome:
    args, model, tokenizer, splits = context.args, context.model, context.tokenizer, context.splits
    eval_splits = datasets.DatasetDict(
        {k: splits[k] for k in (MODIFIED_TRAIN, MODIFIED_TEST, UNMODIFIED_TEST, CONSISTENCY) if k in splits}
    )
    if context.job.setting == "ft":  # nothing to edit: report what FT reached
        results = evaluate_splits(model, tokenizer, eval_splits, batch_size=context.batch_size, show_progress=True)
        return _finish(context, edit_metrics(eval_splits, results), [], [], None, start)
    train_dataset, train_args = context.train_set(args)
    trainer = ConstrainedEditTrainer(
        model,
        train_args,
        train_dataset=train_dataset,
        eval_dataset=eval_splits,
        processing_class=tokenizer,
        fisher_dataset=splits[UNMODIFIED_TRAIN],
        preserve_texts=context.preservation_texts(),
    )
    held_out = context.drift_samples()
    generated_before = context.generated_before("run", eval_splits)
    facts = isinstance(context.source, FactsFile)
    facts_before = facts_answers(model, tokenizer, splits, context.batch_size) if facts and generated_before else None
    trainer.train(resume_from_checkpoint=resume)
    results = trainer.fact_results(eval_splits)
    metrics = edit_metrics(eval_splits, results, trainer.before_edit, tokenizer, trainer.kind)
    metrics.update(preference_metrics(trainer.edit_model.model, tokenizer, eval_splits, context.batch_size))
    generated = facts_after = None
    if generated_before is not None:
        generated = generate_splits(trainer.edit_model.model, tokenizer, eval_splits, context.batch_size)
        metrics.update(generation_metrics(eval_splits, generated, generated_before))
        if facts:
            facts_after = facts_answers(trainer.edit_model.model, tokenizer, splits, context.batch_size)
    if facts:
        metrics.update(facts_metrics(trainer.edit_model.model, tokenizer, splits, context.batch_size, facts_after))
    if held_out is not None:
        metrics.update(next_token_drift(trainer.edit_model.model, tokenizer, held_out, trainer.at_theta0))
    examples = fact_examples(splits[MODIFIED_TEST], results[MODIFIED_TEST], tokenizer, generated_before, generated)
    if facts_after and QUESTIONS in facts_after:  # how a chat user meets the edit: the fact asked as a question
        asked = {
            row["uuid"]: (row, before, after)
            for row, before, after in zip(splits[QUESTIONS], facts_before[QUESTIONS], facts_after[QUESTIONS])
        }
        for example in examples:
            if example["uuid"] in asked:
                row, before, after = asked[example["uuid"]]
                example.update(
                    question_answer_before=before,
                    question_answer=after,
                    question_correct=answer_contains(after, row["object"]),
                )
    lost = lost_facts(eval_splits, results, trainer.before_edit, tokenizer, trainer.kind)
    return _finish(context, metrics, examples, lost, trainer, start)


def fact_examples(
    split: datasets.Dataset,
    after: FactResults,
    tokenizer: PreTrainedTokenizerBase,
    generated_before: Mapping[str, list[str]] | None = None,
    generated: Mapping[str, list[str]] | None = None,
) -> list[dict]:
    """Each edited fact as results.json records it: old → new object, the prediction after the edit and whether it
    is right, and, with generation, what greedy generation answered before and after the edit."""
    examples = [
        {
            "uuid": row["uuid"],
            "relation": row["relation"],
            "subject": row["subject"],
            "text": row["text"],
            "old": row["original_object"],
            "new": row["object"],
            "predicted": tokenizer.decode(ids).strip(),
            "correct": ok,
        }
        for row, ids, ok in zip(split, after.predicted, after.correct)
    ]
    if generated is not None:  # what greedy generation answers, before and after the edit, beside teacher forcing
        for example, before, answer in zip(
            examples, generated_before.get(MODIFIED_TEST, []), generated.get(MODIFIED_TEST, [])
        ):
            example.update(
                generated_before=before, generated=answer, generated_correct=answer_matches(answer, example["new"])
            )
    return examples


def _finish(
    context: Theta0Context,
    metrics: dict,
    examples: list[dict],
    lost: list[dict],
    trainer: ConstrainedEditTrainer | None,
    start: float,
) -> RunOutcome:
    """Write the run's outputs; the folder is sealed (memedit_run.json) only once all of them are in place."""
    job, args, locality = context.job, context.args, context.locality
    record = ResultsRecord(
        metrics=metrics,
        config=run_config(context),
        seed=args.seed,
        model=job.model_name_or_path,
        benchmark=context.source.describe()
        if isinstance(context.source, FactsFile)
        else {"name": job.benchmark, "m": job.m, "seed": job.benchmark_seed, **(job.benchmark_options or {})},
        scoring=facts_scoring(metrics) if isinstance(context.source, FactsFile) else generation_scoring(metrics),
        facts=examples,
        locality=locality.to_dict(),
        lost=lost,
        seconds=round(time.perf_counter() - start, 2),
    )
    main = PartialState().is_main_process
    sharded = trainer is not None and any(map(is_sharded, trainer.edit_model.trainable_parameters().values()))
    if sharded and not main:
        trainer.edit_model.save_pretrained(args.output_dir, is_main_process=False)  # FSDP2: its part of the gather
    if main:
        begin_outputs(args.output_dir)
        if trainer is not None:
            with atomic_directory(os.path.join(args.output_dir, "edit")) as staging:
                trainer.edit_model.save_pretrained(staging)
        record.save(args.output_dir)
        if trainer is not None:
            atomic_write_text(
                os.path.join(args.output_dir, "log_history.json"), json.dumps(trainer.state.log_history, indent=2)
            )
        seal_run(args.output_dir)
    return RunOutcome(record, examples, trainer)


def run_config(context: Theta0Context) -> dict[str, Any]:
    """The knobs that define the edit from this θ0, and the model kind (for the record, the manifest and the card)."""
    job, args = context.job, context.args
    keys = ("setting", "model_name_or_path", "gguf_file", "benchmark", "m", "benchmark_seed", "modify_known")
    config = {key: getattr(job, key) for key in keys}
    if isinstance(context.source, FactsFile):  # the facts replace the benchmark (the card reads "facts", m)
        config.update(
            benchmark="facts",
            m=len(context.source.records),
            modify_known=False,
            facts=context.source.describe()["source"],
            train_on_paraphrases=job.train_on_paraphrases,
            fallback_keep=context.source.describe()["fallback_keep"],
        )
    config["model_kind"] = model_kind(context.model)
    config.update(
        edit_blocks=list(args.edit_blocks),
        **constraint_record(vars(args)),
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        seed=args.seed,
        preserve_objective=context.objective,
        eos_target=args.eos_target,
        loss_reduction=args.loss_reduction,
    )
    optional = ("edit_modules", "stop_at_loss", "skip_below_loss", "stop_at_epoch_loss", "target_suffix")
    config.update({name: getattr(args, name) for name in optional if getattr(args, name) is not None})
    if config["preserve_objective"] != "none":
        config.update(
            preserve_ratio=args.preserve_ratio,
            preserve_weight=args.preserve_weight,
            preserve_fraction=args.preserve_fraction,
            preserve_risk=args.preserve_risk,
        )
    if job.setting in FT_SETTINGS:
        config.update(ft_blocks=list(job.ft_blocks), ft_learning_rate=job.ft_learning_rate, ft_epochs=job.ft_epochs)
    return config
