"""``gate_norm``: gate, amplification, retention, product with x, LayerNorm, dropout (SPEC §5).

One pass per row; the op saves only per-row fp32 mean/rstd (and the seed); the backward
recomputes the gate and the dropout keep mask (shared Philox stream, ``ops.dropout``).
"""
from __future__ import annotations

import torch

from . import _checks as C
from . import backend as _backend

__all__ = ["gate_norm"]


def gate_norm(
    zpre: torch.Tensor,
    bias_row: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    *,
    alpha: float = 0.5,
    beta: float = 0.2,
    p: float = 0.0,
    seed: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """``Dropout_p(LayerNorm(G_eff(zpre + bias_row) * x))`` (eps 1e-5), dropout from the shared
    Philox stream keyed by ``seed`` (element ``(b, t, c)`` is row ``b*T + t``, column ``c``).

    ``zpre``, ``x``: ``[B, T, D]``, same floating dtype; ``bias_row``: ``[B, D]``; ``ln_weight``,
    ``ln_bias``: ``[D]`` (cast to float32, or float64 for float64 ``x``; gradients come back in
    their own dtype). Returns ``y`` ``[B, T, D]`` in ``x``'s dtype.
    """
    C.float_tensor(x, "x")
    C.rank(x, 3, "x", "[B, T, D]")
    C.float_tensor(zpre, "zpre")
    if zpre.dtype != x.dtype:
        raise TypeError(f"zpre: expected the dtype of x ({x.dtype}), got {zpre.dtype}")
    C.shape(zpre, x.shape, "zpre", "[B, T, D] of x")
    B, _, D = x.shape
    if D < 1:
        raise ValueError(f"x: expected D >= 1 features, got shape {tuple(x.shape)}")
    C.float_tensor(bias_row, "bias_row")
    C.shape(bias_row, (B, D), "bias_row", "[B, D]")
    C.float_tensor(ln_weight, "ln_weight")
    C.shape(ln_weight, (D,), "ln_weight", "[D]")
    C.float_tensor(ln_bias, "ln_bias")
    C.shape(ln_bias, (D,), "ln_bias", "[D]")
    C.check_same_device(x, "x", (zpre, bias_row, ln_weight, ln_bias), ("zpre", "bias_row", "ln_weight", "ln_bias"))
    alpha = C.real(alpha, "alpha")
    beta = C.real(beta, "beta")
    p = C.probability(p, "p")
    seed = C.seed(seed, "seed")
    resolved = _backend.resolve(backend, x, "gate_norm")
    ns = _backend.namespace(resolved)
    if resolved == "triton":  # vgmr_triton::gate_norm takes the seed as a one-element int64 tensor (CONTRACT)
        seed = torch.tensor([seed], dtype=torch.int64, device=x.device)
    pdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if bias_row.dtype != pdt:
        bias_row = bias_row.to(pdt)
    if ln_weight.dtype != pdt:
        ln_weight = ln_weight.to(pdt)
    if ln_bias.dtype != pdt:
        ln_bias = ln_bias.to(pdt)
    y, _, _ = ns.gate_norm(
        zpre.contiguous(),
        bias_row.contiguous(),
        x.contiguous(),
        ln_weight.contiguous(),
        ln_bias.contiguous(),
        alpha,
        beta,
        p,
        seed,
    )
    return y


def _register(ns: str, needs_fake: bool) -> None:
    """Fake kernels and autograd for ``<ns>::gate_norm`` (ns = vgmr or vgmr_triton)."""
    if needs_fake:

        @torch.library.register_fake(f"{ns}::gate_norm")
        def _fake(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, seed):
            B, T, _ = x.shape
            stat = torch.float64 if x.dtype == torch.float64 else torch.float32
            return x.new_empty(x.shape), x.new_empty(B, T, dtype=stat), x.new_empty(B, T, dtype=stat)

        @torch.library.register_fake(f"{ns}::gate_norm_backward")
        def _fake_backward(dy, zpre, bias_row, x, ln_weight, mean, rstd, alpha, beta, p, seed):
            return (
                zpre.new_empty(zpre.shape),
                bias_row.new_empty(bias_row.shape),
                x.new_empty(x.shape),
                ln_weight.new_empty(ln_weight.shape),
                ln_weight.new_empty(ln_weight.shape),
            )

    ops = getattr(torch.ops, ns)

    def setup_context(ctx, inputs, output):
        zpre, bias_row, x, ln_weight, _ln_bias, alpha, beta, p, seed = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(zpre, bias_row, x, ln_weight, mean, rstd)
        ctx.args = (alpha, beta, p, seed)

    def backward(ctx, dy, _dmean, _drstd):
        zpre, bias_row, x, ln_weight, mean, rstd = ctx.saved_tensors
        alpha, beta, p, seed = ctx.args
        dzpre, dbias_row, dx, dw, db = ops.gate_norm_backward(
            dy.to(x.dtype).contiguous(), zpre, bias_row, x, ln_weight, mean, rstd, alpha, beta, p, seed
        )
        return dzpre, dbias_row, dx, dw, db, None, None, None, None

    if _backend.autograd_in_cpp(ns):
        return  # vgmr:: ops carry a C++ autograd kernel (csrc/ops.cpp): same math, less overhead
    torch.library.register_autograd(f"{ns}::gate_norm", backward, setup_context=setup_context)


_backend.add_registrar("gate_norm", _register)
