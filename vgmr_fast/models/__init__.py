"""Backbones the paper evaluates VGMR on, and the comparison refiners of its Table 7."""
from .backbones import Concat, Transformer
from .refiners import CrossAttentionRefiner, MLPRefiner, SigmoidTanhGate, make_refiner, param_count

__all__ = [
    "Concat",
    "Transformer",
    "MLPRefiner",
    "SigmoidTanhGate",
    "CrossAttentionRefiner",
    "make_refiner",
    "param_count",
]
