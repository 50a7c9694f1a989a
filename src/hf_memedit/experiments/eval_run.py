"""`memedit eval`'s job: score a model, optionally with an edit applied, on the benchmark."""

from __future__ import annotations

import os
import time

from ..architectures import model_kind
from ..edit_config import EditConfig
from ..evaluation.metrics import (
    edit_metrics,
    evaluate_splits,
    generate_splits,
    generation_metrics,
    lost_facts,
    next_token_drift,
    preference_metrics,
)
from ..evaluation.results import RESULTS_JSON, ResultsRecord
from ..model import EditModel
from ..run_folder import check_writable
from .context import Theta0Context
from .job_config import JobConfig


def run_eval(
    job: JobConfig, args: EditConfig, edit_dir: str | None = None, name: str | None = None
) -> tuple[ResultsRecord, str]:
    """The model the config starts from (with `edit_dir` applied first, if given) on the benchmark; written to
    `<output_dir>/eval/<name or the UTC time>`, never over a run's own record. Returns (record, folder)."""
    folder = os.path.join(args.output_dir, "eval", name or time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    if os.path.exists(os.path.join(folder, RESULTS_JSON)):
        raise ValueError(f"{folder} already holds an evaluation: choose another --eval_name.")
    check_writable(folder)
    # As the run: θ0 of its setting (its saved FT model; RI's seeded init), the facts drawn on it, and its locality
    # split, so an edit that preserved benchmark facts is scored on the disjoint rest.
    context = Theta0Context(job, args, reuse_only=True)
    model, tokenizer, splits, batch = context.model, context.tokenizer, context.splits, context.batch_size
    before = answers_before = held_out = edit = None
    if edit_dir:
        before = context.before("eval", splits)
        answers_before = context.generated_before("eval", splits)
        held_out = context.drift_samples()  # θ0's samples, drawn as the run drew them
        edit = EditModel.from_pretrained(model, edit_dir)
        model = edit.merge_and_unload()
    after = evaluate_splits(model, tokenizer, splits, batch_size=batch, show_progress=True)
    kind = model_kind(model)
    metrics = edit_metrics(splits, after, before, tokenizer, kind)
    metrics.update(preference_metrics(model, tokenizer, splits, batch))
    if args.generation_eval and kind.generates:  # as the run scored it
        metrics.update(generation_metrics(splits, generate_splits(model, tokenizer, splits, batch), answers_before))
    if held_out is not None:
        metrics.update(next_token_drift(model, tokenizer, held_out, edit.at_theta0))
    record = ResultsRecord(
        metrics,
        config={"edit_dir": edit_dir, "setting": job.setting},
        seed=args.seed,
        model=job.model_name_or_path,
        benchmark={"name": job.benchmark, "m": job.m, "seed": job.benchmark_seed, **(job.benchmark_options or {})},
        locality=context.locality.to_dict(),
        lost=lost_facts(splits, after, before, tokenizer, kind),
    )
    record.save(folder)
    return record, folder
