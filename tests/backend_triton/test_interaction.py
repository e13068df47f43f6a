"""vgmr_triton::interaction and interaction_backward against vgmr_fast.reference.interaction.

Interpreter-sized on a CPU machine (TRITON_INTERPRET=1); large sizes on a GPU only.
Test rule (docs/math.md §9): error <= 2x the eager reference's error in the same dtype
+ 1e-6 (fp32) / 1e-3 (half), truth = reference in float64.
"""
from __future__ import annotations


import pytest
import torch

import vgmr_fast.triton as VT
from vgmr_fast import reference as ref
from vgmr_fast import cuda_graph

pytestmark = pytest.mark.skipif(not VT.AVAILABLE, reason=f"Triton unavailable: {VT.unavailable_reason()}")

from rules import DEVICE, DTYPES, check  # noqa: E402


def make_s(B, M, D, dtype, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed + B * 1000 + M * 100 + D)
    s = torch.randn(B, M, D, generator=g)
    if ties:  # s_m == s_j somewhere: d|s_m - s_j| = sign(0) = 0 there
        s[:, 1, ::2] = s[:, 0, ::2]
    return s.to(DEVICE, dtype)


def run_and_check(B, M, D, dtype, s=None):
    if s is None:
        s = make_s(B, M, D, dtype)
    u = torch.ops.vgmr_triton.interaction(s)
    assert u.dtype == dtype and u.shape == (B, M, (3 * M - 1) * D)
    g = torch.Generator().manual_seed(7)
    du = torch.randn(u.shape, generator=g).to(DEVICE, dtype)
    ds = torch.ops.vgmr_triton.interaction_backward(du, s)
    assert ds.dtype == dtype and ds.shape == (B, M, D)
    s64 = s.detach().double().requires_grad_()
    sX = s.detach().clone().requires_grad_()
    u64 = ref.interaction(s64)
    uX = ref.interaction(sX)
    u64.backward(du.double())
    uX.backward(du)
    check("u", u, u64, uX, dtype)
    # the copies of s_m, s_j are exact; so are the products and |differences| (one rounding of
    # an exact fp32 value), except for bf16 under the interpreter, whose bf16 cast truncates
    n = (3 * M - 2) * D if not (VT.INTERPRET and dtype == torch.bfloat16) else M * D
    assert torch.equal(u[..., :n].cpu(), uX[..., :n].detach().cpu()), "copy/product/|diff| blocks differ"
    check("ds", ds, s64.grad, sX.grad, dtype)
    return u, ds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("D", [35, 130])
def test_several_d_blocks(monkeypatch, D, M, dtype):
    monkeypatch.setitem(VT.CONFIG, "ia_block_d", 16)
    run_and_check(2, M, D, dtype)


def test_argument_errors():
    with pytest.raises(ValueError):
        torch.ops.vgmr_triton.interaction(torch.randn(2, 1, 4, device=DEVICE))
    with pytest.raises(ValueError):
        torch.ops.vgmr_triton.interaction_backward(torch.randn(2, 2, 4, device=DEVICE), torch.randn(2, 2, 4,
                                                                                                    device=DEVICE))
    with pytest.raises(TypeError):
        torch.ops.vgmr_triton.interaction(torch.ones(2, 2, 4, dtype=torch.int64, device=DEVICE))


# ---------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,M,D", [(256, 3, 128), (64, 2, 1023), (33, 4, 1500), (8, 3, 16384)],
                         ids=lambda v: str(v))
def test_gpu_sizes(B, M, D, dtype):
    run_and_check(B, M, D, dtype)


@gpu
def test_gpu_beyond_int32_elements():
    torch.cuda.empty_cache()
    M, D = 2, 4096
    B = 2**31 // ((3 * M - 1) * M * D) + 4
    assert B * M * (3 * M - 1) * D > 2**31
    s = torch.randn(B, M, D, device="cuda", dtype=torch.float16)
    u = torch.ops.vgmr_triton.interaction(s)
    du = torch.randn_like(u)
    ds = torch.ops.vgmr_triton.interaction_backward(du, s)
    last = slice(B - 2, B)
    sl = s[last].double().requires_grad_()
    ul = ref.interaction(sl)
    ul.backward(du[last].double())
    torch.testing.assert_close(u[last].double(), ul, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ds[last].double(), sl.grad, atol=2e-2, rtol=1e-2)
    del u, du
    torch.cuda.empty_cache()


@gpu
def test_gpu_cuda_graph_forward_backward():
    s = make_s(16, 3, 256, torch.bfloat16)
    du = torch.randn(16, 3, 8 * 256, device="cuda", dtype=torch.bfloat16)

    def step():
        return torch.ops.vgmr_triton.interaction(s), torch.ops.vgmr_triton.interaction_backward(du, s)

    graph, outs = cuda_graph.capture(step)
    s.copy_(torch.randn_like(s))
    du.copy_(torch.randn_like(du))
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(outs, step()):
        assert torch.equal(a, e)


@gpu
def test_gpu_public_cuda_graph_whole_step():
    # summary_pool -> interaction -> gate_norm, forward + autograd backward, captured in one graph.
    ops = pytest.importorskip("vgmr_fast.ops")
    B, T, D = 4, 16, 64
    h = torch.randn(B, T, D, device="cuda", requires_grad=True)
    mask = torch.rand(B, T, device="cuda") > 0.2
    x = torch.randn(B, T, D, device="cuda", requires_grad=True)
    w = torch.ones(D, device="cuda", requires_grad=True)
    b = torch.zeros(D, device="cuda", requires_grad=True)

    def step():
        for t in (h, x, w, b):
            t.grad = None
        mean, mx = ops.summary_pool(h, mask, backend="triton")
        s = torch.stack([mean, mx], dim=1)  # [B, 2, D]
        u = ops.interaction(s, backend="triton")  # [B, 2, 5D]
        bias_row = u[:, 0, :D] - u[:, 1, D:2 * D]
        zpre = h * 0.5
        y = ops.gate_norm(zpre, bias_row, x, w, b, p=0.1, seed=3, backend="triton")
        loss = y.square().mean()
        loss.backward()
        return loss

    graph, loss = cuda_graph.capture(step)
    graph.replay()
    torch.cuda.synchronize()
    got = [loss.clone()] + [t.grad.clone() for t in (h, x, w, b)]
    eager = [step()] + [t.grad for t in (h, x, w, b)]
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e)
