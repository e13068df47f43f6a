"""A refiner in front of anyone's backbone, in the shape ``vgmr_fast.objective`` needs.

Most multimodal backbones take one tensor per modality, ``backbone(text, audio, video)``, and
return logits (or a tuple whose first element is the logits, like MulT's ``(output, hidden)``).
``PerModality(backbone, refiner)`` puts the refiner (a ``vgmr_fast.VGMR``) in front and provides
the protocol of ``vgmr_fast.objective.vgmr_objective``:

- ``forward(xs, masks=None, return_aux=False)``: ``xs`` a list (or dict, in the refiner's order)
  of ``[B, T_m, D_m]`` tensors; returns the backbone's logits, and with ``return_aux=True`` also
  the refiner's auxiliaries plus ``refined`` and ``masks``;
- ``backbone_logits(feats, masks)``: the backbone's logits for already-refined features (the
  objective's no-grad removal pass).

``call`` says how the features reach the backbone: ``"positional"`` (default,
``backbone(*feats)``), ``"keyword"`` (``backbone(**{name: feat})`` with the refiner's modality
names), or a function ``call(backbone, feats, masks) -> output`` for anything else (masks, extra
arguments). ``output`` picks the logits from the backbone's output (default: the output itself,
or its first element when it is a tuple or list).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional, Union

from torch import nn

__all__ = ["PerModality"]


def _first_if_tuple(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class PerModality(nn.Module):
    """``refiner`` then ``backbone``, the backbone called with one tensor per modality."""

    def __init__(self, backbone: nn.Module, refiner: nn.Module, *,
                 call: Union[str, Callable] = "positional", output: Optional[Callable] = None):
        super().__init__()
        if not callable(call) and call not in ("positional", "keyword"):
            raise ValueError(f"call: expected 'positional', 'keyword' or a function, got {call!r}")
        names = getattr(refiner, "names", None)
        if call == "keyword" and not names:
            raise ValueError("call='keyword' needs modality names: build the refiner with widths as a dict")
        self.backbone = backbone
        self.refiner = refiner
        self.call = call
        self.output = output if output is not None else _first_if_tuple

    def _as_list(self, xs):
        if isinstance(xs, Mapping):
            names = getattr(self.refiner, "names", None) or list(xs)
            missing = [n for n in names if n not in xs]
            if missing:
                raise ValueError(f"xs: missing modalities {missing} (expected {names})")
            return [xs[n] for n in names]
        return list(xs)

    def backbone_logits(self, feats, masks=None):
        """The backbone's logits for already-refined features (a list in the refiner's order)."""
        feats = list(feats)
        masks = list(masks) if masks is not None else [None] * len(feats)
        if callable(self.call):
            out = self.call(self.backbone, feats, masks)
        elif self.call == "keyword":
            out = self.backbone(**dict(zip(self.refiner.names, feats)))
        else:
            out = self.backbone(*feats)
        return self.output(out)

    def forward(self, xs, masks=None, return_aux: bool = False):
        xs_l = self._as_list(xs)
        masks_l = None if masks is None else self._as_list(masks)
        if return_aux and getattr(self.refiner, "has_aux", False):
            refined, aux = self.refiner(xs_l, masks_l, return_aux=True)
            aux = dict(aux)
        else:
            refined, aux = self.refiner(xs_l, masks_l), {}
        refined = list(refined)
        masks_out = masks_l if masks_l is not None else [None] * len(refined)
        logits = self.backbone_logits(refined, masks_out)
        if not return_aux:
            return logits
        aux["refined"] = refined
        aux["masks"] = masks_out
        return logits, aux
