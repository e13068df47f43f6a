"""``vgmr_triton::gate_norm`` and ``gate_norm_backward`` (docs/math.md §5, docs/ops.md, docs/backends.md).

Forward, per row ``r = b*T + t`` of ``D`` elements::

    z = zpre + bias_row[b];  G = sigmoid(z);  Geff = beta + (1-beta)(1 + alpha(2G-1))
    v = Geff * x;  y = LayerNorm_D(v) * w + b;  y = keep ? y / (1-p) : 0

Row statistics (the same algorithm on every backend): shift the row by its first element
``K = v[0]``, then two passes over the shifted values: ``mean_s = mean(v - K)``,
``var = mean((v - K - mean_s)^2)``, normalised value ``(v - K - mean_s) * rstd``; the op saves
``mean = K + mean_s`` and ``rstd`` (fp32).  A row constant along ``D`` gives exactly ``ln_bias``.
fp32 overflow: a row whose ``(v - K)^2`` overflows has ``var = inf``; ``rstd`` is then stored
as NaN and the row's output is NaN (as eager's), never a silent ``ln_bias``.

Paths (chosen on the host from D only, from the named tables :func:`fwd_configs` and
:func:`bwd_configs`; ``aot.py`` compiles every entry):

* single block (``D <= CONFIG["gn_max_single_d"]``; ``gn_bwd_max_single_d`` for the
  backward): a program holds a tile of ``BLOCK_R`` whole rows: load, gate, K, mean_s, var,
  normalise, dropout, store ``y``, ``mean``, ``rstd``.
* tiled (larger ``D``): a stats kernel reads each row in chunks: chunk 0 for ``K``, a pass
  for ``mean_s``, a pass for ``var``; it stores mean/rstd and ``(K, mean_s)`` in a scratch
  buffer; then an elementwise kernel over (row tile, chunk) writes ``y``.

Backward recomputes ``G``, ``Geff``, ``K``, ``mean_s`` (from the row, which it reads anyway;
not from the saved ``mean``), ``v_hat`` and the keep mask.  Rows are split into groups that
never straddle a batch index ``b``: a program owns either several whole batches (``T``
rows each) or one slice of ``T`` of one batch, so it reduces ``dbias_row[b]`` for its rows
in registers; ``dln_weight`` and ``dln_bias`` are written as fp32 per-program partials
``[programs, D]`` and summed by torch in a fixed order.  Deterministic, no atomics.  For
tiled ``D`` a stats kernel first stores per row ``mean_D(dv_hat)``, ``mean_D(dv_hat * v_hat)``,
``K`` and ``mean_s``.  Bit-consistency of ``v_hat`` between forward and backward: the same
code computes it from the same values; ``tl.sum`` adds in an order set by the tile layout,
so a backward tile of another shape than the forward's may round ``mean_s`` differently in
the last bit (the C++ kernels share one loop and are exact).

Seed: a one-element int64 tensor, loaded by the kernels (``seed_key``), never read when
``p == 0``.  No host synchronisation: every launch parameter is derived from shapes.
"""

import functools
from typing import Tuple

import torch
import triton
import triton.language as tl

from ..ops import _checks as C
from . import CONFIG, alloc, check_device, check_float, define_op, launch, num_warps_for, sm_count
from .philox import keep_block, keep_threshold, seed_key

_OP = "vgmr_triton::gate_norm"
_OP_BWD = "vgmr_triton::gate_norm_backward"
EPS = 1e-5
#: Narrowest column block: 16 elements, so a row of an aligned tensor (D % 16 == 0) can be
#: read with 128-bit accesses (8 bf16/fp16 or 4 fp32 values per thread).
MIN_BLOCK_D = 16


# ---------------------------------------------------------------------------
# Kernels.  Integer arguments other than D are ``do_not_specialize``: their values (T = 1, a
# multiple of 16, ...) would otherwise each compile another variant; D keeps Triton's
# divisibility-by-16 specialisation, which lets aligned rows use 128-bit accesses.  ``thresh``
# is typed int64: it reaches 2**32 - 1, and a value-dependent i32/i64 type would double the variants.
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
def _first_col(v, cols):
    # K = v[:, 0] of a tile whose columns include column 0: a sum of one value and zeros, exact.
    return tl.sum(tl.where(cols[None, :] == 0, v, 0.0), axis=1)


@triton.jit
def _row_block_shift_and_mean(zpre_ptr, bias_ptr, x_ptr, R, T, D, alpha, beta,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Tiled D, this program's BLOCK_R rows: the shift K = v[:, 0] and the shifted mean
    # mean_s = mean_D(v - K), one pass over the row.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    bidx = rows // T
    cols0 = tl.arange(0, BLOCK_D)
    m0 = rmask[:, None] & (cols0 < D)[None, :]
    _, _, _, v0 = _load_v(zpre_ptr, bias_ptr, x_ptr, rows, bidx, cols0, m0, D, alpha, beta)
    K = _first_col(v0, cols0)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        msk = rmask[:, None] & (cols < D)[None, :]
        _, _, _, v = _load_v(zpre_ptr, bias_ptr, x_ptr, rows, bidx, cols, msk, D, alpha, beta)
        acc += tl.sum(tl.where(msk, v - K[:, None], 0.0), axis=1)
    return rows, rmask, bidx, K, acc / D


@triton.jit
def _dropout_grad(dy_ptr, seed_ptr, rows, cols, c0, msk, D, thresh, keep_div,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    # dL/d(LayerNorm output) of a tile: dy through the dropout's keep mask (regenerated) and scale.
    g = tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=msk, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        k0, k1 = seed_key(seed_ptr)
        th = (tl.full((1,), 0, tl.int64) + thresh).to(tl.uint32)
        keep = keep_block(k0, k1, rows, c0, D, th, BLOCK_R, BLOCK_D)
        g = tl.where(keep, g / keep_div, 0.0)
    return g


@triton.jit
def _rstd(var, eps):
    # var = inf ((v - K)^2 overflowed fp32): NaN, so the row's output is NaN, never ln_bias.
    return tl.where(var == float("inf"), float("nan"), tl.math.rsqrt(var + eps))


@triton.jit(do_not_specialize=["R", "T"])
def _gn_fwd_stats_kernel(
    mean_ptr, rstd_ptr, shift_ptr, zpre_ptr, bias_ptr, x_ptr,
    R, T, D, alpha, beta, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Tiled D: K from chunk 0, then mean_s and var in two passes; shift[r] = (K, mean_s).
    rows, rmask, bidx, K, mean_s = _row_block_shift_and_mean(zpre_ptr, bias_ptr, x_ptr, R, T, D, alpha, beta,
                                                             BLOCK_R, BLOCK_D)
    acc2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        msk = rmask[:, None] & (cols < D)[None, :]
        _, _, _, v = _load_v(zpre_ptr, bias_ptr, x_ptr, rows, bidx, cols, msk, D, alpha, beta)
        dev = tl.where(msk, (v - K[:, None]) - mean_s[:, None], 0.0)
        acc2 += tl.sum(dev * dev, axis=1)
    rstd = _rstd(acc2 / D, eps)
    tl.store(mean_ptr + rows, K + mean_s, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    tl.store(shift_ptr + 2 * rows, K, mask=rmask)
    tl.store(shift_ptr + 2 * rows + 1, mean_s, mask=rmask)


@triton.jit(do_not_specialize=["R", "T", "n_col_blocks", "thresh"])
def _gn_fwd_kernel(
    y_ptr, mean_ptr, rstd_ptr, shift_ptr, zpre_ptr, bias_ptr, x_ptr, w_ptr, b_ptr, seed_ptr,
    R, T, D, n_col_blocks, alpha, beta, eps, thresh: tl.int64, keep_div,
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
        K = _first_col(v, cols)
        vs = tl.where(msk, v - K[:, None], 0.0)
        mean_s = tl.sum(vs, axis=1) / D
        dev = tl.where(msk, vs - mean_s[:, None], 0.0)
        rstd = _rstd(tl.sum(dev * dev, axis=1) / D, eps)
        tl.store(mean_ptr + rows, K + mean_s, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
    else:
        K = tl.load(shift_ptr + 2 * rows, mask=rmask, other=0.0)
        mean_s = tl.load(shift_ptr + 2 * rows + 1, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        dev = (v - K[:, None]) - mean_s[:, None]
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
    y = dev * rstd[:, None] * w[None, :] + b[None, :]
    if HAS_DROPOUT:
        k0, k1 = seed_key(seed_ptr)
        th = (tl.full((1,), 0, tl.int64) + thresh).to(tl.uint32)
        keep = keep_block(k0, k1, rows, c0, D, th, BLOCK_R, BLOCK_D)
        y = tl.where(keep, y / keep_div, 0.0)
    offs = rows[:, None] * D + cols[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _gn_bwd_terms(dy_ptr, zpre_ptr, bias_ptr, x_ptr, w, rstd_ptr, rowstat_ptr, seed_ptr,
                  rows, bidx, rmask, c0, D, alpha, beta, thresh, keep_div,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr):
    # Recompute one [BLOCK_R, BLOCK_D] tile (columns c0 + arange): g = upstream grad after
    # dropout, v_hat (K and mean_s as the forward computed them), dv_hat.
    # w: the [BLOCK_D] LayerNorm weight of these columns.
    cols = c0 + tl.arange(0, BLOCK_D)
    cmask = cols < D
    msk = rmask[:, None] & cmask[None, :]
    x, G, geff, v = _load_v(zpre_ptr, bias_ptr, x_ptr, rows, bidx, cols, msk, D, alpha, beta)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    if SINGLE:
        K = _first_col(v, cols)
        vs = tl.where(msk, v - K[:, None], 0.0)
        mean_s = tl.sum(vs, axis=1) / D
    else:
        K = tl.load(rowstat_ptr + 4 * rows + 2, mask=rmask, other=0.0)
        mean_s = tl.load(rowstat_ptr + 4 * rows + 3, mask=rmask, other=0.0)
        vs = v - K[:, None]
    vhat = tl.where(msk, (vs - mean_s[:, None]) * rstd[:, None], 0.0)
    g = _dropout_grad(dy_ptr, seed_ptr, rows, cols, c0, msk, D, thresh, keep_div, BLOCK_R, BLOCK_D, HAS_DROPOUT)
    dvhat = g * w[None, :]
    return x, G, geff, rstd, vhat, g, dvhat


@triton.jit(do_not_specialize=["R", "T", "thresh"])
def _gn_bwd_stats_kernel(
    rowstat_ptr, dy_ptr, zpre_ptr, bias_ptr, x_ptr, w_ptr, rstd_ptr, seed_ptr,
    R, T, D, alpha, beta, thresh: tl.int64, keep_div,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    # Tiled D: rowstat[r] = (mean_D(dv_hat), mean_D(dv_hat * v_hat), K, mean_s), K and mean_s
    # recomputed from the row exactly as _gn_fwd_stats_kernel computes them.
    rows, rmask, bidx, K, mean_s = _row_block_shift_and_mean(zpre_ptr, bias_ptr, x_ptr, R, T, D, alpha, beta,
                                                             BLOCK_R, BLOCK_D)
    tl.store(rowstat_ptr + 4 * rows + 2, K, mask=rmask)
    tl.store(rowstat_ptr + 4 * rows + 3, mean_s, mask=rmask)
    s1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        msk = rmask[:, None] & cmask[None, :]
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
        _, _, _, v = _load_v(zpre_ptr, bias_ptr, x_ptr, rows, bidx, cols, msk, D, alpha, beta)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        vhat = tl.where(msk, ((v - K[:, None]) - mean_s[:, None]) * rstd[:, None], 0.0)
        g = _dropout_grad(dy_ptr, seed_ptr, rows, cols, c0, msk, D, thresh, keep_div, BLOCK_R, BLOCK_D, HAS_DROPOUT)
        dvhat = g * w[None, :]
        s1 += tl.sum(dvhat, axis=1)
        s2 += tl.sum(dvhat * vhat, axis=1)
    tl.store(rowstat_ptr + 4 * rows, s1 / D, mask=rmask)
    tl.store(rowstat_ptr + 4 * rows + 1, s2 / D, mask=rmask)


@triton.jit(do_not_specialize=["B", "T", "n_col_blocks", "n_tb", "b_per_prog", "t_per_prog", "thresh"])
def _gn_bwd_kernel(
    dz_ptr, dx_ptr, dbias_ptr, dw_part_ptr, db_part_ptr,
    dy_ptr, zpre_ptr, bias_ptr, x_ptr, w_ptr, rstd_ptr, rowstat_ptr, seed_ptr,
    B, T, D, n_col_blocks, n_tb, b_per_prog, t_per_prog,
    alpha, beta, thresh: tl.int64, keep_div,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr, HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr = True,
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
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    coef = 2.0 * alpha * (1.0 - beta)
    # Column accumulators, [BLOCK_D]: each row tile is summed over its rows at once (a tile-
    # shaped accumulator would hold three more fp32 values per element in registers, which
    # the AOT compile showed spilling to local memory at 8+ elements per thread).
    acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_start = bg * b_per_prog
    b_end = tl.minimum(b_start + b_per_prog, B)
    t_start = tb * t_per_prog
    t_end = tl.minimum(t_start + t_per_prog, T)
    for b in range(b_start, b_end):
        acc_z = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(t_start, t_end, BLOCK_R):
            ts = t0 + tl.arange(0, BLOCK_R)
            rmask = ts < t_end
            rows = b * T + ts
            bidx = rows * 0 + b
            msk = rmask[:, None] & cmask[None, :]
            x, G, geff, rstd, vhat, g, dvhat = _gn_bwd_terms(
                dy_ptr, zpre_ptr, bias_ptr, x_ptr, w, rstd_ptr, rowstat_ptr, seed_ptr, rows, bidx, rmask,
                c0, D, alpha, beta, thresh, keep_div, BLOCK_R, BLOCK_D, SINGLE, HAS_DROPOUT)
            acc_b += tl.sum(g, axis=0)
            acc_w += tl.sum(g * vhat, axis=0)
            if SINGLE:
                c1 = tl.sum(dvhat, axis=1) / D
                c2 = tl.sum(dvhat * vhat, axis=1) / D
            else:
                c1 = tl.load(rowstat_ptr + 4 * rows, mask=rmask, other=0.0)
                c2 = tl.load(rowstat_ptr + 4 * rows + 1, mask=rmask, other=0.0)
            dv = rstd[:, None] * (dvhat - c1[:, None] - vhat * c2[:, None])
            dz = tl.where(msk, dv * x * coef * G * (1.0 - G), 0.0)
            acc_z += tl.sum(dz, axis=0)
            offs = rows[:, None] * D + cols[None, :]
            if NEED_DX:  # no input gradient asked for: dx is never written
                tl.store(dx_ptr + offs, (dv * geff).to(dx_ptr.dtype.element_ty), mask=msk)
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=msk)
        tl.store(dbias_ptr + (b * n_tb + tb) * D + cols, acc_z, mask=cmask)
    part = bg * n_tb + tb
    tl.store(dw_part_ptr + part * D + cols, acc_w, mask=cmask)
    tl.store(db_part_ptr + part * D + cols, acc_b, mask=cmask)


# ---------------------------------------------------------------------------
# Launch configurations: named tables; the launchers choose only from these and aot.py
# compiles every entry (so a new entry is compiled ahead of time automatically).
# ---------------------------------------------------------------------------
def _config(name, single, block_d, block_r, warps):
    return {"name": name, "SINGLE": single, "BLOCK_D": block_d, "BLOCK_R": block_r, "num_warps": warps}


def _bwd_config(name, single, block_d, block_r, warps):
    # maxnreg: the register file's share per thread (255 up to 8 warps).  Without an explicit
    # limit ptxas 12.8 (Triton 3.6) settles below what these kernels need and spills a few
    # bytes (the AOT compile: 4-12 bytes at 80-128 registers); with it, none.
    cfg = _config(name, single, block_d, block_r, warps)
    cfg["maxnreg"] = min(255, 65536 // (32 * warps))
    return cfg


#: Backward tiles per row alignment: values per thread and the largest single-block / chunk
#: width.  The backward keeps about a dozen fp32 values per element live (~190 registers at
#: 8 values per thread).  Aligned rows (D % 16 == 0): 8 values per thread, what a 128-bit
#: access to bf16/fp16 needs, at most 8 warps (a thread of a 256-thread program may use 255
#: registers; at 16 warps the cap is 128, and the AOT compile showed those tiles spilling).
#: Unaligned rows read scalars whose 64-bit per-element addresses cost registers too; the
#: AOT compile showed them spilling even at 4 values per thread: 2 per thread, rows wider
#: than 512 tiled in 512-wide chunks.
_BWD = {True: {"per_thread": 8, "max_single": None, "chunk": None},
        False: {"per_thread": 2, "max_single": 512, "chunk": 512}}


def fwd_configs():
    """Forward configurations: one single-block entry per power-of-two ``BLOCK_D`` from
    ``MIN_BLOCK_D`` up to ``gn_max_single_d``, one tiled entry (``BLOCK_D`` = ``gn_chunk_d``).
    ``BLOCK_R`` rows per program fill a tile of ``gn_max_tile`` elements.  Built once per
    value of those three settings (a tuple: callers must not modify the entries)."""
    return _fwd_table(CONFIG["gn_max_single_d"], CONFIG["gn_chunk_d"], CONFIG["gn_max_tile"])


@functools.lru_cache(maxsize=None)
def _fwd_table(max_single_d: int, chunk_d: int, max_tile: int):
    out = []
    top = triton.next_power_of_2(max_single_d)
    bd = min(MIN_BLOCK_D, top)
    while bd <= top:
        br = max(1, max_tile // bd)
        out.append(_config(f"single_d{bd}", True, bd, br, num_warps_for(br * bd)))
        bd *= 2
    chunk = max(4, triton.next_power_of_2(chunk_d))
    br = max(1, max_tile // chunk)
    out.append(_config(f"tiled_d{chunk}", False, chunk, br, num_warps_for(br * chunk)))
    return tuple(out)


def bwd_configs(aligned: bool = True):
    """Backward configurations for aligned (``D % 16 == 0``) or unaligned rows: per
    power-of-two ``BLOCK_D`` (single block up to ``gn_bwd_max_single_d``, then one tiled
    chunk width; see ``_BWD``), ``BLOCK_R`` either the tile's full height (256 threads'
    worth of values) or the shortest tile that fills one warp (short sequences: a program's
    rows never straddle a batch, so a tall tile over ``T`` < its height would idle lanes).
    Built once per value of the two settings and the alignment (a tuple: callers must not
    modify the entries)."""
    return _bwd_table(bool(aligned), CONFIG["gn_bwd_max_single_d"], CONFIG["gn_bwd_chunk_d"])


@functools.lru_cache(maxsize=None)
def _bwd_table(aligned: bool, max_single_d: int, chunk_d: int):
    per = _BWD[aligned]["per_thread"]
    tag = "" if aligned else "_unaligned"
    out = []
    top = triton.next_power_of_2(max_single_d)
    if not aligned and _BWD[False]["max_single"]:
        top = min(top, _BWD[False]["max_single"])
    bd = min(MIN_BLOCK_D, top)
    while bd <= top:
        full = max(1, 8 * 32 * per // bd)
        for br in sorted({full, min(full, max(1, 32 * per // bd))}, reverse=True):
            out.append(_bwd_config(f"single_d{bd}_r{br}{tag}", True, bd, br,
                                   max(1, min(8, br * bd // (32 * per)))))
        bd *= 2
    if not aligned and _BWD[False]["chunk"]:
        chunk_d = min(chunk_d, _BWD[False]["chunk"])
    chunk = max(4, triton.next_power_of_2(chunk_d))
    full = max(1, 8 * 32 * per // chunk)
    for br in sorted({full, min(full, max(1, 32 * per // chunk))}, reverse=True):
        out.append(_bwd_config(f"tiled_d{chunk}_r{br}{tag}", False, chunk, br,
                               max(1, min(8, br * chunk // (32 * per)))))
    return tuple(out)


def _pick_fwd(D: int):
    for cfg in fwd_configs():
        if cfg["SINGLE"] and D <= cfg["BLOCK_D"] and D <= CONFIG["gn_max_single_d"]:
            return cfg
    return fwd_configs()[-1]


def _pick_bwd(D: int, T: int):
    aligned = D % 16 == 0
    table = bwd_configs(aligned)
    top = max(c["BLOCK_D"] for c in table if c["SINGLE"])
    single = D <= min(CONFIG["gn_bwd_max_single_d"], top)
    cands = [c for c in table if c["SINGLE"] == single and (not single or D <= c["BLOCK_D"])]
    block_d = cands[0]["BLOCK_D"]
    cands = [c for c in cands if c["BLOCK_D"] == block_d]  # [full height, short] (or one entry)
    full = cands[0]
    if triton.next_power_of_2(max(T, 1)) >= full["BLOCK_R"]:
        return full
    return cands[-1]


def _bwd_rows_config(B: int, T: int, n_col: int, block_r: int, device: torch.device):
    """Split the rows into groups that never straddle a batch: (b_per_prog, n_tb, t_per_prog)."""
    target = max(1, (CONFIG["programs_per_sm"] * sm_count(device)) // n_col)
    if B >= target:
        b_per_prog = triton.cdiv(B, target)
        return b_per_prog, 1, T
    n_tb = max(1, min(triton.cdiv(T, block_r), triton.cdiv(target, B)))
    t_per_prog = triton.cdiv(triton.cdiv(T, n_tb), block_r) * block_r
    n_tb = triton.cdiv(T, t_per_prog)
    return 1, n_tb, t_per_prog


def _dropout_args(p: float):
    thresh = keep_threshold(p)
    if p > 0.0:
        return True, thresh, 1.0 - p
    return False, 0, 1.0


# ---------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------
@define_op("gate_norm")
def gate_norm(
    zpre: torch.Tensor, bias_row: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    alpha: float, beta: float, p: float, seed: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, D = C.gate_inputs(_OP, zpre, bias_row, x, ln_weight, check_float)
    C.op_typed(_OP, "ln_bias", ln_bias, torch.float32, (D,), "[D]", " (the op layer casts it)")
    check_device(_OP, "x", x, zpre=zpre, bias_row=bias_row, ln_weight=ln_weight, ln_bias=ln_bias)
    C.op_seed(_OP, seed, x)
    has_drop, thresh, keep_div = _dropout_args(p)
    zpre = zpre.contiguous()
    x = x.contiguous()
    bias_row = bias_row.contiguous()
    ln_weight = ln_weight.contiguous()
    ln_bias = ln_bias.contiguous()
    y = alloc((B, T, D), x.dtype, x.device)
    mean = alloc((B, T), torch.float32, x.device)
    rstd = alloc((B, T), torch.float32, x.device)
    R = B * T
    if R == 0:
        return y, mean.zero_(), rstd.zero_()
    cfg = _pick_fwd(D)
    block_d, block_r, warps = cfg["BLOCK_D"], cfg["BLOCK_R"], cfg["num_warps"]
    n_col = 1 if cfg["SINGLE"] else triton.cdiv(D, block_d)
    n_row = triton.cdiv(R, block_r)
    if cfg["SINGLE"]:
        shift = mean  # unused
    else:
        shift = alloc((R, 2), torch.float32, x.device)
        launch(_gn_fwd_stats_kernel, (n_row,),
               mean, rstd, shift, zpre, bias_row, x, R, T, D, float(alpha), float(beta), EPS,
               BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    launch(_gn_fwd_kernel, (n_row * n_col,),
           y, mean, rstd, shift, zpre, bias_row, x, ln_weight, ln_bias, seed,
           R, T, D, n_col, float(alpha), float(beta), EPS, thresh, keep_div,
           BLOCK_R=block_r, BLOCK_D=block_d, SINGLE=cfg["SINGLE"], HAS_DROPOUT=has_drop, num_warps=warps)
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
    seed: torch.Tensor,
    need_dx: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, D = C.gate_inputs(_OP_BWD, zpre, bias_row, x, ln_weight, check_float)
    check_float(_OP_BWD, "dy", dy)
    C.op_like(_OP_BWD, "dy", dy, x, "x")
    C.gate_stats(_OP_BWD, mean, rstd, B, T)
    check_device(_OP_BWD, "x", x, zpre=zpre, bias_row=bias_row, ln_weight=ln_weight, dy=dy, mean=mean, rstd=rstd)
    C.op_seed(_OP_BWD, seed, x)
    has_drop, thresh, keep_div = _dropout_args(p)
    dev = x.device
    dy = dy.contiguous()
    zpre = zpre.contiguous()
    x = x.contiguous()
    bias_row = bias_row.contiguous()
    ln_weight = ln_weight.contiguous()
    rstd = rstd.contiguous()
    dzpre = alloc((B, T, D), zpre.dtype, dev)
    # no input gradient asked for: an empty dx (the kernel never writes it)
    dx = alloc((B, T, D) if need_dx else (0,), x.dtype, dev)
    R = B * T
    if R == 0:
        z = torch.zeros((D,), dtype=torch.float32, device=dev)
        return dzpre, torch.zeros((B, D), dtype=torch.float32, device=dev), dx, z, z.clone()
    cfg = _pick_bwd(D, T)
    block_d, block_r, warps, single = cfg["BLOCK_D"], cfg["BLOCK_R"], cfg["num_warps"], cfg["SINGLE"]
    n_col = 1 if single else triton.cdiv(D, block_d)
    b_per_prog, n_tb, t_per_prog = _bwd_rows_config(B, T, n_col, block_r, dev)
    n_bg = triton.cdiv(B, b_per_prog)
    if single:
        rowstat = rstd  # unused
    else:
        rowstat = alloc((R, 4), torch.float32, dev)
        launch(_gn_bwd_stats_kernel, (triton.cdiv(R, block_r),),
               rowstat, dy, zpre, bias_row, x, ln_weight, rstd, seed,
               R, T, D, float(alpha), float(beta), thresh, keep_div,
               BLOCK_R=block_r, BLOCK_D=block_d, HAS_DROPOUT=has_drop, num_warps=warps,
               maxnreg=cfg["maxnreg"])
    if n_tb == 1:
        dbias = alloc((B, D), torch.float32, dev)
        dbias_part = dbias
    else:
        dbias_part = alloc((B * n_tb, D), torch.float32, dev)
    dw_part = alloc((n_bg * n_tb, D), torch.float32, dev)
    db_part = alloc((n_bg * n_tb, D), torch.float32, dev)
    launch(_gn_bwd_kernel, (n_bg * n_tb * n_col,),
           dzpre, dx, dbias_part, dw_part, db_part,
           dy, zpre, bias_row, x, ln_weight, rstd, rowstat, seed,
           B, T, D, n_col, n_tb, b_per_prog, t_per_prog,
           float(alpha), float(beta), thresh, keep_div,
           BLOCK_R=block_r, BLOCK_D=block_d, SINGLE=single, HAS_DROPOUT=has_drop, NEED_DX=bool(need_dx),
           num_warps=warps, maxnreg=cfg["maxnreg"])
    if n_tb != 1:
        dbias = dbias_part.view(B, n_tb, D).sum(dim=1)
    dln_w = dw_part.sum(dim=0)
    dln_b = db_part.sum(dim=0)
    return dzpre, dbias, dx, dln_w, dln_b
