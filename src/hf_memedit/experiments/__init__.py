"""The application layer: the main job and its experiments, built on the editing core.

- `job_config`: `JobConfig` (model, benchmark, setting, sweeps and compares) and the settings' names;
- `loading`: the model (or its config alone), a run's base and the benchmark;
- `settings`: FT / RI / as loaded, the disjoint locality split, and the preservation mixes (FTA's among them);
- `facts_source`, `facts_edit`: a user's facts file as the job's facts (`FactsFile`), and `edit_facts` from Python;
- `context`: `Theta0Context`, θ0 of one job (model, facts, locality split, what every edit from θ0 shares);
- `run`: one run of the main job, written as one whole run folder;
- `eval_run`: `memedit eval`'s scoring of a model, with or without an edit;
- `grid_point`, `points`: `GridPoint`, one point of a sweep or compare, and `points.jsonl` keyed by it;
- `grid`: `GridRunner`, which scores points from one θ0 on the validation and test halves of the facts;
- `picks`: the two halves and the rule that picks a point on one;
- `sweep`, `reports`: `memedit sweep`, its table and plots;
- `method`, `methods/`: what an editing method is, and the methods, one module each;
- `compare`: `memedit compare`, the methods side by side.
"""

from .compare import run_compare
from .context import BenchmarkFacts, FactsSource, GivenFacts, Theta0Context
from .eval_run import run_eval
from .facts_edit import FACTS_RECIPE, edit_facts
from .facts_source import FactsFile
from .grid import GridRunner
from .job_config import COMPARE_METHODS, FT_SETTINGS, FTA_SETTINGS, MODEL_KINDS, SETTINGS, JobConfig
from .loading import holdout, load_config, load_model_and_tokenizer, load_run_base, prepare_benchmark
from .run import RunOutcome, resume_target, run_config, run_edit
from .settings import edit_train_dataset, finetune, locality_split, preserve_objective, random_init, starting_model
from .sweep import run_sweep


__all__ = [
    "COMPARE_METHODS",
    "FACTS_RECIPE",
    "FTA_SETTINGS",
    "FactsFile",
    "FT_SETTINGS",
    "MODEL_KINDS",
    "SETTINGS",
    "BenchmarkFacts",
    "FactsSource",
    "GivenFacts",
    "GridRunner",
    "JobConfig",
    "RunOutcome",
    "Theta0Context",
    "edit_facts",
    "edit_train_dataset",
    "finetune",
    "holdout",
    "load_config",
    "load_model_and_tokenizer",
    "load_run_base",
    "locality_split",
    "preserve_objective",
    "prepare_benchmark",
    "random_init",
    "resume_target",
    "run_compare",
    "run_config",
    "run_edit",
    "run_eval",
    "run_sweep",
    "starting_model",
]
