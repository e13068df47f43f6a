"""Backbones the paper evaluates VGMR on, the comparison refiners of its Table 7, and an adapter
that puts a refiner in front of anyone's backbone (one tensor per modality)."""
from .adapter import PerModality
from .backbones import Concat, Transformer
from .refiners import CrossAttentionRefiner, MLPRefiner, SigmoidTanhGate, make_refiner, param_count

__all__ = [
    "Concat",
    "Transformer",
    "PerModality",
    "MLPRefiner",
    "SigmoidTanhGate",
    "CrossAttentionRefiner",
    "make_refiner",
    "param_count",
]
