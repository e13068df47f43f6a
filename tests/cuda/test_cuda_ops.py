"""The CUDA C++ kernels (csrc/cuda/) on a GPU, against vgmr_fast.reference.

Everything goes through the public op layer with ``backend="cuda"`` (autograd included),
plus the raw ``torch.ops.vgmr`` ops where an output is not public (argmax, mean/rstd).
Each case covers the kernel paths the launchers choose between:
- gate_norm: warp-per-row (D <= 256) / block-per-row (D <= 4096; <= 8192 forward) register
  kernels when D % (16 bytes / element) == 0 and the pointers are 16-byte aligned, the
  generic kernel otherwise (odd D, D > 4096 backward, misaligned views), and T split over
  several tiles (dbias_row partials) when B is small and T large;
- summary_pool / interaction: 32-bit and 64-bit index variants (the latter in the 2^31 tests).
Rule of docs/math.md §9: error <= 2 x (eager reference in the same dtype) + atol, against the
reference in float64; outputs are NaN-filled before the kernels run (vgmr_debug_nan_fill).

Skipped, visibly, without a CUDA device. A CUDA device with an extension built without the
CUDA kernels fails (test_cuda_kernels_are_built), it does not skip.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close_to_truth, assert_no_nan, gen
from vgmr_fast import ops
from vgmr_fast import cuda_graph
from vgmr_fast import reference as ref
from vgmr_fast.ops import backend as op_backend
from vgmr_fast.ops import dropout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA C++ kernels)"),
    pytest.mark.usefixtures("vgmr_debug_nan_fill"),
]

DEV = "cuda"


def _seed(v: int) -> torch.Tensor:
    """The raw ops' dropout seed: a one-element int64 tensor on the device (docs/ops.md)."""
    return torch.tensor(v, dtype=torch.int64, device=DEV)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]
D_SWEEP = [1, 3, 35, 74, 1023, 1500, 4096, 5000]
ALPHA, BETA = 0.5, 0.2
BIG_SEED = 1099511627779  # > 2**32: both Philox key words non-zero
GN_NAMES = ["y", "dzpre", "dbias_row", "dx", "dln_weight", "dln_bias"]
NEED_GIB = 40  # the 2^31 tests


def _shape_id(s):
    return "x".join(map(str, s))


@pytest.fixture(autouse=True)
def _kernels_present():
    if not op_backend.has_cuda_kernels():
        pytest.fail("a CUDA device is present but vgmr_fast._C has no CUDA kernels: "
                    "rebuild with `pip install --no-build-isolation -e .` on this machine")


def test_cuda_kernels_are_built():
    for op in ("summary_pool", "summary_pool_backward", "interaction", "interaction_backward", "gate_norm",
               "gate_norm_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vgmr::{op}", "CUDA"), op


def _free_gib() -> float:
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def _grads(fn, args, cotangents):
    """Outputs of fn(*args) and the gradients of sum(<out, cotangent>) w.r.t. args."""
    # detach, not clone: a view keeps its storage offset (the misaligned-pointer cases)
    args = [a.detach().requires_grad_(True) for a in args]
    out = fn(*args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    grads = torch.autograd.grad(outs, args, [c.to(o.dtype) for o, c in zip(outs, cotangents)])
    return [*outs, *grads]


# =============================================================================================
# summary_pool
# =============================================================================================
def _first_valid_argmax(h, mask):
    """int32 [B, D]: the first valid maximal step (NaN maximal, first NaN wins), -1 for none."""
    B, T, D = h.shape
    hf = h.double()
    valid = torch.ones(B, T, dtype=torch.bool, device=h.device) if mask is None else mask
    v3 = valid[:, :, None].expand(B, T, D)
    isnan = torch.isnan(hf) & v3
    filled = torch.where(v3 & ~torch.isnan(hf), hf, torch.full_like(hf, -math.inf))
    mx = filled.max(dim=1, keepdim=True).values
    is_max = v3 & ~torch.isnan(hf) & (filled == mx)
    any_nan = isnan.any(dim=1)
    first_nan = isnan.int().argmax(dim=1)  # argmax returns the first maximal index
    first_max = is_max.int().argmax(dim=1)
    out = torch.where(any_nan, first_nan, first_max)
    out = torch.where(valid.any(dim=1)[:, None], out, torch.full_like(out, -1))
    return out.to(torch.int32)


def _pool_truth_dh(dmean, dmax, mask, argmax, T, dtype):
    """dh of the contract (docs/ops.md) in `dtype` arithmetic (float64: the truth)."""
    B, D = dmean.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=dmean.device) if mask is None else mask
    n = valid.sum(dim=1).clamp(min=1).to(dtype)
    dh = valid[:, :, None].to(dtype) * (dmean.to(dtype)[:, None, :] / n[:, None, None])
    onehot = torch.arange(T, device=dmean.device)[None, :, None] == argmax.long()[:, None, :]
    return dh + onehot.to(dtype) * dmax.to(dtype)[:, None, :]


def _pool_inputs(B, T, D, dtype, seed, masked):
    g = gen(seed)
    h = torch.randn(B, T, D, generator=g)
    if dtype == torch.bfloat16:
        h = (h * 4).round() / 4  # many ties: the first valid maximal step must win
    h = h.to(dtype).to(DEV)
    mask = None
    if masked:
        mask = torch.rand(B, T, generator=g) > 0.35
        mask[0] = False  # an absent modality: all steps masked
        if B > 1:
            mask[1, -1] = True
        mask = mask.to(DEV)
    dmean = torch.randn(B, D, generator=g).to(dtype).to(DEV)
    dmax = torch.randn(B, D, generator=g).to(dtype).to(DEV)
    return h, mask, dmean, dmax


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", D_SWEEP)
@pytest.mark.parametrize("BT", [(2, 9), (1, 1), (3, 1), (2, 40)], ids=_shape_id)
def test_summary_pool(BT, D, dtype, masked):
    B, T = BT
    h, mask, dmean, dmax = _pool_inputs(B, T, D, dtype, seed=B * 977 + T * 31 + D, masked=masked)
    mean, mx, am = torch.ops.vgmr.summary_pool(h, mask)
    assert mean.dtype == dtype and mx.dtype == dtype and am.dtype == torch.int32
    assert mean.shape == (B, D) and am.shape == (B, D)
    r_mean, r_max = ref.summary_pool(h, mask)
    t_mean, t_max = ref.summary_pool(h.double(), mask)
    assert_close_to_truth(mean, r_mean, t_mean, dtype, name="mean")
    assert torch.equal(mx.double(), t_max), "max must be exact (a copy of one input element)"
    expect_am = _first_valid_argmax(h, mask)
    assert torch.equal(am, expect_am), "argmax: first valid maximal step, -1 for an all-masked row"
    if masked:
        assert bool((am[0] == -1).all()) and bool((mean[0] == 0).all()) and bool((mx[0] == 0).all())
    # backward: the raw op against the contract, then the public op's autograd wiring
    dh = torch.ops.vgmr.summary_pool_backward(dmean, dmax, mask, am, T)
    assert dh.dtype == dtype and dh.shape == (B, T, D)
    assert_close_to_truth(dh, _pool_truth_dh(dmean, dmax, mask, am, T, dtype),
                          _pool_truth_dh(dmean, dmax, mask, am, T, torch.float64), dtype, name="dh")
    f_mean, f_max, f_dh = _grads(lambda x: ops.summary_pool(x, mask, backend="cuda"), [h], [dmean, dmax])
    assert torch.equal(f_mean, mean) and torch.equal(f_max, mx)
    assert torch.equal(f_dh, dh)


def test_summary_pool_nan_is_maximal_first_wins():
    h = torch.randn(2, 12, 40, device=DEV)
    h[0, 3, 5] = float("nan")
    h[0, 7, 5] = float("nan")
    h[0, 1, 5] = 1e30
    h[1, 0, 9] = float("nan")
    mean, mx, am = torch.ops.vgmr.summary_pool(h, None)
    assert int(am[0, 5]) == 3 and bool(torch.isnan(mx[0, 5])) and int(am[1, 9]) == 0
    mask = torch.ones(2, 12, dtype=torch.bool, device=DEV)
    mask[0, 3] = False  # the first NaN is masked: the next one wins
    _, mx, am = torch.ops.vgmr.summary_pool(h, mask)
    assert int(am[0, 5]) == 7 and bool(torch.isnan(mx[0, 5]))
    assert torch.equal(am, _first_valid_argmax(h, mask))


def test_summary_pool_many_steps_and_columns():
    # several column tiles per batch row and 8 time slices per block combined in order
    B, T, D = 5, 1000, 300
    h, mask, dmean, dmax = _pool_inputs(B, T, D, torch.bfloat16, seed=11, masked=True)
    mean, mx, am = torch.ops.vgmr.summary_pool(h, mask)
    assert torch.equal(am, _first_valid_argmax(h, mask))
    r_mean, _ = ref.summary_pool(h, mask)
    t_mean, t_max = ref.summary_pool(h.double(), mask)
    assert_close_to_truth(mean, r_mean, t_mean, torch.bfloat16, name="mean")
    assert torch.equal(mx.double(), t_max)


# =============================================================================================
# interaction
# =============================================================================================
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", D_SWEEP)
@pytest.mark.parametrize("BM", [(3, 2), (2, 3), (1, 5)], ids=_shape_id)
def test_interaction(BM, D, dtype):
    B, M = BM
    g = gen(B * 131 + M * 17 + D)
    s = torch.randn(B, M, D, generator=g).to(dtype).to(DEV)
    s[0, 1, 0] = s[0, 0, 0]  # |s_m - s_j| at 0: gradient 0 (torch.abs)
    du = torch.randn(B, M, (3 * M - 1) * D, generator=g).to(dtype).to(DEV)
    f = _grads(lambda x: ops.interaction(x, backend="cuda"), [s], [du])
    r = _grads(ref.interaction, [s], [du])
    t = _grads(ref.interaction, [s.double()], [du.double()])
    assert f[0].dtype == dtype and f[0].shape == (B, M, (3 * M - 1) * D)
    assert f[1].dtype == dtype and f[1].shape == (B, M, D)
    for name, a, b, c in zip(["u", "ds"], f, r, t):
        assert_close_to_truth(a, b, c, dtype, name=name)
    assert_no_nan(*f, name="interaction")


def test_interaction_raw_ops_and_exact_copies():
    s = torch.randn(4, 3, 33, device=DEV, dtype=torch.bfloat16)
    u = torch.ops.vgmr.interaction(s)
    blocks = u.view(4, 3, 8, 33)
    for m in range(3):
        others = [j for j in range(3) if j != m]
        assert torch.equal(blocks[:, m, 0], s[:, m])
        for i, j in enumerate(others):
            assert torch.equal(blocks[:, m, 1 + i], s[:, j])
    ds = torch.ops.vgmr.interaction_backward(torch.zeros_like(u), s)
    assert bool((ds == 0).all())


# =============================================================================================
# gate_norm
# =============================================================================================
def _gn_make(B, T, D, dtype, seed, offset=0):
    """(zpre, bias_row, x, ln_weight, ln_bias), dy; offset > 0: zpre/x/dy are contiguous views at
    an element offset (misaligned data pointers: the generic kernel)."""
    g = gen(seed)

    def big(scale=1.0):
        t = (torch.randn(B * T * D + offset, generator=g) * scale).to(dtype).to(DEV)
        return t[offset:].view(B, T, D)

    zpre = big(2.0)
    x = big()
    bias_row = (torch.randn(B, D, generator=g) * 0.5).to(DEV)
    w = (1 + 0.3 * torch.randn(D, generator=g)).to(DEV)
    b = (0.3 * torch.randn(D, generator=g)).to(DEV)
    dy = big()
    return [zpre, bias_row, x, w, b], dy


def _gn_run(args, dy, p=0.0, seed=0, alpha=ALPHA, beta=BETA):
    def fused(*a):
        return ops.gate_norm(*a, alpha=alpha, beta=beta, p=p, seed=seed, backend="cuda")

    def eager(*a):
        return ref.gate_norm(*a, alpha=alpha, beta=beta, p=p, seed=seed)

    f = _grads(fused, args, [dy])
    r = _grads(eager, args, [dy])
    t = _grads(eager, [a.double() for a in args], [dy.double()])
    return f, r, t


def _gn_check(f, r, t, args):
    dtypes = [args[2].dtype, args[0].dtype, args[1].dtype, args[2].dtype, args[3].dtype, args[4].dtype]
    for name, a, b, c, dt in zip(GN_NAMES, f, r, t, dtypes):
        assert_close_to_truth(a, b, c, dt, name=name)
    assert_no_nan(*f, name="gate_norm")


GN_SHAPES = [(2, 3), (1, 1), (4, 1), (1, 7)]  # (B, T): T = 1, B = 1


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", D_SWEEP + [8, 64, 256, 512, 8192])
@pytest.mark.parametrize("BT", GN_SHAPES, ids=_shape_id)
def test_gate_norm(BT, D, dtype, p):
    B, T = BT
    args, dy = _gn_make(B, T, D, dtype, seed=B * 7919 + T * 31 + D)
    f, r, t = _gn_run(args, dy, p=p, seed=1234 + D)
    _gn_check(f, r, t, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(2, 8, 64), (3, 7, 256), (1, 1, 1023), (1, 1, 1500), (3, 512, 128),
                                   (1, 3000, 96), (2, 700, 1024), (1, 64, 4096), (1, 300, 5000), (1, 400, 1023)],
                         ids=_shape_id)
def test_gate_norm_suites_and_split_T(shape, dtype):
    # the common LayerNorm suites, plus B = 1 with many steps: T split over several tiles
    # (dbias_row through the partial buffer), several tiles per worker, grid-stride rows
    args, dy = _gn_make(*shape, dtype, seed=sum(shape))
    f, r, t = _gn_run(args, dy, p=0.1, seed=BIG_SEED)
    _gn_check(f, r, t, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 1024, 40])
def test_gate_norm_misaligned_pointers(D, dtype):
    # contiguous views one element into their storage: not 16-byte aligned -> generic kernel
    args, dy = _gn_make(2, 5, D, dtype, seed=D, offset=1)
    assert args[0].data_ptr() % 16 != 0
    f, r, t = _gn_run(args, dy, p=0.2, seed=7)
    _gn_check(f, r, t, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [3, 64, 1500, 4096, 5000])
@pytest.mark.parametrize("seed", [0, 20261123, BIG_SEED])
def test_gate_norm_dropout_mask_is_keep_mask(seed, D, dtype):
    B, T, p = 2, 6, 0.4
    args, _ = _gn_make(B, T, D, dtype, seed=D)
    y = ops.gate_norm(*args, p=p, seed=seed, backend="cuda")
    y0 = ops.gate_norm(*args, p=0.0, seed=seed, backend="cuda")
    keep = dropout.keep_mask(seed, B * T, D, p, device=DEV).view(B, T, D)
    nz = y0 != 0
    assert torch.equal((y != 0) & nz, keep & nz), "dropped elements differ from dropout.keep_mask"
    scale = 1.0 / (1.0 - p)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), torch.where(keep, y0.float() * scale, torch.zeros_like(y0.float())),
                               rtol=tol, atol=tol)


def test_gate_norm_dropout_vectors():
    # docs/backends.md keep mask for seed 20261123, p = 0.5, R = 3, D = 6 (ln_weight 0, ln_bias 1)
    D = 6
    args, _ = _gn_make(1, 3, D, torch.float32, seed=2)
    zpre, _, x, _, _ = args
    y = ops.gate_norm(zpre, torch.zeros(1, D, device=DEV), x, torch.zeros(D, device=DEV), torch.ones(D, device=DEV),
                      p=0.5, seed=20261123, backend="cuda")
    expect = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 1]], dtype=torch.float32)
    assert torch.equal(y.view(3, D).cpu(), 2 * expect)


@pytest.mark.parametrize("shape", [(4, 50, 64), (2, 300, 1024), (1, 500, 5000), (1, 2000, 256)], ids=_shape_id)
def test_gate_norm_backward_is_deterministic(shape):
    args, dy = _gn_make(*shape, torch.float32, seed=8)
    runs = [_grads(lambda *a: ops.gate_norm(*a, p=0.1, seed=3, backend="cuda"), args, [dy]) for _ in range(3)]
    for u, v, w in zip(*runs):
        assert torch.equal(u, v) and torch.equal(v, w)


def test_gate_norm_saved_stats():
    B, T, D = 3, 4, 300
    args, _ = _gn_make(B, T, D, torch.bfloat16, seed=0)
    y, mean, rstd = torch.ops.vgmr.gate_norm(*args, ALPHA, BETA, 0.0, _seed(0))
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32 and mean.shape == (B, T)
    zpre, bias_row, x, _, _ = [a.double() for a in args]
    v = ref.gate_transform(zpre + bias_row[:, None, :], ALPHA, BETA) * x
    torch.testing.assert_close(mean.double(), v.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(v.var(-1, unbiased=False) + 1e-5), rtol=1e-5, atol=1e-6)


def test_gate_norm_empty():
    args, dy = _gn_make(3, 0, 8, torch.float32, seed=0)
    y, mean, rstd = torch.ops.vgmr.gate_norm(*args, ALPHA, BETA, 0.0, _seed(0))
    assert y.shape == (3, 0, 8) and mean.shape == (3, 0)
    dz, dbias, dx, dw, db = torch.ops.vgmr.gate_norm_backward(dy, args[0], args[1], args[2], args[3], mean, rstd,
                                                              ALPHA, BETA, 0.0, _seed(0))
    assert dz.shape == (3, 0, 8) and bool((dbias == 0).all()) and bool((dw == 0).all()) and bool((db == 0).all())


# =============================================================================================
# argument checks in the binding (ValueError / TypeError, never a crash)
# =============================================================================================
def test_binding_checks():
    args, dy = _gn_make(2, 3, 16, torch.float32, seed=0)
    zpre, bias_row, x, w, b = args
    op = torch.ops.vgmr.gate_norm
    with pytest.raises((ValueError, RuntimeError), match="bias_row"):
        op(zpre, bias_row.cpu(), x, w, b, ALPHA, BETA, 0.0, _seed(0))
    with pytest.raises((TypeError, RuntimeError), match="x"):
        op(zpre.double(), bias_row, x.double(), w, b, ALPHA, BETA, 0.0, _seed(0))
    with pytest.raises((TypeError, RuntimeError), match="ln_weight"):
        op(zpre, bias_row, x, w.half(), b, ALPHA, BETA, 0.0, _seed(0))
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        op(zpre.transpose(0, 1), bias_row, x.transpose(0, 1), w, b, ALPHA, BETA, 0.0, _seed(0))
    with pytest.raises((ValueError, RuntimeError), match="p must be"):
        op(zpre, bias_row, x, w, b, ALPHA, BETA, 1.0, _seed(0))
    with pytest.raises((TypeError, RuntimeError), match="seed"):
        op(zpre, bias_row, x, w, b, ALPHA, BETA, 0.1, _seed(1).int())
    with pytest.raises((ValueError, RuntimeError), match="seed"):
        op(zpre, bias_row, x, w, b, ALPHA, BETA, 0.1, _seed(1).cpu())
    y, mean, rstd = op(zpre, bias_row, x, w, b, ALPHA, BETA, 0.0, _seed(0))
    with pytest.raises((ValueError, RuntimeError), match="rstd"):
        torch.ops.vgmr.gate_norm_backward(dy, zpre, bias_row, x, w, mean, rstd[:1].contiguous(), ALPHA, BETA, 0.0,
                                          _seed(0))
    h = torch.randn(2, 3, 4, device=DEV)
    with pytest.raises((TypeError, RuntimeError), match="mask"):
        torch.ops.vgmr.summary_pool(h, torch.ones(2, 3, device=DEV))
    with pytest.raises((ValueError, RuntimeError), match="mask"):
        torch.ops.vgmr.summary_pool(h, torch.ones(2, 4, dtype=torch.bool, device=DEV))
    with pytest.raises((ValueError, RuntimeError), match="M >= 2"):
        torch.ops.vgmr.interaction(torch.randn(2, 1, 4, device=DEV))
    with pytest.raises((TypeError, RuntimeError), match="du"):
        s = torch.randn(2, 3, 4, device=DEV)
        torch.ops.vgmr.interaction_backward(torch.randn(2, 3, 32, device=DEV).half(), s)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_uses_its_own_stream_and_guard():
    with torch.cuda.device(0):
        args, dy = _gn_make(2, 3, 64, torch.float16, seed=4)
        args = [a.to("cuda:1") for a in args]
        dy = dy.to("cuda:1")
        f = _grads(lambda *a: ops.gate_norm(*a, p=0.2, seed=5, backend="cuda"), args, [dy])
    r = _grads(lambda *a: ref.gate_norm(*a, p=0.2, seed=5), args, [dy])
    t = _grads(lambda *a: ref.gate_norm(*a, p=0.2, seed=5), [a.double() for a in args], [dy.double()])
    assert all(o.device == torch.device("cuda:1") for o in f)
    _gn_check(f, r, t, args)


# =============================================================================================
# CUDA graphs: capture forward + backward once, replay on new input values
# =============================================================================================
def _graph_check(fn, inputs, cotangents, refill):
    """Capture outputs + input gradients of fn; replay after refilling the inputs in place and
    compare with an eager run on the new values (bitwise: same kernels, same inputs)."""
    inputs = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in inputs]
    diff = [a for a in inputs if a.requires_grad]

    def step():
        out = fn(*inputs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        grads = torch.autograd.grad(outs, diff, [c.to(o.dtype) for o, c in zip(outs, cotangents)])
        return [o.detach() for o in outs] + list(grads)

    g, static_out = cuda_graph.capture(step)
    with torch.no_grad():
        for a in inputs:
            refill(a)
    g.replay()
    torch.cuda.synchronize()
    eager = step()
    for i, (a, b) in enumerate(zip(static_out, eager)):
        assert torch.equal(a, b), f"graph replay output {i} differs from an eager run"
    return static_out


def _refill(seed):
    gg = torch.Generator(device=DEV).manual_seed(seed)

    def refill(a):
        if a.is_floating_point():
            a.copy_(torch.randn(a.shape, generator=gg, device=DEV, dtype=torch.float32).to(a.dtype))

    return refill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_summary_pool(dtype):
    h, mask, dmean, dmax = _pool_inputs(3, 20, 100, dtype, seed=1, masked=True)
    _graph_check(lambda x, m: ops.summary_pool(x, m, backend="cuda"), [h, mask], [dmean, dmax], _refill(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_graph_interaction(dtype):
    s = torch.randn(4, 3, 50, device=DEV, dtype=dtype)
    du = torch.randn(4, 3, 8 * 50, device=DEV, dtype=dtype)
    _graph_check(lambda x: ops.interaction(x, backend="cuda"), [s], [du], _refill(2))


@pytest.mark.parametrize("D", [64, 1024, 1500, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_gate_norm(dtype, D):
    args, dy = _gn_make(2, 40, D, dtype, seed=D)
    _graph_check(lambda *a: ops.gate_norm(*a, p=0.1, seed=42, backend="cuda"), args, [dy], _refill(3))


# =============================================================================================
# 64-bit offsets: one op call over more than 2^31 elements
# =============================================================================================
def _needs_memory(gib):
    if _free_gib() < gib:
        pytest.skip(f"needs ~{gib} GiB of free GPU memory, {_free_gib():.1f} GiB free")


def _rows_check(y, mean, rstd, args, rows, p, seed):
    """Compare rows (b, t) of a huge gate_norm output with the reference on those rows alone."""
    zpre, bias_row, x, w, b = args
    B, T, D = x.shape
    keep_all = None
    for bi, ti in rows:
        sl = (slice(bi, bi + 1), slice(ti, ti + 1))
        sub = [zpre[sl], bias_row[bi:bi + 1], x[sl], w, b]
        truth = ref.gate_norm(*[a.double() for a in sub], alpha=ALPHA, beta=BETA)
        eager = ref.gate_norm(*sub, alpha=ALPHA, beta=BETA)
        if p > 0:  # the keep mask of global row r = b*T + t
            r = bi * T + ti
            words = dropout.philox4x32(seed, r * ((D + 3) // 4) + torch.arange(D, device=DEV) // 4)
            keep_all = words.gather(-1, (torch.arange(D, device=DEV) % 4)[:, None]).squeeze(-1) >= dropout.threshold(p)
            truth = truth * keep_all / (1 - p)
            eager = eager * keep_all.to(eager.dtype) / (1 - p)
        assert_close_to_truth(y[sl], eager, truth, x.dtype, name=f"y[{bi},{ti}]")


_BIG_B = 2


def _big_T(D: int) -> int:
    """T with B*T*D just past 2**31 elements (B = _BIG_B): the last rows need 64-bit offsets."""
    T = (2**31) // (_BIG_B * D) + 3
    assert _BIG_B * T * D > 2**31
    return T


def _big_gate_norm_inputs(D: int, dtype, seed: int):
    """(B, T, generator, [zpre, bias_row, x, ln_weight, ln_bias]) with B*T*D > 2**31."""
    B, T = _BIG_B, _big_T(D)
    g = torch.Generator(device=DEV).manual_seed(seed)
    zpre = torch.randn(B, T, D, generator=g, device=DEV, dtype=dtype)
    x = torch.randn(B, T, D, generator=g, device=DEV, dtype=dtype)
    bias_row = torch.randn(B, D, generator=g, device=DEV)
    w = 1 + 0.3 * torch.randn(D, generator=g, device=DEV)
    b = 0.3 * torch.randn(D, generator=g, device=DEV)
    return B, T, g, [zpre, bias_row, x, w, b]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,D", [(torch.float16, 4096), (torch.bfloat16, 4096), (torch.float16, 4099)],
                         ids=["fp16-vec", "bf16-vec", "fp16-generic"])
def test_gate_norm_forward_beyond_2_31_elements(dtype, D):
    _needs_memory(3 * _BIG_B * _big_T(D) * D * 2 / 2**30 + 2)
    B, T, g, (zpre, bias_row, x, w, b) = _big_gate_norm_inputs(D, dtype, 0)
    p, seed = 0.1, BIG_SEED
    y, mean, rstd = torch.ops.vgmr.gate_norm(zpre, bias_row, x, w, b, ALPHA, BETA, p, _seed(seed))
    rows = [(0, 0), (0, T - 1), (1, 0), (1, T // 2), (1, T - 1)]  # the last rows lie beyond 2^31
    _rows_check(y, mean, rstd, [zpre, bias_row, x, w, b], rows, p, seed)
    assert not bool(torch.isnan(mean).any()) and not bool(torch.isnan(rstd).any())


@pytest.mark.slow
@pytest.mark.parametrize("D", [4096, 4099], ids=["vec", "generic"])
def test_gate_norm_backward_beyond_2_31_elements(D):
    # dy is zero except on a few rows (two of them beyond 2^31), so dbias_row, dln_weight and
    # dln_bias equal the reference on those rows alone; the other rows' dzpre / dx are exactly 0
    dtype = torch.bfloat16
    _needs_memory(5 * _BIG_B * _big_T(D) * D * 2 / 2**30 + 4)
    B, T, g, (zpre, bias_row, x, w, b) = _big_gate_norm_inputs(D, dtype, 1)
    y, mean, rstd = torch.ops.vgmr.gate_norm(zpre, bias_row, x, w, b, ALPHA, BETA, 0.0, _seed(0))
    del y
    rows = [(0, 1), (1, T - 2), (1, T - 1)]
    dy = torch.zeros(B, T, D, device=DEV, dtype=dtype)
    for bi, ti in rows:
        dy[bi, ti] = torch.randn(D, generator=g, device=DEV).to(dtype)
    dz, dbias, dx, dw, db = torch.ops.vgmr.gate_norm_backward(dy, zpre, bias_row, x, w, mean, rstd, ALPHA, BETA,
                                                              0.0, _seed(0))

    def per_row(truth: bool):
        """[y, dzpre, dbias_row, dx, dln_weight, dln_bias] lists over `rows`, reference on each row
        alone (float64 truth, or eager in the input dtypes)."""
        outs = [[] for _ in range(6)]
        for bi, ti in rows:
            a = [zpre[bi:bi + 1, ti:ti + 1], bias_row[bi:bi + 1], x[bi:bi + 1, ti:ti + 1], w, b]
            c = dy[bi:bi + 1, ti:ti + 1]
            if truth:
                a, c = [t.double() for t in a], c.double()
            res = _grads(lambda *z: ref.gate_norm(*z, alpha=ALPHA, beta=BETA), a, [c])
            for j in range(6):
                outs[j].append(res[j])
        return outs

    tr, er = per_row(True), per_row(False)
    for k, (bi, ti) in enumerate(rows):
        assert_close_to_truth(dz[bi, ti], er[1][k][0, 0], tr[1][k][0, 0], dtype, name=f"dzpre[{bi},{ti}]")
        assert_close_to_truth(dx[bi, ti], er[3][k][0, 0], tr[3][k][0, 0], dtype, name=f"dx[{bi},{ti}]")
    for bi in range(B):
        ks = [k for k, r in enumerate(rows) if r[0] == bi]
        t_db = sum(tr[2][k][0] for k in ks)
        e_db = sum(er[2][k][0] for k in ks)
        assert_close_to_truth(dbias[bi], e_db, t_db, torch.float32, name=f"dbias_row[{bi}]", atol=1e-5)
    assert_close_to_truth(dw, sum(er[4]), sum(tr[4]), torch.float32, name="dln_weight", atol=1e-5)
    assert_close_to_truth(db, sum(er[5]), sum(tr[5]), torch.float32, name="dln_bias", atol=1e-5)
    for bi, ti in [(0, 0), (1, T - 3), (1, T // 2)]:  # rows with dy = 0
        assert bool((dz[bi, ti] == 0).all()) and bool((dx[bi, ti] == 0).all())


@pytest.mark.slow
def test_summary_pool_and_interaction_beyond_2_31_elements():
    # summary_pool backward writes dh [B, T, D] > 2^31 elements (64-bit index kernel)
    dtype = torch.float16
    B, D = 1, 4096
    T = 2**31 // D + 5
    _needs_memory(2 * B * T * D * 2 / 2**30 + 4)
    g = torch.Generator(device=DEV).manual_seed(2)
    h = torch.randn(B, T, D, generator=g, device=DEV, dtype=dtype)
    mask = torch.rand(B, T, generator=g, device=DEV) > 0.5
    mean, mx, am = torch.ops.vgmr.summary_pool(h, mask)
    hm = h.masked_fill(~mask[:, :, None], float("-inf"))
    ref_max = hm.max(dim=1).values
    assert torch.equal(mx, ref_max)
    t_mean = torch.stack([(h[:, :, c0:c0 + 512].double() * mask[:, :, None]).sum(1) for c0 in range(0, D, 512)],
                         dim=1).view(B, D) / mask.sum(1, keepdim=True).double()
    assert (mean.double() - t_mean).abs().max().item() < 2e-3
    del hm
    dmean = torch.randn(B, D, generator=g, device=DEV).to(dtype)
    dmax = torch.randn(B, D, generator=g, device=DEV).to(dtype)
    dh = torch.ops.vgmr.summary_pool_backward(dmean, dmax, mask, am, T)
    n = mask.sum().clamp(min=1).double()
    for t in [0, T // 2, T - 1, T - 2]:  # the last steps lie beyond 2^31 elements
        expect = mask[0, t].double() * dmean[0].double() / n + (am[0] == t).double() * dmax[0].double()
        assert (dh[0, t].double() - expect).abs().max().item() < 5e-3, t
    del h, dh
    # interaction: u [B, M, (3M-1) D] > 2^31 elements
    M, Dm = 2, 1024
    Bi = 2**31 // (M * (3 * M - 1) * Dm) + 3
    _needs_memory(2 * Bi * M * (3 * M - 1) * Dm * 2 / 2**30 + 2)
    s = torch.randn(Bi, M, Dm, generator=g, device=DEV, dtype=dtype)
    u = torch.ops.vgmr.interaction(s)
    for bi in [0, Bi - 1]:
        expect = ref.interaction(s[bi:bi + 1].double())
        assert (u[bi:bi + 1].double() - expect).abs().max().item() < 1e-2
    du = torch.randn_like(u)
    ds = torch.ops.vgmr.interaction_backward(du, s)
    for bi in [0, Bi - 1]:
        sb = s[bi:bi + 1].double().requires_grad_()
        (expect,) = torch.autograd.grad(ref.interaction(sb), sb, du[bi:bi + 1].double())
        assert (ds[bi:bi + 1].double() - expect).abs().max().item() < 5e-2
