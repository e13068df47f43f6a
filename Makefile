# The two commands of the README: `make bench` (the main job) and `make test`.
# Both install what they need first, and only when something changed: the extension is
# (re)built when no build is importable or a file it is built from is newer than the stamp,
# so `make bench` right after `make test` pays no second set-up.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
STAMP := build/.vgmr-installed
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

# The GPU image's versions (torch 2.11.0+cu130, triton 3.6.0, Python 3.12): `make test-gpu-image`
# builds the CUDA extension against them in its own venv (no GPU needed: setup.py's default
# architectures) and runs the suite there. numpy < 2.4: Triton 3.6's interpreter converts
# one-element arrays with int(), which numpy 2.4 rejects (Triton 3.9 squeezes them first).
GPU_IMAGE_PYTHON ?= $(HOME)/.pyenv/versions/3.12.1/bin/python
GPU_IMAGE_VENV ?= build/venv-gpu-image
GPU_IMAGE_SPECS ?= torch==2.11.0 triton==3.6.0 "numpy<2.4"
GPU_IMAGE_PY := $(GPU_IMAGE_VENV)/bin/python
# the venv's ninja builds the extension, its vgmr-fast is the one tests run
GPU_IMAGE_ENV := PATH=$(abspath $(GPU_IMAGE_VENV))/bin:$$PATH

.PHONY: install force-install bench test test-gpu-image

install:
	@if command -v vgmr-fast >/dev/null 2>&1 && [ -f $(STAMP) ] \
	    && $(PYTHON) -c "import vgmr_fast._C" 2>/dev/null \
	    && [ -z "$$(find $(BUILD_INPUTS) -newer $(STAMP) 2>/dev/null)" ]; then \
	  echo "vgmr-fast: installed build is up to date ($(STAMP))"; \
	else \
	  $(MAKE) --no-print-directory force-install; \
	fi

force-install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q setuptools wheel pybind11 ninja
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[dev]"
	@mkdir -p build && touch $(STAMP)

bench: install
	vgmr-fast bench

test: install
	$(PYTHON) -m pytest -q

# tests/test_setup.py is left out here: it checks `make install` for $(PYTHON), which `make test` runs.
test-gpu-image:
	@if [ ! -x $(GPU_IMAGE_PY) ]; then \
	  if [ -x $(GPU_IMAGE_PYTHON) ]; then base=$(GPU_IMAGE_PYTHON); \
	  else base=$(PYTHON); echo "test-gpu-image: no Python at $(GPU_IMAGE_PYTHON); using $(PYTHON)" \
	    "($$($(PYTHON) -c 'import sys; print(sys.version.split()[0])')), not the GPU image's 3.12"; fi; \
	  $$base -m venv $(GPU_IMAGE_VENV); \
	fi
	$(GPU_IMAGE_PY) -m pip install -q $(GPU_IMAGE_SPECS) setuptools wheel pybind11 ninja
	$(GPU_IMAGE_ENV) $(GPU_IMAGE_PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(GPU_IMAGE_ENV) $(GPU_IMAGE_PY) -c "import sys, torch, triton, vgmr_fast.ops.backend as b; \
	  print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, \
	  'CUDA kernels built:', b.has_cuda_kernels())"
	$(GPU_IMAGE_ENV) $(GPU_IMAGE_PY) -m pytest -q -p no:cacheprovider --ignore=tests/test_setup.py
