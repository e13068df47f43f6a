"""The dropout random stream every backend shares (docs/math.md §5a, docs/backends.md), in plain torch.

A leaf module (no op layer, no extension), so the reference imports it without loading
``vgmr_fast._C``; ``vgmr_fast.ops.dropout`` re-exports it for the op layer.

Philox4x32-10 keyed by ``(lo32(seed), hi32(seed))``; element ``(r, c)`` of a
row-major ``[R, D]`` output uses counter ``r * ceil(D / 4) + c // 4`` and word
``c % 4``; it is kept iff that word (uint32) is ``>= threshold(p)``. Written in
int64 torch arithmetic so it runs on any device; the reference module and the
tests use it to reproduce the fused kernels' masks bit for bit.
"""
from __future__ import annotations

import numbers

import torch

from .philox_constants import MASK32 as _MASK32
from .philox_constants import PHILOX_M0 as _M0
from .philox_constants import PHILOX_M1 as _M1
from .philox_constants import PHILOX_W0 as _W0
from .philox_constants import PHILOX_W1 as _W1

_MASK64 = 0xFFFFFFFFFFFFFFFF


def threshold(p: float) -> int:
    """Keep threshold ``min(2**32 - 1, floor(p * 2**32))`` for dropout probability ``p``."""
    check_p(p)
    return min(_MASK32, int(float(p) * 4294967296.0))


def check_p(p: float) -> None:
    """Dropout probability in [0, 1) (a ValueError naming ``p`` otherwise; NaN fails too)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= float(p) < 1.0):
        raise ValueError(f"dropout probability p must be in [0, 1), got {p}")


def seed_value(seed, name: str = "seed") -> int:
    """A seed's Philox key as a Python int: an int in [0, 2**63) as it is, or a one-element int64
    tensor (read with ``.item()``: this is the reference's path, never the fused op's) whose 64
    bits are read as uint64, so a negative value v is the key v + 2**64 (every backend's rule)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"{name}: expected a one-element int64 tensor, got dtype {seed.dtype}, "
                            f"shape {tuple(seed.shape)}")
        return int(seed.item()) & _MASK64
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name}: expected an int or a one-element int64 tensor, got {type(seed).__name__}")
    seed = int(seed)
    if not (0 <= seed < 2**63):
        raise ValueError(f"{name}: expected a non-negative int64 (0 <= seed < 2**63), got {seed}")
    return seed


def check_seed(seed) -> None:
    seed_value(seed)


def check_seed_tensor(seed: torch.Tensor, ref: torch.Tensor, name: str = "seed") -> None:
    """The fused kernels' seed: a one-element int64 tensor on ``ref``'s device, which they read
    there (no host sync). Errors name ``name``; shared by the op layer and the Triton ops."""
    if seed.dtype != torch.int64:
        raise TypeError(f"{name}: expected an int64 tensor, got dtype {seed.dtype}")
    if seed.numel() != 1:
        raise ValueError(f"{name}: expected a tensor with exactly one element, got shape {tuple(seed.shape)}")
    if seed.device != ref.device:
        raise ValueError(f"{name}: on {seed.device}, but x is on {ref.device} (the kernels read the seed there)")


def _mulhilo(a: int, b: torch.Tensor):
    # 32x32 -> 64-bit product without overflowing int64: split b into 16-bit halves.
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_part = a * b_lo  # < 2**48
    hi_part = a * b_hi  # < 2**48
    mid = lo_part + ((hi_part & 0xFFFF) << 16)  # < 2**49
    return (hi_part >> 16) + (mid >> 32), mid & _MASK32


def philox4x32(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 words for int64 ``counters`` (counter = ``(lo32(n), hi32(n), 0, 0)``).

    ``seed``: as :func:`seed_value` takes it. Returns an int64 tensor of shape
    ``counters.shape + (4,)`` holding uint32 values.
    """
    return _philox_words(seed_value(seed), counters)


def _philox_words(key: int, counters: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 words for the uint64 ``key`` (a Python int in [0, 2**64))."""
    seed = key
    n = counters.to(torch.int64)
    c0, c1 = n & _MASK32, (n >> 32) & _MASK32
    c2, c3 = torch.zeros_like(n), torch.zeros_like(n)
    k0, k1 = int(seed) & _MASK32, (int(seed) >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def keep_mask(seed, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep mask ``[rows, cols]`` that every backend draws for ``(seed, p)``;
    ``seed``: an int or a one-element int64 tensor (as :func:`seed_value` takes it)."""
    seed = seed_value(seed)
    t = threshold(p)
    per_row = (cols + 3) // 4
    r = torch.arange(rows, device=device, dtype=torch.int64)
    c = torch.arange(cols, device=device, dtype=torch.int64)
    counters = r[:, None] * per_row + (c // 4)[None, :]
    words = _philox_words(seed, counters)  # [rows, cols, 4]
    word = words.gather(-1, (c % 4).expand(rows, cols).unsqueeze(-1)).squeeze(-1)
    return word >= t


def draw_seeds(count: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One step's dropout seeds, an int64 tensor ``[count]`` drawn on ``device`` from torch's
    generator for that device (``torch.manual_seed`` governs it; no host sync, graph-safe).

    The fused module draws them on its inputs' device and the reference the same call on the
    CPU, so on the CPU both drop identical elements under the same ``torch.manual_seed``."""
    return torch.randint(0, 2**62, (count,), generator=generator, dtype=torch.int64, device=device)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One dropout seed from torch's CPU generator as a Python int (reads it on the host)."""
    return int(draw_seeds(1, generator=generator).item())
