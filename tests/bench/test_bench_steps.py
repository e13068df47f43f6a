"""Every layer-level step of the bench runs, for every peer and mode, on a small setting (one
call each, never timed): a peer that cannot run a mode must fail here, not in a bench run."""
import pytest
import torch

from vgmr_fast.bench import layer
from vgmr_fast.bench.common import Skip
from vgmr_fast.bench.settings import Setting
from bench_helpers import DEVICE, PEERS, ctx, skip_unavailable  # noqa: F401  (ctx: the fixture)

SMALL = Setting("small", B=3, T=5, widths=(16, 9, 4), d=8, dtype="float32")
ALL_MODES = layer.MODES + layer.FIRST_SETTING_MODES


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("peer", PEERS + ["gemm-only"] + (["fused-cpu" + layer.ATEN_GEMM, "gemm-only-onednn"]
                                                          if DEVICE == "cpu" else []))
def test_every_step_runs(ctx, mode, peer):  # noqa: F811
    skip_unavailable(peer)
    try:
        step, _ = layer.make_step(ctx, SMALL, peer, mode)
    except Skip as exc:
        pytest.skip(str(exc))
    out = step()
    if mode == "infer":
        assert all(torch.isfinite(o).all() for o in out)
