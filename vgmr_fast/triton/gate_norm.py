"""``vgmr_triton::gate_norm`` and ``gate_norm_backward`` (SPEC §5, docs/ops.md).

Forward, per row ``r = b*T + t`` of ``D`` elements::

    z = zpre + bias_row[b];  G = sigmoid(z);  Geff = beta + (1-beta)(1 + alpha(2G-1))
    v = Geff * x;  y = LayerNorm_D(v) * w + b;  y = keep ? y / (1-p) : 0

Paths (chosen on the host from D only):

* ``D <= CONFIG["gn_max_single_d"]`` (single block; ``gn_bwd_max_single_d`` for
  the backward): a program holds a tile of ``BLOCK_R`` whole rows, one pass: load,
  gate, mean/var, normalise, dropout, store ``y``, ``mean``, ``rstd``.
* larger ``D`` (tiled): a stats kernel walks each row in chunks of
  ``CONFIG["gn_chunk_d"]``, merging chunk (mean, M2) pairs with Chan's formula,
  and stores mean/rstd; then an elementwise kernel over (row tile, chunk) writes ``y``.

Backward recomputes ``G``, ``Geff``, ``v_hat`` and the keep mask.  Rows are split
into groups that never straddle a batch index ``b``: a program owns either
several whole batches (``T`` rows each) or one slice of ``T`` of one batch, so it
reduces ``dbias_row[b]`` for its rows in registers; ``dln_weight`` and
``dln_bias`` are written as fp32 per-program partials ``[programs, D]`` and summed
by torch in a fixed order.  Deterministic, no atomics.  For tiled ``D`` a stats
kernel first stores the per-row ``mean_D(dv_hat)`` and ``mean_D(dv_hat * v_hat)``.

No host synchronisation: every launch parameter is derived from shapes.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl

from vgmr_fast.ops.dropout import check_p, threshold

from . import CONFIG, alloc, check_device, check_float, define_op, num_warps_for, sm_count, wrap_triton
from .philox import keep_block, seed_key, split_seed


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@triton.jit
def _gate(z, x, alpha, beta):
    G = tl.sigmoid(z)
    geff = beta + (1.0 - beta) * (1.0 + alpha * (2.0 * G - 1.0))
    return G, geff, geff * x


@triton.jit
def _load_v(zpre_ptr, bias_ptr, x_ptr, rows, bidx, cols, m2, D, alpha, beta):
    offs = rows[:, None] * D + cols[None, :]
    z = tl.load(zpre_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    z = z + tl.load(bias_ptr + bidx[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    G, geff, v = _gate(z, x, alpha, beta)
    return x, G, geff, v


@triton.jit
def _gn_fwd_stats_kernel(
    mean_ptr, rstd_ptr, zpre_ptr, bias_ptr, x_ptr,
    R, T, D, alpha, beta, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    bidx = rows // T
    mean = tl.zeros([BLOCK_R], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        msk = rmask[:, None] & cmask[None, :]
        x, G, geff, v = _load_v(zpre_ptr, bias_ptr, x_ptr, rows, bidx, cols, msk, D, alpha, beta)
        nc = tl.sum(cmask.to(tl.float32), axis=0)
        cmean = tl.sum(v, axis=1) / nc
        dev = tl.where(msk, v - cmean[:, None], 0.0)
        cm2 = tl.sum(dev * dev, axis=1)
        na = c0 * 1.0
        nt = na + nc
        delta = cmean - mean
        mean = mean + delta * (nc / nt)
        m2 = m2 + cm2 + delta * delta * (na * nc / nt)
    rstd = tl.math.rsqrt(m2 / D + eps)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _gn_fwd_kernel(
    y_ptr, mean_ptr, rstd_ptr, zpre_ptr, bias_ptr, x_ptr, w_ptr, b_ptr,
    R, T, D, n_col_blocks, alpha, beta, eps, seed_lo, seed_hi, thresh, keep_div,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rb = pid // n_col_blocks
    c0 = (pid % n_col_blocks) * BLOCK_D
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = c0 + tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    msk = rmask[:, None] & cmask[None, :]
    bidx = rows // T
    x, G, geff, v = _load_v(zpre_ptr, bias_ptr, x_ptr, rows, bidx, cols, msk, D, alpha, beta)
    if SINGLE:
        mean = tl.sum(v, axis=1) / D
        dev = tl.where(msk, v - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(dev * dev, axis=1) / D + eps)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
    else:
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = (v - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
    if HAS_DROPOUT:
        k0, k1 = seed_key(seed_lo, seed_hi)
        th = (tl.full((1,), 0, tl.int64) + thresh).to(tl.uint32)
        keep = keep_block(k0, k1, rows, c0, D, th, BLOCK_R, BLOCK_D)
        y = tl.where(keep, y / keep_div, 0.0)
    offs = rows[:, None] * D + cols[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _gn_bwd_terms(dy_ptr, zpre_ptr, bias_ptr, x_ptr, w, mean_ptr, rstd_ptr,
                  rows, bidx, rmask, c0, D, alpha, beta,
                  seed_lo, seed_hi, thresh, keep_div,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    # Recompute one [BLOCK_R, BLOCK_D] tile (columns c0 + arange): g = upstream grad after
    # dropout, v_hat, dv_hat.  w: the [BLOCK_D] LayerNorm weight of these columns.
    cols = c0 + tl.arange(0, BLOCK_D)
    cmask = cols < D
    msk = rmask[:, None] & cmask[None, :]
    x, G, geff, v = _load_v(zpre_ptr, bias_ptr, x_ptr, rows, bidx, cols, msk, D, alpha, beta)
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    vhat = tl.where(msk, (v - mean[:, None]) * rstd[:, None], 0.0)
    g = tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=msk, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        k0, k1 = seed_key(seed_lo, seed_hi)
        th = (tl.full((1,), 0, tl.int64) + thresh).to(tl.uint32)
        keep = keep_block(k0, k1, rows, c0, D, th, BLOCK_R, BLOCK_D)
        g = tl.where(keep, g / keep_div, 0.0)
    dvhat = g * w[None, :]
    return x, G, geff, rstd, vhat, g, dvhat


@triton.jit
def _gn_bwd_stats_kernel(
    rowstat_ptr, dy_ptr, zpre_ptr, bias_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr,
    R, T, D, alpha, beta, seed_lo, seed_hi, thresh, keep_div,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    # rowstat[r] = (mean_D(dv_hat), mean_D(dv_hat * v_hat)) for the tiled-D backward.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    bidx = rows // T
    s1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        x, G, geff, rstd, vhat, g, dvhat = _gn_bwd_terms(
            dy_ptr, zpre_ptr, bias_ptr, x_ptr, w, mean_ptr, rstd_ptr, rows, bidx, rmask, c0,
            D, alpha, beta, seed_lo, seed_hi, thresh, keep_div, BLOCK_R, BLOCK_D, HAS_DROPOUT)
        s1 += tl.sum(dvhat, axis=1)
        s2 += tl.sum(dvhat * vhat, axis=1)
    tl.store(rowstat_ptr + 2 * rows, s1 / D, mask=rmask)
    tl.store(rowstat_ptr + 2 * rows + 1, s2 / D, mask=rmask)


@triton.jit
def _gn_bwd_kernel(
    dz_ptr, dx_ptr, dbias_ptr, dw_part_ptr, db_part_ptr,
    dy_ptr, zpre_ptr, bias_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, rowstat_ptr,
    B, T, D, n_col_blocks, n_tb, b_per_prog, t_per_prog,
    alpha, beta, seed_lo, seed_hi, thresh, keep_div,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    # Program (bg, tb, cb): batches [bg*b_per_prog, ...), steps [tb*t_per_prog, ...), columns of chunk cb.
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % n_col_blocks
    rest = pid // n_col_blocks
    tb = rest % n_tb
    bg = rest // n_tb
    c0 = cb * BLOCK_D
    cols = c0 + tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    coef = 2.0 * alpha * (1.0 - beta)
    acc_w = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    b_start = bg * b_per_prog
    b_end = tl.minimum(b_start + b_per_prog, B)
    t_start = tb * t_per_prog
    t_end = tl.minimum(t_start + t_per_prog, T)
    for b in range(b_start, b_end):
        acc_z = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for t0 in range(t_start, t_end, BLOCK_R):
            ts = t0 + tl.arange(0, BLOCK_R)
            rmask = ts < t_end
            rows = b * T + ts
            bidx = rows * 0 + b
            msk = rmask[:, None] & cmask[None, :]
            x, G, geff, rstd, vhat, g, dvhat = _gn_bwd_terms(
                dy_ptr, zpre_ptr, bias_ptr, x_ptr, w, mean_ptr, rstd_ptr, rows, bidx, rmask, c0,
                D, alpha, beta, seed_lo, seed_hi, thresh, keep_div, BLOCK_R, BLOCK_D, HAS_DROPOUT)
            acc_b += g
            acc_w += g * vhat
            if SINGLE:
                c1 = tl.sum(dvhat, axis=1) / D
                c2 = tl.sum(dvhat * vhat, axis=1) / D
            else:
                c1 = tl.load(rowstat_ptr + 2 * rows, mask=rmask, other=0.0)
                c2 = tl.load(rowstat_ptr + 2 * rows + 1, mask=rmask, other=0.0)
            dv = rstd[:, None] * (dvhat - c1[:, None] - vhat * c2[:, None])
            dx = dv * geff
            dz = tl.where(msk, dv * x * coef * G * (1.0 - G), 0.0)
            acc_z += dz
            offs = rows[:, None] * D + cols[None, :]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=msk)
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=msk)
        tl.store(dbias_ptr + (b * n_tb + tb) * D + cols, tl.sum(acc_z, axis=0), mask=cmask)
    part = bg * n_tb + tb
    tl.store(dw_part_ptr + part * D + cols, tl.sum(acc_w, axis=0), mask=cmask)
    tl.store(db_part_ptr + part * D + cols, tl.sum(acc_b, axis=0), mask=cmask)


# ---------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------
def _col_config(D: int, backward: bool = False):
    """(BLOCK_D, n_col_blocks, SINGLE, BLOCK_R) for rows of D elements."""
    pre = "gn_bwd_" if backward else "gn_"
    single = D <= CONFIG[pre + "max_single_d"]
    if single:
        block_d = max(4, triton.next_power_of_2(D))
        n_col = 1
    else:
        block_d = max(4, triton.next_power_of_2(CONFIG[pre + "chunk_d"]))
        n_col = triton.cdiv(D, block_d)
    block_r = max(1, CONFIG["gn_max_tile"] // block_d)
    return block_d, n_col, single, block_r


def _bwd_rows_config(B: int, T: int, n_col: int, block_r: int, device: torch.device):
    """Split the rows into groups that never straddle a batch: (b_per_prog, n_tb, t_per_prog, block_r)."""
    block_r = max(1, min(block_r, triton.next_power_of_2(T)))
    target = max(1, (CONFIG["programs_per_sm"] * sm_count(device)) // n_col)
    if B >= target:
        b_per_prog = triton.cdiv(B, target)
        return b_per_prog, 1, T, block_r
    n_tb = max(1, min(triton.cdiv(T, block_r), triton.cdiv(target, B)))
    t_per_prog = triton.cdiv(triton.cdiv(T, n_tb), block_r) * block_r
    n_tb = triton.cdiv(T, t_per_prog)
    return 1, n_tb, t_per_prog, block_r


def _dropout_args(p: float, seed: int):
    check_p(p)
    lo, hi = split_seed(seed)
    if p > 0.0:
        return True, lo, hi, threshold(p), 1.0 - p
    return False, lo, hi, 0, 1.0


def _check_inputs(zpre, bias_row, x, ln_weight, ln_bias):
    check_float("zpre", zpre)
    check_float("x", x)
    if x.dim() != 3 or zpre.shape != x.shape:
        raise ValueError(f"vgmr_triton.gate_norm: zpre and x must be [B, T, D] of one shape, "
                         f"got {tuple(zpre.shape)} and {tuple(x.shape)}")
    B, T, D = x.shape
    if tuple(bias_row.shape) != (B, D):
        raise ValueError(f"vgmr_triton.gate_norm: bias_row must be [B, D] = {(B, D)}, got {tuple(bias_row.shape)}")
    if tuple(ln_weight.shape) != (D,) or tuple(ln_bias.shape) != (D,):
        raise ValueError(f"vgmr_triton.gate_norm: ln_weight and ln_bias must be [D] = ({D},)")
    check_device(zpre, bias_row, x, ln_weight, ln_bias)
    return B, T, D


# ---------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------
@define_op("gate_norm")
def gate_norm(
    zpre: torch.Tensor,
    bias_row: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    alpha: float,
    beta: float,
    p: float,
    seed: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, D = _check_inputs(zpre, bias_row, x, ln_weight, ln_bias)
    has_drop, seed_lo, seed_hi, thresh, keep_div = _dropout_args(p, seed)
    zpre = zpre.contiguous()
    x = x.contiguous()
    bias_row = bias_row.contiguous().to(torch.float32)
    ln_weight = ln_weight.contiguous().to(torch.float32)
    ln_bias = ln_bias.contiguous().to(torch.float32)
    y = alloc((B, T, D), x.dtype, x.device)
    mean = alloc((B, T), torch.float32, x.device)
    rstd = alloc((B, T), torch.float32, x.device)
    R = B * T
    if R == 0 or D == 0:
        return y, mean.zero_(), rstd.zero_()
    eps = 1e-5
    block_d, n_col, single, block_r = _col_config(D)
    block_r = min(block_r, triton.next_power_of_2(R))
    n_row = triton.cdiv(R, block_r)
    warps = num_warps_for(block_r * block_d)
    if not single:
        wrap_triton(_gn_fwd_stats_kernel)[(n_row,)](
            mean, rstd, zpre, bias_row, x, R, T, D, float(alpha), float(beta), eps,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    wrap_triton(_gn_fwd_kernel)[(n_row * n_col,)](
        y, mean, rstd, zpre, bias_row, x, ln_weight, ln_bias,
        R, T, D, n_col, float(alpha), float(beta), eps, seed_lo, seed_hi, thresh, keep_div,
        BLOCK_R=block_r, BLOCK_D=block_d, SINGLE=single, HAS_DROPOUT=has_drop, num_warps=warps)
    return y, mean, rstd


@define_op("gate_norm_backward")
def gate_norm_backward(
    dy: torch.Tensor,
    zpre: torch.Tensor,
    bias_row: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    alpha: float,
    beta: float,
    p: float,
    seed: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, D = _check_inputs(zpre, bias_row, x, ln_weight, ln_weight)
    check_float("dy", dy)
    if dy.shape != x.shape:
        raise ValueError(f"vgmr_triton.gate_norm_backward: dy must be {tuple(x.shape)}, got {tuple(dy.shape)}")
    if tuple(mean.shape) != (B, T) or tuple(rstd.shape) != (B, T):
        raise ValueError(f"vgmr_triton.gate_norm_backward: mean and rstd must be [B, T] = {(B, T)}")
    check_device(dy, mean, rstd)
    has_drop, seed_lo, seed_hi, thresh, keep_div = _dropout_args(p, seed)
    dev = x.device
    dy = dy.contiguous()
    zpre = zpre.contiguous()
    x = x.contiguous()
    bias_row = bias_row.contiguous().to(torch.float32)
    ln_weight = ln_weight.contiguous().to(torch.float32)
    mean = mean.contiguous().to(torch.float32)
    rstd = rstd.contiguous().to(torch.float32)
    dzpre = alloc((B, T, D), zpre.dtype, dev)
    dx = alloc((B, T, D), x.dtype, dev)
    R = B * T
    if R == 0 or D == 0:
        z = torch.zeros((D,), dtype=torch.float32, device=dev)
        return dzpre, torch.zeros((B, D), dtype=torch.float32, device=dev), dx, z, z.clone()
    block_d, n_col, single, block_r = _col_config(D, backward=True)
    b_per_prog, n_tb, t_per_prog, block_r = _bwd_rows_config(B, T, n_col, block_r, dev)
    n_bg = triton.cdiv(B, b_per_prog)
    warps = num_warps_for(2 * block_r * block_d)
    if single:
        rowstat = mean  # unused
    else:
        rowstat = alloc((R, 2), torch.float32, dev)
        st_r = max(1, min(block_r, triton.next_power_of_2(R)))
        wrap_triton(_gn_bwd_stats_kernel)[(triton.cdiv(R, st_r),)](
            rowstat, dy, zpre, bias_row, x, ln_weight, mean, rstd,
            R, T, D, float(alpha), float(beta), seed_lo, seed_hi, thresh, keep_div,
            BLOCK_R=st_r, BLOCK_D=block_d, HAS_DROPOUT=has_drop, num_warps=warps)
    if n_tb == 1:
        dbias = alloc((B, D), torch.float32, dev)
        dbias_part = dbias
    else:
        dbias_part = alloc((B * n_tb, D), torch.float32, dev)
    dw_part = alloc((n_bg * n_tb, D), torch.float32, dev)
    db_part = alloc((n_bg * n_tb, D), torch.float32, dev)
    wrap_triton(_gn_bwd_kernel)[(n_bg * n_tb * n_col,)](
        dzpre, dx, dbias_part, dw_part, db_part,
        dy, zpre, bias_row, x, ln_weight, mean, rstd, rowstat,
        B, T, D, n_col, n_tb, b_per_prog, t_per_prog,
        float(alpha), float(beta), seed_lo, seed_hi, thresh, keep_div,
        BLOCK_R=block_r, BLOCK_D=block_d, SINGLE=single, HAS_DROPOUT=has_drop, num_warps=warps)
    if n_tb != 1:
        dbias = dbias_part.view(B, n_tb, D).sum(dim=1)
    dln_w = dw_part.sum(dim=0)
    dln_b = db_part.sum(dim=0)
    return dzpre, dbias, dx, dln_w, dln_b
