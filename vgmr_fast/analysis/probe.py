"""Linear probes on frozen per-modality encoders: how much of a modality did joint training learn?

The modality-imbalance literature (OGM-GE, Peng et al. 2022; IIBalance, seed 001)
measures under-training of a weak modality like this: freeze the encoder of that
modality in the jointly trained model, fit a *linear* classifier on its pooled
features, and compare its accuracy with the same probe on an encoder trained on
that modality alone. The difference

    gap_m = probe_acc(unimodally trained encoder_m) − probe_acc(jointly trained encoder_m)

is the quantity the balancing methods claim to shrink.

What "the encoder of modality m" is, per backbone of :mod:`vgmr_fast.models`:

* ``Concat``: ``encoders[m]`` on the masked time mean of the modality's input
  (exactly the features the decision layer sees, ``encode(...)[m]``).
* ``Transformer``: ``proj[m]`` + modality embedding + positions, then the
  shared ``encoder`` run on modality ``m``'s tokens **alone**, masked mean.
  The joint model's own pooled stream ``m`` has attended to every other
  modality, so a probe on it would read the dominant modality's evidence
  through attention; running the stream alone isolates what the weights learned
  for modality ``m``. A Transformer trained on one modality is exactly this
  computation, so both sides of the gap use the same function.
* A refiner (VGMR, ...) in front of the backbone is part of the model's input
  pipeline: it is applied to the full multimodal input first, and modality
  ``m``'s refined sequence feeds its encoder.

The probe: features are standardised with the train split's statistics, then a
multinomial logistic regression (L2 ``weight_decay`` on the weights) is fitted
full-batch with L-BFGS from zero (deterministic), on the train split; accuracy
is measured on the evaluation split (test).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["modality_features", "fit_linear_probe", "probe_accuracy", "probe_model", "probe_gap"]


def _core(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def _stream_features(core: nn.Module, m: int, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Pooled features of modality ``m``'s encoder on its (already refined) input ``x`` alone."""
    from ..models.backbones import masked_mean, sinusoidal

    encoders = getattr(core, "encoders", None)
    if isinstance(encoders, nn.ModuleList):  # Concat
        return encoders[m](masked_mean(x, mask))
    proj, shared = getattr(core, "proj", None), getattr(core, "encoder", None)
    if isinstance(proj, nn.ModuleList) and shared is not None:  # Transformer: the stream alone
        b, t, _ = x.shape
        tokens = proj[m](x) + core.modality_embedding[m] + sinusoidal(t, core.d_model, x.device, x.dtype)
        valid = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=x.device)
        padding = ~valid & valid.any(dim=1, keepdim=True)
        return masked_mean(shared(tokens, src_key_padding_mask=padding), valid)
    raise TypeError(f"model: no per-modality encoder found on {type(core).__name__} "
                    "(expected Concat-style 'encoders' or Transformer-style 'proj' + 'encoder')")


def modality_features(model: nn.Module, ds, m: int, batch_size: int = 512) -> torch.Tensor:
    """Frozen pooled features ``[N, H]`` of modality ``m``'s encoder over dataset ``ds`` (eval mode)."""
    return _features(model, ds, [m], batch_size)[0]


@torch.no_grad()
def _features(model: nn.Module, ds, modalities: Sequence[int], batch_size: int = 512) -> List[torch.Tensor]:
    """:func:`modality_features` of each of ``modalities``, one pass over ``ds`` (the refiner, when
    there is one, runs once per batch for all of them)."""
    core = _core(model)
    for m in modalities:
        if not 0 <= m < ds.num_modalities:
            raise ValueError(f"m must index one of the {ds.num_modalities} modalities of ds, got {m}")
    was = model.training
    model.eval()
    out: List[List[torch.Tensor]] = [[] for _ in modalities]
    try:
        for xs, masks, _ in ds.batches(batch_size, shuffle=False):
            if getattr(core, "refiner", None) is not None:
                feats, masks_l, _ = core.refine(xs, masks)
            else:
                feats, masks_l = list(xs), (list(masks) if masks is not None else [None] * len(xs))
            for k, m in enumerate(modalities):
                out[k].append(_stream_features(core, m, feats[m], masks_l[m]).float())
    finally:
        model.train(was)
    return [torch.cat(o) if o else torch.zeros(0, 0) for o in out]


def fit_linear_probe(f_train: torch.Tensor, y_train: torch.Tensor, f_eval: torch.Tensor, y_eval: torch.Tensor,
                     num_classes: Optional[int] = None, weight_decay: float = 1e-3, max_iter: int = 200) -> Dict:
    """Multinomial logistic regression on standardised features; ``{"accuracy", "loss", "train_accuracy"}``.

    Args:
        f_train, y_train: ``[N, H]`` features and labels the probe is fitted on.
        f_eval, y_eval: held-out features and labels it is scored on.
        num_classes: ``C`` (default: from the labels).
        weight_decay: L2 penalty ``λ/2 ‖W‖²`` on the weights (not the bias).
        max_iter: L-BFGS iterations.
    """
    if f_train.dim() != 2 or f_eval.dim() != 2 or f_train.shape[1] != f_eval.shape[1]:
        raise ValueError(f"f_train and f_eval must be [N, H] with the same H, got {tuple(f_train.shape)} "
                         f"and {tuple(f_eval.shape)}")
    if y_train.shape != (f_train.shape[0],) or y_eval.shape != (f_eval.shape[0],):
        raise ValueError("y_train / y_eval must be [N] labels matching their features")
    if f_train.shape[0] < 2:
        raise ValueError("f_train needs at least 2 samples")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    c = int(num_classes or int(max(y_train.max(), y_eval.max())) + 1)
    f_train, f_eval = f_train.double(), f_eval.double()
    mu, sd = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    xtr, xev = (f_train - mu) / sd, (f_eval - mu) / sd
    w = torch.zeros(xtr.shape[1], c, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, y_train) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits = xev @ w + b
        return {"accuracy": float((logits.argmax(1) == y_eval).double().mean()),
                "loss": float(F.cross_entropy(logits, y_eval)),
                "train_accuracy": float(((xtr @ w + b).argmax(1) == y_train).double().mean())}


def probe_accuracy(model: nn.Module, train, evaluation, m: int, model_modality: Optional[int] = None,
                   **probe_kwargs) -> float:
    """Linear-probe accuracy of modality ``m`` of ``train``/``evaluation`` through ``model``.

    ``model_modality``: which of the model's streams is modality ``m`` (default
    ``m``; 0 for a model trained on that modality alone, with one-modality
    datasets).
    """
    mm = m if model_modality is None else model_modality
    f_tr = modality_features(model, train, mm)
    f_ev = modality_features(model, evaluation, mm)
    return fit_linear_probe(f_tr, train.y, f_ev, evaluation.y, train.num_classes, **probe_kwargs)["accuracy"]


def probe_model(model: nn.Module, train, evaluation, **probe_kwargs) -> List[float]:
    """Probe accuracy of every modality of a multimodal model → ``[M]`` list; the same numbers as
    :func:`probe_accuracy` per modality, from one pass over each split."""
    modalities = range(train.num_modalities)
    f_tr, f_ev = _features(model, train, modalities), _features(model, evaluation, modalities)
    return [fit_linear_probe(a, train.y, b, evaluation.y, train.num_classes, **probe_kwargs)["accuracy"]
            for a, b in zip(f_tr, f_ev)]


def probe_gap(unimodal: Sequence[float], joint: Sequence[float]) -> List[float]:
    """``gap_m = unimodal_m − joint_m`` (positive: joint training under-trained modality ``m``)."""
    if len(unimodal) != len(joint):
        raise ValueError(f"unimodal has {len(unimodal)} modalities, joint {len(joint)}")
    return [float(u) - float(j) for u, j in zip(unimodal, joint)]
