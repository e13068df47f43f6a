"""The fused layer's matrix products: ``beta * c + alpha * a @ b``, 2-D or 3-D (batched).

A float32 CPU product of at least :data:`MIN_ONEDNN_MACS` multiply-adds runs as ``vgmr::gemm`` /
``vgmr::gemm_into`` (csrc/cpu/gemm.cpp: oneDNN's matmul). ATen alone sends float32 to MKL's sgemm,
which on the AMD EPYC (AVX-512) of the committed CPU runs takes 2.1-2.3x as long on the layer's
shapes (docs/ops.md, "The layer's GEMMs"). Everything else -- other devices and dtypes, smaller
products, calls that record gradients -- is ATen's ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` with
the same arguments. torch.compile traces the operators through their fake kernels and calls them
from the compiled graph (the mutating ``gemm_into`` functionalized and written back in place).

:func:`use_onednn` turns the oneDNN route off for a block (the bench's ATen-GEMM peer; the results
then are ATen's to the last bit).
"""
from __future__ import annotations

import torch

from . import backend as _backend

__all__ = ["gemm", "gemm_into", "use_onednn", "onednn_active"]

_enabled = True


class use_onednn:  # noqa: N801  (a context manager, named like torch.no_grad)
    """Within the block the fused layer's CPU GEMMs run on oneDNN (``True``) or ATen (``False``);
    one instance may be entered again and again (and nested)."""

    def __init__(self, enabled: bool):
        self.enabled, self._outer = bool(enabled), []

    def __enter__(self):
        global _enabled
        self._outer.append(_enabled)
        _enabled = self.enabled

    def __exit__(self, *exc):
        global _enabled
        _enabled = self._outer.pop()


def onednn_active() -> bool:
    """Whether float32 CPU GEMMs of the fused layer run on oneDNN here and now."""
    return _enabled and _backend.has_onednn_matmul() and torch.backends.mkldnn.enabled


#: Below this many multiply-adds a float32 GEMM stays ATen's: oneDNN's fixed cost per call (~13 us
#: measured, against ~2 us for ATen at [1, 128] x [128, 128]) outweighs its faster kernels (break-even
#: near [32, 128] x [128, 128], 0.5 M; at 3 M, [3, 32, 256] x [3, 256, 128], oneDNN is 1.4x faster).
MIN_ONEDNN_MACS = 1 << 20


def _ours(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None) -> bool:
    """The CPU operators serve: a float32 CPU call large enough for oneDNN to pay off, with no
    gradient to record (the operators have no autograd; the composable path's differentiable
    calls stay ATen's)."""
    return (_enabled and a.dtype == torch.float32 and a.device.type == "cpu"
            and a.numel() * b.shape[-1] >= MIN_ONEDNN_MACS and _backend.has_onednn_matmul()
            and not (torch.is_grad_enabled()
                     and (a.requires_grad or b.requires_grad or (c is not None and c.requires_grad))))


def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None, beta: float = 1.0,
         alpha: float = 1.0) -> torch.Tensor:
    """``beta * c + alpha * a @ b`` in a new tensor (``c`` broadcast to it; absent: zero)."""
    if _ours(a, b, c):
        return torch.ops.vgmr.gemm(a, b, c, beta, alpha)
    two = a.dim() == 2
    if c is None:
        out = torch.mm(a, b) if two else torch.bmm(a, b)
        return out if alpha == 1 else out.mul_(alpha)
    return (torch.addmm if two else torch.baddbmm)(c, a, b, beta=beta, alpha=alpha)


def gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None,
              beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """``out = beta * c + alpha * a @ b``, with ``c`` = ``out`` itself when absent (``beta = 0``:
    ``out`` is only written, its contents never read); returns ``out``."""
    if _ours(a, b, c):
        torch.ops.vgmr.gemm_into(out, a, b, c, beta, alpha)
    elif c is None:
        (out.addmm_ if a.dim() == 2 else out.baddbmm_)(a, b, beta=beta, alpha=alpha)
    else:
        (torch.addmm if a.dim() == 2 else torch.baddbmm)(c, a, b, beta=beta, alpha=alpha, out=out)
    return out


if _backend.has_cpp():

    @torch.library.register_fake("vgmr::gemm")
    def _gemm_fake(a, b, c=None, beta=1.0, alpha=1.0):
        return a.new_empty(*a.shape[:-1], b.shape[-1])

    @torch.library.register_fake("vgmr::gemm_into")
    def _gemm_into_fake(out, a, b, c=None, beta=1.0, alpha=1.0):
        return None
