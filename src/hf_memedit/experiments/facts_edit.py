"""`edit_facts`: a user's facts edited into a model from Python, by the same run as `memedit edit --facts`, with
the default recipe (`FACTS_RECIPE`) under the options given."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..edit_config import EditConfig
from ..evaluation.results import ResultsRecord
from ..model import EditModel
from .facts_source import FactsFile
from .job_config import BENCHMARK_ONLY, JobConfig, refuse_benchmark_setting
from .run import run_edit


# The default recipe of a facts edit: the demo's (trainer_configs/demo_smollm2.yaml: KL on θ0's answers to the keep
# prompts, the null space of the keys of the model's own samples, an L∞ bound), its block counted from the top
# (SmolLM2-135M's 25 of 30), until the recipes issue picks one. `memedit edit --facts` without --config uses it too.
FACTS_RECIPE: dict[str, Any] = {
    "edit_blocks": ["-5"],
    "norm": "linf",
    "delta": 3.0e-2,
    "key_constraint": "nullspace",
    "nullspace_energy": 0.7,
    "preserve_corpus": "samples",
    "preserve_objective": "kl",
    "preserve_ratio": 4.0,
    "preserve_fraction": 0.5,
    "learning_rate": 5.0e-3,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "max_steps": 60,
    "lr_scheduler_type": "constant",
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "generation_eval": True,
    "drift_eval": True,
}


def edit_facts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: str | os.PathLike | Sequence[Mapping],
    output_dir: str | None = None,
    **options: Any,
) -> tuple[EditModel, ResultsRecord]:
    """Edit `facts` (a facts file, dataset folder, Hub dataset id, or records in any format of `hf_memedit.facts`)
    into `model` (in place, reversibly: the `EditModel` holds θ0) and score the edit, as `memedit edit --facts` does.

    `options` are fields of `EditConfig` or `JobConfig` (e.g. `edit_blocks=["1"]`, `max_steps=30`,
    `train_on_paraphrases=True`) over `FACTS_RECIPE`. The run folder is written to `output_dir`, or to a temporary
    folder removed afterwards. Returns the edit and its report (results.json's `ResultsRecord`).
    """
    job, edit_options, source = facts_job(model, facts, options, "edit_facts")
    with tempfile.TemporaryDirectory(prefix="memedit-facts-") as scratch:
        args = EditConfig(output_dir=output_dir or os.path.join(scratch, "run"), **edit_options)
        outcome = run_edit(job, args, model, tokenizer, facts=source)
    return outcome.trainer.edit_model, outcome.record


def facts_job(
    model: PreTrainedModel, facts: Any, options: Mapping[str, Any], caller: str, own: Sequence[str] = ()
) -> tuple[JobConfig, dict[str, Any], FactsFile]:
    """A facts edit from Python: its `JobConfig`, its `EditConfig` options (`FACTS_RECIPE` under `options`) and the
    facts as a source. `options` are fields of either config; `own` names the caller's own options, which it has
    taken out, for the error that refuses an unknown one."""
    job_fields = {f.name for f in fields(JobConfig)} - set(BENCHMARK_ONLY) - {"facts"}
    edit_fields = {f.name for f in fields(EditConfig) if f.init}
    unknown = sorted(set(options) - job_fields - edit_fields)
    if unknown:
        theirs = f"the {caller}'s ({', '.join(own)}) or " if own else ""
        raise ValueError(
            f"{caller} got unknown options {', '.join(unknown)}: give {theirs}fields of EditConfig or JobConfig "
            f"(not the benchmark's: {', '.join(BENCHMARK_ONLY)})."
        )
    path = os.fspath(facts) if isinstance(facts, (str, os.PathLike)) else None
    job_options = {name: value for name, value in options.items() if name in job_fields}
    # JobConfig's options of a facts path only: records given in Python take them through the source
    own = {name: job_options.pop(name) for name in ("train_on_paraphrases", "fallback_keep") if name in job_options}
    train_on_paraphrases, fallback_keep = own.get("train_on_paraphrases", False), own.get("fallback_keep")
    job = JobConfig(model_name_or_path=model.name_or_path, facts=path, **job_options, **(own if path else {}))
    refuse_benchmark_setting(job.setting)
    edit_options = {**FACTS_RECIPE, **{name: value for name, value in options.items() if name in edit_fields}}
    source = FactsFile(
        path or list(facts), train_on_paraphrases, edit_options["per_device_eval_batch_size"], fallback_keep
    )
    return job, edit_options, source
