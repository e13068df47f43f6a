"""The adapter that puts a VGMR in front of anyone's backbone (one tensor per modality)."""
import pytest
import torch
from torch import nn

import vgmr_fast
from vgmr_fast import objective as O
from vgmr_fast.models import PerModality

W = {"text": 12, "audio": 7, "video": 5}


class CrossModalNet(nn.Module):
    """A third-party style backbone: ``forward(text, audio, video)``, each modality attending to the
    other two (MulT-like), one regression score out, returned as ``(score, hidden)`` like MulT."""

    def __init__(self, widths=(12, 7, 5), d=16, heads=2, out=1):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(D, d) for D in widths)
        self.attn = nn.ModuleList(nn.MultiheadAttention(d, heads, batch_first=True) for _ in widths)
        self.head = nn.Linear(d * len(widths), out)

    def forward(self, text, audio, video):
        hs = [p(x) for p, x in zip(self.proj, (text, audio, video))]
        pooled = []
        for m, h in enumerate(hs):
            others = torch.cat([o for j, o in enumerate(hs) if j != m], dim=1)
            ctx, _ = self.attn[m](h, others, others, need_weights=False)
            pooled.append((h + ctx).mean(dim=1))
        hidden = torch.cat(pooled, dim=-1)
        return self.head(hidden), hidden


def inputs(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, T, D, generator=g) for T, D in zip([5, 4, 3], W.values())]
    return xs, torch.randn(B, 1, generator=g)


def make(backend="auto", dropout=0.0):
    torch.manual_seed(0)
    return PerModality(CrossModalNet(), vgmr_fast.VGMR(W, d=8, dropout=dropout, backend=backend))


def test_forward_is_the_backbone_on_refined_features():
    model = make()
    xs, _ = inputs()
    logits, aux = model(xs, return_aux=True)
    refined = model.refiner(xs)
    torch.testing.assert_close(logits, model.backbone(*refined)[0])
    torch.testing.assert_close(model(xs), logits)
    assert logits.shape == (6, 1) and len(aux["refined"]) == 3 and aux["global_value"].shape == (6, 3)
    # a dict in the refiner's order gives the same result
    torch.testing.assert_close(model(dict(zip(W, xs))), logits)


def test_value_targets_through_the_adapter_are_explicit_removals():
    model = make()
    xs, y = inputs()
    _, parts = O.vgmr_objective(model, xs, None, y, task="regression", value_target="magnitude")
    refined = model.refiner(xs)
    model.eval()
    with torch.no_grad():
        base = (model.backbone(*refined)[0] - y).abs().squeeze(1)
        for m in range(3):
            feats = [torch.zeros_like(r) if k == m else r for k, r in enumerate(refined)]
            removed = (model.backbone(*feats)[0] - y).abs().squeeze(1)
            torch.testing.assert_close(parts["targets"][:, m], torch.sigmoid((removed - base).abs()))


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_training_step_reaches_backbone_and_refiner(fraction):
    model = make(dropout=0.1)
    xs, y = inputs()
    loss, parts = O.vgmr_objective(model, xs, None, y, task="regression", value_fraction=fraction)
    loss.backward()
    assert parts["targets"].shape == (3 if fraction == 0.5 else 6, 3)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.backbone.attn[0].in_proj_weight.grad.abs().sum() > 0
    refiner_grads = model.refiner.reference_grads()  # the fused layout, keyed as the reference's
    assert refiner_grads["blocks.2.global_head.weight"].abs().sum() > 0
    assert model.training  # the removal pass restored train mode


def test_labels_b_and_b1_and_mismatch():
    model = make()
    xs, y = inputs()
    l1, _ = O.vgmr_objective(model, xs, None, y, task="regression")
    l2, _ = O.vgmr_objective(model, xs, None, y.squeeze(1), task="regression")
    torch.testing.assert_close(l1, l2)
    with pytest.raises(ValueError, match="^y: expected 6 labels"):
        O.vgmr_objective(model, xs, None, y[:5], task="regression")


def test_call_keyword_and_function_and_masks():
    torch.manual_seed(0)
    net = CrossModalNet()
    refiner = vgmr_fast.VGMR(W, d=8, dropout=0.0)
    positional = PerModality(net, refiner)
    keyword = PerModality(net, refiner, call="keyword")
    seen = []

    def call(backbone, feats, masks):
        seen.append([None if m is None else tuple(m.shape) for m in masks])
        return backbone(*feats)

    custom = PerModality(net, refiner, call=call, output=lambda out: out[0] * 2)
    xs, _ = inputs()
    masks = [torch.rand(6, x.shape[1]) > 0.2 for x in xs]
    ref = positional(xs, masks)
    torch.testing.assert_close(keyword(xs, masks), ref)
    torch.testing.assert_close(custom(xs, masks), 2 * ref)
    assert seen == [[(6, 5), (6, 4), (6, 3)]]
    with pytest.raises(ValueError, match="call"):
        PerModality(net, refiner, call="star")
    with pytest.raises(ValueError, match="keyword"):
        PerModality(net, vgmr_fast.VGMR([12, 7, 5], d=8), call="keyword")
    with pytest.raises(ValueError, match="xs: missing"):
        positional({"text": xs[0], "audio": xs[1]})


def test_objective_names_a_model_without_the_protocol():
    xs, y = inputs()

    class Plain(nn.Module):
        def forward(self, xs, masks=None, return_aux=False):
            return torch.zeros(6, 1), {"global_value": None, "channel_value": None, "refined": xs,
                                       "masks": [None] * 3}

    with pytest.raises(TypeError, match="backbone_logits"):
        O.vgmr_objective(Plain(), xs, None, y, task="regression")
