"""SPEC §6: the training objective ``L = L_task + lambda_v L_value + lambda_r L_reg``.

Value supervision: the contribution of modality m for sample b is the loss increase when its
refined feature is zeroed, ``Delta[m, b] = l_b(X~ with X~_m := 0) - l_b(X~)``. The M removal
passes and the un-removed pass run as ONE batched backbone pass of ``(M + 1) B`` samples without
gradient, with the backbone in eval mode (choice: so dropout noise does not enter Delta; the
backbone's train/eval state is restored afterwards). Targets ``t = sigmoid(Delta / tau)``
(``value_target="signed"``) or ``sigmoid(|Delta| / tau)`` (``"magnitude"``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _up(x: torch.Tensor) -> torch.Tensor:
    """Half precision up to float32 for the loss; float32/float64 unchanged (gradcheck runs in float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def task_loss(logits: torch.Tensor, y: torch.Tensor, task: str = "classification", reduction: str = "mean"):
    """Cross entropy on class labels, or L1 on a score (``logits`` [B, 1]) for ``task="regression"``."""
    if task == "classification":
        return F.cross_entropy(_up(logits), y, reduction=reduction)
    if task == "regression":
        return F.l1_loss(_up(logits).squeeze(-1), y.to(_up(logits).dtype), reduction=reduction)
    raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")


@torch.no_grad()
def value_targets(model, refined, masks, y, *, tau: float = 1.0, value_target: str = "signed",
                  task: str = "classification") -> torch.Tensor:
    """Targets ``t [B, M]`` from one batched no-grad pass of the backbone over M+1 variants."""
    if value_target not in ("signed", "magnitude"):
        raise ValueError(f"value_target: expected 'signed' or 'magnitude', got {value_target!r}")
    if tau <= 0:
        raise ValueError(f"tau: expected > 0, got {tau}")
    M, B = len(refined), y.shape[0]
    # variant 0 keeps everything; variant k (1..M) zeroes modality k-1
    feats = [
        torch.cat([r.detach() if k != m + 1 else torch.zeros_like(r) for k in range(M + 1)], dim=0)
        for m, r in enumerate(refined)
    ]
    big_masks = [None if mk is None else mk.repeat(M + 1, 1) for mk in masks]
    was_training = model.training
    model.eval()
    try:
        logits = model.backbone_logits(feats, big_masks)
    finally:
        model.train(was_training)
    losses = task_loss(logits, y.repeat(M + 1), task, reduction="none").view(M + 1, B)
    delta = (losses[1:] - losses[:1]).t()  # [B, M]
    if value_target == "magnitude":
        delta = delta.abs()
    return torch.sigmoid(delta / tau)


def value_loss(global_value, channel_value, targets) -> torch.Tensor:
    """``mean_{m,b}[(g - t)^2 + (mean_k v - t)^2]`` (terms of ablated signals are left out)."""
    loss = targets.new_zeros(())
    if global_value is not None:
        loss = loss + ((_up(global_value) - targets) ** 2).mean()
    if channel_value is not None:
        loss = loss + ((_up(channel_value).mean(dim=-1) - targets) ** 2).mean()
    return loss


def reg_loss(global_value, channel_value, kappa: float = 0.05) -> torch.Tensor:
    """``sum_m relu(kappa - std_b g_m) + relu(kappa - std_{b,k} v_m)``: keeps values from collapsing."""
    terms = []
    if global_value is not None and global_value.shape[0] > 1:
        terms.append(F.relu(kappa - _up(global_value).std(dim=0)).sum())
    if channel_value is not None and channel_value.shape[0] * channel_value.shape[2] > 1:
        v = _up(channel_value).transpose(0, 1).flatten(1)  # [M, B*d]
        terms.append(F.relu(kappa - v.std(dim=1)).sum())
    return sum(terms) if terms else torch.zeros(())


def vgmr_objective(model, xs, masks, y, *, lambda_v: float = 0.1, lambda_r: float = 0.01, tau: float = 1.0,
                   kappa: float = 0.05, value_target: str = "signed", task: str = "classification"):
    """Full §6 loss for a backbone whose refiner is a VGMR. Returns ``(loss, parts)``."""
    logits, aux = model(xs, masks, return_aux=True)
    l_task = task_loss(logits, y, task)
    if "global_value" not in aux:
        raise ValueError("model: its refiner returns no value auxiliaries (is it a VGMR?)")
    g, v = aux["global_value"], aux["channel_value"]
    t = value_targets(model, aux["refined"], aux["masks"], y, tau=tau, value_target=value_target, task=task)
    l_value = value_loss(g, v, t)
    l_reg = reg_loss(g, v, kappa)
    loss = l_task + lambda_v * l_value + lambda_r * l_reg
    parts = {"task": l_task.detach(), "value": l_value.detach(), "reg": l_reg.detach(),
             "targets": t, "logits": logits.detach()}
    return loss, parts
