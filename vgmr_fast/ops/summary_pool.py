"""``summary_pool(h, mask=None) -> (mean, max)``: masked mean and max over time (docs/math.md §1).

One pass over ``h`` saving the int32 argmax; the backward is one pass writing ``dh``
(docs/ops.md). Ties send the whole max gradient to the first valid maximal step.
"""
from __future__ import annotations

import torch

from . import _checks as C
from . import backend as _backend

__all__ = ["summary_pool"]


def summary_pool(h: torch.Tensor, mask: torch.Tensor | None = None, *, backend: str = "auto"):
    """Masked mean and max over time: ``h [B, T, D]``, ``mask [B, T]`` bool (True = valid) or None
    -> ``(mean [B, D], max [B, D])`` in ``h``'s dtype. A row with no valid step gets 0 for both."""
    C.float_tensor(h, "h")
    C.rank(h, 3, "h", "[B, T, D]")
    if mask is not None:
        C.tensor(mask, "mask")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool (True = valid step), got {mask.dtype}")
        C.shape(mask, h.shape[:2], "mask", "[B, T]")
        C.same_device(h, "h", mask=mask)
        mask = mask.contiguous()
    be = _backend.resolve(backend, h, "summary_pool")
    if be == "triton":
        _backend.check_transforms("vgmr_triton::summary_pool", h)
    ns = _backend.namespace(be)
    mean, mx, _ = ns.summary_pool(h.contiguous(), mask)
    return mean, mx


def _register(ns: str, needs_fake: bool) -> None:
    """Fake kernels and autograd for ``<ns>::summary_pool`` (ns = vgmr or vgmr_triton)."""
    if needs_fake:

        @torch.library.register_fake(f"{ns}::summary_pool")
        def _fake(h, mask):
            B, _, D = h.shape
            return h.new_empty(B, D), h.new_empty(B, D), h.new_empty(B, D, dtype=torch.int32)

        @torch.library.register_fake(f"{ns}::summary_pool_backward")
        def _fake_backward(dmean, dmax, mask, argmax, T):
            B, D = dmean.shape
            return dmean.new_empty(B, T, D)

    ops = getattr(torch.ops, ns)

    def setup_context(ctx, inputs, output):
        h, mask = inputs
        _, _, argmax = output
        ctx.mark_non_differentiable(argmax)
        ctx.T = h.shape[1]
        ctx.h_dtype = h.dtype
        ctx.has_mask = mask is not None
        ctx.save_for_backward(mask if mask is not None else argmax, argmax)

    def backward(ctx, dmean, dmax, _dargmax):
        saved, argmax = ctx.saved_tensors
        _backend.no_double_backward(f"{ns}::summary_pool", dmean, dmax)
        mask = saved if ctx.has_mask else None
        if dmean is None:
            dmean = argmax.new_zeros(argmax.shape, dtype=ctx.h_dtype)
        if dmax is None:
            dmax = argmax.new_zeros(argmax.shape, dtype=ctx.h_dtype)
        dmax = dmax.to(dmean.dtype)
        dh = ops.summary_pool_backward(dmean.contiguous(), dmax.contiguous(), mask, argmax, ctx.T)
        return dh, None

    if _backend.autograd_in_cpp(ns):
        return  # vgmr:: ops carry a C++ autograd kernel (csrc/ops.cpp): same math, less overhead
    torch.library.register_autograd(f"{ns}::summary_pool", backward, setup_context=setup_context)


_backend.add_registrar("summary_pool", _register)
