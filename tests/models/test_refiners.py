"""Table 7's comparison refiners: shapes, parameter matching, masks."""
import pytest
import torch

from vgmr_fast.models import CrossAttentionRefiner, MLPRefiner, SigmoidTanhGate, make_refiner, param_count
from vgmr_fast.reference import VGMR

KINDS = ["mlp", "gate", "cross_attention"]
WIDTHS = [12, 5, 3]
TS = [6, 4, 7]  # modalities need not share a length


def inputs(B=3, gen=None):
    return [torch.randn(B, T, D, generator=gen) for T, D in zip(TS, WIDTHS)]


def test_make_refiner_classes():
    assert isinstance(make_refiner("mlp", WIDTHS), MLPRefiner)
    assert isinstance(make_refiner("gate", WIDTHS), SigmoidTanhGate)
    assert isinstance(make_refiner("cross_attention", WIDTHS), CrossAttentionRefiner)
    with pytest.raises(ValueError, match="kind"):
        make_refiner("nope", WIDTHS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_masks", [False, True])
def test_shapes(kind, with_masks):
    torch.manual_seed(0)
    r = make_refiner(kind, WIDTHS, hidden=16).eval()
    xs = inputs()
    masks = [torch.rand(3, T) > 0.3 for T in TS] if with_masks else None
    out = r(xs, masks)
    assert len(out) == len(xs)
    for y, x in zip(out, xs):
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all()
    sum(y.sum() for y in r(xs, masks)).backward()  # differentiable


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("widths,d", [([768, 74, 35], 128), ([1024, 512, 256], 256), ([40, 20, 10], 16)])
def test_parameter_matching(kind, widths, d):
    target = param_count(VGMR(widths, d))
    r = make_refiner(kind, widths, target_params=target)
    got = param_count(r)
    assert abs(got - target) / target < 0.03, (kind, got, target)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_steps_do_not_leak(kind):
    """Changing the features at padded steps changes no output at a valid step, in any modality."""
    torch.manual_seed(1)
    r = make_refiner(kind, WIDTHS, hidden=16).eval()
    g = torch.Generator().manual_seed(2)
    xs = inputs(gen=g)
    masks = [torch.ones(3, T, dtype=torch.bool) for T in TS]
    masks[1][:, -2:] = False
    masks[2][0, 3:] = False
    xs2 = [x.clone() for x in xs]
    for x, mk in zip(xs2, masks):
        x[~mk] = 100 * torch.randn(int((~mk).sum()), x.shape[-1], generator=g)
    a, b = r(xs, masks), r(xs2, masks)
    for ya, yb, mk in zip(a, b, masks):
        torch.testing.assert_close(ya[mk], yb[mk], rtol=1e-5, atol=1e-5)


def test_cross_attention_uses_the_other_modalities():
    """Without masks, changing another modality changes the cross-attention output; with that
    modality's steps all masked in every sample but one, only that sample can change."""
    torch.manual_seed(3)
    r = make_refiner("cross_attention", WIDTHS, hidden=16).eval()
    xs = inputs()
    xs2 = [x.clone() for x in xs]
    xs2[2] = torch.randn_like(xs2[2])
    assert not torch.allclose(r(xs)[0], r(xs2)[0])
    masks = [torch.ones(3, T, dtype=torch.bool) for T in TS]
    masks[2][1:] = False  # samples 1, 2: modality 2 absent
    a, b = r(xs, masks)[0], r(xs2, masks)[0]
    torch.testing.assert_close(a[1:], b[1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0], b[0])


def test_cross_attention_all_keys_masked_is_finite():
    torch.manual_seed(4)
    r = make_refiner("cross_attention", WIDTHS, hidden=16).eval()
    xs = inputs()
    masks = [torch.zeros(3, T, dtype=torch.bool) for T in TS]  # nothing valid anywhere
    for y in r(xs, masks):
        assert torch.isfinite(y).all()
