"""Decision-layer diagnostics against hand-computed values; the adaptive allocation head."""
import math

import pytest
import torch
from torch import nn

from vgmr_fast.balance import (AdaptiveDecisionHead, AllocatedModel, decision_diagnostics, linear_modality_logits,
                               modality_logits, plot_decision_diagnostics, shapley_values, split_decision_layer,
                               summarize_diagnostics, zero_others_logits)


def _tiny_head():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]]))
        layer.bias.copy_(torch.tensor([1.0, -1.0]))
    return layer


def test_split_and_per_modality_logits_by_hand():
    layer = _tiny_head()
    ws, b = split_decision_layer(layer, [2, 1])
    assert torch.equal(ws[0], torch.tensor([[1.0, 2.0], [0.0, 1.0]])) and torch.equal(ws[1], torch.tensor([[3.0], [-1.0]]))
    hs = [torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0]])]
    z = linear_modality_logits(layer, hs)
    torch.testing.assert_close(z, torch.tensor([[[3.5, 0.5]], [[6.5, -2.5]]]))
    # the per-modality logits add up to the full logits
    torch.testing.assert_close(z.sum(0), layer(torch.cat(hs, 1)))
    with pytest.raises(ValueError, match="sizes"):
        split_decision_layer(layer, [2, 2])
    with pytest.raises(TypeError, match="layer"):
        split_decision_layer(nn.Conv1d(1, 1, 1), [1])


def test_diagnostics_match_hand_computation():
    layer = _tiny_head()
    hs = [torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[2.0], [-1.0]])]
    y = torch.tensor([0, 1])
    d = decision_diagnostics(layer, hs, y, names=["a", "v"])
    assert d["mode"] == "linear"
    torch.testing.assert_close(d["weight_norm"], torch.tensor([math.sqrt(6.0), math.sqrt(10.0)]))
    torch.testing.assert_close(d["weight_norm_per_class"], torch.tensor([[math.sqrt(5.0), 1.0], [3.0, 1.0]]))
    torch.testing.assert_close(d["feature_norm"], torch.tensor([[math.sqrt(2.0), 0.0], [2.0, 1.0]]))
    # ||W_a h_a|| = ||[3, 1]||, ||W_v h_v|| = ||[6, -2]||  ->  shares 1/3, 2/3 for sample 0
    torch.testing.assert_close(d["contribution"][:, 0], torch.tensor([math.sqrt(10.0), math.sqrt(40.0)]))
    torch.testing.assert_close(d["share"][:, 0], torch.tensor([1 / 3, 2 / 3]))
    torch.testing.assert_close(d["share"].sum(0), torch.ones(2))
    # per-modality logits: a: [[3.5, .5], [.5, -.5]] -> preds [0, 0]; v: [[6.5, -2.5], [-2.5, 0.5]] -> [0, 1]
    torch.testing.assert_close(d["accuracy"], torch.tensor([0.5, 1.0]))
    # subsets: {} -> b = [1,-1] -> [0,0]: acc .5; {a}: [[4,0],[1,-1]] -> .5; {v}: [[7,-3],[-2,0]] -> 1;
    # {a,v}: [[10,-2],[-2,0]] -> 1.  phi_a = 1/2[(.5-.5) + (1-1)] = 0; phi_v = 1/2[(1-.5)+(1-.5)] = .5
    assert d["subset_accuracy"] == {(): 0.5, ("a",): 0.5, ("v",): 1.0, ("a", "v"): 1.0}
    torch.testing.assert_close(d["shapley"], torch.tensor([0.0, 0.5]))
    assert float(d["fused_accuracy"]) == 1.0
    rows = summarize_diagnostics(d)
    assert rows[1]["modality"] == "v" and rows[1]["shapley"] == pytest.approx(0.5)


def test_zero_others_path_matches_linear_contributions_in_one_call():
    torch.manual_seed(0)
    layer = nn.Linear(7, 3)
    hs = [torch.randn(5, 4), torch.randn(5, 3)]
    calls = []

    def classify(h):
        calls.append(h[0].shape[0])
        return layer(torch.cat(h, -1))
    z = zero_others_logits(classify, hs)
    assert calls == [10]  # one batched call over M*B rows, no per-sample loop
    lin = linear_modality_logits(layer, hs)
    torch.testing.assert_close(z, lin + layer.bias / 2)  # zeroing others keeps the full bias
    d_lin = decision_diagnostics(layer, hs, torch.zeros(5, dtype=torch.long))
    d_zero = decision_diagnostics(classify, hs, torch.zeros(5, dtype=torch.long), mode="zero_others")
    assert d_zero["mode"] == "zero_others" and d_zero["weight_norm"] is None
    torch.testing.assert_close(d_zero["contribution"], d_lin["contribution"])
    torch.testing.assert_close(d_zero["shapley"], d_lin["shapley"])


def test_shapley_axioms():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(8, generator=g, dtype=torch.float64)
    phi = shapley_values(v)
    assert phi.sum().item() == pytest.approx(float(v[7] - v[0]))  # efficiency
    # additive game: v(S) = sum of weights in S  ->  phi = weights
    w = torch.tensor([0.1, 0.5, -0.2], dtype=torch.float64)
    subsets = (torch.arange(8)[:, None] >> torch.arange(3)) & 1
    torch.testing.assert_close(shapley_values(subsets.double() @ w), w)
    # a dummy player gets 0
    v2 = (subsets[:, :2].double() @ w[:2]) ** 2
    assert shapley_values(v2)[2].item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2\\^M"):
        shapley_values(torch.zeros(6))


def test_backbones_use_the_right_path():
    from vgmr_fast.models import Concat, Transformer

    widths = {"a": 3, "b": 4, "c": 2}
    xs = [torch.randn(6, 5, 3), torch.randn(6, 4, 4), torch.randn(6, 3, 2)]
    y = torch.randint(0, 2, (6,))
    c = Concat(widths, 2, hidden=8).eval()
    hs = c.encode(xs)
    d = decision_diagnostics(c, hs, y, list(widths))
    assert d["mode"] == "linear" and d["modality_logits"].shape == (3, 6, 2)
    torch.testing.assert_close(modality_logits(c, hs).sum(0), c.classify(hs))
    t = Transformer(widths, 2, d_model=8, nhead=2, num_layers=1).eval()
    hs = t.encode(xs)
    d = decision_diagnostics(t, hs, y, list(widths))
    assert d["mode"] == "zero_others" and d["share"].shape == (3, 6)
    assert len(d["subset_accuracy"]) == 8
    with pytest.raises(TypeError, match="linear"):
        decision_diagnostics(t, hs, y, mode="linear")
    with pytest.raises(ValueError, match="y"):
        decision_diagnostics(c, c.encode(xs), y[:3])


def test_plot_writes_png(tmp_path):
    layer = nn.Linear(6, 3)
    hs = [torch.randn(20, 4), torch.randn(20, 2)]
    y = torch.randint(0, 3, (20,))
    d = decision_diagnostics(layer, hs, y, ["a", "b"])
    uni = {"a": decision_diagnostics(nn.Linear(4, 3), hs[:1], y, ["a"])}
    p = plot_decision_diagnostics(d, str(tmp_path / "dec.png"), unimodal=uni, title="t")
    data = open(p, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_adaptive_head_weights_calibration_and_training():
    torch.manual_seed(0)
    head = AdaptiveDecisionHead([4, 3], num_classes=3, momentum=0.5)
    hs = [torch.randn(32, 4), torch.randn(32, 3)]
    y = torch.randint(0, 3, (32,))
    w = head.weights()
    assert w.shape == (2,) and w.sum().item() == pytest.approx(1.0) and torch.allclose(w, torch.full((2,), 0.5))
    out = head(hs)
    assert out.shape == (32, 3)
    # a convex combination of log-probabilities: every row is <= 0 and logsumexp <= 0
    assert (out <= 0).all() and (torch.logsumexp(out, -1) <= 1e-6).all()
    head.train()
    loss, parts = head.loss(hs, y)
    loss.backward()
    assert head.alloc.grad is not None and head.heads[0].weight.grad is not None
    assert head.temp_param.grad is not None
    assert not torch.allclose(head.capability, torch.full((2,), 1 / 3))  # capability EMA moved
    # a modality whose head is perfect gets the larger weight after capability updates
    with torch.no_grad():
        head.heads[0].weight.zero_()
        head.heads[0].bias.zero_()
    hs_good = [torch.randn(32, 4), torch.nn.functional.one_hot(y, 3).float() * 10]
    with torch.no_grad():
        head.heads[1].weight.copy_(torch.eye(3))
        head.heads[1].bias.zero_()
    for _ in range(10):
        head.loss(hs_good, y)
    assert head.weights()[1] > 0.7
    with pytest.raises(ValueError, match="num_classes"):
        AdaptiveDecisionHead([2], 1)


def test_allocated_model_wraps_a_backbone():
    from vgmr_fast.models import Concat

    widths = {"a": 3, "b": 4}
    core = Concat(widths, 3, hidden=5)
    model = AllocatedModel(core, [5, 5], 3)
    xs = [torch.randn(4, 6, 3), torch.randn(4, 2, 4)]
    assert model(xs).shape == (4, 3)
    loss, _ = model.loss(xs, None, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert core.encoders[0][0].weight.grad is not None
    assert model.refiner is None
    d = decision_diagnostics(model, model.encode(xs), torch.tensor([0, 1, 2, 0]))
    assert d["mode"] == "zero_others"
    with pytest.raises(TypeError, match="backbone"):
        AllocatedModel(nn.Linear(2, 2), [2], 2)
