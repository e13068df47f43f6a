"""summary_pool (docs/math.md §1, docs/ops.md) against vgmr_fast.reference.summary_pool.

Forward (mean, max), the saved argmax and the gradient, judged by the docs/math.md §9 rule
(truth = reference in float64 on the upcast inputs).
"""
from __future__ import annotations

import pytest
import torch

from helpers import BACKENDS, DTYPES, assert_close_to_truth, assert_no_nan, cap, gen, noncontig
from vgmr_fast import ops
from vgmr_fast import reference as ref

pytestmark = pytest.mark.usefixtures("vgmr_debug_nan_fill")

SHAPES = [(2, 8, 64), (1, 1, 1), (3, 7, 35), (2, 5, 74), (1, 4, 1023), (4, 1, 3), (2, 3, 1), (3, 6, 300)]
MASKS = ["none", "some", "all_masked_row"]


def make(B, T, D, dtype, mask_kind, seed, device="cpu"):
    g = gen(seed)
    h = torch.randn(B, T, D, generator=g).to(dtype)
    if mask_kind == "none":
        mask = None
    else:
        mask = torch.rand(B, T, generator=g) > 0.35
        mask[:, 0] |= mask_kind == "some"  # at least one valid step per row
        if mask_kind == "all_masked_row":
            mask[0] = False
            if B > 1:
                mask[-1] = True
    return h.to(device), None if mask is None else mask.to(device)


def run_both(h, mask, backend, dmean, dmax):
    """(mean, max, dh) of the fused op, the reference in h's dtype, and the float64 truth."""
    out = []
    for fn, x in (
        (lambda a, m: ops.summary_pool(a, m, backend=backend), h),
        (ref.summary_pool, h),
        (ref.summary_pool, h.double()),
    ):
        x = x.detach().clone().requires_grad_(True)
        mean, mx = fn(x, mask)
        (dh,) = torch.autograd.grad((mean, mx), (x,), (dmean.to(x.dtype), dmax.to(x.dtype)))
        out.append((mean, mx, dh))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(backend, dtype, mask_kind, shape):
    B, T, D = shape
    dev = cap(backend, B * T, dtype)
    h, mask = make(B, T, D, dtype, mask_kind, seed=B * 1000 + T * 10 + D)
    h, mask = h.to(dev), None if mask is None else mask.to(dev)
    g = gen(7)
    dmean = torch.randn(B, D, generator=g).to(dev)
    dmax = torch.randn(B, D, generator=g).to(dev)
    (fm, fx, fdh), (rm, rx, rdh), (tm, tx, tdh) = run_both(h, mask, backend, dmean, dmax)
    assert_close_to_truth(fm, rm, tm, dtype, name="mean", backend=backend)
    assert_close_to_truth(fx, rx, tx, dtype, name="max", backend=backend)
    assert_close_to_truth(fdh, rdh, tdh, dtype, name="dh", backend=backend)
    assert_no_nan(fm, fx, fdh, name="summary_pool")
    if mask_kind == "all_masked_row":
        assert torch.all(fm[0] == 0) and torch.all(fx[0] == 0)
        assert torch.all(fdh[0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_argmax_first_valid_maximal(backend, mask_kind):
    B, T, D = 3, 9, 37
    dev = cap(backend, B * T)
    # bf16 with few distinct values: many ties
    g = gen(3)
    h = torch.randint(-3, 4, (B, T, D), generator=g).to(torch.bfloat16).to(dev)
    _, mask = make(B, T, D, torch.bfloat16, mask_kind, seed=5)
    mask = None if mask is None else mask.to(dev)
    ns = ops.backend.namespace(backend)
    mean, mx, arg = ns.summary_pool(h.contiguous(), mask)
    assert arg.dtype == torch.int32
    filled = h.float() if mask is None else h.float().masked_fill(~mask.unsqueeze(-1), float("-inf"))
    vals, idx = torch.max(filled, dim=1)
    if mask is not None:
        empty = ~mask.any(dim=1)
        idx = torch.where(empty.unsqueeze(-1), torch.full_like(idx, -1), idx)
        vals = torch.where(empty.unsqueeze(-1), torch.zeros_like(vals), vals)
    assert torch.equal(arg.long().cpu(), idx.cpu())
    assert torch.equal(mx.float().cpu(), vals.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_send_gradient_to_first_maximal_step(backend):
    B, T, D = 2, 6, 16
    dev = cap(backend, B * T)
    h = torch.zeros(B, T, D, dtype=torch.bfloat16)
    h[:, 1] = 1.0
    h[:, 4] = 1.0  # tie between steps 1 and 4
    h[1, 5, :8] = 1.0  # a third tied step in half the columns
    h = (h + torch.randint(-2, 0, (B, T, D), generator=gen(1)).to(torch.bfloat16) * (h == 0)).to(dev)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 1] = False  # row 1: step 1 masked, first valid maximal step is 4
    mask = mask.to(dev)
    x = h.clone().requires_grad_(True)
    _, mx = ops.summary_pool(x, mask, backend=backend)
    dmax = torch.randn(B, D, generator=gen(2)).to(torch.bfloat16).to(dev)
    (dh,) = torch.autograd.grad(mx, x, dmax)
    expect = torch.zeros(B, T, D, dtype=torch.bfloat16, device=dev)
    expect[0, 1] = dmax[0]
    expect[1, 4] = dmax[1]
    assert torch.equal(dh, expect)
    # the reference agrees (torch.max semantics)
    xr = h.clone().requires_grad_(True)
    _, rmx = ref.summary_pool(xr, mask)
    (rdh,) = torch.autograd.grad(rmx, xr, dmax)
    assert torch.equal(dh, rdh)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_counts_as_maximal(backend):
    dev = cap(backend, 8)
    h = torch.randn(2, 4, 5, generator=gen(0))
    h[0, 2, 1] = float("nan")
    h[0, 3, 1] = float("nan")
    h[1, 0, 4] = float("nan")
    h = h.to(dev)
    _, mx, arg = ops.backend.namespace(backend).summary_pool(h, None)
    vals, idx = torch.max(h.cpu(), dim=1)
    assert torch.equal(arg.long().cpu(), idx)
    assert torch.equal(torch.isnan(mx.cpu()), torch.isnan(vals))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_non_contiguous_inputs(backend, dtype):
    B, T, D = 3, 5, 33
    dev = cap(backend, B * T)
    h, mask = make(B, T, D, dtype, "some", seed=11)
    h = h.to(dev)
    mask = mask.to(dev)
    h_nc = noncontig(h)
    mask_nc = torch.stack([mask, ~mask], dim=-1)[..., 0]  # a strided view
    assert not h_nc.is_contiguous() and not mask_nc.is_contiguous()
    dmean = torch.randn(B, D, generator=gen(1)).to(dev)
    dmax = torch.randn(B, D, generator=gen(2)).to(dev)
    (fm, fx, fdh), (rm, rx, rdh), (tm, tx, tdh) = run_both(h_nc, mask_nc, backend, dmean, dmax)
    assert_close_to_truth(fm, rm, tm, dtype, name="mean", backend=backend)
    assert_close_to_truth(fx, rx, tx, dtype, name="max", backend=backend)
    assert_close_to_truth(fdh, rdh, tdh, dtype, name="dh", backend=backend)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_gradcheck_float64(mask_kind):
    h, mask = make(2, 5, 6, torch.float64, mask_kind, seed=4)
    h.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ops.summary_pool(a, mask, backend="cpu"), (h,))


def test_only_one_output_used():
    h = torch.randn(2, 3, 4, requires_grad=True)
    mean, _ = ops.summary_pool(h)
    mean.sum().backward()
    assert torch.allclose(h.grad, torch.full_like(h, 1 / 3))
    h.grad = None
    _, mx = ops.summary_pool(h)
    mx.sum().backward()
    assert torch.equal(h.grad.sum(dim=1), torch.ones(2, 4))


def test_large_batch_parallel_matches_serial():
    # many (b, column chunk) tasks; the result must not depend on the thread count
    h, mask = make(16, 40, 700, torch.float32, "some", seed=9)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.summary_pool(h, mask)
        torch.set_num_threads(max(2, old))
        b = ops.summary_pool(h, mask)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- argument checks -------------------------------------------------------------------
@pytest.mark.parametrize(
    "make_args, exc, match",
    [
        (lambda: ([1.0],), TypeError, "h"),
        (lambda: (torch.ones(2, 3, 4, dtype=torch.int32),), TypeError, "h"),
        (lambda: (torch.ones(2, 3),), ValueError, "h"),
        (lambda: (torch.ones(2, 3, 4), torch.ones(2, 3)), TypeError, "mask"),
        (lambda: (torch.ones(2, 3, 4), torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
        (lambda: (torch.ones(2, 3, 4), torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
        (lambda: (torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError, "mask"),
    ],
)
def test_bad_arguments(make_args, exc, match):
    with pytest.raises(exc, match=match):
        ops.summary_pool(*make_args())


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        ops.summary_pool(torch.ones(1, 2, 3), backend="gpu")


def test_cpp_checks_raise_not_crash():
    op = torch.ops.vgmr.summary_pool
    with pytest.raises((ValueError, RuntimeError), match="h"):
        op(torch.ones(2, 3), None)
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        op(torch.ones(2, 4, 3).transpose(1, 2), None)
    with pytest.raises((TypeError, RuntimeError), match="mask"):
        op(torch.ones(2, 3, 4), torch.ones(2, 3))
    with pytest.raises((ValueError, RuntimeError), match="mask"):
        op(torch.ones(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))
    bwd = torch.ops.vgmr.summary_pool_backward
    with pytest.raises((ValueError, RuntimeError), match="argmax"):
        bwd(torch.ones(2, 4), torch.ones(2, 4), None, torch.zeros(2, 5, dtype=torch.int32), 3)
    with pytest.raises((TypeError, RuntimeError), match="argmax"):
        bwd(torch.ones(2, 4), torch.ones(2, 4), None, torch.zeros(2, 4, dtype=torch.int64), 3)
    with pytest.raises((ValueError, RuntimeError), match="T"):
        bwd(torch.ones(2, 4), torch.ones(2, 4), None, torch.zeros(2, 4, dtype=torch.int32), -1)


# ---- torch.compile ---------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    h, mask = make(3, 5, 7, torch.float32, "all_masked_row", seed=2)

    def f(x, m):
        mean, mx = ops.summary_pool(x, m)
        return (mean * 2 + mx).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    x1 = h.clone().requires_grad_(True)
    x2 = h.clone().requires_grad_(True)
    f(x1, mask).backward()
    cf(x2, mask).backward()
    assert torch.equal(x1.grad, x2.grad)
