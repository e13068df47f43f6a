"""The launchers' configuration tables are built once per value of the settings they read,
not on every launch (vgmr_fast.triton: gate_norm, summary_pool, interaction)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
import vgmr_fast.triton as VT  # noqa: E402
from vgmr_fast.triton import gate_norm as GN  # noqa: E402
from vgmr_fast.triton import interaction as IA  # noqa: E402
from vgmr_fast.triton import summary_pool as SP  # noqa: E402

BUILDERS = {"gate_norm forward": GN._fwd_table, "gate_norm backward": GN._bwd_table,
            "summary_pool": SP._table, "interaction": IA._table}


def _launch_every_op(D=48):
    """Run every launcher once on CPU tensors, recording its launches instead of running them."""
    B, T, M = 2, 3, 3
    f32 = torch.float32
    x, z, dy = (torch.randn(B, T, D) for _ in range(3))
    br, w, b = torch.randn(B, D), torch.randn(D), torch.randn(D)
    seed = torch.zeros(1, dtype=torch.int64)
    stats = torch.zeros(B, T, dtype=f32)
    s = torch.randn(B, M, D)
    with VT.recording() as launches:
        GN.gate_norm(z, br, x, w, b, 0.5, 0.2, 0.1, seed)
        GN.gate_norm_backward(dy, z, br, x, w, stats, stats, 0.5, 0.2, 0.1, seed)
        SP.summary_pool(x, None)
        SP.summary_pool_backward(br, br, None, torch.zeros(B, D, dtype=torch.int32), T)
        IA.interaction(s)
        IA.interaction_backward(torch.randn(B, M, (3 * M - 1) * D), s)
    return launches


def _misses():
    return {name: fn.cache_info().misses for name, fn in BUILDERS.items()}


def test_second_launch_builds_no_table():
    first = _launch_every_op()
    assert len(first) >= 6
    before = _misses()
    hits = {name: fn.cache_info().hits for name, fn in BUILDERS.items()}
    second = _launch_every_op()
    assert _misses() == before
    assert all(BUILDERS[name].cache_info().hits > hits[name] for name in BUILDERS)
    assert [(k.__name__, g, m) for k, g, _, m in second] == [(k.__name__, g, m) for k, g, _, m in first]


def test_a_changed_setting_builds_its_own_table(monkeypatch):
    _launch_every_op()
    before = _misses()
    monkeypatch.setitem(VT.CONFIG, "gn_max_tile", VT.CONFIG["gn_max_tile"] // 2)
    monkeypatch.setitem(VT.CONFIG, "gn_bwd_chunk_d", VT.CONFIG["gn_bwd_chunk_d"] // 2)
    monkeypatch.setitem(VT.CONFIG, "sp_max_tile", VT.CONFIG["sp_max_tile"] // 2)
    monkeypatch.setitem(VT.CONFIG, "ia_block_d", VT.CONFIG["ia_block_d"] * 2)
    _launch_every_op()
    after = _misses()
    assert all(after[name] > before[name] for name in BUILDERS), (before, after)
    assert GN.fwd_configs()[0]["BLOCK_R"] == VT.CONFIG["gn_max_tile"] // GN.fwd_configs()[0]["BLOCK_D"]


def test_tables_are_tuples():
    # cached: a caller appending to a table would change every later launch
    for table in (GN.fwd_configs(), GN.bwd_configs(True), GN.bwd_configs(False), SP.configs(), IA.configs()):
        assert isinstance(table, tuple) and table
