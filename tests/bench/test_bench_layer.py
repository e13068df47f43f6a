"""Whole-layer benchmarks (pytest-benchmark): reference VGMR (eager) vs fused VGMR per backend
and the GEMM-only floor, train step (fwd+bwd) and inference, as `vgmr-fast bench`'s layer level. Only with ``--benchmark-only``."""
import pytest

from vgmr_fast.bench import layer
from vgmr_fast.bench.common import Skip
from bench_helpers import DEVICE, PEERS, SETTINGS, run, skip_unavailable


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
@pytest.mark.parametrize("mode", layer.MODES)
@pytest.mark.parametrize("peer", PEERS + ["gemm-only"])
def test_layer(benchmark, ctx, setting, mode, peer):
    skip_unavailable(peer)
    try:
        step, nsets = layer.make_step(ctx, setting, peer, mode)
    except Skip as exc:
        pytest.skip(str(exc))
    benchmark.group = f"layer {mode} {setting.name}"
    benchmark.extra_info.update(rotation_sets=nsets, shape=setting.describe())
    run(benchmark, step, DEVICE)
