"""Per-op benchmarks (pytest-benchmark): each op over all modalities of a setting, as in
`vgmr-fast bench`'s ops level (same inputs, rotation and peers; see benchmarks/README.md). Only with ``--benchmark-only``.."""
import pytest

from vgmr_fast.bench import ops
from bench_helpers import DEVICE, PEERS, SETTINGS, run, skip_unavailable


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
@pytest.mark.parametrize("op", ops.OPS)
@pytest.mark.parametrize("mode", ops.MODES)
@pytest.mark.parametrize("peer", PEERS)
def test_op(benchmark, ctx, setting, op, mode, peer):
    skip_unavailable(peer)
    step, nsets = ops.make_step(ctx, op, peer, setting, mode)
    benchmark.group = f"{op} {mode} {setting.name}"
    benchmark.extra_info.update(floor_bytes=ops.floor_bytes(op, setting)[mode], rotation_sets=nsets,
                                shape=setting.describe())
    run(benchmark, step, DEVICE)
