"""The benchmark suite behind ``vgmr-fast bench`` (and the backend probing ``vgmr-fast check`` shares).

Levels: per op (``ops.py``), the whole VGMR layer (``layer.py``), end to end with the paper's
Table 7 (``e2e.py``) and a sweep over T (``layer.py``). ``timing.py`` and ``memory.py`` hold the
measurement method, ``opcount.py`` the launch counts (ATen ops; kernels in torch.compile's
generated code) and saved-activation bytes, ``graphcheck.py`` the ``fullgraph=True`` training
check, ``report.py`` the tables (with the layer summary), JSON and plot, ``suite.py`` the
driver (``run_bench(args)``). Every figure is a ratio against a peer measured in the same run; method
and floor arithmetic are written down in ``benchmarks/README.md``.
"""
from .backends import probe_backends  # noqa: F401
