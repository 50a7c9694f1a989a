"""Preserved keys: the second moment C = E[k kᵀ] of each edited linear layer's inputs over a preservation corpus.

AlphaEdit's observation: a layer's output on a preserved input k changes by ΔW k, so an update
with ΔW k ≈ 0 for the keys the model sees on ordinary text leaves that text's computation alone.
`collect_keys` runs the model over a corpus (every unmasked token, as AlphaEdit), accumulating C
in float64 per linear layer whose weight the edit trains; `KeyStatistics.save` / `load` cache it
as safetensors, stamped with the model's weights hash, the layers and the corpus hash, so a cache
is never used for another model or corpus. The constraints built on C live in `projection`.

Corpora (`EditConfig.preserve_corpus`): `samples` (the model's own seeded samples: data-free, the
offline default for causal LMs), `benchmark` (the unmodified facts set aside by the disjoint
split, written out), or any `datasets` folder, file or Hub id with a text column.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from .architectures import model_kind
from .caching import default_cache_dir, weights_hash
from .files import load_tensors, save_tensors


logger = logging.getLogger(__name__)

MEMORY_SHARE = 0.5  # refuse statistics that would take more than this share of the free memory


def key_layers(model: nn.Module, trainable: Sequence[str]) -> dict[str, tuple[str, bool]]:
    """Weight name → (module name, transposed) for every trainable weight of a linear layer.

    `transposed` marks GPT-2's `Conv1D`, which stores its weight as [in, out].
    """
    modules = dict(model.named_modules())
    layers = {}
    for name in trainable:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if leaf == "weight" and isinstance(module, (nn.Linear, Conv1D)):
            layers[name] = (owner, isinstance(module, Conv1D))
    return layers


def estimate_bytes(model: nn.Module, layers: Mapping[str, tuple[str, bool]]) -> int:
    """Memory of the float64 moments (one [in, in] matrix per layer) and of their eigenbases (as much again)."""
    modules = dict(model.named_modules())
    total = 0
    for owner, transposed in layers.values():
        weight = modules[owner].weight
        width = weight.shape[0] if transposed else weight.shape[1]
        total += 2 * width * width * 8
    return total


@dataclass
class KeyStatistics:
    """Per linear layer (by its weight's name), C = E[k kᵀ] in float64, and what it was taken on."""

    moments: dict[str, torch.Tensor]
    tokens: int
    model_hash: str
    corpus_hash: str

    def save(self, path: str) -> None:
        meta = {
            "tokens": str(self.tokens),
            "model_hash": self.model_hash,
            "corpus_hash": self.corpus_hash,
            "layers": json.dumps(sorted(self.moments)),
        }
        save_tensors(self.moments, path, metadata=meta)

    @classmethod
    def load(cls, path: str, model_hash: str, layers: Sequence[str], corpus_hash: str) -> KeyStatistics:
        """The statistics in `path`, refused unless they were taken on this model, these layers and this corpus."""
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            meta = handle.metadata() or {}
        for what, wanted, found in (
            ("model", model_hash, meta.get("model_hash")),
            ("corpus", corpus_hash, meta.get("corpus_hash")),
            ("layers", json.dumps(sorted(layers)), meta.get("layers")),
        ):
            if wanted != found:
                raise ValueError(
                    f"The preserved keys in {path} were made for another {what} (theirs {str(found)[:60]}, this "
                    f"edit's {str(wanted)[:60]}): delete the file, or set preserve_keys_file to another path."
                )
        return cls(load_tensors(path), int(meta["tokens"]), model_hash, corpus_hash)


def corpus_hash(texts: Sequence[str] | None = None, spec: Mapping | None = None) -> str:
    """sha256 of the corpus texts (or, for the model's own samples, of how they are drawn)."""
    digest = hashlib.sha256()
    if spec is not None:
        digest.update(json.dumps(spec, sort_keys=True).encode())
    for text in texts or ():
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:32]


def model_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    length: int,
    seed: int,
    batch_size: int = 32,
    model_hash: str | None = None,
    cache_dir: str | None = None,
) -> list[list[int]]:
    """`count` seeded samples of `length` tokens from a causal LM, started at its BOS (or EOS) token, as token ids
    (kept as ids: decoding and encoding again need not give the same tokens).

    The same model (`weights_hash`, pass it when known) and draw give the same samples: they are kept in the
    `samples` folder of `cache_dir` (default HF_HOME/hf_memedit) and read back, so a new run folder does not mean a
    new corpus.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("The model's own samples need a BOS or EOS token to start from; give a text corpus instead.")
    draw = {
        "model": model_hash or weights_hash(model),
        "start": start,
        "count": count,
        "length": length,
        "seed": seed,
        "batch_size": batch_size,
    }
    name = hashlib.sha256(json.dumps(draw, sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir or default_cache_dir(), "samples", f"samples-{name}.safetensors")
    if os.path.isfile(path):
        logger.info("The model's samples read from %s.", path)
        return load_tensors(path)["ids"].tolist()
    samples = _draw_samples(model, start, count, length, seed, batch_size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_tensors({"ids": torch.tensor(samples)}, path, metadata={"draw": json.dumps(draw, sort_keys=True)})
    return samples


@torch.no_grad()
def _draw_samples(
    model: PreTrainedModel, start: int, count: int, length: int, seed: int, batch_size: int
) -> list[list[int]]:
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for first in tqdm(range(0, count, batch_size), desc="sampling the preservation corpus"):
            n = min(batch_size, count - first)
            ids = torch.full((n, 1), start, dtype=torch.long, device=device)
            cache = None
            for _ in range(length):
                out = model(input_ids=ids[:, -1:] if cache is not None else ids, cache=cache, use_cache=True)
                cache = out.cache
                probs = torch.softmax(out.logits[:, -1].float().cpu(), dim=-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator).to(device)], dim=1)
            samples += ids.tolist()
    finally:
        model.train(was_training)
    return samples


@torch.no_grad()
def collect_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str] | Sequence[list[int]],
    layers: Mapping[str, tuple[str, bool]],
    batch_size: int = 16,
    max_length: int = 128,
) -> tuple[dict[str, torch.Tensor], int]:
    """C = E[k kᵀ] (float64) of each layer's inputs over every unmasked token of `texts` (strings, or token
    id lists); returns (moments, tokens)."""
    sequences = [
        tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
        if isinstance(t, str)
        else list(t)[:max_length]
        for t in texts
    ]
    sequences = [ids for ids in sequences if ids]
    if not sequences:
        raise ValueError("The preservation corpus is empty: no text to take the preserved keys from.")
    need = estimate_bytes(model, layers)
    available = psutil.virtual_memory().available
    if need > MEMORY_SHARE * available:
        raise MemoryError(
            f"The preserved keys of {len(layers)} layers need {need / 2**30:.2f} GiB but only "
            f"{available / 2**30:.2f} GiB is free: edit fewer modules (edit_modules, e.g. mlp_out) or fewer blocks."
        )
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []
    handles = []

    def hook(name):
        def record(module, args):
            keys = args[0].detach().double()
            keys = keys.reshape(-1, keys.shape[-1])[mask[0].reshape(-1)]
            sums[name] = sums.get(name, 0) + keys.T @ keys

        return record

    for name, (owner, _) in layers.items():
        handles.append(modules[owner].register_forward_pre_hook(hook(name)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(sequences), batch_size), desc="preserved keys"):
            encoded = sequences[start : start + batch_size]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.tensor([ids + [pad or 0] * (width - len(ids)) for ids in encoded], device=device)
            attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded], device=device)
            mask[:] = [attention.bool()]
            model(input_ids=input_ids, attention_mask=attention)
            tokens += int(attention.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: (total / tokens).cpu() for name, total in sums.items()}, tokens


def preserved_keys(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    trainable: Sequence[str],
    texts: Sequence[str] | None,
    spec: Mapping,
    path: str | None = None,
    cache_dir: str | None = None,
) -> KeyStatistics:
    """The key statistics of the trainable linear weights, from `path` (default: named by the model, corpus and layers
    in the `keys` folder of `cache_dir`, HF_HOME/hf_memedit) when made for this model and corpus, else collected and
    written there. `texts` None means the model's own samples drawn by `spec` (kept in `cache_dir` too)."""
    layers = key_layers(model, trainable)
    if not layers:
        raise ValueError(
            "The preserved-key constraints need a trained linear layer, and the edit trains none: select whole blocks "
            "or linear submodules (edit_modules)."
        )
    model_hash = weights_hash(model)
    corpus = corpus_hash(texts, spec)
    if path is None:
        folder = os.path.join(cache_dir or default_cache_dir(), "keys")
        name = hashlib.sha256(f"{model_hash}:{corpus}:{json.dumps(sorted(layers))}".encode()).hexdigest()[:24]
        path = os.path.join(folder, f"keys-{name}.safetensors")
    if os.path.isfile(path):
        logger.info("Preserved keys read from %s.", path)
        return KeyStatistics.load(path, model_hash, list(layers), corpus)
    corpus_items = (
        texts
        if texts is not None
        else model_samples(
            model, tokenizer, spec["samples"], spec["length"], spec["seed"], model_hash=model_hash, cache_dir=cache_dir
        )
    )
    moments, tokens = collect_keys(model, tokenizer, corpus_items, layers)
    stats = KeyStatistics(moments, tokens, model_hash, corpus)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stats.save(path)
    logger.info("Preserved keys of %d layers over %d tokens written to %s.", len(layers), tokens, path)
    return stats


_DATA_FILES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def keys_corpus(corpus: str, model: nn.Module) -> str:
    """The corpus the keys are taken on: the model's own `samples` need a causal LM to draw them, so a masked LM takes
    the preservation facts (`benchmark`) instead."""
    return "benchmark" if corpus == "samples" and not model_kind(model).generates else corpus


def corpus_texts(
    corpus: str, column: str, count: int, benchmark_texts: Sequence[str] | None = None
) -> list[str] | None:
    """The preservation corpus's first `count` texts (None for 'samples': the model draws them)."""
    if corpus == "samples":
        return None
    if corpus == "benchmark":
        if not benchmark_texts:
            raise ValueError(
                "preserve_corpus 'benchmark' needs the unmodified facts set aside "
                "for preservation (preserve_fraction > 0), and there are none."
            )
        return list(benchmark_texts)[:count]
    import datasets

    extension = os.path.splitext(corpus)[1].lower()
    try:
        if os.path.isfile(corpus) and extension in _DATA_FILES:
            dataset = datasets.load_dataset(_DATA_FILES[extension], data_files=corpus, split="train")
        else:
            dataset = datasets.load_dataset(corpus, split="train")
    except Exception as error:  # datasets raises many kinds; the user needs the corpus named
        raise ValueError(
            f"Could not load the preservation corpus {corpus!r} ({type(error).__name__}: {str(error)[:200]}): give "
            "'samples', 'benchmark', a data file (.jsonl, .csv, .parquet, .txt), a datasets folder or a Hub id."
        ) from None
    if column not in dataset.column_names:
        raise ValueError(
            f"The preservation corpus {corpus!r} has no column {column!r} (its "
            f"columns: {', '.join(dataset.column_names)}): set preserve_corpus_column."
        )
    texts = [text for text in dataset[column][: 4 * count] if isinstance(text, str) and text.strip()][:count]
    if not texts:
        raise ValueError(f"The column {column!r} of the preservation corpus {corpus!r} holds no text.")
    return texts
