"""The executable specification of VGMR (SPEC.md §1–§5), in plain PyTorch.

Every fused kernel is tested against the functions here, and the fused module
``vgmr_fast.VGMR`` shares this module's constructor, parameter names and
``state_dict``. Section marks (§N) refer to SPEC.md.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops.dropout import check_p, draw_seed, keep_mask

EPS = 1e-5

__all__ = [
    "VGMR",
    "ModalityBlock",
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
    so the max gradient goes to one step, the first maximal one.
    """
    if mask is None:
        return h.mean(dim=1), torch.max(h, dim=1).values
    valid = mask.to(torch.bool)
    m = valid.unsqueeze(-1).to(h.dtype)
    n = valid.sum(dim=1, keepdim=True).clamp(min=1).to(h.dtype)
    mean = (h * m).sum(dim=1) / n
    filled = h.masked_fill(~valid.unsqueeze(-1), float("-inf"))
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
                    so.reshape(B, -1),
                    (sm.unsqueeze(1) * so).reshape(B, -1),
                    (sm.unsqueeze(1) - so).abs().reshape(B, -1),
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
    zpre: torch.Tensor,
    bias_row: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    alpha: float = 0.5,
    beta: float = 0.2,
    p: float = 0.0,
    seed: int = 0,
    eps: float = EPS,
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


# ---------------------------------------------------------------------------
# Input handling shared by the reference and the fused module.
# ---------------------------------------------------------------------------
def as_modality_list(xs, count: int, names: list[str] | None, what: str):
    """Normalise a dict or sequence of per-modality tensors to a list in modality order."""
    if isinstance(xs, Mapping):
        if names is None or set(xs.keys()) != set(names):
            raise ValueError(f"{what}: expected keys {names}, got {list(xs.keys())}")
        return [xs[n] for n in names]
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{what}: expected a sequence or dict of {count} tensors, got {type(xs).__name__}")
    if len(xs) != count:
        raise ValueError(f"{what}: expected {count} modalities, got {len(xs)}")
    return list(xs)


def check_inputs(xs: list, masks: list | None, widths: list[int]):
    """Validate features and masks; raise ValueError/TypeError naming the argument."""
    B = device = None
    for m, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"xs[{m}]: expected a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"xs[{m}]: expected a floating-point tensor, got {x.dtype}")
        if x.dim() != 3:
            raise ValueError(f"xs[{m}]: expected shape [B, T, D], got {tuple(x.shape)}")
        if x.shape[-1] != widths[m]:
            raise ValueError(f"xs[{m}]: expected feature width D={widths[m]}, got {x.shape[-1]}")
        if x.shape[1] < 1:
            raise ValueError(f"xs[{m}]: expected at least one time step, got T=0")
        if B is None:
            B, device = x.shape[0], x.device
        elif x.shape[0] != B:
            raise ValueError(f"xs[{m}]: batch size {x.shape[0]} differs from xs[0]'s {B}")
        elif x.device != device:
            raise ValueError(f"xs[{m}]: on {x.device}, but xs[0] is on {device}")
    if masks is None:
        return
    for m, (x, mk) in enumerate(zip(xs, masks)):
        if mk is None:
            continue
        if not isinstance(mk, torch.Tensor):
            raise TypeError(f"masks[{m}]: expected a tensor or None, got {type(mk).__name__}")
        if mk.dtype != torch.bool:
            raise TypeError(f"masks[{m}]: expected dtype torch.bool (True = valid step), got {mk.dtype}")
        if tuple(mk.shape) != tuple(x.shape[:2]):
            raise ValueError(f"masks[{m}]: expected shape {tuple(x.shape[:2])} ([B, T_m]), got {tuple(mk.shape)}")
        if mk.device != x.device:
            raise ValueError(f"masks[{m}]: on {mk.device}, but xs[{m}] is on {x.device}")


def mlp2(d_in: int, d: int) -> nn.Sequential:
    """§1 the paper's two-layer MLP: Linear(d_in -> d), GELU, Linear(d -> d)."""
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))


class ModalityBlock(nn.Module):
    """All parameters of one modality (names shared by the reference and fused modules).

    - ``proj``: P_m (two-layer MLP, or one Linear with ``projection="linear"``)
    - ``summary``: E_m on ``[mean; max]``; ``value``: V_m on ``u_m``
    - ``global_head`` (w_m, b_m), ``channel_head`` (W_vm, b_vm)
    - ``gate_raw`` (W_rm), ``gate_latent`` (W_hm), ``gate_global`` (A_gm), ``gate_channel`` (A_cm)
    - ``norm``: the LayerNorm of §5
    """

    def __init__(self, D: int, d: int, u_width: int, use_global: bool, use_channel: bool, projection: str):
        super().__init__()
        self.proj = mlp2(D, d) if projection == "mlp" else nn.Linear(D, d)
        self.summary = mlp2(2 * d, d)
        self.value = mlp2(u_width, d)
        self.global_head = nn.Linear(d, 1) if use_global else None
        self.channel_head = nn.Linear(d, d) if use_channel else None
        self.gate_raw = nn.Linear(D, D)
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
    """Value-Gated Modality Refiner, reference implementation (SPEC §1–§5).

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

    Forward takes one ``[B, T_m, D_m]`` tensor per modality (dict or sequence, like ``widths``)
    and optional ``[B, T_m]`` bool masks (True = valid step), and returns refined features of the
    same shapes in the same container. With ``return_aux=True`` it also returns a dict with
    ``global_value`` [B, M], ``channel_value`` [B, M, d] (None where ablated), ``gate_mean`` [B, M]
    (mean initial gate G per sample) and ``gate`` (the list of G tensors).

    Dropout draws from the shared Philox stream (``vgmr_fast.ops.dropout``) with one seed per
    modality taken from torch's CPU generator, so the fused module with the same
    ``torch.manual_seed`` drops the same elements. Set ``dropout_rng = "torch"`` to use
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
    ):
        super().__init__()
        if isinstance(widths, Mapping):
            names, dims = [str(k) for k in widths.keys()], list(widths.values())
        elif isinstance(widths, Sequence) and not isinstance(widths, str):
            names, dims = None, list(widths)
        else:
            raise TypeError(f"widths: expected a dict name -> D_m or a sequence of ints, got {type(widths).__name__}")
        if len(dims) < 2:
            raise ValueError(f"widths: VGMR needs at least 2 modalities, got {len(dims)}")
        if not all(isinstance(D, int) and not isinstance(D, bool) and D >= 1 for D in dims):
            raise ValueError(f"widths: every D_m must be a positive int, got {dims}")
        if not (isinstance(d, int) and d >= 1):
            raise ValueError(f"d: expected a positive int, got {d}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta: expected a value in [0, 1], got {beta}")
        check_p(dropout)
        if projection not in ("mlp", "linear"):
            raise ValueError(f"projection: expected 'mlp' or 'linear', got {projection!r}")
        self.names, self.widths, self.d = names, dims, d
        self.alpha, self.beta, self.p = float(alpha), float(beta), float(dropout)
        self.use_global_value, self.use_channel_value = use_global_value, use_channel_value
        self.use_agreement, self.use_discrepancy = use_agreement, use_discrepancy
        self.projection = projection
        self.dropout_rng = "philox"
        M = len(dims)
        self.u_blocks = interaction_blocks(M, use_agreement, use_discrepancy)
        u_width = len(self.u_blocks) * d
        self.blocks = nn.ModuleList(
            ModalityBlock(D, d, u_width, use_global_value, use_channel_value, projection) for D in dims
        )

    @property
    def num_modalities(self) -> int:
        return len(self.widths)

    def extra_repr(self) -> str:
        return (
            f"widths={self.widths}, d={self.d}, alpha={self.alpha}, beta={self.beta}, dropout={self.p}, "
            f"global={self.use_global_value}, channel={self.use_channel_value}, "
            f"agreement={self.use_agreement}, discrepancy={self.use_discrepancy}, projection={self.projection!r}"
        )

    # -- helpers shared with the fused module ---------------------------------
    def _prepare(self, xs, masks):
        xs_list = as_modality_list(xs, self.num_modalities, self.names, "xs")
        masks_list = None
        if masks is not None:
            masks_list = as_modality_list(masks, self.num_modalities, self.names, "masks")
        check_inputs(xs_list, masks_list, self.widths)
        if masks_list is None:
            masks_list = [None] * len(xs_list)
        return xs_list, masks_list

    def _pack(self, xs, outs):
        if isinstance(xs, Mapping):
            return dict(zip(self.names, outs))
        return type(xs)(outs) if isinstance(xs, tuple) else list(outs)

    def _dropout_seeds(self) -> list[int]:
        if not (self.training and self.p > 0) or self.dropout_rng == "torch":
            return [0] * self.num_modalities  # no draw: torch's dropout keeps its own stream
        return [draw_seed() for _ in range(self.num_modalities)]

    def _select_u(self, u: torch.Tensor) -> torch.Tensor:
        M = self.num_modalities
        if len(self.u_blocks) == 3 * M - 1:
            return u
        B = u.shape[0]
        return u.view(B, M, 3 * M - 1, self.d)[:, :, self.u_blocks].reshape(B, M, -1)

    # -- forward ------------------------------------------------------------------
    def forward(self, xs, masks=None, return_aux: bool = False):
        xs_list, masks_list = self._prepare(xs, masks)
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
        refined = self._pack(xs, outs)
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
