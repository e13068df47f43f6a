"""Two backbones from the paper's settings, each usable with or without a refiner in front.

- ``Concat``: per modality, masked mean over time, ``Linear(D_m -> hidden)`` + ReLU; the
  pooled features are concatenated and one linear decision layer ``classifier`` maps
  ``[h_1; ...; h_M]`` to logits (so ``W = [W_1 | ... | W_M]`` splits by blocks of ``hidden``,
  as the decision-layer diagnostics need).
- ``Transformer``: per-modality projection to ``d_model`` plus a learned modality embedding and
  sinusoidal positions, one joint ``nn.TransformerEncoder`` over all modalities' steps (masked
  steps are padding), per-modality masked mean pooling, MLP head on the concatenation.

``forward(xs, masks=None, return_aux=False)``: ``xs`` a sequence or dict of ``[B, T_m, D_m]``
tensors; with a refiner, the refined features feed the backbone. With ``return_aux=True`` the
result is ``(logits, aux)``: aux holds ``refined`` (the backbone's input features) and, for a
VGMR refiner, its auxiliaries (``global_value``, ``channel_value``, ``gate_mean``, ``gate``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..reference import as_modality_list, check_inputs


def parse_widths(widths):
    if isinstance(widths, Mapping):
        return [str(k) for k in widths], [int(v) for v in widths.values()]
    return None, [int(v) for v in widths]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over time of valid steps; 0 for a row with no valid step."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


class _Backbone(nn.Module):
    def __init__(self, widths, num_classes: int, refiner: nn.Module | None):
        super().__init__()
        self.names, self.widths = parse_widths(widths)
        if len(self.widths) < 1:
            raise ValueError("widths: expected at least one modality")
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.refiner = refiner

    @property
    def num_modalities(self) -> int:
        return len(self.widths)

    def _lists(self, xs, masks):
        xs_l = as_modality_list(xs, self.num_modalities, self.names, "xs")
        masks_l = None if masks is None else as_modality_list(masks, self.num_modalities, self.names, "masks")
        check_inputs(xs_l, masks_l, self.widths)
        return xs_l, (masks_l if masks_l is not None else [None] * len(xs_l))

    def refine(self, xs, masks=None, return_aux: bool = False):
        """Apply the refiner (if any): returns the list of backbone inputs (and the refiner's aux)."""
        xs_l, masks_l = self._lists(xs, masks)
        aux = {}
        if self.refiner is None:
            refined = xs_l
        elif return_aux and getattr(self.refiner, "has_aux", False):
            refined, aux = self.refiner(xs_l, masks_l, return_aux=True)
            aux = dict(aux)
        else:
            refined = self.refiner(xs_l, masks_l)
        return list(refined), masks_l, aux

    def encode(self, xs, masks=None):
        """Per-modality pooled features ``[h_1, ..., h_M]`` (after the refiner, if any)."""
        refined, masks_l, _ = self.refine(xs, masks)
        return self.encode_features(refined, masks_l)

    def backbone_logits(self, feats, masks=None):
        """Logits from already-refined features (the objective's removal pass uses this)."""
        masks_l = masks if masks is not None else [None] * len(feats)
        return self.classify(self.encode_features(list(feats), list(masks_l)))

    def forward(self, xs, masks=None, return_aux: bool = False):
        refined, masks_l, aux = self.refine(xs, masks, return_aux)
        logits = self.classify(self.encode_features(refined, masks_l))
        if not return_aux:
            return logits
        aux["refined"] = refined
        aux["masks"] = masks_l
        return logits, aux


class Concat(_Backbone):
    """Concat-fusion classifier: pooled per-modality encoders, one linear decision layer."""

    def __init__(self, widths, num_classes: int = 2, hidden: int = 64, dropout: float = 0.1, refiner=None):
        super().__init__(widths, num_classes, refiner)
        self.hidden = hidden
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Dropout(dropout)) for D in self.widths
        )
        self.classifier = nn.Linear(hidden * self.num_modalities, num_classes)

    def encode_features(self, feats, masks):
        return [enc(masked_mean(x, mk)) for enc, x, mk in zip(self.encoders, feats, masks)]

    def classify(self, hs):
        return self.classifier(torch.cat(hs, dim=-1))


def sinusoidal(T: int, dim: int, device, dtype) -> torch.Tensor:
    pos = torch.arange(T, device=device, dtype=torch.float32).unsqueeze(1)
    i = torch.arange(0, dim, 2, device=device, dtype=torch.float32)
    ang = pos / torch.pow(10000.0, i / dim)
    pe = torch.zeros(T, dim, device=device)
    pe[:, 0::2] = torch.sin(ang)
    pe[:, 1::2] = torch.cos(ang[:, : dim // 2])
    return pe.to(dtype)


class Transformer(_Backbone):
    """Small multimodal Transformer: per-modality projection, one joint encoder, pooled head."""

    def __init__(self, widths, num_classes: int = 2, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dropout: float = 0.1, refiner=None):
        super().__init__(widths, num_classes, refiner)
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.d_model = d_model
        self.proj = nn.ModuleList(nn.Linear(D, d_model) for D in self.widths)
        self.modality_embedding = nn.Parameter(torch.randn(self.num_modalities, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(
            nn.Linear(d_model * self.num_modalities, d_model), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(d_model, num_classes),
        )

    def encode_features(self, feats, masks):
        tokens, valid = [], []
        for m, (proj, x, mk) in enumerate(zip(self.proj, feats, masks)):
            B, T, _ = x.shape
            t = proj(x) + self.modality_embedding[m] + sinusoidal(T, self.d_model, x.device, x.dtype)
            tokens.append(t)
            valid.append(mk if mk is not None else torch.ones(B, T, dtype=torch.bool, device=x.device))
        seq = torch.cat(tokens, dim=1)
        ok = torch.cat(valid, dim=1)
        # A sample with no valid step at all would make attention NaN: let it attend everywhere.
        padding = ~ok & ok.any(dim=1, keepdim=True)
        out = self.encoder(seq, src_key_padding_mask=padding)
        hs, start = [], 0
        for x, v in zip(feats, valid):
            T = x.shape[1]
            hs.append(masked_mean(out[:, start : start + T], v))
            start += T
        return hs

    def classify(self, hs):
        return self.head(torch.cat(hs, dim=-1))
