"""Backend choice for the fused ops (docs/ops.md, "The op layer").

Backends:
- ``"cpu"``: the C++ kernels of ``vgmr_fast._C`` (namespace ``torch.ops.vgmr``), CPU tensors.
- ``"cuda"``: the CUDA C++ kernels of ``vgmr_fast._C`` (same namespace, CUDA dispatch key),
  present when the extension was built with CUDA (``vgmr_fast._C.WITH_CUDA``).
- ``"triton"``: the Triton kernels of ``vgmr_fast.triton`` (namespace ``torch.ops.vgmr_triton``),
  CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``"auto"``: ``"cpu"`` for CPU tensors, :data:`GPU_AUTO` for CUDA tensors; when that one is
  unavailable it falls back to the other GPU backend with a one-time warning.
- Meta tensors: every backend whose ops are defined runs them as shape inference (fake
  kernels), so a model can be built and traced on ``device="meta"``.

Nothing here imports triton or queries CUDA at import time; ``vgmr_fast.triton`` is imported
on first need, defensively: a missing or broken triton never breaks the CPU path.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable

import torch

from .. import schemas

BACKENDS = ("auto", "cpu", "cuda", "triton")
#: What ``backend="auto"`` picks for CUDA tensors (Triton until a committed GPU run shows
#: the CUDA C++ path correct and faster).
GPU_AUTO = "triton"

OPS = ("summary_pool", "interaction", "gate_norm")

# ---- the C++ extension ----------------------------------------------------------------
_C = None
_C_ERROR: BaseException | None = None
_VGMR_LIBRARY = None  # owns the vgmr:: schemas (vgmr_fast/schemas.py) while the process runs
try:  # importing the extension registers the vgmr:: kernels; their schemas are defined here
    from .. import _C as _C  # type: ignore[no-redef]

    _VGMR_LIBRARY = schemas.define("vgmr", {**schemas.SCHEMAS, **schemas.CPU_SCHEMAS, **schemas.DEBUG_SCHEMAS})
except Exception as e:  # noqa: BLE001  (missing build, ABI mismatch, ...)
    _C, _C_ERROR = None, e


if _C is not None:

    @torch.library.register_fake("vgmr::philox_words")
    def _philox_words_fake(seed, counters):
        return counters.new_empty(*counters.shape, 4)


def has_cpp() -> bool:
    """Whether ``vgmr_fast._C`` (the C++ CPU kernels) is loaded."""
    return _C is not None


def has_onednn_matmul() -> bool:
    """Whether the CPU GEMMs of ``vgmr_fast._C`` found oneDNN's matmul (float32 GEMMs run there)."""
    return _C is not None and bool(getattr(_C, "ONEDNN_MATMUL", False))


def has_cuda_kernels() -> bool:
    """Whether ``vgmr_fast._C`` was built with the CUDA kernels and they are registered."""
    if _C is None or not getattr(_C, "WITH_CUDA", False):
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("vgmr::gate_norm", "CUDA"))
    except Exception:  # noqa: BLE001
        return True  # flag says built with CUDA; trust it on torch versions without the query


def autograd_in_cpp(ns: str) -> bool:
    """Whether namespace ``ns`` has its autograd kernels in C++ (``vgmr`` when the extension
    says so); the op layer then registers only the fake kernels there."""
    return ns == "vgmr" and _C is not None and bool(getattr(_C, "CPP_AUTOGRAD", False))


def cpp_error() -> str:
    return "" if _C_ERROR is None else f"{type(_C_ERROR).__name__}: {_C_ERROR}"


def set_debug_nan_fill(on: bool) -> bool:
    """Fill the C++ kernels' outputs with NaN before they are written (tests). Returns the old value."""
    if _C is None:
        return False
    return bool(_C.set_debug_nan_fill(bool(on)))


# ---- what the fused autograd does not support: a clear error naming the op --------------
def unsupported_message(op: str, what: str) -> str:
    """The one wording of "this fused op cannot do <what>" (the C++ autograd of csrc/ops.cpp says the same)."""
    name = op.split("::")[-1]
    return (f"{op}: {what} is not supported by the fused kernels; use the plain-torch reference "
            f"(vgmr_fast.reference.{name}, or VGMR(backend=\"reference\") for the module)")


def no_double_backward(op: str, *tensors) -> None:
    """Raise when the backward of ``op`` runs with ``create_graph=True`` and would build a graph
    (any input of the backward requires grad): the fused backward is not differentiable, and a
    silent graph through it would return wrong second derivatives."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(unsupported_message(
            op, "double backward (torch.autograd.grad(..., create_graph=True), gradgradcheck, gradient penalties)"))


def check_transforms(op: str, *tensors) -> None:
    """For ops whose autograd is registered in Python (``vgmr_triton::``): raise under torch.func
    transforms and forward-mode AD, which that autograd would silently get wrong (zero or
    missing tangents). The C++ autograd of ``vgmr::`` does the same check itself. Skipped while
    torch.compile traces (no graph break; dynamo handles transforms around the op itself)."""
    if torch.compiler.is_compiling():
        return
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(unsupported_message(
            op, "torch.func (grad, vmap, jvp, jacrev, functional_call under a transform, ...)"))
    from torch.autograd import forward_ad

    if forward_ad._current_level >= 0 and any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(unsupported_message(op, "forward-mode AD (torch.autograd.forward_ad dual tensors)"))


# ---- per-op registration (fake + autograd), one function per op for both namespaces -----
_REGISTRARS: dict[str, Callable[[str, bool], None]] = {}
_REGISTERED: set[tuple[str, str]] = set()


def add_registrar(op: str, fn: Callable[[str, bool], None]) -> None:
    """Record ``fn(namespace, needs_fake)``, the one registration function of ``op``, and run it
    for every namespace already loaded (``vgmr`` now, ``vgmr_triton`` once triton loads)."""
    _REGISTRARS[op] = fn
    if _C is not None:
        _run(op, "vgmr", True)
    if _TRITON_STATE.get("loaded") and op in _TRITON_STATE.get("ops", ()):
        _run(op, "vgmr_triton", _TRITON_STATE["needs_fake"])


def _run(op: str, ns: str, needs_fake: bool) -> None:
    if (ns, op) in _REGISTERED:
        return
    _REGISTRARS[op](ns, needs_fake)
    _REGISTERED.add((ns, op))


def op_exists(ns: str, name: str) -> bool:
    """Whether ``torch.ops.<ns>.<name>`` is defined."""
    try:
        getattr(getattr(torch.ops, ns), name)
        return True
    except (AttributeError, RuntimeError):
        return False


# ---- triton, lazily -----------------------------------------------------------------------
_TRITON_STATE: dict = {}


def _load_triton() -> bool:
    """Import ``vgmr_fast.triton`` once and register fake/autograd for its ``vgmr_triton::`` ops.

    That package defines the ops whenever it imports (stubs that raise when Triton cannot
    run), so registration happens even where they cannot run; :func:`has_triton` says
    whether they can. Returns whether the package imported.
    """
    if "loaded" in _TRITON_STATE:
        return _TRITON_STATE["loaded"]
    _TRITON_STATE["loaded"] = False
    _TRITON_STATE["error"] = None
    try:
        mod = importlib.import_module("vgmr_fast.triton")
    except Exception as e:  # noqa: BLE001  (a bug in a kernel file must not break the CPU path)
        _TRITON_STATE["error"] = f"vgmr_fast.triton failed to import: {type(e).__name__}: {e}"
        return False
    ops = [n for n in OPS if op_exists("vgmr_triton", n)]
    _TRITON_STATE["module"] = mod
    _TRITON_STATE["ops"] = set(ops)
    # triton_op-defined ops trace their own fake kernels; custom_op / stub ones need ours.
    _TRITON_STATE["needs_fake"] = bool(getattr(mod, "NEEDS_FAKE", True))
    _TRITON_STATE["loaded"] = True
    for op in ops:
        if op in _REGISTRARS:
            try:
                _run(op, "vgmr_triton", _TRITON_STATE["needs_fake"])
            except Exception as e:  # noqa: BLE001
                _TRITON_STATE["error"] = f"registering vgmr_triton::{op} failed: {type(e).__name__}: {e}"
                warnings.warn(f"vgmr_fast.ops: {_TRITON_STATE['error']}", RuntimeWarning, stacklevel=2)
    return True


def load_triton() -> bool:
    """Import ``vgmr_fast.triton`` and register the op layer for ``vgmr_triton::`` (idempotent)."""
    return _load_triton()


def has_triton(op: str | None = None) -> bool:
    """Whether the Triton ops can run here (``op``: that one is defined)."""
    if not _load_triton():
        return False
    mod = _TRITON_STATE["module"]
    try:
        ok = bool(mod.is_available()) if hasattr(mod, "is_available") else True
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        return False
    return op is None or op in _TRITON_STATE.get("ops", ())


def triton_error() -> str:
    if not _load_triton():
        return _TRITON_STATE.get("error") or ""
    mod = _TRITON_STATE["module"]
    reason = None
    if hasattr(mod, "unavailable_reason"):
        try:
            reason = mod.unavailable_reason()
        except Exception as e:  # noqa: BLE001
            reason = repr(e)
    return reason or _TRITON_STATE.get("error") or ""


def triton_usable_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_GROUPED = _C is not None and op_exists("vgmr", "gate_norm_grouped_backward")

# ---- resolve ------------------------------------------------------------------------------
_WARNED: set[tuple[str, str]] = set()


def _available(backend: str, op: str | None) -> tuple[bool, str]:
    if backend == "cpu":
        if has_cpp():
            return True, ""
        return False, (f"vgmr_fast._C is not loaded ({cpp_error() or 'not built'}); build it with "
                       "`pip install --no-build-isolation -e .`")
    if backend == "cuda":
        if not has_cpp():
            return False, f"vgmr_fast._C is not loaded ({cpp_error() or 'not built'})"
        if has_cuda_kernels():
            return True, ""
        return False, "vgmr_fast._C was built without the CUDA kernels (VGMR_WITH_CUDA)"
    if backend == "triton":
        if has_triton(op):
            return True, ""
        return False, f"the Triton backend is unavailable ({triton_error() or f'vgmr_triton::{op} is not defined'})"
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def resolve(backend: str, tensor, op: str | None = None) -> str:
    """The concrete backend (``"cpu"``, ``"cuda"`` or ``"triton"``) for ``tensor``'s device
    (``tensor`` may also be a ``torch.device``).

    Raises ValueError for an unknown backend or one that cannot run on the tensor's device,
    RuntimeError for an explicitly requested backend that is not available. The common CPU
    case is a few attribute reads, so torch.compile traces through it without a graph break.
    """
    device = tensor if isinstance(tensor, torch.device) else tensor.device
    dev = device.type
    if (backend == "auto" or backend == "cpu") and dev == "cpu" and _C is not None:
        return "cpu"
    return _resolve_slow(backend, dev, device, op)


def _resolve_slow(backend, dev: str, device, op: str | None) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if dev == "meta":
        return _resolve_meta(backend, op)
    if backend == "auto":
        if dev == "cpu":
            order = ["cpu", "triton"] if triton_usable_on_cpu() else ["cpu"]
        elif dev == "cuda":
            order = [GPU_AUTO] + [b for b in ("triton", "cuda") if b != GPU_AUTO]
        else:
            raise ValueError(f"backend='auto': no fused backend for {dev} tensors")
        reasons = []
        for i, b in enumerate(order):
            ok, why = _available(b, op)
            if ok:
                if i > 0 and (order[0], b) not in _WARNED:
                    _WARNED.add((order[0], b))
                    warnings.warn(
                        f"vgmr_fast.ops: backend '{order[0]}' unavailable ({reasons[0]}); using '{b}'",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                return b
            reasons.append(why)
        raise RuntimeError(f"vgmr_fast.ops: no backend available for {dev} tensors: " + "; ".join(reasons))
    if backend == "cpu" and dev != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {device}")
    if backend == "cuda" and dev != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got {device}")
    if backend == "triton" and dev != "cuda" and not (dev == "cpu" and triton_usable_on_cpu()):
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                         f"got {device}")
    ok, why = _available(backend, op)
    if not ok:
        raise RuntimeError(f"vgmr_fast.ops: backend={backend!r} requested but {why}")
    return backend


def _resolve_meta(backend: str, op: str | None) -> str:
    """Meta tensors (a model built on ``device="meta"`` first): shape inference only, through the
    fake kernels every op namespace registers. ``"auto"`` uses the C++ ops' namespace when the
    extension is loaded, else Triton's; an explicit backend needs its own ops to be defined."""
    if backend in ("auto", "cpu", "cuda") and has_cpp():
        return "cpu" if backend == "auto" else backend
    if backend in ("auto", "triton") and _load_triton() and (op is None or op in _TRITON_STATE.get("ops", ())):
        return "triton"
    ok, why = _available("cpu" if backend == "auto" else backend, op)
    raise RuntimeError(f"vgmr_fast.ops: backend={backend!r} on meta tensors needs its ops to be defined, but {why}")


def has_grouped(backend: str) -> bool:
    """Whether ``backend`` runs gate_norm of every modality in one operator call (the C++
    backends, whose extension defines ``gate_norm_grouped``). Decided at import: a schema query
    does not trace."""
    return backend in ("cpu", "cuda") and _GROUPED


def namespace(backend: str):
    """``torch.ops.vgmr`` for "cpu"/"cuda", ``torch.ops.vgmr_triton`` for "triton"."""
    return torch.ops.vgmr_triton if backend == "triton" else torch.ops.vgmr


def available_backends(op: str | None = None) -> list[str]:
    """Concrete backends usable in this process (for tests and benchmarks)."""
    out = []
    if has_cpp():
        out.append("cpu")
    if has_cuda_kernels() and torch.cuda.is_available():
        out.append("cuda")
    if has_triton(op) and (torch.cuda.is_available() or triton_usable_on_cpu()):
        out.append("triton")
    return out
