"""Comparison refiners of the paper's Table 7, each a pre-fusion module like VGMR.

All take ``(xs, masks)`` (lists of ``[B, T_m, D_m]`` tensors and ``[B, T_m]`` bool masks or
None) and return the list of refined features of the same shapes. ``hidden`` sets their size;
``make_refiner(kind, widths, target_params=...)`` picks ``hidden`` so the parameter count
matches a target (the paper compares at equal parameter count).

- ``MLPRefiner`` ("Concat+MLP"): ``LayerNorm(x + W_2 GELU(W_1 x))`` per modality.
- ``SigmoidTanhGate`` (the generic gate): ``u = GELU(W_0 x)``, ``y = LayerNorm(sigmoid(W_1 u) * tanh(W_2 u))``
  per modality: the paper's ``sigmoid(XW_1) * tanh(XW_2)`` with a low-rank input layer so its size can
  be matched.
- ``CrossAttentionRefiner``: each modality (projected to ``hidden``) attends to all the other
  modalities' steps (masked steps are keys to ignore), projected back to ``D_m``, residual + LayerNorm.
"""
from __future__ import annotations

import torch
from torch import nn


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class MLPRefiner(nn.Module):
    def __init__(self, widths, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, D), nn.Dropout(dropout))
            for D in widths
        )
        self.norms = nn.ModuleList(nn.LayerNorm(D) for D in widths)

    def forward(self, xs, masks=None):
        return [norm(x + mlp(x)) for mlp, norm, x in zip(self.mlps, self.norms, xs)]


class SigmoidTanhGate(nn.Module):
    def __init__(self, widths, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.inp = nn.ModuleList(nn.Sequential(nn.Linear(D, hidden), nn.GELU()) for D in widths)
        self.w1 = nn.ModuleList(nn.Linear(hidden, D) for D in widths)
        self.w2 = nn.ModuleList(nn.Linear(hidden, D) for D in widths)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for D in widths)
        self.drop = nn.Dropout(dropout)

    def forward(self, xs, masks=None):
        out = []
        for inp, w1, w2, norm, x in zip(self.inp, self.w1, self.w2, self.norms, xs):
            u = inp(x)
            out.append(self.drop(norm(torch.sigmoid(w1(u)) * torch.tanh(w2(u)))))
        return out


class CrossAttentionRefiner(nn.Module):
    def __init__(self, widths, hidden: int = 128, nhead: int = 4, dropout: float = 0.1):
        super().__init__()
        hidden = max(nhead, hidden - hidden % nhead)
        self.inp = nn.ModuleList(nn.Linear(D, hidden) for D in widths)
        self.attn = nn.ModuleList(
            nn.MultiheadAttention(hidden, nhead, dropout=dropout, batch_first=True) for _ in widths
        )
        self.out = nn.ModuleList(nn.Linear(hidden, D) for D in widths)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for D in widths)

    def forward(self, xs, masks=None):
        masks = masks if masks is not None else [None] * len(xs)
        hs = [inp(x) for inp, x in zip(self.inp, xs)]
        valid = [
            mk if mk is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            for x, mk in zip(xs, masks)
        ]
        out = []
        for m, x in enumerate(xs):
            keys = torch.cat([h for j, h in enumerate(hs) if j != m], dim=1)
            ok = torch.cat([v for j, v in enumerate(valid) if j != m], dim=1)
            padding = ~ok & ok.any(dim=1, keepdim=True)  # no valid key at all: attend everywhere
            ctx, _ = self.attn[m](hs[m], keys, keys, key_padding_mask=padding, need_weights=False)
            out.append(self.norms[m](x + self.out[m](ctx)))
        return out


REFINERS = {"mlp": MLPRefiner, "gate": SigmoidTanhGate, "cross_attention": CrossAttentionRefiner}


def make_refiner(kind: str, widths, target_params: int | None = None, hidden: int = 128, **kwargs) -> nn.Module:
    """Build a comparison refiner; with ``target_params``, choose ``hidden`` to match that count."""
    if kind not in REFINERS:
        raise ValueError(f"kind: expected one of {sorted(REFINERS)}, got {kind!r}")
    cls = REFINERS[kind]
    widths = list(widths.values()) if isinstance(widths, dict) else list(widths)
    if target_params is None:
        return cls(widths, hidden=hidden, **kwargs)
    lo, hi = 1, 1
    while param_count(cls(widths, hidden=hi, **kwargs)) < target_params:
        hi *= 2
    while lo < hi:  # smallest hidden reaching the target
        mid = (lo + hi) // 2
        if param_count(cls(widths, hidden=mid, **kwargs)) < target_params:
            lo = mid + 1
        else:
            hi = mid
    return cls(widths, hidden=lo, **kwargs)
