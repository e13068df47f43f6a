"""gate_norm (docs/math.md §5, docs/ops.md) against vgmr_fast.reference.gate_norm.

Forward and all five gradients by the docs/math.md §9 rule, dropout from the shared Philox
stream (same mask as the reference for the same seed), determinism of the reductions.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import BACKENDS, DTYPES, assert_close_to_truth, assert_no_nan, cap, gate_norm_inputs, noncontig
from vgmr_fast import ops
from vgmr_fast import reference as ref
from vgmr_fast.ops import dropout

pytestmark = pytest.mark.usefixtures("vgmr_debug_nan_fill")

ALPHA, BETA = 0.5, 0.2
BIG_SEED = 1099511627779  # > 2**32: both key words non-zero
SHAPES = [(2, 8, 64), (1, 1, 1023), (3, 7, 35), (2, 5, 74), (1, 1, 1), (2, 3, 3), (1, 1, 1500), (2, 4, 1023)]
NAMES = ["y", "dzpre", "dbias_row", "dx", "dln_weight", "dln_bias"]


def fwd_bwd(fn, args, dy):
    args = [a.detach().clone().requires_grad_(True) for a in args]
    y = fn(*args)
    grads = torch.autograd.grad(y, args, dy.to(y.dtype))
    return [y, *grads]


def run_all(args, dy, backend, p=0.0, seed=0, alpha=ALPHA, beta=BETA):
    """[y, dzpre, dbias_row, dx, dln_weight, dln_bias] for fused, reference (same dtype), truth (float64)."""

    def fused(*a):
        return ops.gate_norm(*a, alpha=alpha, beta=beta, p=p, seed=seed, backend=backend)

    def eager(*a):
        return ref.gate_norm(*a, alpha=alpha, beta=beta, p=p, seed=seed)

    f = fwd_bwd(fused, args, dy)
    r = fwd_bwd(eager, args, dy)
    t = fwd_bwd(eager, [a.double() for a in args], dy.double())
    return f, r, t


def check_all(f, r, t, args, backend):
    dtypes = [args[2].dtype, args[0].dtype, args[1].dtype, args[2].dtype, args[3].dtype, args[4].dtype]
    for name, a, b, c, dt in zip(NAMES, f, r, t, dtypes):
        assert_close_to_truth(a, b, c, dt, name=name, backend=backend)
    assert_no_nan(*f, name="gate_norm")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(backend, dtype, p, shape):
    B, T, D = shape
    dev = cap(backend, B * T, dtype)
    args, dy = gate_norm_inputs(B, T, D, dtype, seed=B * 7919 + T * 31 + D, device=dev)
    f, r, t = run_all(args, dy, backend, p=p, seed=1234 + D)
    check_all(f, r, t, args, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 300, 768), (3, 50, 35), (1, 40, 3000), (2, 33, 1024), (2, 32, 74)],
                         ids=lambda s: "x".join(map(str, s)))
def test_many_rows(backend, shape):
    # several row blocks and backward chunks per batch row; D above the CPU block size
    B, T, D = shape
    dev = cap(backend, B * T)
    args, dy = gate_norm_inputs(B, T, D, torch.float32, seed=D, device=dev)
    f, r, t = run_all(args, dy, backend, p=0.1, seed=BIG_SEED)
    check_all(f, r, t, args, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha,beta", [(0.0, 0.2), (1.0, 0.0), (0.5, 1.0), (0.3, 0.7), (1.3, 0.0)])
def test_alpha_beta(backend, alpha, beta):
    # alpha = 0: a neutral gate, beta = 1: identity gating; either way dzpre = dbias_row = 0 exactly.
    dev = cap(backend, 12)
    args, dy = gate_norm_inputs(3, 4, 37, torch.float32, seed=17, device=dev)
    f, r, t = run_all(args, dy, backend, p=0.1, seed=5, alpha=alpha, beta=beta)
    check_all(f, r, t, args, backend)
    if alpha == 0.0 or beta == 1.0:
        assert bool((f[1] == 0).all()) and bool((f[2] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_non_contiguous_inputs(backend, dtype):
    B, T, D = 2, 5, 37
    dev = cap(backend, B * T)
    args, dy = gate_norm_inputs(B, T, D, dtype, seed=3, device=dev)
    zpre, bias_row, x, w, b = args
    nc = [noncontig(zpre), noncontig(bias_row), x.transpose(0, 1).contiguous().transpose(0, 1), noncontig(w),
          noncontig(b)]
    assert not any(t.is_contiguous() for t in nc)
    f, r, t = run_all(nc, dy, backend, p=0.2, seed=9)
    check_all(f, r, t, args, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_side_inputs_in_other_dtypes(backend):
    # bias_row / ln_weight / ln_bias in bf16 (a half module): cast to fp32, gradients come back in bf16
    dev = cap(backend, 6)
    args, dy = gate_norm_inputs(2, 3, 19, torch.bfloat16, seed=4, device=dev)
    args = [args[0], args[1].bfloat16(), args[2], args[3].bfloat16(), args[4].bfloat16()]
    f, r, t = run_all(args, dy, backend)
    for g, a in zip(f[1:], args):
        assert g.dtype == a.dtype
    check_all(f, r, t, args, backend)


# ---- dropout ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 20261123, BIG_SEED])
def test_dropout_mask_is_the_shared_stream(backend, seed):
    B, T, D = 2, 6, 37
    dev = cap(backend, B * T)
    p = 0.4
    args, _ = gate_norm_inputs(B, T, D, torch.float32, seed=seed % 1000, device=dev)
    y = ops.gate_norm(*args, p=p, seed=seed, backend=backend)
    keep = dropout.keep_mask(seed, B * T, D, p).view(B, T, D)
    assert torch.equal((y != 0).cpu(), keep)
    y_ref = ref.gate_norm(*args, p=p, seed=seed)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate_and_seeds(backend):
    B, T, D = (2, 16, 1000) if backend != "triton" else (1, 16, 1000)
    dev = cap(backend, B * T)
    args, _ = gate_norm_inputs(B, T, D, torch.float32, seed=1, device=dev)
    n = B * T * D
    for p in (0.1, 0.5, 0.9):
        y = ops.gate_norm(*args, p=p, seed=77, backend=backend)
        rate = float((y != 0).float().mean())
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(rate - (1 - p)) < 4 * sigma, (p, rate)
        y2 = ops.gate_norm(*args, p=p, seed=77, backend=backend)
        assert torch.equal(y, y2)  # same seed -> same mask and values
        y3 = ops.gate_norm(*args, p=p, seed=78, backend=backend)
        assert not torch.equal(y != 0, y3 != 0)
    y0 = ops.gate_norm(*args, p=0.0, seed=77, backend=backend)
    assert bool((y0 != 0).all())
    assert torch.equal(y0, ops.gate_norm(*args, p=0.0, seed=5, backend=backend))  # p = 0: seed unused


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_kept_values_scaled(backend):
    # ln_weight = 0, ln_bias = 1: y is exactly the keep factor, 1/(1-p) or 0
    B, T, D = 3, 2, 6
    dev = cap(backend, B * T)
    args, _ = gate_norm_inputs(1, B * T, D, torch.float32, seed=2, device=dev)
    zpre, _, x, _, _ = args
    y = ops.gate_norm(zpre, torch.zeros(1, D, device=dev), x, torch.zeros(D, device=dev),
                      torch.ones(D, device=dev), p=0.5, seed=20261123, backend=backend)
    expect = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 1]], dtype=torch.float32)
    assert torch.equal(y.view(B * T, D)[:3].cpu(), 2 * expect)


# ---- float64 gradcheck (CPU kernels) ---------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.35])
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 2, 1), (2, 2, 9)], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_float64(p, shape):
    args, _ = gate_norm_inputs(*shape, torch.float64, seed=sum(shape))
    args = [a.double().requires_grad_(True) for a in args]
    assert torch.autograd.gradcheck(
        lambda *a: ops.gate_norm(*a, alpha=0.7, beta=0.1, p=p, seed=BIG_SEED, backend="cpu"), args
    )


# ---- determinism of the reductions -----------------------------------------------------------
def test_backward_deterministic_across_thread_counts():
    args, dy = gate_norm_inputs(4, 200, 300, torch.float32, seed=8)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = fwd_bwd(lambda *x: ops.gate_norm(*x, p=0.1, seed=3), args, dy)
        torch.set_num_threads(max(2, old))
        b = fwd_bwd(lambda *x: ops.gate_norm(*x, p=0.1, seed=3), args, dy)
        c = fwd_bwd(lambda *x: ops.gate_norm(*x, p=0.1, seed=3), args, dy)
    finally:
        torch.set_num_threads(old)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(v, w)


def test_saved_stats_are_fp32():
    args, _ = gate_norm_inputs(2, 3, 8, torch.bfloat16, seed=0)
    zpre, bias_row, x, w, b = args
    y, mean, rstd = torch.ops.vgmr.gate_norm(zpre, bias_row, x, w, b, ALPHA, BETA, 0.0, torch.tensor(0))
    assert y.dtype == torch.bfloat16 and mean.dtype == torch.float32 and rstd.dtype == torch.float32
    assert mean.shape == (2, 3) and rstd.shape == (2, 3)


def test_empty_rows():
    args, _ = gate_norm_inputs(0, 3, 8, torch.float32, seed=0)
    y = ops.gate_norm(*args)
    assert y.shape == (0, 3, 8)


# ---- argument checks --------------------------------------------------------------------------
def _good():
    args, _ = gate_norm_inputs(2, 3, 4, torch.float32, seed=0)
    return args


@pytest.mark.parametrize(
    "mutate, kw, exc, match",
    [
        (lambda a: [a[0].half()] + a[1:], {}, TypeError, "zpre"),
        (lambda a: [a[0], a[1], a[2].int(), a[3], a[4]], {}, TypeError, "x"),
        (lambda a: [a[0], a[1].long(), a[2], a[3], a[4]], {}, TypeError, "bias_row"),
        (lambda a: [a[0], a[1], a[2][0], a[3], a[4]], {}, ValueError, "x"),
        (lambda a: [a[0][:, :2], a[1], a[2], a[3], a[4]], {}, ValueError, "zpre"),
        (lambda a: [a[0], torch.zeros(2, 5), a[2], a[3], a[4]], {}, ValueError, "bias_row"),
        (lambda a: [a[0], a[1], a[2], torch.ones(5), a[4]], {}, ValueError, "ln_weight"),
        (lambda a: [a[0], a[1], a[2], a[3], torch.ones(2, 4)], {}, ValueError, "ln_bias"),
        (lambda a: [a[0], a[1].to("meta"), a[2], a[3], a[4]], {}, ValueError, "bias_row"),
        (lambda a: a, {"p": 1.0}, ValueError, "p"),
        (lambda a: a, {"p": -0.1}, ValueError, "p"),
        (lambda a: a, {"p": "0.1"}, TypeError, "p"),
        (lambda a: a, {"seed": -1}, ValueError, "seed"),
        (lambda a: a, {"seed": 2**63}, ValueError, "seed"),
        (lambda a: a, {"seed": 1.5}, TypeError, "seed"),
        (lambda a: a, {"alpha": None}, TypeError, "alpha"),
        (lambda a: a, {"backend": "nope"}, ValueError, "backend"),
        (lambda a: ["zpre"] + a[1:], {}, TypeError, "zpre"),
    ],
)
def test_bad_arguments(mutate, kw, exc, match):
    with pytest.raises(exc, match=match):
        ops.gate_norm(*mutate(_good()), **kw)


def test_cpp_checks_raise_not_crash():
    zpre, bias_row, x, w, b = _good()
    op = torch.ops.vgmr.gate_norm
    s0 = torch.tensor(0)  # the raw ops take the seed as a one-element int64 tensor
    with pytest.raises((ValueError, RuntimeError), match="bias_row"):
        op(zpre, bias_row[:, :3].contiguous(), x, w, b, ALPHA, BETA, 0.0, s0)
    with pytest.raises((TypeError, RuntimeError), match="ln_weight"):
        op(zpre, bias_row, x, w.double(), b, ALPHA, BETA, 0.0, s0)
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        op(zpre.transpose(0, 1), bias_row, x.transpose(0, 1), w, b, ALPHA, BETA, 0.0, s0)
    with pytest.raises((ValueError, RuntimeError), match="p must be"):
        op(zpre, bias_row, x, w, b, ALPHA, BETA, 1.5, s0)
    with pytest.raises((ValueError, RuntimeError), match="seed"):
        op(zpre, bias_row, x, w, b, ALPHA, BETA, 0.1, torch.tensor([3, 4]))
    y, mean, rstd = op(zpre, bias_row, x, w, b, ALPHA, BETA, 0.0, s0)
    bwd = torch.ops.vgmr.gate_norm_backward
    with pytest.raises((ValueError, RuntimeError), match="mean"):
        bwd(y, zpre, bias_row, x, w, mean[:1].contiguous(), rstd, ALPHA, BETA, 0.0, s0)
    with pytest.raises((TypeError, RuntimeError), match="dy"):
        bwd(y.double(), zpre, bias_row, x, w, mean, rstd, ALPHA, BETA, 0.0, s0)


# ---- torch.compile -----------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    args, dy = gate_norm_inputs(2, 5, 12, torch.float32, seed=6)

    def f(zpre, bias_row, x, w, b):
        y = ops.gate_norm(zpre, bias_row, x, w, b, alpha=0.4, beta=0.3, p=0.25, seed=99)
        return (y * dy).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    a1 = [a.clone().requires_grad_(True) for a in args]
    a2 = [a.clone().requires_grad_(True) for a in args]
    l1 = f(*a1)
    l2 = cf(*a2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    for u, v in zip(a1, a2):
        torch.testing.assert_close(u.grad, v.grad, rtol=1e-6, atol=1e-6)


# ---- the 8-lane CPU kernels (AVX2 / x86-64 baseline) on an AVX-512 machine too ------------------
@pytest.fixture
def narrow_simd():
    from vgmr_fast.ops import backend

    old = backend._C.set_force_narrow_simd(True)
    yield
    backend._C.set_force_narrow_simd(old)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(2, 8, 64), (3, 7, 35), (2, 5, 74), (1, 1, 1), (2, 3, 3), (1, 3, 1500)],
                         ids=lambda s: "x".join(map(str, s)))
def test_narrow_simd_path(narrow_simd, dtype, p, shape):
    args, dy = gate_norm_inputs(*shape, dtype, seed=sum(shape) + 1)
    f, r, t = run_all(args, dy, "cpu", p=p, seed=31)
    check_all(f, r, t, args, "cpu")
