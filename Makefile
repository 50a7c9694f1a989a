# Two set-up commands for a fresh machine: `make demo` and `make test`.
# torch is installed only when none is importable, so a user's own (CUDA) build is kept.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: test demo install-test install-demo torch

$(PY):
	$(PYTHON) -m venv $(VENV)

torch: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"

install-test: torch
	$(PY) -m pip install -e ".[test]"

install-demo: torch
	$(PY) -m pip install -e ".[demo]"

test: install-test
	$(PY) -m pytest

demo: install-demo
	$(PY) -m hf_memedit.demo
