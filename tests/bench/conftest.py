"""The pytest-benchmark suite (``test_bench_ops.py``, ``test_bench_layer.py``) runs only when asked
for: ``python -m pytest tests/bench --benchmark-only``. Without that flag its tests are deselected
(counted as deselected, not as passed), so the default test run stays short; the counters in this
folder run either way. Helpers and the ``ctx`` fixture live in bench_helpers.py."""
from bench_helpers import ctx  # noqa: F401  (the fixture)


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", False):
        return
    timed = [item for item in items if "benchmark" in getattr(item, "fixturenames", ())]
    if timed:
        config.hook.pytest_deselected(items=timed)
        items[:] = [item for item in items if item not in timed]
