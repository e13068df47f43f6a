"""The fused drop-in VGMR: same constructor, parameter names and state_dict as the reference.

``vgmr_fast.VGMR`` subclasses ``vgmr_fast.reference.VGMR`` (so parameters, ``state_dict`` and
input checks are literally shared) and replaces the forward's bandwidth-bound parts with the
fused ops of ``vgmr_fast.ops``:

    X -> P (GEMMs) -> summary_pool -> E -> interaction -> V -> g, v -> bias_row
    [X; H] -> gate GEMM -> Zpre;   gate_norm(Zpre, bias_row, X) -> X~

The module keeps the GEMMs and small MLPs (torch does them best). Per SPEC §4 the two per-step
gate products ``X W_r^T + H W_h^T`` are two GEMMs accumulating into one output
(``gate_gemm="two"``, ``torch.addmm`` with beta = 1, no concatenated copy of ``[X; H]``) or one
GEMM over the concatenation with the stacked weight (``gate_gemm="stacked"``); with
``projection="linear"`` the weights fold into one ``D x D`` GEMM. All per-sample terms (A_g, A_c
and every bias) form one ``[B, D]`` bias row that ``gate_norm`` broadcasts over time.
"""
from __future__ import annotations

import warnings

import torch

from . import reference as ref
from .ops.dropout import draw_seed

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@torch.compiler.disable
def _gate_norm_dropout(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, backend):
    """gate_norm with dropout, its seed drawn here (in modality order, as the reference does).

    The seed is a fresh Python int each step: inside a compiled graph it would be a guarded
    constant and recompile every step, so the draw and this launch stay outside the graph.
    """
    from . import ops

    return ops.gate_norm(zpre, bias_row, x, ln_weight, ln_bias, alpha=alpha, beta=beta, p=p,
                         seed=draw_seed(), backend=backend)


class VGMR(ref.VGMR):
    """Fused VGMR. Arguments as ``vgmr_fast.reference.VGMR``, plus:

    Args:
        backend: ``"auto"`` (best available for the inputs' device; falls back to the reference
            with a one-time warning when no fused backend is available), ``"reference"``,
            ``"cpu"`` (C++), ``"cuda"`` (CUDA C++) or ``"triton"``.
        gate_gemm: ``"two"`` (two GEMMs into one output) or ``"stacked"`` (one GEMM over ``[X; H]``).

    With ``return_aux=True`` the auxiliaries match the reference's; the gate statistics
    (``gate``, ``gate_mean``) cost one extra elementwise pass, done only on request.
    """

    def __init__(self, widths, d: int = 128, alpha: float = 0.5, beta: float = 0.2, dropout: float = 0.1,
                 *, backend: str = "auto", gate_gemm: str = "two", **kwargs):
        super().__init__(widths, d, alpha, beta, dropout, **kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if gate_gemm not in ("two", "stacked"):
            raise ValueError(f"gate_gemm: expected 'two' or 'stacked', got {gate_gemm!r}")
        self.backend = backend
        self.gate_gemm = gate_gemm

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}, gate_gemm={self.gate_gemm!r}"

    def resolved_backend(self, device: torch.device) -> str:
        """The backend this module runs on ``device`` (``"reference"`` when nothing fused is available)."""
        if self.backend == "reference":
            return "reference"
        try:
            from .ops import backend as _backend

            return _backend.resolve(self.backend, device)
        except (ImportError, RuntimeError, OSError) as exc:
            if self.backend != "auto":
                raise
            _warn_once(f"fallback-{device.type}",
                       f"vgmr_fast: no fused backend available for {device.type} tensors ({exc}); "
                       "using the reference implementation")
            return "reference"

    # -- gate GEMM ------------------------------------------------------------------
    def _gate_logits(self, blk: ref.ModalityBlock, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Per-step gate logits without biases: ``X W_r^T + H W_h^T`` ([B, T, D])."""
        B, T, D = x.shape
        x2, h2 = x.reshape(B * T, D), h.reshape(B * T, -1)
        w_r, w_h = blk.gate_raw.weight, blk.gate_latent.weight
        if self.projection == "linear":
            # P is one Linear (h = x W_p^T + b_p): fold W_h into W_r (SPEC §4); W_h b_p joins the bias row.
            z = x2 @ (w_r + w_h @ blk.proj.weight).t()
        elif self.gate_gemm == "stacked":
            z = torch.cat([x2, h2], dim=1) @ torch.cat([w_r, w_h], dim=1).t()
        else:
            z = torch.addmm(x2 @ w_r.t(), h2, w_h.t())
        return z.view(B, T, D)

    def _bias_row(self, blk: ref.ModalityBlock, g, v, x: torch.Tensor) -> torch.Tensor:
        """All per-sample gate terms in one ``[B, D]`` row: A_g, A_c and every bias."""
        row = blk.value_bias(g, v, x) + blk.gate_raw.bias + blk.gate_latent.bias
        if self.projection == "linear":
            row = row + blk.gate_latent.weight @ blk.proj.bias
        return row

    # -- forward ----------------------------------------------------------------------
    def forward(self, xs, masks=None, return_aux: bool = False):
        xs_list, masks_list = self._prepare(xs, masks)
        backend = self.resolved_backend(xs_list[0].device)
        if backend == "reference":
            return super().forward(xs, masks, return_aux)
        from . import ops

        blocks = list(self.blocks)
        hs = [blk.proj(x) for blk, x in zip(blocks, xs_list)]
        summaries = []
        for blk, h, mk in zip(blocks, hs, masks_list):
            mean, mx = ops.summary_pool(h, mk, backend=backend)
            summaries.append(blk.summary(torch.cat([mean, mx], dim=-1)))
        u = self._select_u(ops.interaction(torch.stack(summaries, dim=1), backend=backend))
        p = self.p if self.training else 0.0
        outs, gs, vs, gates = [], [], [], []
        for m, (blk, x, h) in enumerate(zip(blocks, xs_list, hs)):
            g, v = blk.values(u[:, m])
            zpre = self._gate_logits(blk, x, h).to(x.dtype)  # autocast may hand back a lower precision
            bias_row = self._bias_row(blk, g, v, x)
            args = (zpre, bias_row, x, blk.norm.weight, blk.norm.bias, self.alpha, self.beta)
            outs.append(_gate_norm_dropout(*args, p, backend) if p > 0 else
                        ops.gate_norm(*args[:5], alpha=self.alpha, beta=self.beta, backend=backend))
            if return_aux:
                gs.append(g)
                vs.append(v)
                gates.append(torch.sigmoid(zpre + bias_row.unsqueeze(1).to(zpre.dtype)))
        refined = self._pack(xs, outs)
        if not return_aux:
            return refined
        return refined, self._aux(gs, vs, gates)


def from_reference(module: ref.VGMR, **kwargs) -> VGMR:
    """A fused VGMR with the same configuration and weights as a reference one."""
    fused = VGMR(
        dict(zip(module.names, module.widths)) if module.names else list(module.widths),
        module.d, module.alpha, module.beta, module.p,
        use_global_value=module.use_global_value, use_channel_value=module.use_channel_value,
        use_agreement=module.use_agreement, use_discrepancy=module.use_discrepancy,
        projection=module.projection, **kwargs,
    )
    fused.load_state_dict(module.state_dict())
    param = next(module.parameters())
    return fused.to(device=param.device, dtype=param.dtype).train(module.training)


__all__ = ["VGMR", "from_reference", "BACKENDS"]
