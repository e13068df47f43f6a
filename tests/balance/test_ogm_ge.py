"""OGM-GE: scores, ratios and coefficients by hand; gradient modulation on real parameters."""
import math

import pytest
import torch
from torch import nn

from vgmr_fast.balance import OGMGE, modality_parameter_groups, ogm_coefficients, ogm_ratios, ogm_scores


def test_scores_by_hand():
    z = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                      [[0.0, 0.0], [3.0, 0.0], [0.0, 2.0]]])  # [M=2, B=3, C=2]
    y = torch.tensor([0, 1, 1])
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731  softmax of two logits
    expect = [sig(2) + sig(1) + 0.5, 0.5 + sig(-3) + sig(2)]
    torch.testing.assert_close(ogm_scores(z, y), torch.tensor(expect))


def test_ratios_two_and_three_modalities():
    torch.testing.assert_close(ogm_ratios(torch.tensor([3.0, 1.5])), torch.tensor([2.0, 0.5]))
    s = torch.tensor([4.0, 2.0, 1.0])
    torch.testing.assert_close(ogm_ratios(s), torch.tensor([4 / 1.5, 2 / 2.5, 1 / 3.0]))
    with pytest.raises(ValueError, match="scores"):
        ogm_ratios(torch.tensor([1.0]))


def test_coefficients_only_dominant_is_suppressed():
    k = ogm_coefficients(torch.tensor([3.0, 1.5]), alpha=0.5)
    torch.testing.assert_close(k, torch.tensor([1 - math.tanh(0.5 * 2.0), 1.0]))
    k = ogm_coefficients(torch.tensor([3.0, 1.5]), alpha=0.5, shifted=True)
    torch.testing.assert_close(k, torch.tensor([1 - math.tanh(0.5 * 1.0), 1.0]))
    # three modalities: two dominate the mean of the others; only_max keeps one
    s = torch.tensor([4.0, 3.0, 0.5])
    rho = ogm_ratios(s)
    k = ogm_coefficients(s, alpha=1.0)
    assert k[0] < 1 and k[1] < 1 and k[2] == 1
    torch.testing.assert_close(k[:2], 1 - torch.tanh(rho[:2]))
    k = ogm_coefficients(s, alpha=1.0, only_max=True)
    assert k[0] < 1 and k[1] == 1 and k[2] == 1
    # equal scores: nobody dominates
    assert torch.equal(ogm_coefficients(torch.tensor([2.0, 2.0]), 1.0), torch.ones(2))
    with pytest.raises(ValueError, match="alpha"):
        ogm_coefficients(torch.tensor([1.0, 2.0]), alpha=-1)


def _params_with_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = nn.Parameter(torch.zeros(50, 40))
    b = nn.Parameter(torch.zeros(30))
    a.grad = torch.randn(50, 40, generator=g)
    b.grad = torch.randn(30, generator=g)
    return a, b


def test_step_scales_dominant_group_without_ge():
    a, b = _params_with_grads()
    ga, gb = a.grad.clone(), b.grad.clone()
    ogm = OGMGE([[a], [b]], alpha=0.5, ge=False)
    z = torch.stack([torch.tensor([[5.0, 0.0]] * 4), torch.tensor([[0.0, 0.0]] * 4)])
    y = torch.zeros(4, dtype=torch.long)
    k = ogm.step(z, y)
    assert k[0] < 1 and k[1] == 1
    torch.testing.assert_close(a.grad, ga * k[0])
    torch.testing.assert_close(b.grad, gb)
    assert ogm.history[-1]["coeff"] == k.tolist()


def test_step_ge_noise_matches_gradient_std_and_is_seeded():
    a, b = _params_with_grads()
    ga = a.grad.clone()
    ogm = OGMGE([[a], [b]], alpha=0.5, ge=True, generator=torch.Generator().manual_seed(1))
    z = torch.stack([torch.tensor([[5.0, 0.0]] * 4), torch.tensor([[0.0, 0.0]] * 4)])
    k = ogm.step(z, torch.zeros(4, dtype=torch.long))
    noise = a.grad - ga * k[0]
    assert abs(float(noise.std()) - float(ga.std())) < 0.1 * float(ga.std())
    # the same generator seed reproduces it
    a2, b2 = _params_with_grads()
    OGMGE([[a2], [b2]], alpha=0.5, ge=True, generator=torch.Generator().manual_seed(1)).step(
        z, torch.zeros(4, dtype=torch.long))
    assert torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)


def test_window_inactive_leaves_gradients():
    a, b = _params_with_grads()
    ga = a.grad.clone()
    ogm = OGMGE([[a], [b]], alpha=0.5, ge=True, start_epoch=2, end_epoch=3)
    z = torch.stack([torch.tensor([[5.0, 0.0]] * 4), torch.tensor([[0.0, 0.0]] * 4)])
    k = ogm.step(z, torch.zeros(4, dtype=torch.long), epoch=0)
    assert torch.equal(k, torch.ones(2)) and torch.equal(a.grad, ga)
    assert ogm.active(2) and ogm.active(3) and not ogm.active(4)


def test_parameter_groups_for_backbones():
    from vgmr_fast.models import Concat, Transformer
    from vgmr_fast.reference import VGMR

    widths = {"a": 3, "b": 5}
    c = Concat(widths, 2, hidden=4)
    groups = modality_parameter_groups(c)
    assert len(groups) == 2
    assert {id(p) for p in groups[0]} == {id(p) for p in c.encoders[0].parameters()}
    t = Transformer(widths, 2, d_model=8, nhead=2, num_layers=1, refiner=VGMR(widths, d=4))
    groups = modality_parameter_groups(t)
    expect = {id(p) for p in t.proj[1].parameters()} | {id(p) for p in t.refiner.blocks[1].parameters()}
    assert {id(p) for p in groups[1]} == expect
    assert len(modality_parameter_groups(t, include_refiner=False)[1]) == 2
    with pytest.raises(TypeError, match="model"):
        modality_parameter_groups(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="param_groups"):
        OGMGE([[nn.Parameter(torch.zeros(1))]])
