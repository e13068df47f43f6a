"""The e2e value_fraction row: listed and labelled; a row that cannot be built is reported as
unavailable in its table, not only in the skipped list."""
from vgmr_fast.bench import e2e, report
from vgmr_fast.bench.common import Ctx, Skip
from vgmr_fast.bench.settings import settings_for


def _ctx():
    return Ctx(device="cpu", backends=["cpu"], compile=False, compile_reason="test", min_time=0.001, min_blocks=2,
               quick=True, tiny=True)


def test_value_fraction_row_is_listed_and_labelled():
    rows = e2e.rows_for(_ctx(), "transformer")
    assert "vgmr-fused-cpu-vf0.25" in rows
    assert e2e.split_value_fraction("vgmr-fused-cpu-vf0.25") == ("vgmr-fused-cpu", 0.25)
    assert e2e.row_label("vgmr-fused-cpu-vf0.25") == "+ VGMR fused (cpu), value_fraction 0.25"
    assert "vgmr-fused-cpu-vf0.25" not in e2e.rows_for(_ctx(), "concat")


def test_a_row_that_cannot_be_built_is_unavailable_in_its_table(monkeypatch):
    def unbuildable(ctx, s, backbone, row):
        raise Skip("no such backend here")

    monkeypatch.setattr(e2e, "build_model", unbuildable)
    ctx = _ctx()
    s = settings_for("cpu", tiny=True)[0]
    e2e.measure(ctx, s, "transformer", ["vgmr-fused-cpu-vf0.25"])
    assert [r["mode"] for r in ctx.records] == ["unavailable"]
    text = "\n".join(t for _, t in report.e2e_tables(ctx.records))
    assert "value_fraction 0.25: UNAVAILABLE (no such backend here)" in text
    assert any("vf0.25" in s["what"] for s in ctx.skipped)
