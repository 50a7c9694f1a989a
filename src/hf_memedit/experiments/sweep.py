"""`memedit sweep`: δ × blocks (× norms), or kNN-LM's ε, from one θ0; each point scored on the validation and test
halves of the facts, the best picked on validation (and, for comparison, on test, as the paper did), written as
sweep.md, sweep.json and plots (`experiments.reports`). Each finished point is kept in points.jsonl
(`experiments.points`), so a resumed sweep recomputes nothing.
"""

from __future__ import annotations

import os

from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..edit_config import EditConfig
from ..run_folder import claim_run_folder
from .grid import GridRunner
from .grid_point import GridPoint
from .job_config import JobConfig
from .method import MethodContext
from .methods import METHODS, method_arguments
from .points import open_points, save_points
from .reports import write_report


def grid(job: JobConfig, args: EditConfig) -> list[GridPoint]:
    """The edit points of a sweep: `sweep_norms` × `sweep_blocks` × `sweep_deltas`, each defaulting to the run's."""
    norms = job.sweep_norms or [args.norm]
    blocks = job.sweep_blocks or list(args.edit_blocks)
    deltas = job.sweep_deltas or [args.delta]
    return [  # block outermost: consecutive points share one prefix cache
        GridPoint(norm=norm, block=block, delta=delta)
        for block in blocks
        for norm in norms
        for delta in ([None] if norm == "none" else deltas)
    ]


def run_sweep(
    job: JobConfig,
    args: EditConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[dict]:
    """Run every grid point not yet in `<output_dir>/points.jsonl`; write the table and the plots.

    With `setting: knn` the grid is the knn method's: kNN-LM's ε (`knn_epsilons`, default: quantiles of the distances).
    """
    folder = args.output_dir
    with claim_run_folder(folder, args.overwrite_output_dir, resuming=True, lock=PartialState().is_main_process):
        done = open_points(folder, job, args)
        runner = GridRunner(job, args, model, tokenizer)
        if job.setting == "knn":
            knn = METHODS["knn"]
            points = knn.grid_points(MethodContext(runner, arguments=method_arguments(job)[knn.arguments]))
        else:
            points = grid(job, args)
        for index, point in enumerate(points):
            if point.key in done:
                continue
            print(f"[sweep {index + 1}] {point.describe()}", flush=True)
            done[point.key] = runner.score(point, os.path.join(folder, "points", f"{index:03d}"))
            save_points(folder, done)
        rows = [done[point.key] for point in points]
        write_report(folder, rows, job, args, runner.locality, runner.folds)
        return rows
