# The two commands of the README: `make bench` (the main job) and `make test`.
# Both install what they need first (idempotent), so they work on a fresh machine.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0

.PHONY: install bench test

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q setuptools wheel pybind11 ninja
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[dev]"

bench: install
	vgmr-fast bench

test: install
	$(PYTHON) -m pytest -q
