"""pytest-benchmark suite (not part of the default test run: pyproject's testpaths is `tests`).
Helpers and the `ctx` fixture live in bench_helpers.py; see benchmarks/README.md."""
from bench_helpers import ctx  # noqa: F401  (the fixture)
