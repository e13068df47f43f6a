# The two commands of the README: `make bench` (the main job) and `make test`.
# Both install what they need first, and only when something changed: the extension is
# (re)built when no build is importable or a file it is built from is newer than the stamp,
# so `make bench` right after `make test` pays no second set-up.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
STAMP := build/.vgmr-installed
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: install force-install bench test

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
