"""vgmr_triton::summary_pool and summary_pool_backward against vgmr_fast.reference.summary_pool.

Interpreter-sized on a CPU machine (TRITON_INTERPRET=1); large sizes on a GPU only.
Test rule (docs/math.md §9): error <= 2x the eager reference's error in the same dtype
+ 1e-6 (fp32) / 1e-3 (half), truth = reference in float64.  max and argmax are
selections and must match exactly (argmax: first valid maximal step, NaN maximal,
-1 where no step is valid).
"""
from __future__ import annotations


import pytest
import torch

import vgmr_fast.triton as VT
from vgmr_fast import reference as ref
from vgmr_fast import cuda_graph

pytestmark = pytest.mark.skipif(not VT.AVAILABLE, reason=f"Triton unavailable: {VT.unavailable_reason()}")

from rules import DEVICE, DTYPES, check  # noqa: E402


def expected_argmax(h, mask):
    """First valid maximal step (NaN maximal), -1 without a valid step."""
    valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if mask is None else mask.bool()
    v = valid[..., None].expand_as(h)
    nan = torch.isnan(h) & v
    filled = h.masked_fill(~v | torch.isnan(h), float("-inf"))
    mx = torch.max(filled, dim=1, keepdim=True).values
    hit = torch.where(nan.any(dim=1, keepdim=True), nan, v & ~torch.isnan(h) & (filled == mx))
    idx = torch.argmax(hit.to(torch.uint8), dim=1).to(torch.int32)  # first True
    return torch.where(hit.any(dim=1), idx, torch.full_like(idx, -1))


def make_mask(B, T, kind, g):
    if kind == "none":
        return None
    m = torch.rand(B, T, generator=g) > 0.4
    if kind == "some":
        m[:, 0] |= ~m.any(dim=1)  # every row has a valid step
    elif kind == "one-empty":
        m[0] = False  # an absent modality for sample 0
        if B > 1:
            m[1] = True
    elif kind == "all-empty":
        m[:] = False
    return m.to(DEVICE)


def run_and_check(B, T, D, dtype, kind, seed=0, h=None):
    g = torch.Generator().manual_seed(seed + B * 1000 + T * 10 + D)
    if h is None:
        h = torch.randn(B, T, D, generator=g).to(DEVICE, dtype)
    mask = make_mask(B, T, kind, g)
    mean, mx, arg = torch.ops.vgmr_triton.summary_pool(h, mask)
    assert mean.dtype == mx.dtype == dtype and arg.dtype == torch.int32 and mean.shape == (B, D)
    # forward
    h64 = h.double().requires_grad_()
    hX = h.detach().clone().requires_grad_()
    m64, x64 = ref.summary_pool(h64, mask)
    mX, xX = ref.summary_pool(hX, mask)
    check("mean", mean, m64, mX, dtype)
    assert torch.equal(mx.cpu(), xX.detach().cpu()), "max differs from the reference"
    assert torch.equal(arg.cpu(), expected_argmax(h, mask).cpu()), "argmax differs"
    if mask is not None:
        empty = ~mask.any(dim=1)
        assert torch.all(mean[empty] == 0) and torch.all(mx[empty] == 0) and torch.all(arg[empty] == -1)
    # backward
    dmean = torch.randn(B, D, generator=g).to(DEVICE, dtype)
    dmax = torch.randn(B, D, generator=g).to(DEVICE, dtype)
    dh = torch.ops.vgmr_triton.summary_pool_backward(dmean, dmax, mask, arg, T)
    assert dh.dtype == dtype and dh.shape == (B, T, D)
    torch.autograd.backward([m64, x64], [dmean.double(), dmax.double()])
    torch.autograd.backward([mX, xX], [dmean, dmax])
    check("dh", dh, h64.grad, hX.grad, dtype)
    return mean, mx, arg, dh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_masked(dtype):
    mean, mx, arg, dh = run_and_check(3, 4, 35, dtype, "all-empty")
    assert torch.all(arg == -1) and torch.all(mean == 0) and torch.all(mx == 0) and torch.all(dh == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["none", "one-empty"])
@pytest.mark.parametrize("D", [3, 35, 130])
def test_tiled(monkeypatch, D, kind, dtype):
    # Several D-blocks per batch and several T tiles per program (BLOCK_D = 16, BLOCK_T = 2).
    monkeypatch.setitem(VT.CONFIG, "sp_block_d", 16)
    monkeypatch.setitem(VT.CONFIG, "sp_max_tile", 32)
    run_and_check(3, 9, D, dtype, kind)


@pytest.mark.parametrize("tiled", [False, True])
def test_ties_first_index(monkeypatch, tiled):
    # bf16 with few distinct values: many ties, also across T tiles; the first valid max wins.
    if tiled:
        monkeypatch.setitem(VT.CONFIG, "sp_block_d", 16)
        monkeypatch.setitem(VT.CONFIG, "sp_max_tile", 32)
    g = torch.Generator().manual_seed(3)
    h = torch.randint(-2, 3, (3, 11, 35), generator=g).to(DEVICE, torch.bfloat16)
    for kind in ("none", "some", "one-empty"):
        run_and_check(3, 11, 35, torch.bfloat16, kind, h=h)


@pytest.mark.parametrize("tiled", [False, True])
def test_nan_and_inf(monkeypatch, tiled):
    if tiled:
        monkeypatch.setitem(VT.CONFIG, "sp_block_d", 16)
        monkeypatch.setitem(VT.CONFIG, "sp_max_tile", 32)
    B, T, D = 2, 9, 20
    h = torch.randn(B, T, D)
    h[0, 3, 0] = float("nan")
    h[0, 6, 0] = float("nan")  # first NaN (t = 3) wins
    h[0, 1, 1] = float("nan")
    h[0, 8, 1] = 1e4  # a larger finite value after a NaN: NaN still maximal
    h[0, 7, 2] = float("nan")  # NaN in a later tile than the finite max
    h[0, 0, 2] = 1e4
    h[1, :, 3] = float("-inf")  # all -inf: max -inf, first valid step
    h[1, 5:, 4] = float("inf")
    for mask in (None, torch.tensor([[True] * T, [False, False] + [True] * (T - 2)])):
        mean, mx, arg = torch.ops.vgmr_triton.summary_pool(h.to(DEVICE), None if mask is None else mask.to(DEVICE))
        _, rmx = ref.summary_pool(h, mask)
        assert torch.equal(mx.cpu().nan_to_num(nan=7.0), rmx.nan_to_num(nan=7.0))
        assert torch.equal(arg.cpu(), expected_argmax(h, mask))
    mean, mx, arg = torch.ops.vgmr_triton.summary_pool(h.to(DEVICE), None)
    assert arg[0, 0] == 3 and arg[0, 1] == 1 and arg[0, 2] == 7 and torch.isnan(mx[0, :3]).all()
    assert arg[1, 3] == 0 and mx[1, 3] == float("-inf") and arg[1, 4] == 5


def test_argument_errors():
    # What vgmr::summary_pool checks, with the argument named.
    sp, spb = torch.ops.vgmr_triton.summary_pool, torch.ops.vgmr_triton.summary_pool_backward
    h = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="mask"):
        sp(h, torch.ones(2, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="h"):
        sp(h.to(torch.int32), None)
    for dt in (torch.uint8, torch.float32, torch.int64):  # no silent reinterpretation of the mask
        with pytest.raises(TypeError, match="mask must be bool"):
            sp(h, torch.ones(2, 3, dtype=dt, device=DEVICE))
    # T must fit the int32 argmax with its -1 sentinel (an expanded view: no memory)
    huge = torch.zeros(1, 1, 1, device=DEVICE).expand(1, 2**31 - 1, 1)
    with pytest.raises(ValueError, match="T must fit the int32 argmax"):
        sp(huge, None)
    mean, mx, arg = sp(h, None)
    with pytest.raises(ValueError, match="T"):
        spb(mean, mx, None, arg, 2**31 - 1)
    with pytest.raises(ValueError, match="T"):
        spb(mean, mx, None, arg, -1)
    with pytest.raises(TypeError, match="argmax must be int32"):
        spb(mean, mx, None, arg.long(), 3)
    with pytest.raises(TypeError, match="dmax must have the dtype of dmean"):
        spb(mean, mx.half(), None, arg, 3)
    with pytest.raises(TypeError, match="mask must be bool"):
        spb(mean, mx, torch.ones(2, 3, dtype=torch.uint8, device=DEVICE), arg, 3)


# ---------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["none", "some", "one-empty"])
@pytest.mark.parametrize("shape", [(8, 512, 256), (2, 1, 1023), (3, 77, 1500), (2, 2049, 64), (1, 3, 16384)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_sizes(shape, kind, dtype):
    run_and_check(*shape, dtype, kind)


@gpu
def test_gpu_beyond_int32_elements():
    torch.cuda.empty_cache()
    B, T, D = 2, 2**16, 2**14 + 8
    assert B * T * D > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(B, T, D, device="cuda", dtype=torch.float16, generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) > 0.3
    mean, mx, arg = torch.ops.vgmr_triton.summary_pool(h, mask)
    last = slice(B - 1, B)
    m_ref, x_ref = ref.summary_pool(h[last].float(), mask[last])
    torch.testing.assert_close(mean[last].float(), m_ref, atol=1e-3, rtol=1e-3)
    assert torch.equal(mx[last].float(), x_ref)
    assert torch.equal(arg[last], expected_argmax(h[last], mask[last]))
    dmean = torch.randn(B, D, device="cuda", dtype=torch.float16, generator=g)
    dmax = torch.randn(B, D, device="cuda", dtype=torch.float16, generator=g)
    dh = torch.ops.vgmr_triton.summary_pool_backward(dmean, dmax, mask, arg, T)
    # the last steps of the last sample (offsets > 2**31)
    ts = torch.arange(T - 8, T, device="cuda")
    n = mask[-1].sum().clamp(min=1).float()
    exp = (mask[-1, ts, None].float() * dmean[-1].float() / n
           + (ts[:, None] == arg[-1][None, :].long()) * dmax[-1].float())
    torch.testing.assert_close(dh[-1, ts].float(), exp, atol=1e-3, rtol=1e-3)
    del h, dh
    torch.cuda.empty_cache()


@gpu
def test_gpu_cuda_graph_forward_backward():
    B, T, D = 4, 33, 200
    h = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(B, T, device="cuda") > 0.3
    mask[0] = False
    dmean, dmax = torch.randn(B, D, device="cuda", dtype=torch.bfloat16), torch.randn(B, D, device="cuda",
                                                                                         dtype=torch.bfloat16)

    def step():
        mean, mx, arg = torch.ops.vgmr_triton.summary_pool(h, mask)
        return mean, mx, arg, torch.ops.vgmr_triton.summary_pool_backward(dmean, dmax, mask, arg, T)

    graph, outs = cuda_graph.capture(step)
    h.copy_(torch.randn_like(h))
    mask.copy_(torch.rand(B, T, device="cuda") > 0.5)
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(outs, step()):
        assert torch.equal(a, e)
