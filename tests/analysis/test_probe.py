"""Linear probes on frozen modality encoders: known answers, and which features each backbone exposes."""
import pytest
import torch

from vgmr_fast.analysis.probe import fit_linear_probe, modality_features, probe_accuracy, probe_gap, probe_model
from vgmr_fast.data import MultimodalDataset
from vgmr_fast.models import Concat, Transformer
from vgmr_fast.reference import VGMR


def _dataset(n=40, seed=0, widths=(5, 3), lengths=(4, 3), classes=3):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, t, d, generator=g) for t, d in zip(lengths, widths)]
    y = torch.randint(0, classes, (n,), generator=g)
    return MultimodalDataset(xs, y, ["a", "b", "c"][: len(widths)], None, classes)


def test_probe_separable_features_reach_full_accuracy():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    centers = torch.randn(4, 6, generator=g) * 5
    f = centers[y] + 0.1 * torch.randn(400, 6, generator=g)
    r = fit_linear_probe(f[:300], y[:300], f[300:], y[300:], 4)
    assert r["accuracy"] == 1.0 and r["train_accuracy"] == 1.0


def test_probe_on_features_independent_of_labels_is_near_chance():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2000, 8, generator=g)
    y = torch.randint(0, 4, (2000,), generator=g)
    r = fit_linear_probe(f[:1000], y[:1000], f[1000:], y[1000:], 4)
    assert abs(r["accuracy"] - 0.25) < 0.05


def test_probe_is_deterministic_and_validates_arguments():
    g = torch.Generator().manual_seed(2)
    f, y = torch.randn(50, 3, generator=g), torch.randint(0, 2, (50,), generator=g)
    assert fit_linear_probe(f, y, f, y) == fit_linear_probe(f, y, f, y)
    with pytest.raises(ValueError, match="f_train and f_eval"):
        fit_linear_probe(f, y, f[:, :2], y)
    with pytest.raises(ValueError, match="y_train"):
        fit_linear_probe(f, y[:10], f, y)
    with pytest.raises(ValueError, match="weight_decay"):
        fit_linear_probe(f, y, f, y, weight_decay=-1.0)


def test_probe_gap():
    assert probe_gap([0.9, 0.8], [0.85, 0.5]) == pytest.approx([0.05, 0.3])
    with pytest.raises(ValueError, match="unimodal"):
        probe_gap([0.9], [0.8, 0.7])


@pytest.mark.parametrize("refined", [False, True])
def test_concat_features_are_the_decision_layer_inputs(refined):
    ds = _dataset()
    torch.manual_seed(0)
    refiner = VGMR(ds.widths, d=4) if refined else None
    model = Concat(ds.widths, 3, hidden=7, refiner=refiner).train()
    xs, masks, _ = ds.full()
    feats = [modality_features(model, ds, m) for m in range(2)]
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        expect = model.encode(xs, masks)
    for f, e in zip(feats, expect):
        torch.testing.assert_close(f, e)


@pytest.mark.parametrize("masked", [False, True])
def test_transformer_features_are_the_stream_alone(masked):
    """Stream m of the joint Transformer run alone equals a one-modality Transformer with the same weights,
    and does not see the other modality (attention would otherwise leak the dominant modality's evidence)."""
    ds = _dataset(widths=(5, 6), lengths=(4, 3))
    if masked:  # variable lengths, including one row of stream b with no valid step
        lengths = torch.tensor([1, 2, 3, 0] * 10)
        mask_b = torch.arange(3)[None] < lengths[:, None]
        ds = MultimodalDataset([ds.xs[0], ds.xs[1] * mask_b[..., None]], ds.y, ds.names, [None, mask_b], 3)
    torch.manual_seed(0)
    joint = Transformer(ds.widths, 3, d_model=8, nhead=2, num_layers=1)
    uni = Transformer({"b": 6}, 3, d_model=8, nhead=2, num_layers=1)
    uni.proj[0].load_state_dict(joint.proj[1].state_dict())
    uni.encoder.load_state_dict(joint.encoder.state_dict())
    with torch.no_grad():
        uni.modality_embedding.copy_(joint.modality_embedding[1:2])
    mask_b = None if ds.masks is None else ds.masks[1]
    single = MultimodalDataset([ds.xs[1]], ds.y, ["b"], None if mask_b is None else [mask_b], 3)
    f_joint = modality_features(joint, ds, 1)
    assert torch.isfinite(f_joint).all()
    torch.testing.assert_close(f_joint, modality_features(uni, single, 0))
    uni.eval()
    with torch.no_grad():
        torch.testing.assert_close(f_joint, uni.encode([ds.xs[1]], None if mask_b is None else [mask_b])[0])
    other = MultimodalDataset([ds.xs[0] * 10 + 3, ds.xs[1]], ds.y, ds.names, ds.masks, 3)
    torch.testing.assert_close(modality_features(joint, other, 1), f_joint)
    # while the joint model's own pooled stream does depend on the other modality
    joint.eval()
    with torch.no_grad():
        assert not torch.allclose(joint.encode(ds.xs)[1], joint.encode(other.xs)[1])


def test_probe_model_reads_the_label_information_of_each_modality():
    """Modality a carries the class, b does not: the probes must say so (through an untrained encoder)."""
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (300,), generator=g)
    a = torch.randn(300, 4, 5, generator=g) + 3 * torch.eye(5)[y][:, None, :]
    b = torch.randn(300, 4, 5, generator=g)
    tr = MultimodalDataset([a[:200], b[:200]], y[:200], ["a", "b"], None, 3)
    te = MultimodalDataset([a[200:], b[200:]], y[200:], ["a", "b"], None, 3)
    torch.manual_seed(0)
    model = Concat(tr.widths, 3, hidden=16)
    acc_a, acc_b = probe_model(model, tr, te)
    assert acc_a > 0.95 and acc_b < 0.5
    assert probe_accuracy(model, tr, te, 0) == acc_a
    with pytest.raises(ValueError, match="m must index"):
        modality_features(model, tr, 2)


@pytest.mark.parametrize("backbone", ["concat", "transformer"])
def test_probe_model_refines_each_split_once_with_the_per_modality_results(backbone):
    """probe_model runs the refiner once per batch of each split (2 passes, not 2 per modality)
    and gives exactly what probe_accuracy gives modality by modality."""
    train, evaluation = _dataset(n=40, seed=3, widths=(5, 3, 4), lengths=(4, 3, 2)), \
        _dataset(n=24, seed=4, widths=(5, 3, 4), lengths=(4, 3, 2))
    torch.manual_seed(0)
    refiner = VGMR(train.widths, d=4)
    model = (Concat(train.widths, 3, hidden=7, refiner=refiner) if backbone == "concat"
             else Transformer(train.widths, 3, d_model=8, nhead=2, refiner=refiner))
    calls = []
    refine = model.refine
    model.refine = lambda xs, masks: calls.append(1) or refine(xs, masks)
    joint = probe_model(model, train, evaluation)
    assert len(calls) == 2
    assert joint == [probe_accuracy(model, train, evaluation, m) for m in range(3)]
    assert len(calls) == 2 + 2 * 3
