"""Argument checks shared by the public ops: ValueError / TypeError naming the argument."""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def float_tensor(t, name: str) -> torch.Tensor:
    tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float16, bfloat16 or float64, got {t.dtype}")
    return t


def rank(t: torch.Tensor, n: int, name: str, shape: str) -> None:
    if t.dim() != n:
        raise ValueError(f"{name}: expected shape {shape} ({n} dims), got {tuple(t.shape)}")


def shape(t: torch.Tensor, want, name: str, what: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{name}: expected shape {what} = {tuple(want)}, got {tuple(t.shape)}")


def same_device(ref: torch.Tensor, ref_name: str, **others) -> None:
    dev = ref.device
    for name, t in others.items():
        if t is not None and t.device != dev:
            raise ValueError(f"{name}: on {t.device}, but {ref_name} is on {dev} (mixed devices)")


def check_same_device(ref: torch.Tensor, ref_name: str, tensors, names) -> None:
    """Positional form of :func:`same_device` (no dict built on the fast path)."""
    dev = ref.device
    for t, name in zip(tensors, names):
        if t.device != dev:
            raise ValueError(f"{name}: on {t.device}, but {ref_name} is on {dev} (mixed devices)")


def real(v, name: str) -> float:
    if type(v) is float:  # fast path (the common case)
        return v
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    return v if isinstance(v, torch.SymFloat) else float(v)


def probability(p, name: str = "p") -> float:
    if type(p) is float and 0.0 <= p < 1.0:  # fast path
        return p
    p = real(p, name)
    if isinstance(p, torch.SymFloat):
        return p
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{name}: dropout probability must be in [0, 1), got {p}")
    return p


def seed(s, name: str = "seed") -> int:
    if type(s) is int and 0 <= s < 9223372036854775808:  # fast path
        return s
    if isinstance(s, bool) or not isinstance(s, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name}: expected a non-negative int, got {type(s).__name__}")
    if isinstance(s, torch.SymInt):
        torch._check(s >= 0, lambda: f"{name}: expected a non-negative int64")
        return s
    s = int(s)
    if not (0 <= s < 2**63):
        raise ValueError(f"{name}: expected a non-negative int64, got {s}")
    return s
