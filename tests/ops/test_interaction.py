"""interaction (docs/math.md §2, docs/ops.md) against vgmr_fast.reference.interaction."""
from __future__ import annotations

import pytest
import torch

from helpers import BACKENDS, DTYPES, assert_close_to_truth, assert_no_nan, cap, gen, noncontig
from vgmr_fast import ops
from vgmr_fast import reference as ref

pytestmark = pytest.mark.usefixtures("vgmr_debug_nan_fill")


def run_all(s, backend, du):
    out = []
    for fn, x in (
        (lambda a: ops.interaction(a, backend=backend), s),
        (ref.interaction, s),
        (ref.interaction, s.double()),
    ):
        x = x.detach().clone().requires_grad_(True)
        u = fn(x)
        (ds,) = torch.autograd.grad(u, x, du.to(x.dtype))
        out.append((u, ds))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("B,D", [(3, 1), (2, 3), (3, 35), (1, 74), (2, 1023)])
def test_forward_backward(backend, dtype, M, B, D):
    dev = cap(backend, B * M, dtype)
    s = torch.randn(B, M, D, generator=gen(M * 100 + D)).to(dtype).to(dev)
    du = torch.randn(B, M, (3 * M - 1) * D, generator=gen(1)).to(dev)
    (fu, fds), (ru, rds), (tu, tds) = run_all(s, backend, du)
    assert_close_to_truth(fu, ru, tu, dtype, name="u", backend=backend)
    assert_close_to_truth(fds, rds, tds, dtype, name="ds", backend=backend)
    assert_no_nan(fu, fds, name="interaction")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [2, 3, 4])
def test_abs_gradient_at_zero(backend, M):
    # s_m == s_j on some channels: d|x|/dx = 0 there (torch.abs), not +-1
    B, D = 2, 16
    dev = cap(backend, B * M)
    s = torch.randn(B, M, D, generator=gen(5))
    s[:, 1, : D // 2] = s[:, 0, : D // 2]
    s = s.to(dev)
    du = torch.zeros(B, M, (3 * M - 1) * D, device=dev)
    n = M - 1
    # gradient only through the discrepancy blocks
    du[:, :, (1 + 2 * n) * D : (1 + 3 * n) * D] = torch.randn(B, M, n * D, generator=gen(6)).to(dev)
    x = s.clone().requires_grad_(True)
    (ds,) = torch.autograd.grad(ops.interaction(x, backend=backend), x, du)
    xr = s.double().clone().requires_grad_(True)
    (rds,) = torch.autograd.grad(ref.interaction(xr), xr, du.double())
    torch.testing.assert_close(ds.double(), rds, rtol=1e-6, atol=1e-6)
    # channels where s_0 == s_1 get no contribution from the pair (0, 1)
    assert torch.isfinite(ds).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    B, M, D = 3, 3, 21
    dev = cap(backend, B * M)
    s = noncontig(torch.randn(B, M, D, generator=gen(2)).to(dev))
    assert not s.is_contiguous()
    du = torch.randn(B, M, 8 * D, generator=gen(3)).to(dev)
    (fu, fds), (ru, rds), (tu, tds) = run_all(s, backend, du)
    assert_close_to_truth(fu, ru, tu, torch.float32, name="u", backend=backend)
    assert_close_to_truth(fds, rds, tds, torch.float32, name="ds", backend=backend)


@pytest.mark.parametrize("M", [2, 3, 4])
def test_gradcheck_float64(M):
    s = torch.randn(2, M, 5, dtype=torch.float64, generator=gen(M)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ops.interaction(a, backend="cpu"), (s,))


def test_layout_blocks():
    # u[:, m] = [s_m; s_j...; s_m*s_j...; |s_m - s_j|...; mean_j s_j] (exact in float32)
    s = torch.randn(2, 3, 4, generator=gen(0))
    u = ops.interaction(s, backend="cpu").view(2, 3, 8, 4)
    assert torch.equal(u[:, 1, 0], s[:, 1])
    assert torch.equal(u[:, 1, 1], s[:, 0]) and torch.equal(u[:, 1, 2], s[:, 2])
    assert torch.equal(u[:, 1, 3], s[:, 1] * s[:, 0]) and torch.equal(u[:, 1, 4], s[:, 1] * s[:, 2])
    assert torch.equal(u[:, 1, 5], (s[:, 1] - s[:, 0]).abs()) and torch.equal(u[:, 1, 6], (s[:, 1] - s[:, 2]).abs())
    torch.testing.assert_close(u[:, 1, 7], (s[:, 0] + s[:, 2]) / 2)


@pytest.mark.parametrize(
    "arg, exc, match",
    [
        ("not a tensor", TypeError, "s"),
        (torch.ones(2, 3, 4, dtype=torch.int64), TypeError, "s"),
        (torch.ones(2, 3), ValueError, "s"),
        (torch.ones(2, 1, 4), ValueError, "M >= 2"),
    ],
)
def test_bad_arguments(arg, exc, match):
    with pytest.raises(exc, match=match):
        ops.interaction(arg)


def test_cpp_checks_raise_not_crash():
    with pytest.raises((ValueError, RuntimeError), match="M >= 2"):
        torch.ops.vgmr.interaction(torch.ones(2, 1, 4))
    with pytest.raises((ValueError, RuntimeError), match="du"):
        torch.ops.vgmr.interaction_backward(torch.ones(2, 3, 5), torch.ones(2, 3, 4))
    with pytest.raises((TypeError, RuntimeError), match="s"):
        torch.ops.vgmr.interaction(torch.ones(2, 3, 4, dtype=torch.int32))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    s = torch.randn(3, 3, 5, generator=gen(1))
    w = torch.randn(3, 3, 40, generator=gen(2))

    def f(x):
        return (ops.interaction(x) * w).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    x1 = s.clone().requires_grad_(True)
    x2 = s.clone().requires_grad_(True)
    f(x1).backward()
    cf(x2).backward()
    assert torch.equal(x1.grad, x2.grad)
