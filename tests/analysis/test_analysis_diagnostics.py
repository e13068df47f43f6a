"""docs/math.md §7 analyses: metrics, removal, noise, value/gate statistics, gradient cosine, refinement."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vgmr_fast.analysis import (accuracy, corrupt_inputs, evaluate, gradient_cosine, macro_f1, modality_removal,
                                noise_sweep, plot_curves, plot_noise_sweep, plot_refinement, refinement_difference,
                                refinement_over_split, shared_parameters, value_gate_shift, value_gate_statistics)
from vgmr_fast.data import MultimodalDataset

PNG = b"\x89PNG\r\n\x1a\n"


class FirstModality(nn.Module):
    """Logits from the mean of modality 0's first feature: class 1 iff positive."""

    def forward(self, xs, masks=None):
        s = xs[0][..., 0].mean(1)
        return torch.stack([-s, s], dim=1)


def _toy_ds(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x0 = torch.randn(n, 5, 3, generator=g) * 0.1 + (2 * y - 1).float()[:, None, None]
    x1 = torch.randn(n, 4, 2, generator=g)
    return MultimodalDataset([x0, x1], y, ["a", "b"])


def test_metrics_by_hand():
    pred, y = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 2])
    assert accuracy(pred, y) == pytest.approx(0.8)
    assert macro_f1(pred, y) == pytest.approx((2 / 3 + 0.8 + 1.0) / 3)
    logits = F.one_hot(pred, 3).float()
    assert macro_f1(logits, y, 3) == pytest.approx(macro_f1(pred, y))
    assert macro_f1(torch.tensor([1, 1]), torch.tensor([1, 1]), num_classes=4) == 1.0  # absent classes left out
    with pytest.raises(ValueError, match="pred"):
        accuracy(pred[:3], y)


def test_evaluate_and_removal():
    ds = _toy_ds()
    model = FirstModality()
    ev = evaluate(model, ds, batch_size=7)
    assert ev["accuracy"] == 1.0 and ev["macro_f1"] == 1.0
    rows = modality_removal(model, ds, batch_size=16)
    assert [r["condition"] for r in rows] == ["full", "w/o a", "w/o b"]
    assert rows[1]["accuracy"] == 0.5 and rows[1]["delta"] == pytest.approx(-0.5)  # logits 0 -> class 0
    assert rows[2]["delta"] == 0.0


def test_corrupt_inputs_semantics():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 10, 6, generator=g), torch.randn(8, 3, 2, generator=g)]
    same = corrupt_inputs(xs, 0.0, 1.0, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(same, xs))
    means = [torch.arange(6.0), torch.tensor([5.0, -5.0])]
    stds = [torch.ones(6), torch.ones(2)]
    allmean = corrupt_inputs(xs, 1.0, 0.0, means, stds)  # ratio 1, weight 0: every entry becomes the mean
    assert torch.equal(allmean[0], means[0].expand(8, 10, 6)) and torch.equal(allmean[1], means[1].expand(8, 3, 2))
    half = corrupt_inputs(xs, 0.5, 1.0, generator=torch.Generator().manual_seed(2))
    frac = float((half[0] != xs[0]).float().mean())
    assert 0.4 < frac < 0.6
    steps = corrupt_inputs(xs, 0.5, 1.0, granularity="step", modalities=[0], generator=torch.Generator().manual_seed(3))
    changed = (steps[0] != xs[0])
    assert torch.equal(changed.any(-1), changed.all(-1))  # whole steps replaced
    assert torch.equal(steps[1], xs[1])  # modality 1 untouched
    # the noise has the requested std
    big = corrupt_inputs([torch.zeros(200, 50, 1)], 1.0, 3.0, [torch.zeros(1)], [torch.full((1,), 2.0)])
    assert float(big[0].std()) == pytest.approx(6.0, rel=0.05)
    for bad, match in ((dict(ratio=1.5), "ratio"), (dict(weight=-1), "weight"), (dict(granularity="x"), "granularity"),
                       (dict(modalities=[5]), "modalities")):
        kw = dict(ratio=0.1, weight=1.0)
        kw.update(bad)
        with pytest.raises(ValueError, match=match):
            corrupt_inputs(xs, **kw)


def test_noise_sweep_and_plot(tmp_path):
    ds = _toy_ds(60)
    model = FirstModality()
    stats = ds.feature_stats()
    r = noise_sweep(model, ds, stats, [0.0, 0.5, 1.0], "ratio", fixed=20.0, seeds=[0, 1])
    assert r["mean"][0] == 1.0 and r["std"][0] == 0.0
    assert r["mean"][2] < 0.8  # everything replaced by heavy noise: near chance
    assert len(r["accuracy"]) == 3 and len(r["accuracy"][0]) == 2
    w = noise_sweep(model, ds, stats, [0.0, 30.0], "weight", fixed=1.0, seeds=[0])
    # ratio 1 with weight 0 replaces every entry by the training mean (~0): the model then sees no signal
    assert w["mean"][0] <= 0.6 and w["vary"] == "weight"
    with pytest.raises(ValueError, match="vary"):
        noise_sweep(model, ds, stats, [0.0], "nope")
    p = plot_noise_sweep({"toy": r}, str(tmp_path / "n.png"), title="x")
    assert open(p, "rb").read(8) == PNG


def _vgmr_concat(widths, **kw):
    from vgmr_fast.models import Concat
    from vgmr_fast.reference import VGMR

    torch.manual_seed(0)
    return Concat(widths, 2, hidden=6, refiner=VGMR(widths, d=5, **kw)).eval()


def test_value_gate_statistics_match_the_auxiliaries():
    ds = _toy_ds(12)
    model = _vgmr_concat(ds.widths)
    st = value_gate_statistics(model, ds, batch_size=5)
    with torch.no_grad():
        _, aux = model.refiner(ds.xs, None, return_aux=True)
    for m, name in enumerate(ds.names):
        g = aux["global_value"][:, m]
        assert st[name]["global_value"]["mean"] == pytest.approx(float(g.mean()), abs=1e-6)
        assert st[name]["global_value"]["std"] == pytest.approx(float(g.std()), abs=1e-6)
        cv = aux["channel_value"][:, m]
        assert st[name]["channel_value"]["mean"] == pytest.approx(float(cv.mean(-1).mean()), abs=1e-6)
        assert st[name]["channel_std"]["mean"] == pytest.approx(float(cv.std(-1).mean()), abs=1e-6)
        assert st[name]["gate"]["mean"] == pytest.approx(float(aux["gate"][m].mean(dim=(1, 2)).mean()), abs=1e-6)
    shift = value_gate_shift(model, ds, target="a", ratio=0.5, weight=5.0, stats=ds.feature_stats())
    assert shift["target"] == "a" and set(shift["delta"]["a"]) == {"global_value", "channel_value", "channel_std", "gate"}
    assert abs(shift["delta"]["a"]["gate"]) > 0  # corrupting the target moves its gate
    with pytest.raises(ValueError, match="target"):
        value_gate_shift(model, ds, target="zzz")
    from vgmr_fast.models import Concat
    with pytest.raises(TypeError, match="VGMR"):
        value_gate_statistics(Concat(ds.widths, 2), ds)


def test_shared_parameters_exclude_modality_specific_layers():
    from vgmr_fast.models import Concat, Transformer
    from vgmr_fast.reference import VGMR

    widths = {"a": 3, "b": 2}
    names = [n for n, _ in shared_parameters(Concat(widths, 2, refiner=VGMR(widths, d=4)))]
    assert names == ["classifier.weight", "classifier.bias"]
    names = [n for n, _ in shared_parameters(Transformer(widths, 2, d_model=8, nhead=2, num_layers=1))]
    assert names and all(n.startswith(("encoder.", "head.")) for n in names)
    assert any(n.startswith("encoder.") for n in names) and any(n.startswith("head.") for n in names)


def test_gradient_cosine_by_hand_and_identity():
    from vgmr_fast.models import Concat

    widths = {"a": 3, "b": 2}
    torch.manual_seed(0)
    model = Concat(widths, 2, hidden=4, dropout=0.5).train()
    xs = [torch.randn(16, 5, 3), torch.randn(16, 4, 2)]
    y = torch.randint(0, 2, (16,))
    assert gradient_cosine(model, xs, None, y, keep=[0, 1]) == pytest.approx(1.0, abs=1e-9)
    assert model.training  # mode restored
    c = gradient_cosine(model, xs, None, y, keep=0)
    # by hand: gradients of the two losses over the classifier, in eval mode
    model.eval()
    p = list(model.classifier.parameters())
    g1 = torch.autograd.grad(F.cross_entropy(model(xs), y), p)
    g2 = torch.autograd.grad(F.cross_entropy(model([xs[0], torch.zeros_like(xs[1])]), y), p)
    a, b = torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g2])
    assert c == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-6)
    assert -1.0 <= c <= 1.0
    with pytest.raises(ValueError, match="keep"):
        gradient_cosine(model, xs, None, y, keep=3)


def test_refinement_difference_is_zero_for_neutral_gate_and_plots(tmp_path):
    from vgmr_fast.reference import VGMR

    widths = [4, 3]
    xs = [torch.randn(2, 5, 4), torch.randn(2, 3, 3)]
    torch.manual_seed(0)
    neutral = VGMR(widths, d=4, alpha=0.0)  # G_hat = 1, G_eff = 1: X~ = LN(X)
    with torch.no_grad():
        for blk in neutral.blocks:  # a non-trivial LayerNorm affine must cancel too
            blk.norm.weight.uniform_(0.5, 2.0)
            blk.norm.bias.normal_()
    res = refinement_difference(neutral, xs)
    assert all(torch.allclose(d, torch.zeros_like(d), atol=1e-6) for d in res["diff"])
    assert torch.allclose(res["suppression"], torch.zeros(2, 2), atol=1e-6)
    torch.manual_seed(0)
    ref = VGMR(widths, d=4, alpha=0.9, beta=0.0)
    masks = [torch.tensor([[True] * 5, [True, True, False, False, False]]), None]
    res = refinement_difference(ref, xs, masks)
    d0 = res["diff"][0]
    assert d0.shape == (2, 5, 4) and d0.abs().max() > 1e-3
    expect = F.relu(-d0[1, :2]).mean()  # only the two valid steps of sample 1
    assert float(res["suppression"][1, 0]) == pytest.approx(float(expect), rel=1e-5)
    p = plot_refinement([d[0] for d in res["diff"]], ["a", "b"], str(tmp_path / "r.png"), res["suppression"][0],
                        res["suppression"].mean(0), title="t")
    assert open(p, "rb").read(8) == PNG
    ds = MultimodalDataset(xs, torch.tensor([0, 1]), ["a", "b"])
    model = _vgmr_concat(ds.widths)
    assert refinement_over_split(model, ds, batch_size=1).shape == (2, 2)


def test_plot_curves(tmp_path):
    p = plot_curves({"x": ([0, 1, 2], [0.1, -0.2, 0.3])}, str(tmp_path / "c.png"), ylabel="cos", hline=0.0)
    assert open(p, "rb").read(8) == PNG
