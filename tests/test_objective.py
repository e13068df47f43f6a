"""docs/math.md §6 objective: value targets from one batched removal pass, L_value, L_reg, gradients."""
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
    # the targets carry no gradient by design (docs/math.md §6): hold them fixed for the numerical check
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


# ------------------------------------------------------------- value_fraction / value_every
def _recording(model):
    """Record the batch size of every removal pass (``backbone_logits``) the objective runs."""
    rows = []
    orig = model.backbone_logits

    def backbone_logits(feats, masks):
        rows.append(feats[0].shape[0])
        return orig(feats, masks)

    model.backbone_logits = backbone_logits
    return rows


@pytest.mark.parametrize("B, fraction, n", [(10, 1.0, 10), (10, 0.25, 3), (10, 0.3, 3), (7, 0.5, 4), (5, 0.01, 1)])
def test_value_fraction_removal_pass_rows(B, fraction, n):
    torch.manual_seed(3)
    model = Concat(W, hidden=4, dropout=0.0, refiner=VGMR(W, d=3, dropout=0.0))
    rows = _recording(model)
    xs, y = inputs(B=B)
    _, parts = O.vgmr_objective(model, xs, None, y, value_fraction=fraction)
    assert rows == [n * (len(W) + 1)]  # ONE pass over ceil(rho B) samples x (M + 1) variants
    assert parts["targets"].shape == (n, len(W)) and parts["value_index"].shape == (n,)
    assert O.value_rows(B, fraction) == n


def test_value_fraction_targets_are_exact_on_the_subset():
    torch.manual_seed(4)
    model = Transformer(W, d_model=8, nhead=2, num_layers=1, dropout=0.0, refiner=VGMR(W, d=4, dropout=0.0))
    xs, y = inputs(B=8)
    masks = [torch.rand(8, x.shape[1]) > 0.3 for x in xs]
    _, full = O.vgmr_objective(model, xs, masks, y)
    loss, part = O.vgmr_objective(model, xs, masks, y, value_fraction=0.5,
                                  generator=torch.Generator().manual_seed(0))
    idx = part["value_index"]
    assert len(set(idx.tolist())) == 4
    torch.testing.assert_close(part["targets"], full["targets"][idx])
    # L_value over the chosen samples only; L_task and L_reg over the whole batch
    _, aux = model(xs, masks, return_aux=True)
    expected_value = O.value_loss(aux["global_value"][idx], aux["channel_value"][idx], full["targets"][idx])
    torch.testing.assert_close(part["value"], expected_value)
    torch.testing.assert_close(part["task"], full["task"])
    torch.testing.assert_close(part["reg"], full["reg"])
    torch.testing.assert_close(loss, full["task"] + 0.1 * expected_value + 0.01 * full["reg"])


def test_value_fraction_one_draws_no_random_numbers():
    model = Concat(W, hidden=4, dropout=0.0, refiner=VGMR(W, d=3, dropout=0.0))
    xs, y = inputs()
    state = torch.get_rng_state()
    O.vgmr_objective(model, xs, None, y, value_fraction=1.0)
    assert torch.equal(state, torch.get_rng_state())
    O.vgmr_objective(model, xs, None, y, value_fraction=0.5)
    assert not torch.equal(state, torch.get_rng_state())


def test_value_every_skips_the_removal_pass_between_periods():
    model = Concat(W, hidden=4, dropout=0.0, refiner=VGMR(W, d=3, dropout=0.0))
    rows = _recording(model)
    xs, y = inputs()
    seen = []
    for step in range(6):
        loss, parts = O.vgmr_objective(model, xs, None, y, value_every=3, step=step)
        seen.append(parts["targets"] is not None)
        if parts["targets"] is None:
            assert parts["value"].item() == 0.0
            torch.testing.assert_close(loss, parts["task"] + 0.01 * parts["reg"])
    assert seen == [True, False, False, True, False, False]
    assert rows == [5 * 4, 5 * 4]


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.5", None])
def test_value_fraction_errors(bad):
    model = Concat(W, hidden=4, refiner=VGMR(W, d=3))
    xs, y = inputs()
    with pytest.raises(ValueError, match="value_fraction"):
        O.vgmr_objective(model, xs, None, y, value_fraction=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_value_every_errors(bad):
    model = Concat(W, hidden=4, refiner=VGMR(W, d=3))
    xs, y = inputs()
    with pytest.raises(ValueError, match="value_every"):
        O.vgmr_objective(model, xs, None, y, value_every=bad)


def test_regression_labels_b_and_b1_agree():
    torch.manual_seed(5)
    model = Concat(W, num_classes=1, hidden=4, dropout=0.0, refiner=VGMR(W, d=3, dropout=0.0))
    xs, _ = inputs()
    y = torch.randn(5)
    loss_b, parts_b = O.vgmr_objective(model, xs, None, y, task="regression")
    loss_b1, parts_b1 = O.vgmr_objective(model, xs, None, y.unsqueeze(1), task="regression")
    torch.testing.assert_close(loss_b, loss_b1)
    torch.testing.assert_close(parts_b["targets"], parts_b1["targets"])
    # the targets are the loss increase of an L1 regression: compare with an explicit removal
    _, aux = model(xs, return_aux=True)
    model.eval()
    base = (model.backbone_logits(aux["refined"], aux["masks"]).squeeze(1) - y).abs()
    feats = [aux["refined"][0] * 0] + aux["refined"][1:]
    removed = (model.backbone_logits(feats, aux["masks"]).squeeze(1) - y).abs()
    torch.testing.assert_close(parts_b1["targets"][:, 0], torch.sigmoid(removed - base))


def test_label_batch_mismatch_names_y():
    model = Concat(W, hidden=4, refiner=VGMR(W, d=3))
    xs, y = inputs()
    with pytest.raises(ValueError, match=r"^y: expected 5 labels"):
        O.vgmr_objective(model, xs, None, y[:4])
    reg = Concat(W, num_classes=1, hidden=4, refiner=VGMR(W, d=3))
    with pytest.raises(ValueError, match=r"^y: "):
        O.vgmr_objective(reg, xs, None, torch.randn(5, 2), task="regression")
    with pytest.raises(ValueError, match=r"^y: "):
        O.task_loss(torch.zeros(5, 1), torch.zeros(6), task="regression")


def test_value_fraction_one_is_the_paper_objective_bit_for_bit():
    """rho = 1 takes every sample as it is (no index_select): the loss is exactly the sum of the
    §6 parts computed on the whole batch."""
    torch.manual_seed(6)
    model = Transformer(W, d_model=8, nhead=2, num_layers=1, dropout=0.0, refiner=VGMR(W, d=4, dropout=0.0))
    xs, y = inputs(B=6)
    masks = [torch.rand(6, x.shape[1]) > 0.3 for x in xs]
    loss, parts = O.vgmr_objective(model, xs, masks, y, value_fraction=1.0)
    logits, aux = model(xs, masks, return_aux=True)
    targets = O.value_targets(model, aux["refined"], aux["masks"], y)
    expected = (O.task_loss(logits, y) + 0.1 * O.value_loss(aux["global_value"], aux["channel_value"], targets)
                + 0.01 * O.reg_loss(aux["global_value"], aux["channel_value"], 0.05))
    assert torch.equal(parts["targets"], targets) and torch.equal(loss, expected)
    assert torch.equal(parts["value_index"], torch.arange(6))
