"""Philox4x32-10 in Triton: the dropout stream every VGMR backend shares (docs/math.md §5a, docs/backends.md).

Why not ``tl.randint4x``: it keys Philox with ``(lo32(seed), hi32(seed))`` only when
its counter block is 32-bit; given an int64 counter it switches to Philox4x64 with
key ``(seed, 0)``, which is a different stream.  Our counters
``n = r * ceil(D / 4) + c // 4`` pass 2**32 on large tensors, so the generator is
written here in uint32 arithmetic (``tl.umulhi`` + wrapping ``*``) with the counter
``(lo32(n), hi32(n), 0, 0)``; ``tests/backend_triton/test_philox.py`` proves it against the
test vectors of docs/backends.md and against ``vgmr_fast.ops.dropout.philox4x32``.

Triton APIs: ``tl.umulhi``, ``tl.static_range``, ``tl.join``, ``tl.reshape`` (all in
Triton 3.0).
"""
from __future__ import annotations

import triton
import triton.language as tl

from vgmr_fast import philox_constants as _K
from vgmr_fast.dropout_stream import threshold as keep_threshold  # the one rule (a leaf module)

_PHILOX_M0 = tl.constexpr(_K.PHILOX_M0)
_PHILOX_M1 = tl.constexpr(_K.PHILOX_M1)
_PHILOX_W0 = tl.constexpr(_K.PHILOX_W0)
_PHILOX_W1 = tl.constexpr(_K.PHILOX_W1)


@triton.jit
def philox4x32(k0, k1, n):
    """Philox4x32-10 words ``(w0, w1, w2, w3)`` (uint32) for int64 counters ``n``.

    ``k0``, ``k1``: uint32 key (lo32 and hi32 of the seed).  The counter is
    ``(lo32(n), hi32(n), 0, 0)``.
    """
    n = n.to(tl.int64)
    c0 = (n & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((n >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = c0 * 0  # uint32 zeros of the counter's shape
    c3 = c0 * 0
    m0 = tl.full(c0.shape, _PHILOX_M0, tl.uint32)
    m1 = tl.full(c0.shape, _PHILOX_M1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def seed_key(seed_ptr):
    """The uint32 Philox key ``(lo32(seed), hi32(seed))`` of the int64 seed at ``seed_ptr``.

    Read from device memory (CONTRACT: no ``.item()`` on the host, a CUDA graph replays with
    the seed tensor's current value); shaped ``(1,)`` so it broadcasts over any block.
    """
    seed = tl.load(seed_ptr + tl.zeros((1,), dtype=tl.int32))
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return k0, k1


@triton.jit
def keep_block(k0, k1, rows, col0, D, thresh, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Keep mask ``[BLOCK_R, BLOCK_D]`` for rows ``rows`` (int64 ``[BLOCK_R]``) and columns
    ``col0 + arange(BLOCK_D)`` of a row-major ``[R, D]`` tensor.

    ``col0`` must be a multiple of 4 (``BLOCK_D`` a power of two >= 4 and chunks start at
    multiples of ``BLOCK_D``).  Element ``(r, c)`` uses counter ``r * ceil(D/4) + c // 4``
    and word ``c % 4``; it is kept iff that word (uint32) is ``>= thresh`` (uint32).
    """
    QD: tl.constexpr = BLOCK_D // 4
    per_row = (D + 3) // 4
    q = tl.arange(0, QD)
    n = rows.to(tl.int64)[:, None] * per_row + (col0 // 4 + q)[None, :]
    w0, w1, w2, w3 = philox4x32(k0, k1, n)
    # tl.join adds a new last axis: [R, QD, 2, 2] with [..., a, b] = word 2a + b, so the
    # row-major reshape to [R, 4 * QD] puts word c % 4 of counter c // 4 at column c.
    w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_R, BLOCK_D))
    return w >= thresh


@triton.jit(do_not_specialize=["N"])
def _philox_words_kernel(out_ptr, n_ptr, N, seed_ptr, BLOCK: tl.constexpr):
    # Test helper: words 0..3 of counter n_ptr[i] into out_ptr[4 i .. 4 i + 3] (int64, uint32 values).
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    n = tl.load(n_ptr + offs, mask=m, other=0)
    k0, k1 = seed_key(seed_ptr)
    w0, w1, w2, w3 = philox4x32(k0, k1, n)
    tl.store(out_ptr + 4 * offs + 0, w0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * offs + 1, w1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * offs + 2, w2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * offs + 3, w3.to(tl.int64), mask=m)


@triton.jit(do_not_specialize=["R", "row0", "thresh"])
def _keep_mask_kernel(out_ptr, R, D, row0, seed_ptr, thresh: tl.int64,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Test helper: rows row0 .. row0 + R - 1 of the keep mask of a [*, D] tensor (int8, [R, D]),
    # drawn with keep_block as gate_norm draws it, one row tile per program.
    pid = tl.program_id(0).to(tl.int64)
    local = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = local + row0
    k0, k1 = seed_key(seed_ptr)
    th = (tl.full((1,), 0, tl.int64) + thresh).to(tl.uint32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        keep = keep_block(k0, k1, rows, c0, D, th, BLOCK_R, BLOCK_D)
        m = (local < R)[:, None] & (cols < D)[None, :]
        tl.store(out_ptr + local[:, None] * D + cols[None, :], keep.to(tl.int8), mask=m)


def seed_tensor(seed, device) -> "torch.Tensor":
    """A one-element int64 tensor for a Python int seed in [0, 2**63) (test helpers)."""
    import torch

    if isinstance(seed, torch.Tensor):
        return seed
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative int64, got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def philox_words(seed, counters):
    """Words ``[N, 4]`` (int64 holding uint32) of Philox4x32-10 for int64 ``counters`` (a tensor);
    ``seed``: an int or a one-element int64 tensor."""
    import torch

    n = counters.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty((n.numel(), 4), dtype=torch.int64, device=n.device)
    seed_t = seed_tensor(seed, n.device)
    if n.numel():
        BLOCK = 64
        from . import launch

        launch(_philox_words_kernel, (triton.cdiv(n.numel(), BLOCK),), out, n, n.numel(), seed_t, BLOCK=BLOCK)
    return out


def keep_mask(seed, rows: int, cols: int, p: float, device="cpu", block_d: int | None = None,
              row0: int = 0):
    """Rows ``row0 .. row0 + rows - 1`` of the keep mask of a ``[*, cols]`` tensor, as the
    Triton kernels draw it (for tests; ``block_d`` forces the column chunk width)."""
    import torch

    out = torch.empty((rows, cols), dtype=torch.int8, device=device)
    seed_t = seed_tensor(seed, device)
    thresh = keep_threshold(p)
    if rows and cols:
        BLOCK_D = block_d or max(4, triton.next_power_of_2(cols))
        BLOCK_R = 4
        from . import launch

        launch(_keep_mask_kernel, (triton.cdiv(rows, BLOCK_R),),
               out, rows, cols, int(row0), seed_t, thresh, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return out.bool()
