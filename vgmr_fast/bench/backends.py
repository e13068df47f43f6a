"""Which fused backends can run here, and why not when they cannot.

Availability is decided by *running* each op once on a tiny input with the backend forced
(``backend="cpu"`` / ``"cuda"`` / ``"triton"``), so the answer does not depend on how the op layer
spells its helpers; a missing op layer, an unbuilt extension or a missing GPU each give a reason
string that the bench and the check print.
"""
from __future__ import annotations

import importlib
import os

import torch

FUSED_BACKENDS = ("cpu", "cuda", "triton")
OPS = ("summary_pool", "interaction", "gate_norm")


def backend_device(backend: str) -> str:
    return "cpu" if backend == "cpu" else "cuda"


def load_ops():
    """The op layer ``vgmr_fast.ops`` (raises ImportError with the cause when it is missing)."""
    return importlib.import_module("vgmr_fast.ops")


def fused_op(name: str):
    """The public fused op ``vgmr_fast.ops.<name>`` (looked up at call time, so tests can patch it)."""
    ops = load_ops()
    fn = getattr(ops, name, None)
    if fn is None:
        raise ImportError(f"vgmr_fast.ops has no {name!r}")
    return fn


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(exc).__name__}: {first}"


def _tiny_inputs(device: str):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 4, generator=g).to(device)
    mask = torch.tensor([[True, True, False], [True, False, False]], device=device)
    s = torch.randn(2, 3, 4, generator=g).to(device)
    zpre = torch.randn(2, 3, 5, generator=g).to(device)
    x = torch.randn(2, 3, 5, generator=g).to(device)
    bias_row = torch.randn(2, 5, generator=g).to(device)
    w = torch.ones(5, device=device)
    b = torch.zeros(5, device=device)
    return h, mask, s, zpre, x, bias_row, w, b


def probe_backend(backend: str) -> str | None:
    """``None`` if every op runs with ``backend`` forced, else the reason it cannot."""
    if backend not in FUSED_BACKENDS:
        return f"unknown backend {backend!r}"
    device = backend_device(backend)
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if backend == "triton" and device == "cuda":
        try:
            importlib.import_module("triton")
        except Exception as exc:  # noqa: BLE001
            return f"triton not importable ({_short(exc)})"
    try:
        load_ops()
    except Exception as exc:  # noqa: BLE001
        return f"op layer vgmr_fast.ops not importable ({_short(exc)})"
    try:
        h, mask, s, zpre, x, bias_row, w, b = _tiny_inputs(device)
        fused_op("summary_pool")(h, mask, backend=backend)
        fused_op("interaction")(s, backend=backend)
        fused_op("gate_norm")(zpre, bias_row, x, w, b, alpha=0.5, beta=0.2, p=0.0, seed=0, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        return f"ops fail with backend={backend!r} ({_short(exc)})"
    return None


def probe_backends(device: str | None = None, only=None) -> dict:
    """``{backend: None or reason}`` for the fused backends of ``device`` ("cpu", "cuda" or None = all).

    ``only``: an iterable of backend names to consider (others are left out of the result).
    ``VGMR_FAST_BENCH_BACKENDS`` (comma-separated) narrows the list the same way.
    """
    names = list(FUSED_BACKENDS)
    if device is not None:
        names = [b for b in names if backend_device(b) == device]
    env = os.environ.get("VGMR_FAST_BENCH_BACKENDS")
    if only is None and env:
        only = [s.strip() for s in env.split(",") if s.strip()]
    if only is not None:
        names = [b for b in names if b in set(only)]
    return {b: probe_backend(b) for b in names}


def fused_module(widths, d: int, backend: str, **kwargs):
    """``vgmr_fast.VGMR(..., backend=backend)`` on the backend's device, after one tiny forward that
    proves it runs fused (an explicit backend raises instead of falling back); RuntimeError saying why not."""
    try:
        from vgmr_fast.vgmr import VGMR
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"fused module vgmr_fast.VGMR not importable ({_short(exc)})") from exc
    device = backend_device(backend)
    try:
        mod = VGMR(widths, d, backend=backend, **kwargs).to(device)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"vgmr_fast.VGMR(backend={backend!r}) fails ({_short(exc)})") from exc
    was_training = mod.training
    try:
        mod.eval()
        xs = [torch.randn(1, 2, D, device=device) for D in (widths.values() if isinstance(widths, dict) else widths)]
        with torch.no_grad():
            mod(xs)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"vgmr_fast.VGMR(backend={backend!r}) cannot run ({_short(exc)})") from exc
    finally:
        mod.train(was_training)
    return mod
