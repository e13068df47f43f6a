"""Helpers of the pytest-benchmark suite (run only with ``--benchmark-only``; see conftest.py).

    python -m pytest tests/bench --benchmark-only                 # all
    python -m pytest tests/bench --benchmark-only -k gate_norm    # one op
    python -m pytest tests/bench --benchmark-only --benchmark-json out.json

Sizes: VGMR_BENCH_SETTINGS=mosei,large (default: mosei). The device is CUDA when available.
"""
import os

import pytest
import torch

from vgmr_fast.bench.backends import probe_backends
from vgmr_fast.bench.common import Ctx
from vgmr_fast.bench.settings import settings_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROBED = probe_backends(DEVICE)
WANTED = [s.strip() for s in os.environ.get("VGMR_BENCH_SETTINGS", "mosei").split(",") if s.strip()]
SETTINGS = [s for s in settings_for(DEVICE) if s.name in WANTED]
PEERS = ["eager"] + [f"fused-{b}" for b in PROBED]


def skip_unavailable(peer: str) -> None:
    if peer.startswith("fused-"):
        why = PROBED.get(peer[len("fused-"):].split("/")[0])
        if why:
            pytest.skip(f"{peer}: {why}")


@pytest.fixture
def ctx():
    c = Ctx(device=DEVICE, backends=[b for b, why in PROBED.items() if why is None], compile=False,
            compile_reason="pytest-benchmark", min_time=0.1, min_blocks=5, quick=False, tiny=False)
    yield c
    c.clear()


def run(benchmark, step, device):
    if device == "cuda":
        def call():
            step()
            torch.cuda.synchronize()
        benchmark(call)
    else:
        benchmark(step)
