"""The reference VGMR: shapes, docs/math.md identities, gradients, state, errors."""
import pytest
import torch
import torch.nn.functional as F

from vgmr_fast import reference as R
from vgmr_fast.ops.dropout import keep_mask

WIDTHS3 = {"text": 24, "audio": 7, "vision": 5}


def make_inputs(widths, B=3, Ts=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = list(widths.values()) if isinstance(widths, dict) else list(widths)
    Ts = Ts or [4 + i for i in range(len(dims))]
    return [torch.randn(B, T, D, generator=g).to(dtype) for T, D in zip(Ts, dims)]


@pytest.mark.parametrize("widths", [[9, 4], [24, 7, 5], {"a": 3, "b": 1, "c": 6, "d": 2}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(widths, dtype):
    torch.manual_seed(0)
    m = R.VGMR(widths, d=8).to(dtype)
    xs = make_inputs(widths, dtype=dtype)
    feed = dict(zip(widths, xs)) if isinstance(widths, dict) else xs
    out, aux = m(feed, return_aux=True)
    outs = list(out.values()) if isinstance(out, dict) else out
    M = len(xs)
    for x, y in zip(xs, outs):
        assert y.shape == x.shape and y.dtype == dtype
        assert torch.isfinite(y).all()
    assert aux["global_value"].shape == (3, M)
    assert aux["channel_value"].shape == (3, M, 8)
    assert aux["gate_mean"].shape == (3, M)
    assert ((aux["global_value"] > 0) & (aux["global_value"] < 1)).all()


def test_tuple_in_tuple_out():
    m = R.VGMR([6, 4], d=4)
    out = m(tuple(make_inputs([6, 4])))
    assert isinstance(out, tuple) and len(out) == 2


@pytest.mark.parametrize("kwargs", [{"beta": 1.0}, {"alpha": 0.0}])
def test_neutral_gate_is_layernorm(kwargs):
    torch.manual_seed(1)
    m = R.VGMR(WIDTHS3, d=8, **kwargs).eval()
    for blk in m.blocks:  # non-trivial LayerNorm affine so the identity is not vacuous
        torch.nn.init.normal_(blk.norm.weight)
        torch.nn.init.normal_(blk.norm.bias)
    xs = make_inputs(WIDTHS3)
    out = m(xs)
    for blk, x, y in zip(m.blocks, xs, out):
        expect = F.layer_norm(x, (x.shape[-1],), blk.norm.weight, blk.norm.bias, 1e-5)
        torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


def test_neutral_gate_dropout_matches_keep_mask():
    torch.manual_seed(2)
    m = R.VGMR([10, 6], d=4, beta=1.0, dropout=0.3).train()
    xs = make_inputs([10, 6])
    gen_state = torch.random.get_rng_state()
    out = m(xs)
    torch.random.set_rng_state(gen_state)
    seeds = torch.randint(0, 2**62, (2,)).tolist()
    for blk, x, y, s in zip(m.blocks, xs, out, seeds):
        B, T, D = x.shape
        ln = F.layer_norm(x, (D,), blk.norm.weight, blk.norm.bias, 1e-5)
        keep = keep_mask(s, B * T, D, 0.3).view(B, T, D)
        torch.testing.assert_close(y, ln * keep / 0.7)


def test_gate_changes_output_when_not_neutral():
    torch.manual_seed(3)
    m = R.VGMR(WIDTHS3, d=8).eval()
    xs = make_inputs(WIDTHS3)
    out = m(xs)
    ln = F.layer_norm(xs[0], (24,), m.blocks[0].norm.weight, m.blocks[0].norm.bias, 1e-5)
    assert (out[0] - ln).abs().max() > 1e-3


def test_all_masked_row_zero_summary_no_nan():
    h = torch.randn(3, 5, 4, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    mean, mx = R.summary_pool(h, mask)
    assert (mean[1] == 0).all() and (mx[1] == 0).all()
    (mean.sum() + mx.sum()).backward()
    assert torch.isfinite(h.grad).all() and (h.grad[1] == 0).all()
    # whole module, a modality absent for one sample: nothing NaN, forward or backward
    m = R.VGMR(WIDTHS3, d=8)
    xs = [x.requires_grad_() for x in make_inputs(WIDTHS3)]
    masks = [torch.ones(x.shape[:2], dtype=torch.bool) for x in xs]
    masks[1][0] = False
    out = m(xs, masks)
    sum(o.sum() for o in out).backward()
    assert all(torch.isfinite(o).all() for o in out)
    assert all(torch.isfinite(x.grad).all() for x in xs)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_tail_mask_equals_truncation():
    h = torch.randn(4, 9, 6)
    lengths = [9, 1, 5, 3]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    mean, mx = R.summary_pool(h, mask)
    for b, n in enumerate(lengths):
        m2, x2 = R.summary_pool(h[b : b + 1, :n])
        torch.testing.assert_close(mean[b], m2[0])
        torch.testing.assert_close(mx[b], x2[0])


def test_max_gradient_goes_to_first_tied_step():
    h = torch.tensor([[[1.0], [3.0], [3.0], [2.0]]], requires_grad=True)
    _, mx = R.summary_pool(h, torch.ones(1, 4, dtype=torch.bool))
    mx.sum().backward()
    assert h.grad.flatten().tolist() == [0.0, 1.0, 0.0, 0.0]


def test_interaction_layout():
    s = torch.randn(2, 3, 4)
    u = R.interaction(s)
    assert u.shape == (2, 3, 8 * 4)
    blocks = u.view(2, 3, 8, 4)
    m, others = 1, [0, 2]
    expect = [s[:, 1], s[:, 0], s[:, 2], s[:, 1] * s[:, 0], s[:, 1] * s[:, 2],
              (s[:, 1] - s[:, 0]).abs(), (s[:, 1] - s[:, 2]).abs(), (s[:, 0] + s[:, 2]) / 2]
    for k, e in enumerate(expect):
        torch.testing.assert_close(blocks[:, m, k], e)


@pytest.mark.parametrize(
    "ablation,width_blocks",
    [({}, 8), ({"use_agreement": False}, 6), ({"use_discrepancy": False}, 6),
     ({"use_agreement": False, "use_discrepancy": False}, 4)],
)
def test_interaction_ablation_widths(ablation, width_blocks):
    m = R.VGMR(WIDTHS3, d=4, **ablation)
    assert m.blocks[0].value[0].in_features == width_blocks * 4
    assert all(torch.isfinite(y).all() for y in m(make_inputs(WIDTHS3)))


@pytest.mark.parametrize("ablation", [{"use_global_value": False}, {"use_channel_value": False},
                                      {"use_global_value": False, "use_channel_value": False}])
def test_value_ablations(ablation):
    m = R.VGMR(WIDTHS3, d=4, **ablation)
    _, aux = m(make_inputs(WIDTHS3), return_aux=True)
    assert (aux["global_value"] is None) == (not ablation.get("use_global_value", True))
    assert (aux["channel_value"] is None) == (not ablation.get("use_channel_value", True))
    names = dict(m.named_parameters())
    assert ("blocks.0.gate_global.weight" in names) == ablation.get("use_global_value", True)


def test_gradcheck_module_float64():
    torch.manual_seed(4)
    widths = [5, 3, 2]
    m = R.VGMR(widths, d=3, dropout=0.0).double()
    xs = [x.double().requires_grad_() for x in make_inputs(widths, B=2, Ts=[3, 2, 1])]
    masks = [torch.tensor([[True, False, True], [False, False, False]]), None, None]

    def f(*args):
        return tuple(m(list(args), masks))

    assert torch.autograd.gradcheck(f, tuple(xs), eps=1e-6, atol=1e-5)


def test_gradcheck_parameters_float64():
    torch.manual_seed(5)
    widths = [4, 3]
    m = R.VGMR(widths, d=2, dropout=0.0).double()
    xs = [x.double() for x in make_inputs(widths, B=2, Ts=[2, 3])]
    params = [p for p in m.parameters()]
    names = [n for n, _ in m.named_parameters()]

    def f(*ps):
        out = torch.func.functional_call(m, dict(zip(names, ps)), (xs,))
        return tuple(out)

    assert torch.autograd.gradcheck(f, tuple(p.detach().requires_grad_() for p in params), eps=1e-6, atol=1e-5)


def test_state_dict_round_trip_and_eval_determinism():
    torch.manual_seed(6)
    a = R.VGMR(WIDTHS3, d=8).eval()
    b = R.VGMR(WIDTHS3, d=8).eval()
    xs = make_inputs(WIDTHS3)
    assert not torch.allclose(a(xs)[0], b(xs)[0])
    b.load_state_dict(a.state_dict())
    for ya, yb in zip(a(xs), b(xs)):
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    for ya, yb in zip(a(xs), a(xs)):
        assert torch.equal(ya, yb)


def test_training_dropout_governed_by_manual_seed():
    m = R.VGMR(WIDTHS3, d=8, dropout=0.5).train()
    xs = make_inputs(WIDTHS3)
    torch.manual_seed(7)
    y1 = m(xs)
    torch.manual_seed(7)
    y2 = m(xs)
    y3 = m(xs)
    assert torch.equal(y1[0], y2[0])
    assert not torch.equal(y2[0], y3[0])
    zero_frac = (y1[0] == 0).float().mean().item()
    assert 0.4 < zero_frac < 0.6


def test_torch_dropout_rng_option():
    m = R.VGMR([6, 4], d=4, dropout=0.5).train()
    m.dropout_rng = "torch"
    y = m(make_inputs([6, 4]))
    assert 0.3 < (y[0] == 0).float().mean().item() < 0.7


# ---- bad input -------------------------------------------------------------
@pytest.mark.parametrize(
    "ctor,exc,word",
    [
        (lambda: R.VGMR([5], d=4), ValueError, "widths"),
        (lambda: R.VGMR("ab", d=4), TypeError, "widths"),
        (lambda: R.VGMR([5, 0], d=4), ValueError, "widths"),
        (lambda: R.VGMR([5, 3], d=0), ValueError, "d"),
        (lambda: R.VGMR([5, 3], dropout=1.0), ValueError, "p"),
        (lambda: R.VGMR([5, 3], alpha=-0.1), ValueError, "alpha"),
        (lambda: R.VGMR([5, 3], beta=2.0), ValueError, "beta"),
        (lambda: R.VGMR([5, 3], projection="conv"), ValueError, "projection"),
    ],
)
def test_bad_constructor(ctor, exc, word):
    with pytest.raises(exc, match=word):
        ctor()


def _bad_cases():
    x0, x1 = torch.randn(2, 3, 5), torch.randn(2, 4, 3)
    return [
        ([x0], None, ValueError, "expected 2 modalities"),
        ([x0, torch.randn(3, 4, 3)], None, ValueError, r"xs\[1\].*batch size"),
        ([x0, torch.randn(2, 4, 6)], None, ValueError, r"xs\[1\].*D=3"),
        ([x0, torch.randn(2, 3)], None, ValueError, r"xs\[1\].*shape"),
        ([x0, torch.randint(0, 3, (2, 4, 3))], None, TypeError, r"xs\[1\].*floating"),
        ([x0, x1], [torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)], ValueError, r"masks\[1\].*shape"),
        ([x0, x1], [torch.ones(2, 3), None], TypeError, r"masks\[0\].*bool"),
        ([x0, x1], [None], ValueError, "masks"),
        (x0, None, TypeError, "xs"),
        ({"a": x0}, None, ValueError, "xs"),
    ]


@pytest.mark.parametrize("xs,masks,exc,pattern", _bad_cases())
def test_bad_input(xs, masks, exc, pattern):
    m = R.VGMR([5, 3], d=4)
    with pytest.raises(exc, match=pattern):
        m(xs, masks)


def test_bad_input_devices():
    meta = torch.empty(2, 4, 3, device="meta")
    m = R.VGMR([5, 3], d=4)
    with pytest.raises(ValueError, match=r"xs\[1\].*meta"):
        m([torch.randn(2, 3, 5), meta])
