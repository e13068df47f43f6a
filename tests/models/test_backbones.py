"""Backbones (Concat, Transformer) with and without a refiner in front."""
import pytest
import torch

from vgmr_fast.models import Concat, Transformer
from vgmr_fast.reference import VGMR

W = {"text": 12, "audio": 5, "vision": 3}


def inputs(B=4):
    return [torch.randn(B, T, D) for T, D in zip([5, 4, 3], W.values())]


@pytest.mark.parametrize("cls", [Concat, Transformer])
@pytest.mark.parametrize("with_vgmr", [False, True])
def test_shapes_and_masks(cls, with_vgmr):
    torch.manual_seed(0)
    model = cls(W, num_classes=3, refiner=VGMR(W, d=4) if with_vgmr else None).eval()
    xs = inputs()
    masks = [torch.rand(4, x.shape[1]) > 0.3 for x in xs]
    for mk in masks:
        mk[0] = False  # sample 0 has no valid step anywhere
    logits, aux = model(xs, masks, return_aux=True)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    assert len(aux["refined"]) == 3
    assert ("global_value" in aux) == with_vgmr
    hs = model.encode(xs, masks)
    assert len(hs) == 3
    torch.testing.assert_close(model.classify(hs), logits)


@pytest.mark.parametrize("cls", [Concat, Transformer])
def test_masked_steps_do_not_matter(cls):
    torch.manual_seed(1)
    model = cls(W).eval()
    xs = inputs()
    masks = [torch.ones(4, x.shape[1], dtype=torch.bool) for x in xs]
    masks[0][:, -2:] = False
    a = model(xs, masks)
    xs2 = [x.clone() for x in xs]
    xs2[0][:, -2:] = 1e3
    torch.testing.assert_close(model(xs2, masks), a, rtol=1e-4, atol=1e-5)


def test_concat_decision_layer_is_block_linear():
    model = Concat(W, hidden=6)
    assert model.classifier.in_features == 18
    hs = [torch.randn(2, 6) for _ in range(3)]
    w = model.classifier.weight
    manual = sum(h @ w[:, 6 * m : 6 * (m + 1)].t() for m, h in enumerate(hs)) + model.classifier.bias
    torch.testing.assert_close(model.classify(hs), manual)


def test_bad_inputs():
    model = Concat(W)
    with pytest.raises(ValueError, match="modalities"):
        model(inputs()[:2])
    with pytest.raises(ValueError, match="nhead"):
        Transformer(W, d_model=10, nhead=4)
