"""``vgmr_triton::interaction`` and ``interaction_backward`` (docs/math.md §2, docs/ops.md).

``u[b, m] = [s_m; s_j...; s_m*s_j...; |s_m - s_j|...; mean_j s_j]`` over ``j != m``
ascending: ``3M - 1`` blocks of ``D``.  Block indices for target ``m`` and the
``k``-th non-target ``j`` (``k = j - (j > m)``): ``0`` s_m, ``1 + k`` s_j,
``M + k`` s_m*s_j, ``2M - 1 + k`` |s_m - s_j|, ``3M - 2`` the context.

Forward: one program per ``(b, m, D-block)`` writes all ``3M - 1`` blocks.
Backward: one program per ``(b, m, D-block)`` gathers every contribution to
``ds_m``: from its own row (s_m, agreement, discrepancy blocks) and from each
target ``j``'s row, where ``m`` sits at position ``m - (m > j)`` (s_m copy,
agreement, discrepancy and the context ``1/(M-1)``).  ``d|x|/dx = sign(x)`` with
``sign(0) = 0``.  ``M`` is a run-time argument (one compiled kernel serves every modality
count); ``BLOCK_D`` comes from the named table :func:`configs` (``aot.py`` compiles each entry).
"""

import functools

import torch
import triton
import triton.language as tl

from . import CONFIG, alloc, check_device, check_float, define_op, launch, num_warps_for

_OP = "vgmr_triton::interaction"
_OP_BWD = "vgmr_triton::interaction_backward"


@triton.jit
def _ia_program(D, n_db, M, BLOCK_D: tl.constexpr):
    # One program per (b, m, column block): row bm = b*M + m of u ([B*M, 3M-1, D]) and the
    # base offsets of sample b's summaries s ([B, M, D]) and of row bm of u.
    pid = tl.program_id(0).to(tl.int64)
    bm = pid // n_db
    cols = (pid % n_db) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    m = bm % M
    b = bm // M
    return bm, cols, cmask, m, b * M * D, bm * (3 * M - 1) * D


@triton.jit(do_not_specialize=["n_db", "M"])
def _ia_fwd_kernel(u_ptr, s_ptr, D, n_db, M, BLOCK_D: tl.constexpr):
    bm, cols, cmask, m, s_base, u_base = _ia_program(D, n_db, M, BLOCK_D)
    ty = u_ptr.dtype.element_ty
    sm = tl.load(s_ptr + s_base + m * D + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(u_ptr + u_base + cols, sm.to(ty), mask=cmask)
    ctx = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(M):
        sj = tl.load(s_ptr + s_base + j * D + cols, mask=cmask, other=0.0).to(tl.float32)
        other = (cols * 0 + m) != j  # a vector: the interpreter rejects scalar-bool & vector masks
        k = j - (m < j).to(tl.int64)
        st = cmask & other
        tl.store(u_ptr + u_base + (1 + k) * D + cols, sj.to(ty), mask=st)
        tl.store(u_ptr + u_base + (M + k) * D + cols, (sm * sj).to(ty), mask=st)
        tl.store(u_ptr + u_base + (2 * M - 1 + k) * D + cols, tl.abs(sm - sj).to(ty), mask=st)
        ctx += tl.where(other, sj, 0.0)
    tl.store(u_ptr + u_base + (3 * M - 2) * D + cols, (ctx / (M - 1)).to(ty), mask=cmask)


@triton.jit(do_not_specialize=["n_db", "M"])
def _ia_bwd_kernel(ds_ptr, du_ptr, s_ptr, D, n_db, M, BLOCK_D: tl.constexpr):
    bm, cols, cmask, m, s_base, own = _ia_program(D, n_db, M, BLOCK_D)
    sm = tl.load(s_ptr + s_base + m * D + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.load(du_ptr + own + cols, mask=cmask, other=0.0).to(tl.float32)
    for j in range(M):
        other = (cols * 0 + m) != j  # a vector: the interpreter rejects scalar-bool & vector masks
        lm = cmask & other
        sj = tl.load(s_ptr + s_base + j * D + cols, mask=cmask, other=0.0).to(tl.float32)
        diff = sm - sj
        sgn = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        # own row: s_m * s_j and |s_m - s_j| at position k of j in N(m)
        k = j - (m < j).to(tl.int64)
        a = tl.load(du_ptr + own + (M + k) * D + cols, mask=lm, other=0.0).to(tl.float32)
        d = tl.load(du_ptr + own + (2 * M - 1 + k) * D + cols, mask=lm, other=0.0).to(tl.float32)
        # target j's row: m at position kp of N(j)
        kp = m - (j < m).to(tl.int64)
        jrow = own + (j - m) * (3 * M - 1) * D  # row b*M + j of u
        e = tl.load(du_ptr + jrow + (1 + kp) * D + cols, mask=lm, other=0.0).to(tl.float32)
        a2 = tl.load(du_ptr + jrow + (M + kp) * D + cols, mask=lm, other=0.0).to(tl.float32)
        d2 = tl.load(du_ptr + jrow + (2 * M - 1 + kp) * D + cols, mask=lm, other=0.0).to(tl.float32)
        c2 = tl.load(du_ptr + jrow + (3 * M - 2) * D + cols, mask=lm, other=0.0).to(tl.float32)
        acc += (a + a2) * sj + (d + d2) * sgn + e + c2 / (M - 1)
    tl.store(ds_ptr + s_base + m * D + cols, acc.to(ds_ptr.dtype.element_ty), mask=cmask)


#: Narrowest D-block: 256 elements, one warp with 8 contiguous values per thread, so aligned
#: rows get 128-bit accesses (a narrower block spreads a warp's 32 threads over fewer values
#: and Triton then gives each thread one scalar; the AOT resource table showed 32-bit loads).
#: A short row leaves lanes idle instead: the data moved is the same.
MIN_BLOCK_D = 256


def configs():
    """Named configurations: one per power-of-two ``BLOCK_D`` from ``MIN_BLOCK_D`` to
    ``ia_block_d``; warps chosen so a thread holds 16 bytes of a row (a 128-bit access).
    Built once per value of that setting (a tuple: callers must not modify the entries)."""
    return _table(CONFIG["ia_block_d"])


@functools.lru_cache(maxsize=None)
def _table(block_d: int):
    out = []
    top = triton.next_power_of_2(block_d)
    bd = min(MIN_BLOCK_D, top)
    while bd <= top:
        # 8 values per thread: 16 bytes of bf16/fp16 (fp32 rows get two 128-bit accesses)
        out.append({"name": f"d{bd}", "BLOCK_D": bd, "num_warps": max(1, min(8, bd // (32 * 8)))})
        bd *= 2
    return tuple(out)


def _pick(D: int):
    for cfg in configs():
        if D <= cfg["BLOCK_D"]:
            return cfg
    return configs()[-1]


def _check_s(op, s: torch.Tensor):
    check_float(op, "s", s)
    if s.dim() != 3 or s.shape[1] < 2:
        raise ValueError(f"{op}: s must be [B, M, D] with M >= 2, got {tuple(s.shape)}")
    check_device(op, "s", s)
    return s.shape


@define_op("interaction")
def interaction(s: torch.Tensor) -> torch.Tensor:
    B, M, D = _check_s(_OP, s)
    s = s.contiguous()
    u = alloc((B, M, (3 * M - 1) * D), s.dtype, s.device)
    if B * D == 0:
        return u
    cfg = _pick(D)
    n_db = triton.cdiv(D, cfg["BLOCK_D"])
    launch(_ia_fwd_kernel, (B * M * n_db,), u, s, D, n_db, M,
           BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return u


@define_op("interaction_backward")
def interaction_backward(du: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    B, M, D = _check_s(_OP_BWD, s)
    check_float(_OP_BWD, "du", du)
    if tuple(du.shape) != (B, M, (3 * M - 1) * D):
        raise ValueError(f"{_OP_BWD}: du must be {(B, M, (3 * M - 1) * D)}, got {tuple(du.shape)}")
    check_device(_OP_BWD, "s", s, du=du)
    du = du.contiguous()
    s = s.contiguous()
    ds = alloc((B, M, D), du.dtype, du.device)
    if B * D == 0:
        return ds
    cfg = _pick(D)
    n_db = triton.cdiv(D, cfg["BLOCK_D"])
    launch(_ia_bwd_kernel, (B * M * n_db,), ds, du, s, D, n_db, M,
           BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return ds
