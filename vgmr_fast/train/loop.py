"""One training run: the model of a method, its optimiser, its training step and its epochs."""
from __future__ import annotations

import copy
import math
import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis import diagnostics as A
from ..balance.decision import AllocatedModel, modality_logits
from ..balance.iibalance import IIBalanceModel, estimate_budgets
from ..balance.ogm import OGMGE, modality_parameter_groups
from ..data import MultimodalDataset
from .distributed import average_gradients, shard
from .methods import BACKBONES, parse_method, vgmr_options


def _make_vgmr(widths, args) -> nn.Module:
    """The fused VGMR of a run (its default dropout stream: the shared Philox one)."""
    from ..vgmr import VGMR

    return VGMR(widths, d=args.vgmr_d, dropout=args.dropout, gate_rank=getattr(args, "gate_rank", None),
                backend=getattr(args, "backend", "auto"))


def _vgmr_loss(core, method: str, xs, masks, y, args, step: int):
    from ..objective import vgmr_objective

    fraction, every = vgmr_options(method, args)
    return vgmr_objective(core, xs, masks, y, lambda_v=args.lambda_v, lambda_r=args.lambda_r,
                          value_fraction=fraction, value_every=every, step=step)


def build_model(backbone: str, method: str, train: MultimodalDataset, val: MultimodalDataset, args,
                seed: int, budget_cache: Optional[Dict] = None) -> Tuple[nn.Module, Dict]:
    """Build the model of one run (seeded). Returns ``(model, info)``."""
    from ..models import Concat, Transformer, make_refiner

    refiner_kind, balancer = parse_method(method)
    torch.manual_seed(seed)
    widths = train.widths
    c = train.num_classes
    info: Dict = {}
    refiner = None
    if refiner_kind == "vgmr":
        refiner = _make_vgmr(widths, args)
    elif refiner_kind is not None:
        refiner = make_refiner(refiner_kind, widths, hidden=args.vgmr_d * 2)
    if backbone == "concat":
        core = Concat(widths, c, hidden=args.hidden, dropout=args.dropout, refiner=refiner)
        sizes = [args.hidden] * train.num_modalities
    elif backbone == "transformer":
        core = Transformer(widths, c, d_model=args.d_model, nhead=args.nhead, num_layers=args.layers,
                           dropout=args.dropout, refiner=refiner)
        sizes = [args.d_model] * train.num_modalities
    else:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    model: nn.Module = core
    if balancer == "iibalance":
        key = (id(train), seed)
        if budget_cache is not None and key in budget_cache:
            est = budget_cache[key]
        else:
            est = estimate_budgets(train, val, seed=seed)
            if budget_cache is not None:
                budget_cache[key] = est
        info["budgets"] = est.to_dict()
        torch.manual_seed(seed + 1)
        model = IIBalanceModel(core, sizes, c, est, lambda_align=args.lambda_align,
                               lambda_uni=getattr(args, "lambda_uni", 1.0))
    elif balancer == "decision":
        model = AllocatedModel(core, sizes, c)
    info["params"] = sum(p.numel() for p in model.parameters())
    return model, info


def core_of(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def is_vgmr(model: nn.Module) -> bool:
    ref = getattr(core_of(model), "refiner", None)
    return ref is not None and getattr(ref, "has_aux", False)


def train_step(model, method, xs, masks, y, opt, ogm, epoch, args, step: int = 0) -> float:
    xs, masks, y = shard(xs, masks, y)
    refiner_kind, balancer = parse_method(method)
    core = core_of(model)
    opt.zero_grad(set_to_none=True)
    if y.shape[0] == 0:  # an empty slice of a small batch: no loss here, zero gradients to the average
        average_gradients(model, 0)
        opt.step()
        return 0.0
    hs_for_ogm = None
    if balancer in ("iibalance", "decision"):
        loss, _ = model.loss(xs, masks, y)
    elif refiner_kind == "vgmr":
        loss, _ = _vgmr_loss(core, method, xs, masks, y, args, step)
    else:
        hs = core.encode(xs, masks)
        loss = F.cross_entropy(core.classify(hs), y)
        hs_for_ogm = hs
    loss.backward()
    if ogm is not None:
        with torch.no_grad():
            if hs_for_ogm is None:  # vgmr+ogm: one extra no-grad encoding of the batch
                hs_for_ogm = core.encode(xs, masks)
            z = modality_logits(core, [h.detach() for h in hs_for_ogm])
        ogm.step(z, y, epoch)
    average_gradients(model, y.shape[0])
    opt.step()
    return float(loss.detach())


def make_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """``--optimizer``: AdamW (default) or SGD with momentum 0.9 (the OGM-GE paper's optimizer).

    Why SGD exists here: Adam divides each parameter's step by its running
    gradient RMS, so OGM-GE's multiplication of a modality's gradient by a
    coefficient ``k`` is undone (``Adam(k·g) ≈ Adam(g)``, exactly on the first
    step) and only the GE noise is left; under SGD the step scales with ``k`` as
    the paper intends (docs/balance.md).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    kind = getattr(args, "optimizer", "adamw")
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    raise ValueError(f"--optimizer must be 'adamw' or 'sgd', got {kind!r}")


def train_one(model: nn.Module, method: str, data: Dict[str, MultimodalDataset], args, seed: int,
              progress=None) -> Dict:
    """Train one model; restore the best validation checkpoint; return the training history."""
    train, val = data["train"], data["val"]
    refiner_kind, balancer = parse_method(method)
    opt = make_optimizer(model, args)
    ogm = None
    if balancer == "ogm":
        ogm = OGMGE(modality_parameter_groups(model), alpha=args.ogm_alpha, ge=True,
                    generator=torch.Generator().manual_seed(seed + 17),
                    modulation=getattr(args, "ogm_modulation", "grad"), optimizer=opt)
    gen = torch.Generator().manual_seed(seed)
    n_cos = min(len(val), 256)
    cos_batch = val.batch(torch.arange(n_cos))
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    cos_every = max(1, steps_per_epoch // max(1, args.cosine_points))
    history = {"train_loss": [], "val_loss": [], "val_accuracy": [], "cos_step": [], "cosine": []}
    best = (-1.0, None, -1)
    step = 0
    step_seconds = 0.0  # optimisation steps only (no evaluation): the cost of the method itself
    # gradient cosine only on models that use the backbone's own head (the paper's setting)
    shared = [p for _, p in A.shared_parameters(model)] if balancer not in ("iibalance", "decision") else []
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for xs, masks, y in train.batches(args.batch_size, shuffle=True, generator=gen):
            t_step = time.perf_counter()
            losses.append(train_step(model, method, xs, masks, y, opt, ogm, epoch, args, step))
            step_seconds += time.perf_counter() - t_step
            step += 1
            if shared and step % cos_every == 0:
                history["cos_step"].append(step / steps_per_epoch)
                history["cosine"].append(A.gradient_cosine(model, cos_batch[0], cos_batch[1], cos_batch[2],
                                                           keep=0, params=shared))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        ev = A.evaluate(model, val)
        history["train_loss"].append(sum(losses) / max(1, len(losses)))
        history["val_loss"].append(ev["loss"])
        history["val_accuracy"].append(ev["accuracy"])
        if ev["accuracy"] > best[0]:
            best = (ev["accuracy"], copy.deepcopy(model.state_dict()), epoch)
    model.load_state_dict(best[1])
    model.eval()
    history["best_epoch"] = best[2]
    history["step_seconds"] = step_seconds / max(1, step)
    if balancer == "iibalance":
        xs, masks, y = val.full()
        history["gate_calibration"] = model.calibrate(xs, masks, y)
    if ogm is not None:
        coeffs = torch.tensor([h["coeff"] for h in ogm.history])
        history["ogm_mean_coeff"] = coeffs.mean(0).tolist()
    return history
