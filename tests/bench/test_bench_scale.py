"""The scale level at toy sizes: every part's rows and columns are there (its output shape, never its times)."""
import pytest
import torch

from vgmr_fast.bench import backends, scale
from vgmr_fast.bench.common import Ctx

CPU_REASON = backends.probe_backend("cpu")


def _ctx(backends_=()):
    return Ctx(device="cpu", backends=list(backends_), compile=False, compile_reason="test", min_time=0.001,
               min_blocks=2, quick=True, tiny=True)


@pytest.fixture(scope="module")
def measured():
    ctx = _ctx([] if CPU_REASON else ["cpu"])
    for task in scale.tasks(ctx):
        task.run()
    return ctx


def test_backbone_rows(measured):
    rows = [r for r in measured.records if r.get("part") == "backbone"]
    grid = scale.GRIDS["tiny"]
    if CPU_REASON:
        pytest.skip(f"the backbone part runs the fused module: {CPU_REASON}")
    got = {(r["size"], r["mode"], r["peer"]) for r in rows}
    want = {(f"{L}x{dm}", "train", p) for L, dm in grid["backbones"] for p in scale.SCHEDULES}
    want |= {(f"{L}x{dm}", "infer", p) for L, dm in grid["backbones"] for p in ("bare", "rho1")}
    assert got == want
    for r in rows:
        assert r["step_s"] > 0 and r["x_bare"] is not None and r["params"] >= r["backbone_params"] > 0
        assert r["steps_per_call"] == (4 if r["peer"] in ("every4", "rho0.25+every4") else 1)


def test_sequence_rows_and_budget(measured):
    rows = [r for r in measured.records if r.get("part") == "sequence"]
    grid = scale.GRIDS["tiny"]
    peers = {"reference"} | (set() if CPU_REASON else {"fused"})
    assert {(r["T"], r["peer"]) for r in rows} == {(T, p) for T in grid["seq"] for p in peers}
    for r in rows:
        assert r["B"] * r["T"] == grid["tokens"]
        assert r["s_per_token"] > 0 and r["peak_bytes"] > 0 and r["bytes_per_token"] > 0
    fits = scale.longest_T(measured.records)
    assert set(fits) == peers
    worst = max(r["bytes_per_token"] for r in rows if r["peer"] == "reference")
    assert fits["reference"] == int(scale.MEMORY_BUDGET / (scale.BUDGET_BATCH * worst) // 64 * 64)


def test_width_rows(measured):
    rows = [r for r in measured.records if r.get("part") == "width"]
    grid = scale.GRIDS["tiny"]
    r4 = grid["ranks"][0]
    for D in grid["widths"]:
        for mode in ("train", "infer"):
            peers = {r["peer"] for r in rows if r["D"] == D and r["mode"] == mode}
            assert {"reference", f"reference-r{r4}", "gate-gemm"} <= peers
            assert ("fused" in peers) == (CPU_REASON is None)
    low = next(r for r in rows if r["D"] == 40 and r["peer"] == f"reference-r{r4}" and r["mode"] == "train")
    full = next(r for r in rows if r["D"] == 40 and r["peer"] == "reference" and r["mode"] == "train")
    # gate_rank=r applies to every modality wider than r: here all three (40, 74, 35)
    assert full["params"] - low["params"] == sum(D * D - 2 * D * r4 for D in (40, *scale.WIDTHS[1:]))
    assert full["gate_raw_params"] - low["gate_raw_params"] == 40 * 40 - 2 * 40 * r4
    assert low["params_vs_full"] == low["params"] / full["params"]
    assert low["flops"] < full["flops"] and low["peak_bytes"] > 0 and "time_vs_full" in low


def test_render_and_plot(measured, tmp_path):
    text = scale.render(measured.records, measured.skipped)
    for title in (("== scale: backbone size",) if CPU_REASON is None else ()) + (
            "== scale: sequence length", "== scale: feature width", "Longest T within", "== scale: not measured"):
        assert title in text
    assert "in the large grid only" in text  # sizes left out are said so
    assert scale.plot(tmp_path / "scale.png", measured.records)
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_too_large_a_size_is_skipped_with_its_need(monkeypatch):
    ctx = _ctx()
    monkeypatch.setattr(scale, "_free_bytes", lambda device: 2**30)
    grid = dict(scale.GRIDS["tiny"], width_B=4096, width_T=4096)
    with pytest.raises(scale.Skip, match=r"skipped: needs [0-9.]+ GiB"):
        scale.measure_width(ctx, grid, 4096)


def test_fused_low_rank_rows_appear_once_the_fused_module_takes_gate_rank(monkeypatch):
    ctx = _ctx(["cpu"])
    assert "fused-r4" not in scale.width_peers(ctx, 40, (4,)) or scale.fused_takes_gate_rank()
    monkeypatch.setattr(scale, "fused_takes_gate_rank", lambda: True)
    assert scale.width_peers(ctx, 40, (4, 64)) == ["reference", "fused", "reference-r4", "fused-r4", "gate-gemm"]


def test_scale_is_opt_in():
    import argparse

    from vgmr_fast.bench import suite

    p = argparse.ArgumentParser()
    suite.add_bench_arguments(p)
    assert "scale" not in p.parse_args([]).levels.split(",")
    assert p.parse_args(["--levels", "scale", "--scale-grid", "large"]).scale_grid == "large"
    assert torch.get_num_threads() >= 1


def test_parts_left_out_are_listed():
    ctx = _ctx()
    labels = [t.label for t in scale.tasks(ctx, parts=("width",))]
    assert labels and all(label.startswith("scale width") for label in labels)
    assert {s["what"] for s in ctx.skipped} >= {"scale backbone", "scale sequence"}
