"""The e2e value_fraction row: measured when the objective takes the keyword, reported as
unavailable (in the table, not only in the skipped list) when it does not."""
import pytest

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


def test_objective_without_the_keyword_makes_the_row_unavailable(monkeypatch):
    def old_objective(model, xs, masks, y, *, lambda_v=0.1):
        raise AssertionError("not called")

    monkeypatch.setattr(e2e, "vgmr_objective", old_objective)
    why = e2e.objective_value_fraction_support()
    assert why and "value_fraction" in why
    ctx = _ctx()
    s = settings_for("cpu", tiny=True)[0]
    with pytest.raises(Skip, match="value_fraction"):
        e2e.build_model(ctx, s, "transformer", "vgmr-fused-cpu-vf0.25")
    e2e.measure(ctx, s, "transformer", ["vgmr-fused-cpu-vf0.25"])
    assert [r["mode"] for r in ctx.records] == ["unavailable"]
    text = "\n".join(t for _, t in report.e2e_tables(ctx.records))
    assert "value_fraction 0.25: UNAVAILABLE" in text
    assert any("vf0.25" in s["what"] for s in ctx.skipped)


def test_installed_objective_takes_value_fraction():
    assert e2e.objective_value_fraction_support() is None
