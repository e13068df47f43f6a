"""Input handling shared by the reference VGMR and the fused one (a leaf: plain torch only).

Both modules validate their constructor arguments and their forward inputs here, so the two
raise the same errors (each naming the argument) and pack outputs the same way. Nothing here
imports the op layer or the C++ extension.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import numbers
from dataclasses import dataclass

import torch

from .dropout_stream import check_p

__all__ = ["Config", "parse_config", "parse_gate_rank", "as_modality_list", "check_inputs", "prepare", "pack", "check_p"]


@dataclass(frozen=True)
class Config:
    """The validated constructor arguments of a VGMR (reference or fused)."""

    names: list | None
    widths: list
    d: int
    alpha: float
    beta: float
    p: float
    use_global_value: bool
    use_channel_value: bool
    use_agreement: bool
    use_discrepancy: bool
    projection: str


def _real_in_unit(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    if not 0.0 <= float(v) <= 1.0:  # NaN fails too
        raise ValueError(f"{name}: expected a value in [0, 1], got {v}")
    return float(v)


def parse_config(widths, d, alpha, beta, dropout, use_global_value=True, use_channel_value=True,
                 use_agreement=True, use_discrepancy=True, projection="mlp") -> Config:
    """Validate a VGMR's constructor arguments; ValueError / TypeError naming the argument."""
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
    if not (isinstance(d, int) and not isinstance(d, bool) and d >= 1):
        raise ValueError(f"d: expected a positive int, got {d}")
    alpha = _real_in_unit(alpha, "alpha")
    beta = _real_in_unit(beta, "beta")
    check_p(dropout)
    if projection not in ("mlp", "linear"):
        raise ValueError(f"projection: expected 'mlp' or 'linear', got {projection!r}")
    return Config(names, dims, d, alpha, beta, float(dropout), bool(use_global_value), bool(use_channel_value),
                  bool(use_agreement), bool(use_discrepancy), projection)


def _gate_rank_of(r, D: int, where: str):
    """One modality's rank from a per-modality entry: None (full rank) or an int in [1, D)."""
    if r is None:
        return None
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r < D:
        raise ValueError(f"gate_rank: expected None or an int r with 1 <= r < D_m = {D} for {where}, got {r!r}")
    return r


def parse_gate_rank(gate_rank, names, widths) -> list:
    """The raw gate's rank per modality, in modality order: None = full rank (the paper's ``D_m × D_m``).

    ``gate_rank``: None (every modality full rank); an int ``r >= 1`` (every modality wider than ``r``
    gets rank ``r``, the others stay full rank); or a mapping from modality name (index, for a module
    built from a sequence of widths) to None or an int in ``[1, D_m)``, modalities left out staying
    full rank. Anything else is a ValueError naming ``gate_rank``.
    """
    if gate_rank is None:
        return [None] * len(widths)
    if isinstance(gate_rank, Mapping):
        keys = list(names) if names is not None else list(range(len(widths)))
        unknown = [k for k in gate_rank if k not in keys]
        if unknown:
            raise ValueError(f"gate_rank: unknown modality {unknown[0]!r}; expected keys from {keys}")
        return [_gate_rank_of(gate_rank.get(k), D, f"modality {k!r}") for k, D in zip(keys, widths)]
    if isinstance(gate_rank, bool) or not isinstance(gate_rank, int) or gate_rank < 1:
        raise ValueError(f"gate_rank: expected None, a positive int or a mapping modality -> rank, got {gate_rank!r}")
    return [gate_rank if D > gate_rank else None for D in widths]


def as_modality_list(xs, count: int, names: list[str] | None, what: str):
    """Normalise a dict or sequence of per-modality tensors to a list in modality order."""
    if isinstance(xs, Mapping):
        if names is None:
            raise ValueError(f"{what}: got a dict, but the module was built from a list of widths: "
                            f"pass a sequence of {count} entries")
        if set(xs.keys()) != set(names):
            raise ValueError(f"{what}: expected keys {names}, got {list(xs.keys())}")
        return [xs[n] for n in names]
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence) or isinstance(xs, str):
        raise TypeError(f"{what}: expected a sequence or dict of {count} tensors, got {type(xs).__name__}")
    if len(xs) != count:
        raise ValueError(f"{what}: expected {count} modalities, got {len(xs)}")
    return list(xs)


def check_inputs(xs: list, masks: list | None, widths: list[int], dtype: torch.dtype | None = None):
    """Validate features and masks; raise ValueError/TypeError naming the argument.

    ``dtype``: the module's parameter dtype. A floating input of another dtype is an error
    (naming ``xs[m]`` and the module's dtype) unless autocast is on for the input's device.
    """
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
        if (dtype is not None and x.dtype != dtype
                and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"xs[{m}]: dtype {x.dtype} differs from the module's parameters ({dtype}); "
                            f"convert the input (x.to({dtype})) or the module (module.to({x.dtype})), "
                            "or run under torch.autocast")
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


def prepare(xs, masks, names, widths, dtype=None):
    """``(xs_list, masks_list)`` in modality order, validated; masks_list holds None where absent.

    A dict of masks needs a dict of features (and the reverse), so a mix is a clear error.
    """
    count = len(widths)
    if masks is not None and isinstance(masks, Mapping) != isinstance(xs, Mapping):
        raise TypeError(f"masks: got a {type(masks).__name__} of masks for a {type(xs).__name__} of features; "
                        "pass both as dicts keyed by modality name or both as sequences")
    xs_list = as_modality_list(xs, count, names, "xs")
    masks_list = None if masks is None else as_modality_list(masks, count, names, "masks")
    check_inputs(xs_list, masks_list, widths, dtype)
    return xs_list, masks_list if masks_list is not None else [None] * count


def pack(xs, names, outs):
    """Outputs in the container type of the inputs (dict, tuple or list)."""
    if isinstance(xs, Mapping):
        return dict(zip(names, outs))
    return type(xs)(outs) if isinstance(xs, tuple) else list(outs)
