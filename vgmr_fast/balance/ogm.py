"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

After ``loss.backward()`` and before ``optimizer.step()``:

1. **Scores.** Per-modality logits ``z_m`` (for a concat head, ``z_m = W_m h_m + b/M``,
   :func:`vgmr_fast.balance.decision.modality_logits`) give the modality's
   confidence on the batch, ``s_m = Σ_i softmax(z_m)_i[y_i]`` (one gather).
2. **Ratios.** ``ρ_m = s_m / mean_{k≠m} s_k``. For ``M = 2`` this is the original
   ``s_a / s_v``; for ``M > 2`` each modality is compared with the mean of the
   others (the issue's generalisation).
3. **Coefficients.** A modality whose ratio exceeds 1 dominates and gets
   ``k_m = 1 − tanh(α · ρ_m)``; the others keep ``k_m = 1``. As in the authors'
   code the argument is ``α·ρ`` (not ``α·(ρ−1)``), so ``k`` jumps from 1 to
   ``1 − tanh(α)`` when ``ρ`` crosses 1; ``shifted=True`` uses ``ρ − 1`` for a
   continuous variant. With ``M > 2``, every modality with ``ρ_m > 1`` is
   suppressed (each dominates the mean of the rest); ``only_max=True``
   suppresses only the highest-ratio one.
4. **Modulation.** The gradients of modality ``m``'s own parameters (its encoder)
   are multiplied by ``k_m``; with GE (``ge=True``), Gaussian noise with the std
   of that parameter's (unmodulated) gradient is added, to *every* modulated
   modality, as the authors' code does (``grad * k + N(0, std(grad))``). Shared
   parameters (fusion head) are never touched. The original modulates only
   4-D conv weights; here every parameter of the modality's encoder is.
5. **Window.** Modulation is active for ``start_epoch <= epoch <= end_epoch``.
6. **Optimizer (our addition, ``modulation="step"``).** The paper trains with
   SGD, where scaling a gradient by ``k`` scales the step by ``k``. Under Adam
   (this package's default, AdamW) the step is ``g / sqrt(E[g²])``, invariant
   to a constant scale of ``g``: the coefficient is cancelled and only the GE
   noise is left, so OGM-GE under Adam is OGM-GE without its modulation
   (tests/balance/test_ogm_ge.py shows it on one step; docs/balance.md on the
   imbalanced benchmark). ``modulation="step"`` applies ``k_m`` to the *step
   size* instead: each modality's parameters get their own optimizer parameter
   group whose learning rate is ``k_m × base lr`` on every step, and the GE
   noise is added to the gradient as before. Under SGD without momentum the two
   modes are the same update (``lr·k·(g + n)`` vs. ``lr·(k·g + n)`` differ only
   in the noise scale); under Adam only ``"step"`` modulates.

``alpha`` is a tuned hyper-parameter in the original work (dataset dependent);
the default 0.5 is a middle value, not the paper's.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ogm_scores", "ogm_ratios", "ogm_coefficients", "OGMGE", "modality_parameter_groups"]


def ogm_scores(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``s_m = Σ_i softmax(z_m)_i[y_i]`` for ``logits`` ``[M, B, C]`` and labels ``[B]`` → ``[M]``."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a [M, B, C] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != logits.shape[1]:
        raise ValueError(f"y must be [B] with B={logits.shape[1]}")
    p = F.softmax(logits.detach().float(), dim=-1)
    idx = y.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return p.gather(2, idx).squeeze(2).sum(1)


def ogm_ratios(scores: torch.Tensor) -> torch.Tensor:
    """``ρ_m = s_m / mean_{k≠m} s_k`` (``[M]``); needs ``M >= 2``."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.dim() != 1 or scores.numel() < 2:
        raise ValueError(f"scores must be a 1-D tensor with at least 2 modalities, got shape {tuple(scores.shape)}")
    m = scores.numel()
    others = (scores.sum() - scores) / (m - 1)
    return scores / others.clamp_min(1e-12)


def ogm_coefficients(scores: torch.Tensor, alpha: float, shifted: bool = False,
                     only_max: bool = False) -> torch.Tensor:
    """Gradient coefficients ``k_m`` (``[M]``): ``1 − tanh(α ρ_m)`` where ``ρ_m > 1``, else 1."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    rho = ogm_ratios(scores)
    arg = (rho - 1.0) if shifted else rho
    k = 1.0 - torch.tanh(alpha * arg)
    dominant = rho > 1.0
    if only_max:
        dominant = dominant & (torch.arange(rho.numel()) == rho.argmax())
    return torch.where(dominant, k, torch.ones_like(k))


def modality_parameter_groups(model: nn.Module, include_refiner: bool = True) -> List[List]:
    """The parameters owned by each modality alone, for the backbones of :mod:`vgmr_fast.models`.

    ``Concat``: ``encoders[m]``; ``Transformer``: ``proj[m]``; plus, when ``include_refiner``, the
    refiner's modality-``m`` parameters: ``refiner.blocks[m]`` of the reference VGMR, or, for the
    fused VGMR (whose parameters are stacked across modalities), one ``(parameter, index)`` entry per
    reference parameter of block ``m`` (``index`` selects its slice), so the modulation and the GE
    noise act on exactly the reference's per-parameter tensors. Wrappers with a ``backbone``
    attribute are unwrapped.
    """
    core = getattr(model, "backbone", model)
    lists = None
    for attr in ("encoders", "proj"):
        mods = getattr(core, attr, None)
        if isinstance(mods, nn.ModuleList):
            lists = [list(mod.parameters()) for mod in mods]
            break
    if lists is None:
        raise TypeError(f"model: cannot find per-modality encoders (encoders/proj) on {type(core).__name__}")
    refiner = getattr(core, "refiner", None) if include_refiner else None
    blocks = getattr(refiner, "blocks", None)
    slots = getattr(refiner, "_slots", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) == len(lists):
        for m, blk in enumerate(blocks):
            lists[m] += list(blk.parameters())
    elif slots is not None and refiner.num_modalities == len(lists):
        for key, pname, index in slots:
            m = int(key.split(".")[1])  # reference keys read "blocks.<m>.<...>"
            lists[m].append((refiner.get_parameter(pname), index))
    return lists


def _entry_grad(entry):
    """The gradient a group entry owns: a parameter's ``.grad`` or a slice of it (None if no grad)."""
    if isinstance(entry, tuple):
        param, index = entry
        return None if param.grad is None else param.grad[index]
    return entry.grad


class OGMGE:
    """Stateless-per-step OGM-GE gradient modulation (see the module docstring).

    Args:
        param_groups: one list per modality of its own parameters (its encoder), each a parameter or a
            ``(parameter, index)`` slice of a stacked one (:func:`modality_parameter_groups`). Under
            ``modulation="step"`` a slice cannot have a learning rate of its own: slices get the
            gradient multiplied instead (with a one-time warning).
        alpha: modulation strength ``α``.
        ge: add the generalisation-enhancement Gaussian noise.
        start_epoch, end_epoch: active window (inclusive; ``end_epoch=None`` = always).
        shifted, only_max: variants of :func:`ogm_coefficients`.
        generator: ``torch.Generator`` for the GE noise (determinism).
        modulation: ``"grad"`` (the paper: multiply the gradient) or ``"step"``
            (multiply the modality's learning rate; needs ``optimizer``; module
            docstring item 6).
        optimizer: the model's optimizer (``"step"`` only). Its parameter groups
            are split once, before any step: each modality's parameters move to a
            new group with the same settings.
    """

    def __init__(self, param_groups: Sequence[Sequence[nn.Parameter]], alpha: float = 0.5, ge: bool = True,
                 start_epoch: int = 0, end_epoch: Optional[int] = None, shifted: bool = False,
                 only_max: bool = False, generator: Optional[torch.Generator] = None, modulation: str = "grad",
                 optimizer: Optional[torch.optim.Optimizer] = None):
        groups = [list(g) for g in param_groups]
        if len(groups) < 2:
            raise ValueError(f"param_groups needs at least 2 modalities, got {len(groups)}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.groups = groups
        self.alpha, self.ge = float(alpha), bool(ge)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.shifted, self.only_max = shifted, only_max
        self.generator = generator
        self.history: List[Dict[str, List[float]]] = []
        if modulation not in ("grad", "step"):
            raise ValueError(f"modulation must be 'grad' or 'step', got {modulation!r}")
        self.modulation = modulation
        self.lr_groups: List[Dict] = []
        if modulation == "step":
            if optimizer is None:
                raise ValueError("modulation='step' needs the optimizer")
            whole = [[p for p in g if not isinstance(p, tuple)] for g in groups]
            if any(isinstance(p, tuple) for g in groups for p in g):
                warnings.warn("OGMGE(modulation='step'): stacked-parameter slices (the fused VGMR's per-modality "
                              "parameters) cannot take their own learning rate; their gradients are scaled instead "
                              "(use backend='reference' for a per-modality learning rate)", RuntimeWarning,
                              stacklevel=2)
            self.lr_groups = _split_param_groups(optimizer, whole)
            self.base_lr = [g["lr"] for g in self.lr_groups]

    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch <= self.end_epoch)

    @torch.no_grad()
    def step(self, logits: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """Modulate the stored ``.grad`` of each group; returns the coefficients ``[M]``."""
        if logits.shape[0] != len(self.groups):
            raise ValueError(f"logits has {logits.shape[0]} modalities, param_groups {len(self.groups)}")
        scores = ogm_scores(logits, y)
        coeff = ogm_coefficients(scores, self.alpha, self.shifted, self.only_max)
        if not self.active(epoch):
            coeff = torch.ones_like(coeff)
            for lr_group, base in zip(self.lr_groups, getattr(self, "base_lr", [])):
                lr_group["lr"] = base
        else:
            for m, (k, group) in enumerate(zip(coeff.tolist(), self.groups)):
                if self.modulation == "step":
                    self.lr_groups[m]["lr"] = self.base_lr[m] * k
                for p in group:
                    g = _entry_grad(p)
                    if g is None:
                        continue
                    std = g.float().std().item() if g.numel() > 1 else 0.0
                    if self.modulation == "grad" or isinstance(p, tuple):
                        g.mul_(k)
                    if self.ge:
                        noise = torch.randn(g.shape, generator=self.generator, dtype=torch.float32)
                        g.add_(noise.to(g.device, g.dtype) * (std + 1e-8))
        self.history.append({"scores": scores.tolist(), "coeff": coeff.tolist()})
        return coeff


def _split_param_groups(optimizer: torch.optim.Optimizer, groups: Sequence[Sequence[nn.Parameter]]) -> List[Dict]:
    """Move each modality's parameters into a new parameter group of ``optimizer`` (same settings) → the groups."""
    if any(optimizer.state.get(p) for g in groups for p in g):
        raise ValueError("optimizer: split the parameter groups before the first step (it already has state)")
    owner: Dict[int, int] = {}
    for m, g in enumerate(groups):
        for p in g:
            if id(p) in owner and owner[id(p)] != m:
                raise ValueError("param_groups: a parameter belongs to two modalities")
            owner[id(p)] = m
    template = None
    found = set()
    for pg in optimizer.param_groups:
        keep = [p for p in pg["params"] if id(p) not in owner]
        found |= {id(p) for p in pg["params"] if id(p) in owner}
        if template is None and len(keep) != len(pg["params"]):
            template = {k: v for k, v in pg.items() if k != "params"}
        pg["params"] = keep
    missing = [id(p) for g in groups for p in g if id(p) not in found]
    if missing:
        raise ValueError(f"optimizer: {len(missing)} modality parameters are not in the optimizer")
    new = []
    for g in groups:
        optimizer.add_param_group({**template, "params": list(dict.fromkeys(g))})
        new.append(optimizer.param_groups[-1])
    optimizer.param_groups[:] = [pg for pg in optimizer.param_groups if pg["params"]]
    return new
