"""Triton kernels for the three fused VGMR ops: the ``vgmr_triton::`` namespace.

The ops have exactly the names, schemas and semantics of the native ``vgmr::`` ones
(docs/ops.md)::

    vgmr_triton::summary_pool, summary_pool_backward
    vgmr_triton::interaction, interaction_backward
    vgmr_triton::gate_norm, gate_norm_backward

They are defined whenever this package is imported, so the op layer can always
register autograd and fake kernels for them.  Where Triton cannot be imported the
ops are stubs that raise ``RuntimeError`` when called.

Module attributes the op layer reads:

``NEEDS_FAKE``
    ``False`` when the ops are ``torch.library.triton_op`` (torch >= 2.6 with
    ``wrap_triton``): torch traces their Python body under fake tensors, so no fake
    kernel is needed (registering one anyway is harmless: it replaces the traced
    one).  ``True`` when they fell back to ``torch.library.custom_op`` (older
    torch, ``VGMR_TRITON_CUSTOM_OP=1`` in the environment, or the stub ops): the op
    layer must register fake kernels.

Schemas: :mod:`vgmr_fast.schemas`, the one list both namespaces are defined from, here with
``int`` read as ``SymInt`` (:func:`vgmr_fast.schemas.triton_schema`: a size may stay symbolic
while torch.compile traces the launcher; same eager behaviour); ``seed`` is a one-element int64
tensor the kernels load (no ``.item()`` on the host).
``AVAILABLE``
    Triton is importable and the kernels can run here: ``TRITON_INTERPRET=1`` was
    set before Triton was imported, or a CUDA device is present.  Computed lazily
    on first access (``torch.cuda.is_available()``), never at import time.

Importing this package never fails hard and never queries CUDA.
"""
from __future__ import annotations

import os

import torch

from ..ops import _checks
from ..schemas import TRITON_OPS, triton_schema

__all__ = ["AVAILABLE", "NEEDS_FAKE", "INTERPRET", "CONFIG", "is_available", "unavailable_reason", "launch",
           "recording"]

# Triton decides between compiling and interpreting when a kernel is decorated,
# from the environment at that moment: read it once, here, for the same answer.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: BaseException | None = None
except Exception as exc:  # ImportError, or a broken install
    triton = None
    _IMPORT_ERROR = exc

try:  # what triton.jit returns under TRITON_INTERPRET=1
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except Exception:  # no Triton, or one without an interpreter
    _InterpretedFunction = ()

_HAS_TRITON_OP = (
    hasattr(torch.library, "triton_op")
    and hasattr(torch.library, "wrap_triton")
    and os.environ.get("VGMR_TRITON_CUSTOM_OP", "0") != "1"
)

if _HAS_TRITON_OP:
    from torch.library import wrap_triton
else:  # torch < 2.6: the kernels are launched directly inside a custom_op

    def wrap_triton(kernel):
        return kernel


# Launch heuristics.  Module level so tests can shrink them to reach the tiled
# (D > one block) and multi-step paths with tiny tensors.  A configuration depends
# only on the shapes and the device's SM count, so results are deterministic.
CONFIG = {
    # gate_norm: a row of up to this many elements is held in one block; above it
    # the row is tiled in chunks of gn_chunk_d (a stats kernel, then an elementwise one).
    "gn_max_single_d": 8192,
    "gn_chunk_d": 4096,
    # the backward keeps ~3x more live values per element: smaller single-block limit (at
    # 4096 a row needs 16 values per thread at 8 warps, and the AOT compile showed it spilling)
    "gn_bwd_max_single_d": 2048,
    "gn_bwd_chunk_d": 2048,
    # elements per program tile when several short rows share one program
    "gn_max_tile": 4096,
    # summary_pool: largest D-block width (halved down to 32 while B * D-blocks < 2 * SMs)
    "sp_block_d": 128,
    "sp_max_tile": 2048,
    # interaction: D-block width
    "ia_block_d": 512,
    # gate_norm backward: row programs per SM (reductions over rows: one fp32 partial per program)
    "programs_per_sm": 4,
    # SM count assumed when not on CUDA (interpreter)
    "cpu_sm_count": 1,
    # tests: fill every buffer a kernel must write (outputs and partials) with NaN
    # (integers: INT_MIN) before the launch, so an unwritten element shows up
    "poison_outputs": False,
}


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a poisoned buffer when ``CONFIG["poison_outputs"]`` (tests)."""
    if not CONFIG["poison_outputs"]:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)

_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """SM count of ``device``, queried lazily at the first launch and cached."""
    if device.type != "cuda":
        return CONFIG["cpu_sm_count"]
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def num_warps_for(elements: int) -> int:
    """Warps for a program tile of ``elements`` values (~16 per thread, 1..16 warps)."""
    w = 1
    while w < 16 and w * 32 * 16 < elements:
        w *= 2
    return w


def check_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    """The kernels run on CUDA tensors (or CPU tensors under the interpreter, or while
    :func:`recording` launches), every argument on ``ref``'s device: errors name the argument."""
    dev = ref.device
    if not (dev.type == "cuda" or (dev.type == "cpu" and (INTERPRET or _RECORDER is not None))):
        raise RuntimeError(
            f"{op}: {ref_name} must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 set "
            f"before triton is imported), got a tensor on {dev}"
        )
    for name, t in others.items():
        if t is not None and t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device}, but {ref_name} is on {dev} (mixed devices)")


# ---------------------------------------------------------------------------
# Launching, and recording launches for the ahead-of-time compile (aot.py)
# ---------------------------------------------------------------------------
_RECORDER = None


def launch(kernel, grid, *args, **meta) -> None:
    """``wrap_triton(kernel)[grid](*args, **meta)``; while :func:`recording`, only record it.

    An interpreted kernel (``TRITON_INTERPRET=1``: ``triton.jit`` gives an
    ``InterpretedFunction``, not a ``JITFunction``) is launched directly: it carries none of
    the compile metadata ``wrap_triton``'s traceable wrapper needs, and torch 2.11's
    ``wrap_triton`` rejects it (later torch returns it unchanged, the same launch)."""
    if _RECORDER is not None:
        _RECORDER.append((kernel, grid, args, meta))
        return
    if isinstance(kernel, _InterpretedFunction):
        kernel[grid](*args, **meta)
        return
    wrap_triton(kernel)[grid](*args, **meta)


class recording:
    """Run launchers without launching: every launch's (kernel, grid, args, meta) is appended to
    the list this context yields.  CPU tensors are accepted (probe inputs for aot.py)."""

    def __enter__(self):
        global _RECORDER
        self._old = _RECORDER
        _RECORDER = []
        return _RECORDER

    def __exit__(self, *exc):
        global _RECORDER
        _RECORDER = self._old
        return False


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    """The Triton kernels' element dtypes (the checks themselves: vgmr_fast.ops._checks)."""
    _checks.op_float(op, name, t, _FLOAT_DTYPES, "float32, float16 or bfloat16")


#: The Python functions behind the ops, by op name (what define_op was given).
LAUNCHERS: dict = {}


def define_op(name: str):
    """Define ``vgmr_triton::<name>`` from a Python function, with the schema of
    :func:`vgmr_fast.schemas.triton_schema` (tests/ops/test_schemas.py holds the
    function's annotations to it)."""

    def dec(fn):
        LAUNCHERS[name] = fn
        qualname = f"vgmr_triton::{name}"
        schema = triton_schema(name)
        if _HAS_TRITON_OP:
            return torch.library.triton_op(qualname, fn, mutates_args=(), schema=schema)
        return torch.library.custom_op(qualname, fn, mutates_args=(), schema=schema)

    return dec


_LOAD_ERROR: BaseException | None = _IMPORT_ERROR

if triton is not None:
    try:
        from . import gate_norm, interaction, summary_pool  # noqa: F401  (defines the ops)
    except Exception as exc:  # e.g. a Triton too old for tl.join: keep the import soft
        _LOAD_ERROR = exc

if _LOAD_ERROR is not None:
    _HAS_TRITON_OP = False

    def _stub(qualname):
        def fn(*args, **kwargs):
            raise RuntimeError(f"{qualname}: Triton is unavailable ({_LOAD_ERROR!r})")

        return fn

    for _name in TRITON_OPS:
        _q = f"vgmr_triton::{_name}"
        try:
            torch.library.custom_op(_q, _stub(_q), mutates_args=(), schema=triton_schema(_name))
        except Exception:  # already defined before the failure: keep it
            pass

NEEDS_FAKE = not _HAS_TRITON_OP


def unavailable_reason() -> str | None:
    """Why the Triton ops cannot run here, or ``None`` when they can."""
    if _LOAD_ERROR is not None:
        return f"triton could not be loaded: {_LOAD_ERROR!r}"
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device and TRITON_INTERPRET=1 was not set before triton was imported"
    return None


def is_available() -> bool:
    return unavailable_reason() is None


def __getattr__(name):
    # AVAILABLE is lazy so that importing this package never queries CUDA.
    if name == "AVAILABLE":
        return is_available()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
