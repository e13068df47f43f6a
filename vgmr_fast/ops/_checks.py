"""The Python argument checks, once: ValueError / TypeError naming the argument.

The public ops' checks (``<name>: expected ...``) and, below them, the raw operators' checks in
the wording of the C++ ones (``<op>: <name> must ...``, csrc/op_checks.h), which the Triton
launchers and the fake kernels call."""
from __future__ import annotations

import math
import numbers

import torch

from ..dropout_stream import check_seed_tensor

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


def finite_real(v, name: str) -> float:
    """A real number that is finite (NaN / inf rejected: they make every output NaN)."""
    if type(v) is float and math.isfinite(v):  # fast path
        return v
    v = real(v, name)
    if not isinstance(v, torch.SymFloat) and not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite real number, got {v}")
    return v


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
        raise TypeError(f"{name}: expected a non-negative int or a one-element int64 tensor, "
                        f"got {type(s).__name__}")
    if isinstance(s, torch.SymInt):
        torch._check(s >= 0, lambda: f"{name}: expected a non-negative int64")
        return s
    s = int(s)
    if not (0 <= s < 2**63):
        raise ValueError(f"{name}: expected an int in [0, 2**63), got {s}")
    return s


# The never-written int64 zeros passed as seeds when p == 0 (unused_seeds), so inference
# costs no extra tensor per call.
_UNUSED_SEED: dict = {}


def _capturing(dev: torch.device) -> bool:
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


def seed_tensor(s, ref: torch.Tensor, p, name: str = "seed") -> torch.Tensor:
    """The dropout seed as the raw ops take it (docs/ops.md): a one-element int64 tensor on
    ``ref``'s device. ``s``: a Python int in ``[0, 2**63)`` (ValueError / TypeError naming
    ``name`` otherwise) or such a tensor (checked: int64, one element, ``ref``'s device; its
    value is not read here, the kernels read it)."""
    if isinstance(s, torch.Tensor):
        check_seed_tensor(s, ref, name)
        return s
    s = seed(s, name)
    if type(p) is float and p == 0.0 and type(ref) is torch.Tensor and not torch.compiler.is_compiling():
        return unused_seeds(ref, ())
    return torch.full((), s, dtype=torch.int64, device=ref.device)


def unused_seeds(ref: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Int64 zeros of ``shape`` on ``ref``'s device, passed as the seed(s) when p == 0 (the
    kernels never read them): one tensor per (device, shape), made on first use, except while
    compiling or capturing a CUDA graph."""
    key = (ref.device, shape)
    t = _UNUSED_SEED.get(key)
    cacheable = type(ref) is torch.Tensor and not torch.compiler.is_compiling()
    if t is None or not cacheable:
        with torch.inference_mode(False):  # a normal tensor: autograd may save it
            t = torch.zeros(shape, dtype=torch.int64, device=ref.device)
        if cacheable and not _capturing(ref.device):  # not from a CUDA graph's private memory pool
            _UNUSED_SEED[key] = t
    return t


# ---- the raw operators' checks --------------------------------------------------------------
# What the vgmr_triton:: launchers check, in the wording of the C++ operators (csrc/op_checks.h):
# "<op>: <name> must ...". The device rule is the backend's own (``on_device(op, name, t)``).
def op_float(op: str, name: str, t, dtypes: tuple, what: str) -> None:
    """``t`` is a tensor of one of ``dtypes`` (``what`` names them)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {what}, got {t.dtype}")


def op_dtype(op: str, name: str, t: torch.Tensor, want: torch.dtype, why: str = "") -> None:
    """No silent casts: a side input of the wrong dtype is an error naming it."""
    if t.dtype != want:
        raise TypeError(f"{op}: {name} must be {want}{why}, got {t.dtype}")


def op_like(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """``t`` has ``ref``'s dtype and shape."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def op_typed(op: str, name: str, t: torch.Tensor, want: torch.dtype, shape_: tuple, shape_name: str,
             why: str = "") -> None:
    """``t`` has dtype ``want`` and shape ``shape_`` (``shape_name`` says which)."""
    op_dtype(op, name, t, want, why)
    if tuple(t.shape) != tuple(shape_):
        raise ValueError(f"{op}: {name} must be {shape_name} = {tuple(shape_)}, got {tuple(t.shape)}")


def op_seed(op: str, s, ref: torch.Tensor | None) -> None:
    """The raw ops' ``seed`` (checks::seed_tensor): a one-element int64 tensor on ``ref``'s device
    (not checked when ``ref`` is None: the fake kernels); its value is not read here."""
    if not isinstance(s, torch.Tensor) or s.dtype != torch.int64:
        raise TypeError(f"{op}: seed must be an int64 tensor, got {getattr(s, 'dtype', type(s).__name__)}")
    if s.numel() != 1:
        raise ValueError(f"{op}: seed must have exactly one element, got shape {tuple(s.shape)}")
    if ref is not None and s.device != ref.device:
        raise ValueError(f"{op}: seed is on {s.device} but x is on {ref.device}")


def op_seeds(op: str, seeds, M: int) -> None:
    """The grouped raw ops' ``seeds`` (checks::grouped_count): an int64 tensor ``[M]``."""
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64:
        raise TypeError(f"{op}: seeds must be an int64 tensor, got {getattr(seeds, 'dtype', type(seeds).__name__)}")
    if tuple(seeds.shape) != (M,):
        raise ValueError(f"{op}: seeds must have shape [M] = [{M}], got {tuple(seeds.shape)}")


def gate_inputs(op: str, zpre, bias_row, x, ln_weight, float_check) -> tuple:
    """gate_norm's gate inputs as the C++ kernels check them (checks::gate_inputs): x [B, T, D]
    with D >= 1 (its dtype checked by ``float_check(op, name, t)``), zpre like x, bias_row [B, D]
    and ln_weight [D] float32 (the op layer casts them). Returns (B, T, D)."""
    float_check(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, T, D], got shape {tuple(x.shape)}")
    float_check(op, "zpre", zpre)
    op_like(op, "zpre", zpre, x, "x")
    B, T, D = x.shape
    if D < 1:
        raise ValueError(f"{op}: x must have D >= 1 features, got shape {tuple(x.shape)}")
    why = " (the op layer casts it)"
    op_typed(op, "bias_row", bias_row, torch.float32, (B, D), "[B, D]", why)
    op_typed(op, "ln_weight", ln_weight, torch.float32, (D,), "[D]", why)
    return B, T, D


def gate_stats(op: str, mean: torch.Tensor, rstd: torch.Tensor, B: int, T: int) -> None:
    """gate_norm_backward's saved statistics: float32 [B, T]."""
    for name, t in (("mean", mean), ("rstd", rstd)):
        op_typed(op, name, t, torch.float32, (B, T), "[B, T]", " (saved by the forward)")
