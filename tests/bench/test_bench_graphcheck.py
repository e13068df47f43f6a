"""The bench's torch.compile(fullgraph=True) training check (graphs, recompiles, graph-break text)."""
import torch
from torch import nn

from vgmr_fast import reference as ref
from vgmr_fast.bench.graphcheck import describe, fullgraph_training


@torch.compiler.disable
def _opaque(x):
    return x * 2


class Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, xs, masks=None):
        outs = []
        for x in xs:  # a graph break inside a loop makes Dynamo skip this frame from then on
            outs.append(_opaque(self.lin(x)))
        return outs


def test_reference_training_step_is_one_graph_with_fresh_masks():
    torch.manual_seed(0)
    m = ref.VGMR([8, 4], 8, dropout=0.1)
    m.dropout_rng = "torch"
    xs = [torch.randn(2, 5, 8), torch.randn(2, 5, 4)]
    masks = [torch.ones(2, 5, dtype=torch.bool)] * 2
    res = fullgraph_training(m, xs, masks)
    assert res["ok"], res["error"]
    assert res["graphs"] == 1 and res["recompiles"] == 0 and res["graphs_per_step"] == [1, 1, 1]
    assert res["fresh_masks"] is True
    assert describe(res) == "1 graph, 0 recompiles over 3 steps"
    assert m.training  # the check compiled a copy


def test_graph_break_is_reported_with_its_place():
    res = fullgraph_training(Breaks(), [torch.randn(3, 4)], None)
    assert not res["ok"]
    assert res["error"].startswith("graph break:")
    assert "test_bench_graphcheck.py" in res["error"]
    assert describe(res) == res["error"]


def test_layer_check_is_not_decided_by_earlier_compiles(monkeypatch):
    """A module compiled before with graph breaks (as the fused+compile peer is) must still be
    reported as breaking, not as the per-submodule graphs Dynamo falls back to."""
    from vgmr_fast.bench import layer
    from vgmr_fast.bench.common import Ctx
    from vgmr_fast.bench.settings import settings_for

    module = Breaks()
    xs = [torch.randn(3, 4), torch.randn(3, 4)]
    torch.compile(module, backend="eager")(xs)  # graph break at _opaque
    monkeypatch.setattr(layer, "peer_module", lambda ctx, s, peer: (module, module, list(module.parameters())))
    monkeypatch.setattr(layer, "input_sets", lambda ctx, s: [(xs, None, None)])
    ctx = Ctx(device="cpu", backends=[], compile=False, compile_reason="test", min_time=0.001, min_blocks=2,
              quick=True, tiny=True)
    layer.measure_fullgraph(ctx, settings_for("cpu", tiny=True)[0], ["breaks"])
    (rec,) = ctx.records
    assert rec["level"] == "fullgraph" and not rec["ok"] and rec["error"].startswith("graph break:")
