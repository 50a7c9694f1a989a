"""Loading what a job needs: the model and tokenizer (safetensors or GGUF only), the base of a run,
the benchmark with exactly m modified facts the model can be trained and tested on, and its validation half."""

from __future__ import annotations

import functools
import glob
import json
import os
import random
import shutil
from typing import Any

import datasets
import torch
import transformers
from accelerate import PartialState
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import ModelKind, model_kind
from ..benchmarks import load_benchmark
from ..benchmarks.common import MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST, hash_share
from ..caching import default_cache_dir
from ..collators import FactEncoder, filter_encodable
from ..evaluation.results import ResultsRecord
from ..files import atomic_write_text, file_sha256, looks_like_path
from ..packaged import PACKAGED_MODELS
from .job_config import FT_SETTINGS, JobConfig


def _source(job: JobConfig) -> tuple[str, dict[str, Any]]:
    """(folder or Hub id, the from_pretrained kwargs) of the job's model: packaged names resolved, and a local GGUF
    file replaced by its safetensors copy where one was made (`gguf_copy`)."""
    name, gguf_file = job.model_name_or_path, job.gguf_file
    if name in PACKAGED_MODELS:
        name, packaged_gguf = PACKAGED_MODELS[name].locate()
        gguf_file = gguf_file or packaged_gguf
    common: dict[str, Any] = {"revision": job.revision, "trust_remote_code": job.trust_remote_code}
    if gguf_file:
        copy = gguf_copy(name, gguf_file)
        if copy is not None and os.path.isfile(os.path.join(copy, GGUF_COPY_DONE)):
            return copy, common
        common["gguf_file"] = gguf_file
    if not os.path.isdir(name) and looks_like_path(name):
        raise FileNotFoundError(
            f"Could not load model {job.model_name_or_path!r}: the folder {os.path.abspath(name)} does not exist."
        )
    return name, common


def _load_failed(job: JobConfig, name: str, error: BaseException) -> FileNotFoundError:
    if os.path.isdir(name):
        return FileNotFoundError(f"Could not load model {job.model_name_or_path!r} from the folder {name} ({error})")
    offline = (
        " The Hugging Face Hub is unreachable or HF_HUB_OFFLINE "
        "is set: download the model elsewhere and pass its folder."
        if _hub_unreachable(error)
        else ""
    )
    return FileNotFoundError(
        f"Could not load model {job.model_name_or_path!r}: tried no local folder {os.path.abspath(name)!r}, so the "
        f"Hub id {name!r}.{offline} ({error})"
    )


def load_config(job: JobConfig) -> tuple[PretrainedConfig, ModelKind]:
    """The model's config and kind, without its weights (what `memedit inspect` needs)."""
    name, common = _source(job)
    try:
        config = AutoConfig.from_pretrained(name, **common)
    except (OSError, ValueError) as error:
        raise _load_failed(job, name, error) from None
    return config, ModelKind(job.model_kind) if job.model_kind != "auto" else ModelKind.of_config(config)


def load_tokenizer(job: JobConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone (what checking a facts file needs, with `load_config`)."""
    name, common = _source(job)
    try:
        return AutoTokenizer.from_pretrained(name, **common)
    except (OSError, ValueError) as error:
        raise _load_failed(job, name, error) from None


def load_model_and_tokenizer(job: JobConfig) -> tuple[PreTrainedModel, Any]:
    """The model (safetensors or GGUF only) and its tokenizer, with an error that says what was tried."""
    name, common = _source(job)
    gguf_file = common.get("gguf_file")
    if os.path.isdir(name) and not gguf_file and not glob.glob(os.path.join(name, "*.safetensors")):
        found = ", ".join(sorted(os.path.basename(f) for f in glob.glob(os.path.join(name, "*.bin")))) or "no weights"
        raise ValueError(
            f"{name} has no safetensors weights ({found}): hf_memedit loads safetensors only, since a pickled "
            "checkpoint can run code when loaded. Convert it where you trust it (from_pretrained, then "
            "save_pretrained(safe_serialization=True))."
        )
    config, kind = load_config(job)
    tokenizer = load_tokenizer(job)
    placement = (
        {"device_map": job.device_map, "offload_folder": job.offload_folder} if job.device_map is not None else {}
    )
    model = kind.auto_class.from_pretrained(
        name,
        config=config,  # read once (a GGUF file's metadata takes seconds to parse)
        dtype=job.torch_dtype,
        use_kernels=job.use_kernels,
        **placement,
        **common,
        **({} if gguf_file else {"use_safetensors": True}),
    )
    if gguf_file:
        _forget_gguf_quantization(model)
        copy = gguf_copy(name, gguf_file)
        if copy is not None and PartialState().is_main_process and job.device_map is None:
            _save_gguf_copy(model, tokenizer, copy)
        if job.torch_dtype != "auto":  # transformers dequantises GGUF to float32
            model.to(getattr(torch, job.torch_dtype))
    return model, tokenizer


GGUF_COPY_DONE = "memedit_gguf_copy.json"  # written last: a copy without it was cut short


def gguf_copy(name: str, gguf_file: str) -> str | None:
    """Where the safetensors copy of a local GGUF checkpoint lives, made or not: HF_HOME/hf_memedit/gguf, by the
    file's content hash and the transformers version that de-quantised it. Parsing a GGUF file takes seconds each
    time its config, tokenizer or weights are read (three times a job); the copy loads like any folder, the same
    float32 weights and tokenizer. None for a GGUF file on the Hub (transformers keeps its own download cache)."""
    path = os.path.join(name, gguf_file)
    if not os.path.isfile(path):
        return None
    stat = os.stat(path)
    key = f"{_content_hash(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)[:24]}-transformers-"
    return os.path.join(default_cache_dir(), "gguf", key + transformers.__version__)


@functools.lru_cache(maxsize=8)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, read once per process while its size and modification time stay (a job resolves its
    model for the config, the tokenizer and the weights: one read of a 100 MB file, not four)."""
    return file_sha256(path)


def _save_gguf_copy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, copy: str) -> None:
    """Write the de-quantised model and its tokenizer to `copy`, whole or not at all (a temporary folder renamed)."""
    if os.path.isfile(os.path.join(copy, GGUF_COPY_DONE)):
        return
    partial = f"{copy}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    atomic_write_text(os.path.join(partial, GGUF_COPY_DONE), json.dumps({"made_from": model.name_or_path}))
    if os.path.isfile(os.path.join(copy, GGUF_COPY_DONE)):  # another job finished its copy meanwhile: it may be
        shutil.rmtree(partial, ignore_errors=True)  # reading it, so it stays
        return
    shutil.rmtree(copy, ignore_errors=True)  # an earlier copy cut short
    try:
        os.rename(partial, copy)
    except OSError:  # another process put its copy there first: the same files
        shutil.rmtree(partial, ignore_errors=True)


def load_run_base(run_dir: str, record: ResultsRecord) -> tuple[PreTrainedModel, Any]:
    """The model a run's edit was made on, and its tokenizer (what `full` and `peft` packages need)."""
    if record.config.get("setting") in FT_SETTINGS:
        return load_model_and_tokenizer(JobConfig(model_name_or_path=os.path.join(run_dir, "ft")))
    if record.config.get("setting") == "ri+ftm":
        raise ValueError("An RI+FTM edit starts from a random model that was not saved: share it as 'delta'.")
    return load_model_and_tokenizer(
        JobConfig(model_name_or_path=record.config["model_name_or_path"], gguf_file=record.config.get("gguf_file"))
    )


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


def prepare_benchmark(
    job: JobConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> datasets.DatasetDict:
    """The benchmark with exactly `job.m` modified facts that this model can be trained and tested on, built once
    per machine (main process first).

    `model` is the one the edit starts from (θ0: after FT for the ft+ settings), so `modify_known` picks facts θ0
    knows. Which facts may be modified, and which new objects drawn, is decided before drawing, over every phrasing
    (`load_benchmark`'s encoder); the phrasings that cannot be encoded are then dropped from every split."""
    options = dict(job.benchmark_options or {})
    encoder = FactEncoder(tokenizer, model_kind(model))
    known = {"model": model, "tokenizer": tokenizer} if job.modify_known else {}
    with PartialState().main_process_first():
        splits = load_benchmark(
            job.benchmark, m=job.m, seed=job.benchmark_seed, data_dir=job.data_dir, encoder=encoder, **known, **options
        )
    kept = {}
    for name, split in splits.items():
        rows, _ = filter_encodable(split, encoder)
        kept[name] = datasets.Dataset.from_list(list(rows), features=split.features) if rows else split.select([])
    tested, trained = set(kept[MODIFIED_TEST]["uuid"]), set(kept[MODIFIED_TRAIN]["uuid"])
    drawn = set(splits[MODIFIED_TEST]["uuid"])
    if len(drawn) != job.m or tested != drawn or trained != drawn:
        raise ValueError(
            f"{job.benchmark} was asked for m={job.m} modified facts and has {len(tested & trained)} "
            f"this model can be trained and tested on ({len(drawn)} drawn; {len(drawn - tested)} lost "
            f"a test phrasing and {len(drawn - trained)} every training phrasing to the tokenizer). "
            "Report it: encodability is checked before drawing, so this should not happen."
        )
    if job.max_unmodified_eval is not None:
        facts = sorted(set(kept[UNMODIFIED_TEST]["uuid"]))
        if len(facts) > job.max_unmodified_eval:
            sample = set(random.Random(job.benchmark_seed).sample(facts, job.max_unmodified_eval))
            kept[UNMODIFIED_TEST] = kept[UNMODIFIED_TEST].select(
                [i for i, uuid in enumerate(kept[UNMODIFIED_TEST]["uuid"]) if uuid in sample]
            )
    return datasets.DatasetDict(kept)


def holdout(split: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(validation, test): the rows whose subject's seeded hash share (`hash_share`) is below `fraction`, and the
    others. So the halves are disjoint by fact and by subject, a fact's questions all on one side, and a fact's side
    does not depend on which other facts are present."""
    validation = [hash_share(subject, seed, "validation") < fraction for subject in split["subject"]]
    return (
        split.select([i for i, v in enumerate(validation) if v]),
        split.select([i for i, v in enumerate(validation) if not v]),
    )
