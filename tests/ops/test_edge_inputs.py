"""Inputs at the edges of the ops' domain:

- meta tensors: the public ops (``backend="auto"`` and explicit) infer shapes through the fake
  kernels, forward and backward, so a model can be built on ``device="meta"``;
- empty batches (B = 0) and empty sequences (T = 0): empty outputs (T = 0 pools to zeros),
  gradients of the right shapes, no internal reshape error;
- summary_pool leaves masked-out steps out entirely: NaN / inf there change neither the pooled
  values nor the gradient (docs/math.md §1: pool over valid steps).
"""
from __future__ import annotations

import pytest
import torch

from helpers import BACKENDS, cap, device_of, gen
from vgmr_fast import ops
from vgmr_fast import reference as ref

pytestmark = pytest.mark.usefixtures("vgmr_debug_nan_fill")


def _gate_args(B, T, D, device, dtype=torch.float32, grad=False):
    g = gen(3)
    ts = [torch.randn(B, T, D, generator=g), torch.randn(B, D, generator=g), torch.randn(B, T, D, generator=g),
          torch.randn(D, generator=g), torch.randn(D, generator=g)]
    out = []
    for i, t in enumerate(ts):
        t = t.to(dtype) if i in (0, 2) else t
        out.append(t.to(device).requires_grad_(grad))
    return out


# ---- meta ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_meta_gate_norm_forward_backward(backend, dtype):
    args = _gate_args(3, 5, 7, "meta", dtype, grad=True)
    for kw in ({}, {"p": 0.2, "seed": 11}, {"p": 0.2, "seed": torch.tensor(11, device="meta")}):
        y = ops.gate_norm(*args, backend=backend, **kw)
        assert y.device.type == "meta" and y.shape == (3, 5, 7) and y.dtype == dtype
        y.sum().backward()
        for a in args:
            assert a.grad.device.type == "meta" and a.grad.shape == a.shape and a.grad.dtype == a.dtype
            a.grad = None


@pytest.mark.parametrize("backend", ["auto", "cpu"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_meta_summary_pool_forward_backward(backend, with_mask):
    h = torch.empty(4, 6, 5, device="meta", requires_grad=True)
    mask = torch.empty(4, 6, dtype=torch.bool, device="meta") if with_mask else None
    mean, mx = ops.summary_pool(h, mask, backend=backend)
    assert mean.shape == mx.shape == (4, 5) and mean.device.type == "meta"
    (mean.sum() + mx.sum()).backward()
    assert h.grad.shape == h.shape and h.grad.device.type == "meta"


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_meta_interaction_forward_backward(backend):
    s = torch.empty(2, 3, 4, device="meta", dtype=torch.float16, requires_grad=True)
    u = ops.interaction(s, backend=backend)
    assert u.shape == (2, 3, 8 * 4) and u.dtype == torch.float16 and u.device.type == "meta"
    u.sum().backward()
    assert s.grad.shape == s.shape


def test_meta_still_checks_arguments():
    args = _gate_args(3, 5, 7, "meta")
    with pytest.raises(ValueError, match="ln_weight"):
        ops.gate_norm(args[0], args[1], args[2], torch.empty(6, device="meta"), args[4])
    with pytest.raises(ValueError, match="seed"):
        ops.gate_norm(*args, p=0.1, seed=2**64)


# ---- empty batches and sequences -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("BT", [(0, 4), (3, 0), (0, 0)], ids=["B0", "T0", "B0T0"])
def test_gate_norm_empty(backend, BT):
    B, T = BT
    dev = device_of(backend)
    args = _gate_args(B, T, 6, dev, grad=True)
    y = ops.gate_norm(*args, p=0.1, seed=5, backend=backend)
    assert y.shape == (B, T, 6)
    y.sum().backward()
    for a in args:
        assert a.grad.shape == a.shape
        assert bool((a.grad == 0).all())  # nothing flows from no rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("BT", [(0, 4), (3, 0), (0, 0)], ids=["B0", "T0", "B0T0"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_summary_pool_empty(backend, BT, with_mask):
    B, T = BT
    dev = device_of(backend)
    h = torch.randn(B, T, 5, device=dev, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev) if with_mask else None
    mean, mx = ops.summary_pool(h, mask, backend=backend)
    assert mean.shape == mx.shape == (B, 5)
    # no valid step: mean = max = 0 (docs/ops.md), as for an all-masked row
    assert bool((mean == 0).all()) and bool((mx == 0).all())
    (mean.sum() + mx.sum()).backward()
    assert h.grad.shape == h.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_interaction_empty_batch(backend):
    dev = device_of(backend)
    s = torch.randn(0, 3, 4, device=dev, requires_grad=True)
    u = ops.interaction(s, backend=backend)
    assert u.shape == (0, 3, 32)
    u.sum().backward()
    assert s.grad.shape == s.shape


# ---- masked steps do not reach the pool -----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_summary_pool_ignores_non_finite_masked_steps(backend, dtype, poison):
    B, T, D = 3, 6, 37
    dev = cap(backend, B * T)
    g = gen(1)
    h = torch.randn(B, T, D, generator=g).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[0, 0] = True
    mask[1] = False  # a row with no valid step: zeros
    mask[2] = True
    mask[2, 3] = False
    poisoned = h.masked_fill(~mask[:, :, None], poison)
    clean = h.masked_fill(~mask[:, :, None], 0.0)
    dmean = torch.randn(B, D, generator=g).to(dtype)
    dmax = torch.randn(B, D, generator=g).to(dtype)

    def run(x, fn):
        x = x.to(dev).requires_grad_(True)
        mean, mx = fn(x, mask.to(dev))
        dh, = torch.autograd.grad([mean, mx], [x], [dmean.to(dev), dmax.to(dev)])
        return mean, mx, dh

    fused = run(poisoned, lambda x, m: ops.summary_pool(x, m, backend=backend))
    on_clean = run(clean, lambda x, m: ops.summary_pool(x, m, backend=backend))
    # the reference on the same valid values (masked steps zeroed, never the maximum here:
    # every valid row has a valid step and -inf/NaN never enter)
    want = run(clean, ref.summary_pool)
    for got, same, w in zip(fused, on_clean, want):
        assert torch.isfinite(got).all()
        assert torch.equal(got, same)  # bit-identical: the masked values are never read into a sum
        torch.testing.assert_close(got.float(), w.float(), rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-2 if dtype != torch.float32 else 1e-6)
    dh = fused[2]
    assert bool((dh[~mask.to(dev)] == 0).all())
