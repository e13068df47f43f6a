"""``vgmr_triton::summary_pool`` and ``summary_pool_backward`` (docs/math.md §1, docs/ops.md).

Forward: one program per ``(b, D-block)`` walks ``T`` in ``[BLOCK_T, BLOCK_D]``
tiles, accumulating the masked sum (fp32), the valid-step count, and a running
max with its index: the first valid maximal step; NaN counts as maximal and the
first NaN wins (as ``torch.max``).  A row with no valid step gets
``mean = max = 0`` and ``argmax = -1``.

Backward: one program per ``(b, T-block, D-block)``:
``dh[b,t] = mask[b,t] * dmean[b] / max(1, n_b) + (t == argmax[b]) * dmax[b]``,
``n_b`` recounted from the mask in the program (no host sync, no extra launch).

Tiles come from the named table :func:`configs` (``aot.py`` compiles every entry).
"""

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import CONFIG, alloc, check_device, check_float, define_op, launch, sm_count

_OP = "vgmr_triton::summary_pool"
_OP_BWD = "vgmr_triton::summary_pool_backward"
#: T must fit the int32 argmax with -1 as the "no valid step" sentinel (as vgmr::summary_pool).
_T_MAX = 2**31 - 1

_BIG = tl.constexpr(2147483647)


@triton.jit(do_not_specialize=["T", "n_db"])
def _sp_fwd_kernel(
    mean_ptr, max_ptr, arg_ptr, h_ptr, mask_ptr,
    T, D, n_db,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_db
    cols = (pid % n_db) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_T], dtype=tl.int32)
    run_max = tl.full([BLOCK_D], float("-inf"), tl.float32)
    run_idx = tl.full([BLOCK_D], -1, tl.int32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        valid = ts < T
        if HAS_MASK:
            mv = tl.load(mask_ptr + b * T + ts, mask=valid, other=0)
            valid = valid & (mv != 0)
        cnt += valid.to(tl.int32)
        m2 = valid[:, None] & cmask[None, :]
        h = tl.load(h_ptr + (b * T + ts)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(h, axis=0)
        tidx = ts.to(tl.int32)[:, None] + tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
        is_nan = h != h
        nan_idx = tl.min(tl.where(m2 & is_nan, tidx, _BIG), axis=0)
        ok = m2 & (h == h)
        vals = tl.where(ok, h, float("-inf"))
        tmax = tl.max(vals, axis=0)
        t_idx = tl.min(tl.where(ok & (vals == tmax[None, :]), tidx, _BIG), axis=0)
        run_ok = run_max == run_max  # the running max is not NaN
        take_nan = (nan_idx < _BIG) & run_ok
        take_ok = run_ok & (nan_idx == _BIG) & (t_idx < _BIG) & ((tmax > run_max) | (run_idx < 0))
        run_max = tl.where(take_nan, float("nan"), tl.where(take_ok, tmax, run_max))
        run_idx = tl.where(take_nan, nan_idx, tl.where(take_ok, t_idx, run_idx))
    n = tl.sum(cnt, axis=0).to(tl.float32)
    mean = acc / tl.maximum(n, 1.0)
    mx = tl.where(run_idx >= 0, run_max, 0.0)
    out = b * D + cols
    tl.store(mean_ptr + out, mean.to(mean_ptr.dtype.element_ty), mask=cmask)
    tl.store(max_ptr + out, mx.to(max_ptr.dtype.element_ty), mask=cmask)
    tl.store(arg_ptr + out, run_idx, mask=cmask)


@triton.jit(do_not_specialize=["T", "n_tb", "n_db"])
def _sp_bwd_kernel(
    dh_ptr, dmean_ptr, dmax_ptr, mask_ptr, arg_ptr,
    T, D, n_tb, n_db,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    db = pid % n_db
    rest = pid // n_db
    tb = rest % n_tb
    b = rest // n_tb
    cols = db * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    ts = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = ts < T
    if HAS_MASK:
        cnt = tl.zeros([BLOCK_N], dtype=tl.int32)
        for n0 in range(0, T, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            mv = tl.load(mask_ptr + b * T + ns, mask=ns < T, other=0)
            cnt += (mv != 0).to(tl.int32)
        n = tl.sum(cnt, axis=0).to(tl.float32)
        valid = tmask & (tl.load(mask_ptr + b * T + ts, mask=tmask, other=0) != 0)
    else:
        n = T * 1.0
        valid = tmask
    n = tl.maximum(n, 1.0)
    # dmean / dmax / argmax are [B, D] vectors in a slice of the tile's layout, read once per
    # program with scalar loads (the resource table shows 32-bit loads here); the traffic that
    # matters, the [T, D] tile of dh, is stored with 128-bit vectors for aligned rows.
    dmean = tl.load(dmean_ptr + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
    dmax = tl.load(dmax_ptr + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
    arg = tl.load(arg_ptr + b * D + cols, mask=cmask, other=-1)
    dh = tl.where(valid[:, None], (dmean / n)[None, :], 0.0)
    dh += tl.where(ts.to(tl.int32)[:, None] == arg[None, :], dmax[None, :], 0.0)
    m2 = tmask[:, None] & cmask[None, :]
    tl.store(dh_ptr + (b * T + ts)[:, None] * D + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=m2)


#: Rows of the mask counted per step of the backward's count loop.
BLOCK_N = 256


def _warps(elements: int, block_d: int) -> int:
    # 8 values per thread (a 128-bit bf16/fp16 access) and 16 for the narrowest block: what
    # the AOT compile found free of spills (ptxas 13 spilled 8 bytes of the forward's running
    # max/argmax/NaN tiles at 80-95 registers for 16 per thread at D-block 64 and for 8 per
    # thread at D-block 32, bf16).
    per_thread = 16 if block_d <= 32 else 8
    return max(1, min(8, elements // (32 * per_thread)))


def configs():
    """Named configurations: ``BLOCK_D`` from ``sp_block_d`` halved down to 32 (narrower
    blocks when ``B * D-blocks`` would underfill the GPU), ``BLOCK_T`` filling a tile of
    ``sp_max_tile`` elements, ``num_warps`` for that tile.  Built once per value of the two
    settings (a tuple: callers must not modify the entries)."""
    return _table(CONFIG["sp_block_d"], CONFIG["sp_max_tile"])


@functools.lru_cache(maxsize=None)
def _table(block_d: int, max_tile: int):
    out = []
    bd = triton.next_power_of_2(block_d)
    while True:
        bt = max(1, max_tile // bd)
        out.append({"name": f"d{bd}_t{bt}", "BLOCK_D": bd, "BLOCK_T": bt, "num_warps": _warps(bt * bd, bd)})
        if bd <= 32:
            return tuple(out)
        bd //= 2


def _pick(B: int, D: int, device: torch.device):
    table = configs()
    for cfg in table[:-1]:
        if D <= cfg["BLOCK_D"] // 2:
            continue  # a narrower block covers the row
        # the forward has one program per (b, D-block): narrower blocks while that underfills the GPU
        if B * triton.cdiv(D, cfg["BLOCK_D"]) >= 2 * sm_count(device):
            return cfg
    return table[-1]


def _mask_arg(op: str, mask: Optional[torch.Tensor], B: int, T: int, like: torch.Tensor):
    if mask is None:
        return like, False
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be bool (True = valid step), got {mask.dtype}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"{op}: mask must be [B, T] = {(B, T)}, got {tuple(mask.shape)}")
    check_device(op, "h" if op == _OP else "dmean", like, mask=mask)
    return mask.contiguous().view(torch.uint8), True


@define_op("summary_pool")
def summary_pool(
    h: torch.Tensor, mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_float(_OP, "h", h)
    if h.dim() != 3:
        raise ValueError(f"{_OP}: h must be [B, T, D], got {tuple(h.shape)}")
    check_device(_OP, "h", h)
    B, T, D = h.shape
    if T >= _T_MAX:
        raise ValueError(f"{_OP}: T must fit the int32 argmax (T < 2**31 - 1), got {T}")
    mask_t, has_mask = _mask_arg(_OP, mask, B, T, h)
    h = h.contiguous()
    mean = alloc((B, D), h.dtype, h.device)
    mx = alloc((B, D), h.dtype, h.device)
    arg = alloc((B, D), torch.int32, h.device)
    if B * D == 0:
        return mean, mx, arg
    cfg = _pick(B, D, h.device)
    n_db = triton.cdiv(D, cfg["BLOCK_D"])
    launch(_sp_fwd_kernel, (B * n_db,), mean, mx, arg, h, mask_t, T, D, n_db,
           HAS_MASK=has_mask, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return mean, mx, arg


@define_op("summary_pool_backward")
def summary_pool_backward(
    dmean: torch.Tensor, dmax: torch.Tensor, mask: Optional[torch.Tensor], argmax: torch.Tensor, T: int
) -> torch.Tensor:
    check_float(_OP_BWD, "dmean", dmean)
    check_float(_OP_BWD, "dmax", dmax)
    if dmean.dim() != 2:
        raise ValueError(f"{_OP_BWD}: dmean must be [B, D], got {tuple(dmean.shape)}")
    if dmax.dtype != dmean.dtype:
        raise TypeError(f"{_OP_BWD}: dmax must have the dtype of dmean ({dmean.dtype}), got {dmax.dtype}")
    if dmax.shape != dmean.shape:
        raise ValueError(f"{_OP_BWD}: dmax must have the shape of dmean {tuple(dmean.shape)}, got {tuple(dmax.shape)}")
    if argmax.dtype != torch.int32:
        raise TypeError(f"{_OP_BWD}: argmax must be int32, got {argmax.dtype}")
    if argmax.shape != dmean.shape:
        raise ValueError(f"{_OP_BWD}: argmax must have the shape of dmean {tuple(dmean.shape)}, "
                         f"got {tuple(argmax.shape)}")
    check_device(_OP_BWD, "dmean", dmean, dmax=dmax, argmax=argmax)
    B, D = dmean.shape
    T = int(T)
    if not 0 <= T < _T_MAX:
        raise ValueError(f"{_OP_BWD}: T must be a non-negative int32 below 2**31 - 1 (the argmax "
                         f"sentinel is -1), got {T}")
    dmean = dmean.contiguous()
    dmax = dmax.contiguous()
    argmax = argmax.contiguous()
    mask_t, has_mask = _mask_arg(_OP_BWD, mask, B, T, dmean)
    dh = alloc((B, T, D), dmean.dtype, dmean.device)
    if B * T * D == 0:
        return dh
    cfg = _pick(B, D, dmean.device)
    n_db = triton.cdiv(D, cfg["BLOCK_D"])
    n_tb = triton.cdiv(T, cfg["BLOCK_T"])
    launch(_sp_bwd_kernel, (B * n_tb * n_db,), dh, dmean, dmax, mask_t, argmax, T, D, n_tb, n_db,
           HAS_MASK=has_mask, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_N=BLOCK_N,
           num_warps=cfg["num_warps"])
    return dh
