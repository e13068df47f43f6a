"""``interaction(s) -> u``: the cross-modal interaction input of every target (docs/math.md §2).

``s [B, M, D] -> u [B, M, (3M-1) D]`` with, for target m and the others j ascending,
``[s_m; s_j...; s_m*s_j...; |s_m - s_j|...; mean_j s_j]``; one kernel forward, one backward.
"""
from __future__ import annotations

import torch

from . import _checks as C
from . import backend as _backend

__all__ = ["interaction"]


def interaction(s: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``s [B, M, D]`` (M >= 2) -> ``u [B, M, (3M-1) D]`` in ``s``'s dtype."""
    C.float_tensor(s, "s")
    C.rank(s, 3, "s", "[B, M, D]")
    if s.shape[1] < 2:
        raise ValueError(f"s: expected M >= 2 modalities in dim 1, got shape {tuple(s.shape)}")
    be = _backend.resolve(backend, s, "interaction")
    if be == "triton":
        _backend.check_transforms("vgmr_triton::interaction", s)
    ns = _backend.namespace(be)
    return ns.interaction(s.contiguous())


def _register(ns: str, needs_fake: bool) -> None:
    """Fake kernels and autograd for ``<ns>::interaction`` (ns = vgmr or vgmr_triton)."""
    if needs_fake:

        @torch.library.register_fake(f"{ns}::interaction")
        def _fake(s):
            B, M, D = s.shape
            return s.new_empty(B, M, (3 * M - 1) * D)

        @torch.library.register_fake(f"{ns}::interaction_backward")
        def _fake_backward(du, s):
            return du.new_empty(s.shape)

    ops = getattr(torch.ops, ns)

    def setup_context(ctx, inputs, output):
        (s,) = inputs
        ctx.save_for_backward(s)

    def backward(ctx, du):
        (s,) = ctx.saved_tensors
        _backend.no_double_backward(f"{ns}::interaction", du, s)
        return ops.interaction_backward(du.contiguous(), s)

    if _backend.autograd_in_cpp(ns):
        return  # vgmr:: ops carry a C++ autograd kernel (csrc/ops.cpp): same math, less overhead
    torch.library.register_autograd(f"{ns}::interaction", backward, setup_context=setup_context)


_backend.add_registrar("interaction", _register)
