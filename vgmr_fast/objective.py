"""docs/math.md §6: the training objective ``L = L_task + lambda_v L_value + lambda_r L_reg``.

Value supervision: the contribution of modality m for sample b is the loss increase when its
refined feature is zeroed, ``Delta[m, b] = l_b(X~ with X~_m := 0) - l_b(X~)``. The M removal
passes and the un-removed pass run as ONE batched backbone pass of ``(M + 1) B`` samples without
gradient, with the backbone in eval mode (choice: so dropout noise does not enter Delta; the
backbone's train/eval state is restored afterwards). Targets ``t = sigmoid(Delta / tau)``
(``value_target="signed"``) or ``sigmoid(|Delta| / tau)`` (``"magnitude"``).

Cost control (not in the paper; the defaults are the paper's objective):

- ``value_fraction`` rho in (0, 1]: exact targets for a random ``ceil(rho B)`` samples of the
  batch only, and ``L_value`` over those samples; the removal pass then takes
  ``ceil(rho B) (M + 1)`` rows instead of ``B (M + 1)``. ``L_task`` and ``L_reg`` still use the
  whole batch. The subset is drawn from ``generator`` (torch's default generator when None) and
  only when rho < 1, so rho = 1 draws nothing and is bit-identical to the paper's objective.
- ``value_every`` k: the removal pass and ``L_value`` run on steps with ``step % k == 0`` only
  (the caller passes ``step``); other steps train on ``L_task + lambda_r L_reg``.

The backbone protocol (what this module calls; ``vgmr_fast.models.adapter`` provides it for a
backbone whose forward takes one tensor per modality):

- ``model(xs, masks, return_aux=True) -> (logits, aux)`` with ``aux["refined"]`` (the M refined
  ``[B, T_m, D_m]`` features the backbone consumed), ``aux["masks"]`` (M masks or Nones),
  ``aux["global_value"]`` and ``aux["channel_value"]`` (the VGMR's value auxiliaries);
- ``model.backbone_logits(feats, masks) -> logits`` for already-refined features (called under
  ``torch.no_grad`` on ``(M + 1) ceil(rho B)`` rows);
- ``model.train()`` / ``model.eval()`` / ``model.training``.

A ``DistributedDataParallel`` wrapper is unwrapped (``.module``) for ``backbone_logits`` (no
gradient flows there, so DDP's hooks are not needed); the main forward goes through the wrapper.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["task_loss", "value_targets", "value_loss", "reg_loss", "vgmr_objective", "value_rows"]


def _up(x: torch.Tensor) -> torch.Tensor:
    """Half precision up to float32 for the loss; float32/float64 unchanged (gradcheck runs in float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_task(task: str) -> None:
    if task not in ("classification", "regression"):
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")


def _labels(y: torch.Tensor, batch: int, task: str) -> torch.Tensor:
    """Labels checked against the batch size; regression scores ``[B]`` or ``[B, 1]`` become ``[B]``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y: expected a tensor, got {type(y).__name__}")
    if y.dim() == 0 or y.shape[0] != batch:
        raise ValueError(f"y: expected {batch} labels (the batch size of the inputs), got shape {tuple(y.shape)}")
    if task == "regression":
        if y.dim() == 2 and y.shape[1] == 1:
            y = y.squeeze(1)
        if y.dim() != 1:
            raise ValueError(f"y: regression expects scores of shape [B] or [B, 1], got {tuple(y.shape)}")
    return y


def task_loss(logits: torch.Tensor, y: torch.Tensor, task: str = "classification", reduction: str = "mean"):
    """Cross entropy on class labels, or L1 on a score (``logits`` [B, 1], ``y`` [B] or [B, 1]) for
    ``task="regression"``."""
    _check_task(task)
    y = _labels(y, logits.shape[0], task)
    if task == "classification":
        return F.cross_entropy(_up(logits), y, reduction=reduction)
    return F.l1_loss(_up(logits).reshape(logits.shape[0], -1).squeeze(-1), y.to(_up(logits).dtype),
                     reduction=reduction)


def _backbone(model):
    """The module that holds ``backbone_logits`` (DDP keeps the user's module in ``.module``)."""
    if hasattr(model, "backbone_logits"):
        return model
    inner = getattr(model, "module", None)
    if inner is not None and hasattr(inner, "backbone_logits"):
        return inner
    raise TypeError(f"model: {type(model).__name__} has no backbone_logits(feats, masks) method; wrap the "
                    "backbone with vgmr_fast.models.adapter.PerModality (see docs/training.md)")


@torch.no_grad()
def value_targets(model, refined, masks, y, *, tau: float = 1.0, value_target: str = "signed",
                  task: str = "classification") -> torch.Tensor:
    """Targets ``t [B, M]`` from one batched no-grad pass of the backbone over M+1 variants."""
    if value_target not in ("signed", "magnitude"):
        raise ValueError(f"value_target: expected 'signed' or 'magnitude', got {value_target!r}")
    if tau <= 0:
        raise ValueError(f"tau: expected > 0, got {tau}")
    _check_task(task)
    M, B = len(refined), refined[0].shape[0]
    y = _labels(y, B, task)
    # variant 0 keeps everything; variant k (1..M) zeroes modality k-1
    feats = [
        torch.cat([r.detach() if k != m + 1 else torch.zeros_like(r) for k in range(M + 1)], dim=0)
        for m, r in enumerate(refined)
    ]
    big_masks = [None if mk is None else mk.repeat(M + 1, 1) for mk in masks]
    inner = _backbone(model)
    was_training = inner.training
    inner.eval()
    try:
        logits = inner.backbone_logits(feats, big_masks)
    finally:
        inner.train(was_training)
    losses = task_loss(logits, y.repeat((M + 1,) + (1,) * (y.dim() - 1)), task, reduction="none").view(M + 1, B)
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
    """``sum_m relu(kappa - std_b g_m) + relu(kappa - std_{b,k} v_m)``: keeps values from collapsing.

    The std is over the batch this process sees (under DDP: its local batch)."""
    terms = []
    if global_value is not None and global_value.shape[0] > 1:
        terms.append(F.relu(kappa - _up(global_value).std(dim=0)).sum())
    if channel_value is not None and channel_value.shape[0] * channel_value.shape[2] > 1:
        v = _up(channel_value).transpose(0, 1).flatten(1)  # [M, B*d]
        terms.append(F.relu(kappa - v.std(dim=1)).sum())
    return sum(terms) if terms else torch.zeros(())


def value_rows(batch: int, value_fraction: float = 1.0) -> int:
    """Samples that get exact value targets per step: ``ceil(value_fraction * batch)``, at least 1."""
    _check_fraction(value_fraction)
    return max(1, min(batch, math.ceil(value_fraction * batch - 1e-9)))


def _check_fraction(value_fraction) -> None:
    if isinstance(value_fraction, bool) or not isinstance(value_fraction, (int, float)) \
            or not 0.0 < float(value_fraction) <= 1.0:
        raise ValueError(f"value_fraction: expected a number in (0, 1], got {value_fraction!r}")


def vgmr_objective(model, xs, masks, y, *, lambda_v: float = 0.1, lambda_r: float = 0.01, tau: float = 1.0,
                   kappa: float = 0.05, value_target: str = "signed", task: str = "classification",
                   value_fraction: float = 1.0, value_every: int = 1, step: int = 0,
                   generator: torch.Generator | None = None):
    """Full §6 loss for a backbone whose refiner is a VGMR. Returns ``(loss, parts)``.

    ``parts``: detached ``task``, ``value``, ``reg`` losses, ``logits``, the ``targets``
    ``[n, M]`` (None on a step without value supervision) and ``value_index``, the ``n``
    samples of the batch they belong to (all of them when ``value_fraction = 1``).
    """
    _check_fraction(value_fraction)
    if isinstance(value_every, bool) or not isinstance(value_every, int) or value_every < 1:
        raise ValueError(f"value_every: expected an int >= 1, got {value_every!r}")
    _check_task(task)
    if value_target not in ("signed", "magnitude"):
        raise ValueError(f"value_target: expected 'signed' or 'magnitude', got {value_target!r}")
    logits, aux = model(xs, masks, return_aux=True)
    y = _labels(y, logits.shape[0], task)
    l_task = task_loss(logits, y, task)
    if "global_value" not in aux:
        raise ValueError("model: its refiner returns no value auxiliaries (is it a VGMR?)")
    g, v = aux["global_value"], aux["channel_value"]
    B = logits.shape[0]
    targets = index = None
    l_value = torch.zeros((), device=logits.device, dtype=_up(logits).dtype)
    if step % value_every == 0:
        n = value_rows(B, value_fraction)
        if n < B:
            index = torch.randperm(B, generator=generator)[:n].sort().values.to(logits.device)
        else:  # every sample: the tensors themselves, no copy (rho = 1 is the paper's objective as is)
            index = torch.arange(B, device=logits.device)

        def rows(t):
            return t if t is None or n == B else t.index_select(0, index)

        targets = value_targets(model, [rows(r) for r in aux["refined"]], [rows(mk) for mk in aux["masks"]], rows(y),
                                tau=tau, value_target=value_target, task=task)
        l_value = value_loss(rows(g), rows(v), targets)
    l_reg = reg_loss(g, v, kappa)
    loss = l_task + lambda_v * l_value + lambda_r * l_reg
    parts = {"task": l_task.detach(), "value": l_value.detach(), "reg": l_reg.detach(),
             "targets": targets, "value_index": index, "logits": logits.detach()}
    return loss, parts
