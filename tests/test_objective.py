"""SPEC §6 objective: value targets from one batched removal pass, L_value, L_reg, gradients."""
import pytest
import torch

from vgmr_fast import objective as O
from vgmr_fast.models import Concat, Transformer
from vgmr_fast.reference import VGMR

W = [6, 4, 3]


def inputs(B=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, T, D, generator=g).to(dtype) for T, D in zip([4, 3, 2], W)]
    y = torch.randint(0, 2, (B,), generator=g)
    return xs, y


def test_targets_half_when_modality_unused():
    torch.manual_seed(0)
    model = Concat(W, hidden=8, dropout=0.0, refiner=VGMR(W, d=4, dropout=0.0))
    with torch.no_grad():
        model.classifier.weight[:, 8:16] = 0  # modality 1 never reaches the decision
    xs, y = inputs()
    logits, aux = model(xs, return_aux=True)
    t = O.value_targets(model, aux["refined"], aux["masks"], y)
    assert t.shape == (5, 3)
    torch.testing.assert_close(t[:, 1], torch.full((5,), 0.5))
    assert (t[:, 0] - 0.5).abs().max() > 1e-4


def test_targets_match_explicit_removal_and_one_pass():
    torch.manual_seed(1)
    model = Transformer(W, d_model=8, nhead=2, num_layers=1, dropout=0.0, refiner=VGMR(W, d=4, dropout=0.0))
    xs, y = inputs()
    _, aux = model(xs, return_aux=True)
    calls = []
    orig = model.backbone_logits
    model.backbone_logits = lambda f, m: calls.append(f[0].shape[0]) or orig(f, m)
    t = O.value_targets(model, aux["refined"], aux["masks"], y, value_target="magnitude", tau=0.5)
    assert calls == [4 * 5]  # (M + 1) * B in ONE pass
    model.eval()
    base = O.task_loss(orig(aux["refined"], aux["masks"]), y, reduction="none")
    for m in range(3):
        feats = [torch.zeros_like(r) if k == m else r for k, r in enumerate(aux["refined"])]
        removed = O.task_loss(orig(feats, aux["masks"]), y, reduction="none")
        torch.testing.assert_close(t[:, m], torch.sigmoid((removed - base).abs() / 0.5), rtol=1e-5, atol=1e-6)


def test_value_and_reg_losses():
    t = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    g = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    v = t.unsqueeze(-1).expand(2, 2, 3).clone()
    assert O.value_loss(g, v, t).item() == pytest.approx(0.0)
    assert O.value_loss(g + 0.1, v, t).item() == pytest.approx(0.01, rel=1e-5)
    assert O.value_loss(None, v - 0.2, t).item() == pytest.approx(0.04, rel=1e-5)
    # collapsed values are penalised, spread ones are not
    const_g = torch.full((4, 2), 0.5)
    assert O.reg_loss(const_g, None, kappa=0.05).item() == pytest.approx(0.1)
    spread = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert O.reg_loss(spread, None, kappa=0.05).item() == 0.0


def test_objective_backward_and_gradcheck_float64(monkeypatch):
    torch.manual_seed(2)
    model = Concat(W, hidden=4, dropout=0.0, refiner=VGMR(W, d=3, dropout=0.0)).double()
    xs, y = inputs(B=3, dtype=torch.float64)
    # the targets carry no gradient by design (SPEC §6): hold them fixed for the numerical check
    t = O.vgmr_objective(model, xs, None, y)[1]["targets"]
    monkeypatch.setattr(O, "value_targets", lambda *a, **k: t)
    xs = [x.requires_grad_() for x in xs]

    def f(*a):
        return O.vgmr_objective(model, list(a), None, y)[0]

    assert torch.autograd.gradcheck(f, tuple(xs), eps=1e-6, atol=1e-5)


def test_objective_parts_and_errors():
    model = Concat(W, hidden=4, refiner=VGMR(W, d=3))
    xs, y = inputs()
    loss, parts = O.vgmr_objective(model, xs, None, y)
    loss.backward()
    assert set(parts) >= {"task", "value", "reg", "targets"}
    assert model.refiner.blocks[0].global_head.weight.grad is not None
    with pytest.raises(ValueError, match="refiner"):
        O.vgmr_objective(Concat(W, hidden=4), xs, None, y)
    with pytest.raises(ValueError, match="value_target"):
        O.vgmr_objective(model, xs, None, y, value_target="abs")
    with pytest.raises(ValueError, match="task"):
        O.task_loss(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), task="ranking")


def test_regression_task():
    model = Concat(W, num_classes=1, hidden=4, refiner=VGMR(W, d=3))
    xs, _ = inputs()
    y = torch.randn(5)
    loss, _ = O.vgmr_objective(model, xs, None, y, task="regression")
    assert torch.isfinite(loss)
