"""What θ0 answers once for good: results that depend only on a model's weights and their inputs, kept by a content
hash under HF_HOME/hf_memedit and read back, so a new run of the same job (a fresh run folder, the next seed, the
next sweep point's process) does not compute them again. The preserved keys and the model's samples keep their own
safetensors files there (`keys.py`); this module holds the hashes and the JSON answers (the known-facts filter,
θ0's greedy answers)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .files import atomic_write_text


logger = logging.getLogger(__name__)


def default_cache_dir() -> str:
    """HF_HOME/hf_memedit: the preserved keys (`keys/`), the model's samples (`samples/`), θ0's answers."""
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "hf_memedit")


def weights_hash(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes): which model an answer was computed on.

    Hashing a model's bytes takes a second or two per 100 M parameters, so the hash is kept on the model with the
    tensors' storage and version counters, and computed again only when a tensor was replaced or written in place."""
    state = sorted(model.state_dict().items())
    signature = tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in state)
    kept = getattr(model, "_memedit_weights_hash", None)
    if kept is not None and kept[0] == signature:
        return kept[1]
    digest = hashlib.sha256()
    for name, tensor in state:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    found = digest.hexdigest()[:32]
    object.__setattr__(model, "_memedit_weights_hash", (signature, found))  # a plain attribute, not a submodule
    return found


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of a tokenizer's vocabulary, special tokens and class: which tokenizer an answer was computed with."""
    described = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
        "padding_side": tokenizer.padding_side,
    }
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:32]


def cached_json(folder: str, key: Any, compute: Callable[[], Any], cache_dir: str | None = None) -> Any:
    """`compute()`'s JSON answer for `key` (anything JSON can hold), from `folder` of the cache when it was computed
    before, else computed and written there atomically."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir or default_cache_dir(), folder, f"{folder}-{name}.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                logger.info("Read from the cache: %s.", path)
                return json.load(handle)["value"]
        except (OSError, ValueError, KeyError):
            logger.warning("The cache file %s is unreadable: computing it again.", path)
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "value": value}))
    return value
