"""The executable specification of VGMR (docs/math.md §1–§5), in plain PyTorch.

Every fused kernel is tested against the functions here, and the fused module
``vgmr_fast.VGMR`` takes the same constructor arguments and gives the same ``state_dict``
(its own parameter layout is converted by state-dict hooks). The two share only input
handling (:mod:`vgmr_fast.inputs`). Plain PyTorch: importing this module never loads the
C++ extension. Section marks (§N) refer to docs/math.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import inputs
from .dropout_stream import check_p, draw_seeds, keep_mask
from .inputs import as_modality_list, check_inputs  # noqa: F401  (backbones import them from here)

EPS = 1e-5

__all__ = [
    "VGMR",
    "ModalityBlock",
    "LowRankLinear",
    "low_rank_init",
    "summary_pool",
    "interaction",
    "interaction_blocks",
    "gate_norm",
    "gate_transform",
    "as_modality_list",
]


# ---------------------------------------------------------------------------
# Functional pieces: one per fused op.
# ---------------------------------------------------------------------------
def summary_pool(h: torch.Tensor, mask: torch.Tensor | None = None):
    """§1 masked mean and max over time: ``[B, T, d] -> ([B, d], [B, d])``.

    A row with no valid step gets mean = max = 0. ``torch.max(dim)`` (not ``amax``)
    so the max gradient goes to one step, the first maximal one. Masked-out steps take no
    part at all: a NaN or infinity there changes nothing (``masked_fill``, not a product by 0).
    """
    if mask is None:
        return h.mean(dim=1), torch.max(h, dim=1).values
    valid = mask.to(torch.bool)
    invalid = ~valid.unsqueeze(-1)
    n = valid.sum(dim=1, keepdim=True).clamp(min=1).to(h.dtype)
    mean = h.masked_fill(invalid, 0.0).sum(dim=1) / n
    filled = h.masked_fill(invalid, float("-inf"))
    mx = torch.max(filled, dim=1).values
    mx = torch.where(valid.any(dim=1, keepdim=True), mx, torch.zeros_like(mx))
    return mean, mx


def interaction_blocks(M: int, use_agreement: bool = True, use_discrepancy: bool = True) -> list[int]:
    """Indices (in units of d) of the blocks of the full ``u_m`` kept by an ablation (paper Table 4.3)."""
    n = M - 1
    keep = list(range(0, 1 + n))  # s_m, s_j...
    if use_agreement:
        keep += list(range(1 + n, 1 + 2 * n))
    if use_discrepancy:
        keep += list(range(1 + 2 * n, 1 + 3 * n))
    keep.append(1 + 3 * n)  # c_m
    return keep


def interaction(s: torch.Tensor) -> torch.Tensor:
    """§2 ``S [B, M, d] -> U [B, M, (3M-1)d]``: for each target m,
    ``[s_m; s_j...; s_m*s_j...; |s_m - s_j|...; mean_j s_j]`` over ``j != m`` ascending."""
    B, M, d = s.shape
    rows = []
    for m in range(M):
        others = [j for j in range(M) if j != m]
        sm = s[:, m]
        so = s[:, others]  # [B, M-1, d]
        rows.append(
            torch.cat(
                [
                    sm,
                    so.reshape(B, (M - 1) * d),
                    (sm.unsqueeze(1) * so).reshape(B, (M - 1) * d),
                    (sm.unsqueeze(1) - so).abs().reshape(B, (M - 1) * d),
                    so.mean(dim=1),
                ],
                dim=-1,
            )
        )
    return torch.stack(rows, dim=1)


def gate_transform(z: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """§5 ``G_eff = beta + (1 - beta)(1 + alpha(2 sigmoid(z) - 1))``."""
    g = torch.sigmoid(z)
    return beta + (1.0 - beta) * (1.0 + alpha * (2.0 * g - 1.0))


def gate_norm(
    zpre: torch.Tensor, bias_row: torch.Tensor, x: torch.Tensor,  # the gate's inputs
    ln_weight: torch.Tensor, ln_bias: torch.Tensor,  # the LayerNorm's affine parameters
    alpha: float = 0.5, beta: float = 0.2, p: float = 0.0, seed: int = 0, eps: float = EPS,
) -> torch.Tensor:
    """§5 ``Dropout_p(LayerNorm(G_eff(zpre + bias_row) * x))`` with the shared Philox dropout stream."""
    check_p(p)
    z = zpre + bias_row.unsqueeze(1).to(zpre.dtype)
    v = gate_transform(z, alpha, beta) * x
    D = x.shape[-1]
    y = F.layer_norm(v, (D,), ln_weight.to(v.dtype), ln_bias.to(v.dtype), eps)
    if p > 0:
        B, T = x.shape[0], x.shape[1]
        keep = keep_mask(seed, B * T, D, p, device=x.device).view(B, T, D)
        y = y * keep.to(y.dtype) / (1.0 - p)
    return y


def low_rank_init(D: int, r: int):
    """``(u, v, bias)`` of a fresh rank-``r`` raw gate (§4a): ``V`` drawn as ``nn.Linear(D, r)``'s
    weight (variance ``1/(3D)``), then ``U`` uniform with variance ``1/r``, then the bias as
    ``nn.Linear(D, D)``'s. Each entry of ``U Vᵀ`` then has the variance of ``nn.Linear(D, D)``'s
    weight entries, ``r · (1/r) · 1/(3D)``. Drawn in this order from torch's generator, so a module
    that lays the parameters out differently gets the same values under the same seed."""
    v = nn.Linear(D, r, bias=False).weight.detach().t().contiguous()  # [D, r]
    bound = (3.0 / r) ** 0.5
    u = torch.empty(D, r).uniform_(-bound, bound)
    bias = torch.empty(D).uniform_(-1.0 / D ** 0.5, 1.0 / D ** 0.5)
    return u, v, bias


class LowRankLinear(nn.Module):
    """§4a the rank-``r`` raw gate ``x ↦ (x V) Uᵀ + b`` with ``U, V ∈ R^{D×r}``.

    Parameters (and ``state_dict`` keys under ``gate_raw.``): ``u`` [D, r], ``v`` [D, r] and ``bias`` [D],
    the same bias key as the full-rank ``nn.Linear``.
    """

    def __init__(self, D: int, r: int):
        super().__init__()
        self.in_features = self.out_features = D
        self.rank = r
        u, v, bias = low_rank_init(D, r)
        self.u, self.v, self.bias = nn.Parameter(u), nn.Parameter(v), nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v.t()), self.u, self.bias)

    def extra_repr(self) -> str:
        return f"D={self.out_features}, rank={self.rank}"


def mlp2(d_in: int, d: int) -> nn.Sequential:
    """§1 the paper's two-layer MLP: Linear(d_in -> d), GELU, Linear(d -> d)."""
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))


class ModalityBlock(nn.Module):
    """All parameters of one modality (names shared by the reference and fused modules).

    - ``proj``: P_m (two-layer MLP, or one Linear with ``projection="linear"``)
    - ``summary``: E_m on ``[mean; max]``; ``value``: V_m on ``u_m``
    - ``global_head`` (w_m, b_m), ``channel_head`` (W_vm, b_vm)
    - ``gate_raw`` (W_rm; a :class:`LowRankLinear` ``(U_m, V_m)`` when ``gate_rank`` is an int), ``gate_latent`` (W_hm), ``gate_global`` (A_gm), ``gate_channel`` (A_cm)
    - ``norm``: the LayerNorm of §5
    """

    def __init__(self, D: int, d: int, u_width: int, use_global: bool, use_channel: bool, projection: str,
                 gate_rank: int | None = None):
        super().__init__()
        self.proj = mlp2(D, d) if projection == "mlp" else nn.Linear(D, d)
        self.summary = mlp2(2 * d, d)
        self.value = mlp2(u_width, d)
        self.global_head = nn.Linear(d, 1) if use_global else None
        self.channel_head = nn.Linear(d, d) if use_channel else None
        self.gate_raw = nn.Linear(D, D) if gate_rank is None else LowRankLinear(D, gate_rank)
        self.gate_latent = nn.Linear(d, D)
        self.gate_global = nn.Linear(1, D) if use_global else None
        self.gate_channel = nn.Linear(d, D) if use_channel else None
        self.norm = nn.LayerNorm(D, eps=EPS)

    def values(self, u: torch.Tensor):
        """§3: ``u_m -> (g_m [B, 1] or None, v_m [B, d] or None)``."""
        r = self.value(u)
        g = torch.sigmoid(self.global_head(r)) if self.global_head is not None else None
        v = torch.sigmoid(self.channel_head(r)) if self.channel_head is not None else None
        return g, v

    def value_bias(self, g, v, like: torch.Tensor) -> torch.Tensor:
        """§4 per-sample gate terms ``A_g(g - 1/2) + A_c(v - 1/2)`` ([B, D]; zeros when both are ablated)."""
        out = torch.zeros(like.shape[0], self.gate_raw.out_features, dtype=like.dtype, device=like.device)
        if g is not None:
            out = out + self.gate_global(g - 0.5)
        if v is not None:
            out = out + self.gate_channel(v - 0.5)
        return out


class VGMR(nn.Module):
    """Value-Gated Modality Refiner, reference implementation (docs/math.md §1–§5).

    Args:
        widths: feature width per modality, a dict ``name -> D_m`` or a sequence of ints (M >= 2).
        d: shared latent width.
        alpha: amplification strength (§5), ``G_hat = 1 + alpha(2G - 1)``.
        beta: residual retention (§5), ``G_eff = beta + (1 - beta) G_hat``; ``beta = 1`` is identity gating.
        dropout: dropout probability after the LayerNorm (training only).
        use_global_value / use_channel_value: ablate g / v from gate conditioning (paper Table 4.3).
        use_agreement / use_discrepancy: ablate the ⊙ / |−| blocks from the interaction input.
        projection: ``"mlp"`` (the paper's two-layer P_m) or ``"linear"`` (a lighter variant; lets the
            fused module fold W_h into W_r, §4).
        gate_rank: the raw gate's rank (§4a, an extension): None (the paper, ``D_m × D_m``); an int r
            (every modality wider than r gets ``(X V) Uᵀ``, ``U, V ∈ R^{D_m×r}``; narrower ones stay
            full rank); or a mapping modality name (index, for a sequence of widths) -> int or None.
            ``gate_ranks`` holds the resolved rank per modality (None = full rank).

    Forward takes one ``[B, T_m, D_m]`` tensor per modality (dict or sequence, like ``widths``)
    and optional ``[B, T_m]`` bool masks (True = valid step), and returns refined features of the
    same shapes in the same container. With ``return_aux=True`` it also returns a dict with
    ``global_value`` [B, M], ``channel_value`` [B, M, d] (None where ablated), ``gate_mean`` [B, M]
    (mean initial gate G per sample) and ``gate`` (the list of G tensors).

    Dropout draws from the shared Philox stream (``vgmr_fast.dropout_stream``): each training
    forward draws one int64 tensor of M seeds, ``torch.randint(0, 2**62, (M,))`` on the CPU
    generator, and modality m uses the m-th; the fused module makes the same call on its inputs'
    device, so on the CPU both drop the same elements under the same ``torch.manual_seed``.
    Inputs must have the parameters' dtype (or run under ``torch.autocast``); an empty batch
    gives empty outputs. Set ``dropout_rng = "torch"`` to use
    ``torch.nn.functional.dropout`` instead (what a plain-PyTorch user would write; benchmarks use it).
    """

    has_aux = True  # backbones ask for the auxiliaries with return_aux=True

    def __init__(
        self,
        widths,
        d: int = 128,
        alpha: float = 0.5,
        beta: float = 0.2,
        dropout: float = 0.1,
        *,
        use_global_value: bool = True,
        use_channel_value: bool = True,
        use_agreement: bool = True,
        use_discrepancy: bool = True,
        projection: str = "mlp",
        gate_rank=None,
    ):
        super().__init__()
        cfg = inputs.parse_config(widths, d, alpha, beta, dropout, use_global_value, use_channel_value,
                                  use_agreement, use_discrepancy, projection)
        self.gate_rank = gate_rank
        self.gate_ranks = inputs.parse_gate_rank(gate_rank, cfg.names, cfg.widths)
        self.names, self.widths, self.d = cfg.names, cfg.widths, cfg.d
        self.alpha, self.beta, self.p = cfg.alpha, cfg.beta, cfg.p
        self.use_global_value, self.use_channel_value = cfg.use_global_value, cfg.use_channel_value
        self.use_agreement, self.use_discrepancy = cfg.use_agreement, cfg.use_discrepancy
        self.projection = cfg.projection
        self.dropout_rng = "philox"
        dims, M = self.widths, len(self.widths)
        self.u_blocks = interaction_blocks(M, use_agreement, use_discrepancy)
        u_width = len(self.u_blocks) * d
        self.blocks = nn.ModuleList(
            ModalityBlock(D, d, u_width, self.use_global_value, self.use_channel_value, self.projection, r)
            for D, r in zip(dims, self.gate_ranks)
        )

    @property
    def num_modalities(self) -> int:
        return len(self.widths)

    def extra_repr(self) -> str:
        return (
            f"widths={self.widths}, d={self.d}, alpha={self.alpha}, beta={self.beta}, dropout={self.p}, "
            f"global={self.use_global_value}, channel={self.use_channel_value}, "
            f"agreement={self.use_agreement}, discrepancy={self.use_discrepancy}, projection={self.projection!r}"
            + ("" if self.gate_rank is None else f", gate_rank={self.gate_rank!r}")
        )

    # -- helpers --------------------------------------------------------------------
    def _param_dtype(self):
        return self.blocks[0].norm.weight.dtype

    def _dropout_seeds(self) -> list[int]:
        """One step's seeds in modality order: the fused module's draw, made on the CPU."""
        if not (self.training and self.p > 0) or self.dropout_rng == "torch":
            return [0] * self.num_modalities  # no draw: torch's dropout keeps its own stream
        return draw_seeds(self.num_modalities).tolist()

    def _select_u(self, u: torch.Tensor) -> torch.Tensor:
        M = self.num_modalities
        if len(self.u_blocks) == 3 * M - 1:
            return u
        B = u.shape[0]
        return u.view(B, M, 3 * M - 1, self.d)[:, :, self.u_blocks].reshape(B, M, len(self.u_blocks) * self.d)

    # -- forward ------------------------------------------------------------------
    def forward(self, xs, masks=None, return_aux: bool = False):
        xs_list, masks_list = inputs.prepare(xs, masks, self.names, self.widths, self._param_dtype())
        blocks = list(self.blocks)
        # §1 projection and summary
        hs = [blk.proj(x) for blk, x in zip(blocks, xs_list)]
        summaries = []
        for blk, h, mk in zip(blocks, hs, masks_list):
            mean, mx = summary_pool(h, mk)
            summaries.append(blk.summary(torch.cat([mean, mx], dim=-1)))
        # §2 interaction
        u = self._select_u(interaction(torch.stack(summaries, dim=1)))
        seeds = self._dropout_seeds()
        p = self.p if self.training else 0.0
        outs, gs, vs, gates = [], [], [], []
        for m, (blk, x, h) in enumerate(zip(blocks, xs_list, hs)):
            # §3 value estimation, §4 gate logits
            g, v = blk.values(u[:, m])
            z = blk.gate_raw(x) + blk.gate_latent(h) + blk.value_bias(g, v, x).unsqueeze(1)
            # §5 amplification, retention, LayerNorm, dropout
            y = F.layer_norm(gate_transform(z, self.alpha, self.beta) * x, (x.shape[-1],),
                             blk.norm.weight, blk.norm.bias, EPS)
            if p > 0:
                if self.dropout_rng == "torch":
                    y = F.dropout(y, p, training=True)
                else:
                    B, T, D = x.shape
                    keep = keep_mask(seeds[m], B * T, D, p, device=x.device).view(B, T, D)
                    y = y * keep.to(y.dtype) / (1.0 - p)
            outs.append(y)
            if return_aux:
                gs.append(g)
                vs.append(v)
                gates.append(torch.sigmoid(z))
        refined = inputs.pack(xs, self.names, outs)
        if not return_aux:
            return refined
        return refined, self._aux(gs, vs, gates)

    @staticmethod
    def _aux(gs, vs, gates):
        return {
            "global_value": torch.cat(gs, dim=1) if gs[0] is not None else None,
            "channel_value": torch.stack(vs, dim=1) if vs[0] is not None else None,
            "gate_mean": torch.stack([G.float().mean(dim=(1, 2)) for G in gates], dim=1),
            "gate": gates,
        }
