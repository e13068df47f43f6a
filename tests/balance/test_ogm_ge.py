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


def _a_dominant_logits():
    """Per-modality logits [2, 4, 2] for labels 0: modality a confident (logit 5), b at chance."""
    return torch.stack([torch.tensor([[5.0, 0.0]] * 4), torch.tensor([[0.0, 0.0]] * 4)])


def _ge_step_a_dominant():
    """One OGM-GE step (alpha 0.5, noise seeded 1) on a-dominant logits: (a, b, a's and b's
    gradients before the step, the logits, the coefficients)."""
    a, b = _params_with_grads()
    ga, gb = a.grad.clone(), b.grad.clone()
    ogm = OGMGE([[a], [b]], alpha=0.5, ge=True, generator=torch.Generator().manual_seed(1))
    z = _a_dominant_logits()
    return a, b, ga, gb, z, ogm.step(z, torch.zeros(4, dtype=torch.long))


def test_step_scales_dominant_group_without_ge():
    a, b = _params_with_grads()
    ga, gb = a.grad.clone(), b.grad.clone()
    ogm = OGMGE([[a], [b]], alpha=0.5, ge=False)
    z = _a_dominant_logits()
    y = torch.zeros(4, dtype=torch.long)
    k = ogm.step(z, y)
    assert k[0] < 1 and k[1] == 1
    torch.testing.assert_close(a.grad, ga * k[0])
    torch.testing.assert_close(b.grad, gb)
    assert ogm.history[-1]["coeff"] == k.tolist()


def test_step_ge_noise_matches_gradient_std_and_is_seeded():
    a, b, ga, _, z, k = _ge_step_a_dominant()
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
    z = _a_dominant_logits()
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


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 0.8])  # the paper's range: 0.1 (VGGSound) .. 0.8 (CREMA-D)
def test_coefficient_for_known_scores_in_the_paper_alpha_range(alpha):
    # s_a = 3, s_v = 1: rho_a = 3 > 1 gets 1 - tanh(3 alpha); rho_v = 1/3 keeps 1 (the authors' code)
    k = ogm_coefficients(torch.tensor([3.0, 1.0]), alpha=alpha)
    torch.testing.assert_close(k, torch.tensor([1 - math.tanh(3 * alpha), 1.0]))
    # the roles swap with the scores
    k = ogm_coefficients(torch.tensor([1.0, 3.0]), alpha=alpha)
    torch.testing.assert_close(k, torch.tensor([1.0, 1 - math.tanh(3 * alpha)]))


def test_ge_noise_is_added_to_the_non_dominant_modality_too():
    """As in the authors' code: grad * k + N(0, std(grad)) for every modulated group, k = 1 included."""
    a, b, _, gb, _, k = _ge_step_a_dominant()
    assert k[1] == 1.0
    noise = b.grad - gb
    assert 0.7 * float(gb.std()) < float(noise.std()) < 1.3 * float(gb.std())


def _one_step(opt_cls, scale, **kw):
    p = nn.Parameter(torch.zeros(20))
    opt = opt_cls([p], **kw)
    p.grad = scale * torch.linspace(-1.0, 2.0, 20)
    opt.step()
    return p.detach().clone()


def test_adam_cancels_the_ogm_coefficient_and_sgd_keeps_it():
    """Why OGM-GE without GE noise is a no-op under Adam: its step is invariant to scaling the gradient by k.

    The first Adam step is -lr * g / (|g| + eps) whatever k is; SGD's step is -lr * k * g. docs/balance.md.
    """
    k = 1 - math.tanh(0.5 * 3.0)  # ~0.095, a typical coefficient of a dominant modality
    adam_full, adam_mod = _one_step(torch.optim.Adam, 1.0, lr=0.01), _one_step(torch.optim.Adam, k, lr=0.01)
    torch.testing.assert_close(adam_mod, adam_full, atol=1e-6, rtol=1e-5)
    sgd_full, sgd_mod = (_one_step(torch.optim.SGD, s, lr=0.01, momentum=0.9) for s in (1.0, k))
    torch.testing.assert_close(sgd_mod, k * sgd_full)


def test_step_modulation_scales_the_learning_rate_of_the_dominant_group_under_adam():
    """modulation='step': the coefficient reaches the update under Adam (the fix for its cancellation)."""
    enc_a, enc_b, head = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(4, 2)
    opt = torch.optim.Adam(list(enc_a.parameters()) + list(head.parameters()) + list(enc_b.parameters()), lr=0.01)
    ogm = OGMGE([list(enc_a.parameters()), list(enc_b.parameters())], alpha=0.8, ge=False, modulation="step",
                optimizer=opt)
    # every parameter still in exactly one group; the head keeps the base lr
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == 6
    head_group = next(g for g in opt.param_groups if any(p is head.weight for p in g["params"]))
    before = [p.detach().clone() for p in enc_a.parameters()] + [p.detach().clone() for p in enc_b.parameters()]
    for p in list(enc_a.parameters()) + list(enc_b.parameters()) + list(head.parameters()):
        p.grad = torch.ones_like(p)
    z = _a_dominant_logits()
    k = ogm.step(z, torch.zeros(4, dtype=torch.long))
    assert k[0] < 1 and k[1] == 1
    assert torch.equal(enc_a.weight.grad, torch.ones(2, 3))  # the gradient itself is left alone
    assert ogm.lr_groups[0]["lr"] == pytest.approx(0.01 * float(k[0])) and ogm.lr_groups[1]["lr"] == 0.01
    assert head_group["lr"] == 0.01
    opt.step()
    step_a = enc_a.weight.detach() - before[0]
    step_b = enc_b.weight.detach() - before[2]
    torch.testing.assert_close(step_a, float(k[0]) * step_b)  # first Adam step: -lr_m * sign(g)
    # outside the window the base learning rates come back
    ogm.end_epoch = 0
    ogm.step(z, torch.zeros(4, dtype=torch.long), epoch=1)
    assert ogm.lr_groups[0]["lr"] == 0.01


def test_step_modulation_validates():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="modulation"):
        OGMGE([[a], [b]], modulation="lr")
    with pytest.raises(ValueError, match="optimizer"):
        OGMGE([[a], [b]], modulation="step")
    with pytest.raises(ValueError, match="optimizer"):
        OGMGE([[a], [b]], modulation="step", optimizer=torch.optim.SGD([a], lr=0.1))


def test_fused_refiner_slices_get_the_reference_modulation():
    """The fused VGMR stacks parameters across modalities; OGM-GE must modulate exactly the slices that
    are the reference's block m (before, the fused refiner's parameters were silently left out)."""
    import vgmr_fast
    from vgmr_fast.models import Concat
    from vgmr_fast.reference import VGMR as ReferenceVGMR

    torch.manual_seed(0)
    widths = [6, 5]
    ref = ReferenceVGMR(widths, d=8, dropout=0.0)
    fused = vgmr_fast.VGMR(widths, d=8, dropout=0.0)
    fused.load_state_dict(ref.state_dict())
    models = [Concat(widths, dropout=0.0, refiner=ref), Concat(widths, dropout=0.0, refiner=fused)]
    models[1].load_state_dict(models[0].state_dict())
    xs = [torch.randn(4, 3, D) for D in widths]
    y = torch.tensor([0, 1, 1, 0])
    logits = torch.tensor([[[3.0, -3.0]] * 4, [[0.1, 0.0]] * 4])  # modality 0 dominates
    grads = []
    for model in models:
        model.train()
        torch.nn.functional.cross_entropy(model(xs), y).backward()
        groups = modality_parameter_groups(model)
        assert all(len(g) > 2 for g in groups), "refiner parameters missing from the groups"
        OGMGE(groups, alpha=0.5, ge=False).step(logits, y)
        grads.append(model)
    ref_grads = {k: v for k, v in ((n, p.grad) for n, p in models[0].refiner.named_parameters())}
    fused_grads = models[1].refiner.reference_grads()
    assert set(ref_grads) == set(fused_grads)
    for key, g in ref_grads.items():
        torch.testing.assert_close(fused_grads[key], g, rtol=1e-5, atol=1e-6, msg=key)
