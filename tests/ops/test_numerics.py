"""gate_norm's row statistics (docs/ops.md), on every backend:

- shift each row by its first element K = v[0], then two passes; a row constant along D gives
  exactly ``ln_bias`` (the unshifted statistics were off by ~5e-5 at |x| ~ 1, ~2e-3 at ~100);
- rows with a large common offset keep their accuracy against the float64 truth;
- a float32 row whose (v - K)^2 overflows gives non-finite outputs and gradients, never a
  silent ``ln_bias``; the other rows are unaffected;
- the saved statistics: mean = K + mean_s, rstd as before.
"""
from __future__ import annotations

import pytest
import torch

from helpers import BACKENDS, cap, gate_norm_inputs, gen, kernel_cast
from vgmr_fast import ops
from vgmr_fast import reference as ref

pytestmark = pytest.mark.usefixtures("vgmr_debug_nan_fill")

ALPHA, BETA = 0.5, 0.2
DS = [1, 3, 8, 35, 74, 768, 1023, 4099]


def _constant_rows(B, T, D, magnitude, dtype, device):
    """Inputs whose v = Geff * x is constant along D in every row (per-row constants)."""
    g = gen(D)
    zrow = torch.randn(B, T, 1, generator=g)
    xrow = magnitude * (1 + 0.5 * torch.rand(B, T, 1, generator=g)) * torch.sign(torch.randn(B, T, 1, generator=g))
    zpre = zrow.expand(B, T, D).to(dtype).contiguous()
    x = xrow.expand(B, T, D).to(dtype).contiguous()
    bias_row = torch.full((B, D), 0.125)
    w = 1 + 0.3 * torch.randn(D, generator=g)
    b = 0.3 * torch.randn(D, generator=g)
    return [t.to(device) for t in (zpre, bias_row, x, w, b)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("magnitude", [1.0, 100.0], ids=["x~1", "x~100"])
@pytest.mark.parametrize("D", DS)
def test_row_constant_along_D_gives_exactly_ln_bias(backend, dtype, magnitude, D):
    B, T = 2, 3
    dev = cap(backend, B * T, dtype)
    args = _constant_rows(B, T, D, magnitude, dtype, dev)
    args = [a.requires_grad_(True) for a in args]
    y = ops.gate_norm(*args, alpha=ALPHA, beta=BETA, backend=backend)
    want = kernel_cast(backend, args[4].detach(), dtype).expand(B, T, D)
    assert torch.equal(y.detach(), want), (y.detach() - want).abs().max()
    # the saved mean is the row's value itself and the backward is finite (vhat = 0 exactly)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    _, mean, rstd = ops.backend.namespace(ops.resolve(backend, args[2])).gate_norm(
        *[a.detach().to(pdt) if i in (1, 3, 4) else a.detach() for i, a in enumerate(args)],
        ALPHA, BETA, 0.0, torch.zeros((), dtype=torch.int64, device=dev))
    zb = args[0].detach().to(pdt) + args[1].detach()[:, None, :]
    v = ref.gate_transform(zb, ALPHA, BETA) * args[2].detach().to(pdt)
    torch.testing.assert_close(mean, v[..., 0], rtol=1e-6 if pdt == torch.float32 else 1e-14, atol=0)
    torch.testing.assert_close(rstd, torch.full_like(rstd, 1e-5).rsqrt(), rtol=1e-6, atol=0)  # var = 0
    dy = torch.randn(B, T, D, generator=gen(1)).to(dtype).to(dev)
    grads = torch.autograd.grad(y, args, dy)
    for gr in grads:
        assert bool(torch.isfinite(gr).all())
    # d ln_bias = sum dy exactly as the reference; d ln_weight = sum dy * vhat = 0
    assert bool((grads[3] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [35, 768, 1023])
def test_large_common_offset_keeps_accuracy(backend, D):
    # Rows ~100 + O(1e-2): the statistics of v - K are well-conditioned; fp32 results stay
    # close to the float64 truth (the unshifted one-pass-mean statistics lost ~3 digits here).
    B, T = 2, 3
    (zpre, bias_row, x, w, b), _ = gate_norm_inputs(B, T, D, torch.float32, seed=7, device=cap(backend, B * T))
    args = [zpre, bias_row, 100 + 0.01 * x, w, b]
    y = ops.gate_norm(*args, alpha=ALPHA, beta=BETA, backend=backend)
    truth = ref.gate_norm(*[a.double() for a in args], alpha=ALPHA, beta=BETA)
    eager = ref.gate_norm(*args, alpha=ALPHA, beta=BETA)
    err = (y.double() - truth).abs().max().item()
    err_eager = (eager.double() - truth).abs().max().item()
    assert err <= max(2 * err_eager, 1e-4), (err, err_eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [8, 35, 1023])
def test_overflowing_row_is_non_finite_never_ln_bias(backend, D):
    # |v - K| ~ 1e20: (v - K)^2 overflows float32. The row's outputs and gradients are NaN, not
    # ln_bias; the neighbouring rows are right as usual. (Eager's CPU layer_norm gives NaN for
    # some D and silently ln_bias for others, e.g. D = 35: the fused op is NaN for every D.)
    B, T = 1, 3
    dev = cap(backend, B * T)
    g = gen(3)
    zpre = torch.zeros(B, T, D)
    bias_row = torch.zeros(B, D)
    x = torch.randn(B, T, D, generator=g)
    x[0, 1] = torch.randn(D, generator=g) * 3e19
    w = torch.ones(D)
    b = torch.full((D,), 0.25)
    args = [t.to(dev).requires_grad_(True) for t in (zpre, bias_row, x, w, b)]
    y = ops.gate_norm(*args, alpha=ALPHA, beta=BETA, backend=backend)
    eager = ref.gate_norm(*[a.detach() for a in args], alpha=ALPHA, beta=BETA)
    assert not bool(torch.isfinite(y[0, 1]).any())
    assert not bool((y[0, 1] == b.to(dev)).any())
    for t in (0, 2):
        assert bool(torch.isfinite(y[0, t]).all())
        torch.testing.assert_close(y[0, t], eager[0, t], rtol=1e-5, atol=1e-5)
    dy = torch.randn(B, T, D, generator=gen(4)).to(dev)
    dzpre, _, dx, _, _ = torch.autograd.grad(y, args, dy)
    assert not bool(torch.isfinite(dx[0, 1]).any())
    assert bool(torch.isfinite(dx[0, 0]).all()) and bool(torch.isfinite(dx[0, 2]).all())


def test_row_with_inf_input_is_non_finite():
    D = 9
    x = torch.randn(1, 2, D, generator=gen(5))
    x[0, 0, 4] = float("inf")
    args = [torch.zeros(1, 2, D), torch.zeros(1, D), x, torch.ones(D), torch.full((D,), 0.5)]
    y = ops.gate_norm(*args)
    assert not bool(torch.isfinite(y[0, 0]).any())
    assert bool(torch.isfinite(y[0, 1]).all())
