"""The application layer: the main job and its experiments, built on the editing core.

- `job_config`: `JobConfig` (model, benchmark, setting, sweeps and compares) and the settings' names;
- `loading`: the model (or its config alone), a run's base and the benchmark;
- `settings`: FT / RI / as loaded, the disjoint locality split, and the preservation mixes (FTA's among them);
- `run`: one run of the main job, written as one whole run folder;
- `grid`: sweeps (`GridRunner`, the points and their keys, the validation/test pick);
- `reports`: the sweep's table and plots;
- `compare`: the editing methods side by side;
- `evaluate`: `memedit eval`'s scoring of a model, with or without an edit.
"""

from .compare import run_compare
from .eval_run import run_eval
from .grid import GridRunner, run_sweep
from .job_config import COMPARE_METHODS, FT_SETTINGS, FTA_SETTINGS, MODEL_KINDS, SETTINGS, JobConfig
from .loading import holdout, load_config, load_model_and_tokenizer, load_run_base, prepare_benchmark
from .run import RunOutcome, resume_target, run_config, run_edit
from .settings import edit_train_dataset, finetune, locality_split, preserve_objective, random_init, starting_model


__all__ = [
    "COMPARE_METHODS", "FTA_SETTINGS", "FT_SETTINGS", "MODEL_KINDS", "SETTINGS", "GridRunner", "JobConfig",
    "RunOutcome", "edit_train_dataset", "finetune", "holdout", "load_config", "load_model_and_tokenizer", "load_run_base",
    "locality_split", "preserve_objective", "prepare_benchmark", "random_init", "resume_target", "run_compare", "run_config", "run_edit", "run_eval",
    "run_sweep", "starting_model",
]
