"""IIBalance components: budgets, prototype alignment (zero at/above budget), probabilistic gate."""
import math

import pytest
import torch
import torch.nn.functional as F

from vgmr_fast.balance import (BudgetEstimate, IIBalanceModel, PrototypeAlignment, ProbabilisticGate, budget_prior,
                               estimate_budgets, information_budgets, label_entropy)


def test_label_entropy_and_budgets_by_hand():
    assert label_entropy(torch.tensor([0, 1, 2, 3] * 5)) == pytest.approx(math.log(4))
    assert label_entropy(torch.tensor([0, 0, 0, 1])) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    h = math.log(4)
    b = information_budgets(torch.tensor([0.0, h, 2 * h, h / 2]), h)
    torch.testing.assert_close(b, torch.tensor([1.0, 0.0, 0.0, 0.5]))
    with pytest.raises(ValueError, match="h_y"):
        information_budgets(torch.tensor([1.0]), 0.0)


def test_prior_is_a_distribution_preserving_order():
    p = budget_prior(torch.tensor([0.6, 0.3, 0.0]))
    assert p.sum().item() == pytest.approx(1.0)
    assert p[0] > p[1] > p[2] > 0
    torch.testing.assert_close(budget_prior(torch.zeros(3)), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="budgets"):
        budget_prior(torch.tensor([-0.1, 0.5]))


def test_estimate_budgets_orders_modalities_by_information():
    from vgmr_fast.data import make_benchmark

    d = make_benchmark("clean", seed=0, n_train=240, n_val=160, n_test=0, complementarity=0.0, dominance=4.0,
                       noisy_snr=0.0)
    est = estimate_budgets(d["train"], d["val"], epochs=40, hidden=32, seed=0)
    assert isinstance(est, BudgetEstimate)
    assert est.budgets.shape == (3,) and ((est.budgets >= 0) & (est.budgets <= 1)).all()
    # dominant (clean, strong) > weak > noisy (no class signal at all)
    assert est.budgets[0] > est.budgets[1] > est.budgets[2]
    assert est.budgets[2] < 0.1 and est.budgets[0] > 0.5
    assert est.anchor == 0 and est.prior.sum().item() == pytest.approx(1.0)
    assert est.label_entropy == pytest.approx(label_entropy(d["val"].y))
    assert est.to_dict()["anchor"] == "dominant"
    est2 = estimate_budgets(d["train"], d["val"], epochs=40, hidden=32, seed=0)
    assert torch.equal(est.budgets, est2.budgets)  # deterministic with a seed


def test_prototypes_are_class_means_of_normalised_features():
    al = PrototypeAlignment([2, 2], 2, torch.tensor([1.0, 0.5]), math.log(2), momentum=0.5)
    h = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    al.update([h, h], y)
    torch.testing.assert_close(al.prototypes(0), torch.tensor([[0.5, 0.5], [1 / math.sqrt(2), 1 / math.sqrt(2)]]))
    assert al.seen.all()
    al.update([h * 0 + torch.tensor([1.0, 0.0]), h], torch.tensor([0, 0, 0]))  # EMA for the class present only
    torch.testing.assert_close(al.prototypes(0)[0], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(al.prototypes(0)[1], torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2)]))


def test_deficits_by_hand():
    al = PrototypeAlignment([2, 2, 2], 2, torch.tensor([0.9, 0.45, 0.3]), math.log(2))
    w = al.deficits(torch.tensor([0.8, 0.2, 0.5]))
    # beta = [1, .5, 1/3], rho = [1, .25, .625] -> w = [0, (.5 - .25) / .5, 0]
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 0.0]))
    # anchor with no performance yet: nothing to be relative to
    assert torch.equal(al.deficits(torch.tensor([0.0, 0.2, 0.5])), torch.zeros(3))


def _separable(n=60, c=3, d=6, seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    protos = torch.randn(c, d, generator=g)
    return protos[y] + noise * torch.randn(n, d, generator=g), y


def test_alignment_loss_is_exactly_zero_at_or_above_budget():
    h, y = _separable()
    al = PrototypeAlignment([6, 6], 3, torch.tensor([0.9, 0.5]), label_entropy(y))
    h0 = h.clone().requires_grad_(True)
    h1 = h.clone().requires_grad_(True)  # the weak modality performs as well as the anchor: rho = 1 >= beta
    loss, info = al([h0, h1], y)
    assert loss.item() == 0.0 and torch.equal(info["deficit"], torch.zeros(2))
    loss.backward() if loss.requires_grad else None
    assert h1.grad is None or torch.all(h1.grad == 0)


def test_alignment_pulls_only_a_modality_below_budget_toward_its_own_prototypes():
    h, y = _separable()
    g = torch.Generator().manual_seed(3)
    weak = torch.randn(60, 4, generator=g)  # no class information: far below its budget
    al = PrototypeAlignment([6, 4], 3, torch.tensor([0.9, 0.8]), label_entropy(y))
    h0 = h.clone().requires_grad_(True)
    h1 = weak.clone().requires_grad_(True)
    loss, info = al([h0, h1], y)
    assert loss.item() > 0 and info["deficit"][1] > 0 and info["deficit"][0] == 0
    loss.backward()
    assert h0.grad is None or torch.all(h0.grad == 0)  # the anchor is never pushed
    assert h1.grad is not None and h1.grad.abs().sum() > 0
    # the loss is the deficit-weighted prototype CE of the weak modality, on its own prototypes
    expect = float(info["deficit"][1]) * F.cross_entropy(al.proto_logits(1, weak), y)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)


def test_gate_weights_sum_to_one_and_follow_prior_and_uncertainty():
    prior = torch.tensor([0.7, 0.3])
    gate = ProbabilisticGate(prior, num_classes=4, kappa=0.0)
    z = torch.randn(2, 5, 4)
    w = gate.weights(z)
    assert w.shape == (5, 2)
    torch.testing.assert_close(w.sum(1), torch.ones(5))
    torch.testing.assert_close(w, prior.expand(5, 2))  # kappa = 0: the global prior
    gate = ProbabilisticGate(torch.tensor([0.5, 0.5]), num_classes=4, kappa=4.0)
    z = torch.stack([torch.tensor([[10.0, 0, 0, 0]] * 3), torch.zeros(3, 4)])  # confident vs. uniform
    w = gate.weights(z)
    assert (w[:, 0] > 0.9).all()
    torch.testing.assert_close(gate.uncertainty(z)[:, 1], torch.ones(3))
    fused = gate(z)
    assert fused.shape == (3, 4) and (fused.argmax(1) == 0).all()
    with pytest.raises(ValueError, match="z"):
        gate.weights(torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="prior"):
        ProbabilisticGate(torch.tensor([0.5, 0.0]), 3)


def test_gate_calibration_fits_temperature_and_kappa():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (400,), generator=g)
    clean = F.one_hot(y, 3).float() * 2 + 0.8 * torch.randn(400, 3, generator=g)
    z = torch.stack([clean * 5, torch.randn(400, 3, generator=g)])  # overconfident head + a useless head
    gate = ProbabilisticGate(torch.tensor([0.5, 0.5]), 3)
    res = gate.calibrate(z, y)
    assert gate.temperature[0] > 1.3  # the overconfident head is softened (Bayes-optimal T ≈ 1.6)
    assert res["kappa"] == gate.kappa and res["nll"] < float(F.cross_entropy(z[0], y))


def test_iibalance_model_end_to_end():
    from vgmr_fast.models import Concat

    widths = {"a": 3, "b": 4}
    core = Concat(widths, 3, hidden=5)
    est = BudgetEstimate(torch.tensor([0.6, 0.2]), budget_prior(torch.tensor([0.6, 0.2])), torch.zeros(2),
                         torch.zeros(2), math.log(3), ["a", "b"])
    model = IIBalanceModel(core, [5, 5], 3, est)
    xs = [torch.randn(9, 4, 3), torch.randn(9, 2, 4)]
    y = torch.arange(9) % 3
    assert model(xs).shape == (9, 3)
    model.train()
    loss, parts = model.loss(xs, None, y)
    loss.backward()
    assert torch.isfinite(loss) and core.encoders[1][0].weight.grad is not None
    assert {"align", "unimodal", "deficit"} <= set(parts)
    model.eval()
    res = model.calibrate(xs, None, y)
    assert len(res["temperature"]) == 2
    with pytest.raises(ValueError, match="sizes"):
        IIBalanceModel(core, [5], 3, est)


def test_trigger_rate_counts_only_steps_below_budget():
    h, y = _separable()
    g = torch.Generator().manual_seed(3)
    weak = torch.randn(60, 4, generator=g)
    al = PrototypeAlignment([6, 4], 3, torch.tensor([0.9, 0.8]), label_entropy(y))
    _, info = al([h, h[:, :4]], y)  # weak as separable as the anchor: at budget, inactive
    assert info["deficit"][1] == 0
    _, info = al([h, weak], y)  # no class information: below budget, active
    assert info["deficit"][1] > 0
    al([h, weak], y, update=False)  # evaluation calls are not training steps
    assert al.steps == 2
    torch.testing.assert_close(al.trigger_rate(), torch.tensor([0.0, 0.5]))
