"""``vgmr-fast train``: train backbones with VGMR and the balancing methods, then run the analyses.

Grid: ``settings`` (benchmark presets, e.g. ``clean`` and ``noisy``) ×
``backbones`` (``concat``, ``transformer``) × ``methods`` × ``seeds``.
A method is ``none`` (the bare backbone, the paper's "Concat"), or ``+``-joined
parts: at most one refiner (``vgmr``; ``vgmr@RHO`` / ``vgmr%K``: VGMR with
value fraction RHO / value supervision every K-th step, e.g. ``vgmr@0.25``,
``vgmr%4``; the Table 7 comparison refiners ``mlp``, ``gate``,
``cross_attention``) and at most one balancer (``ogm``: OGM-GE;
``iibalance``; ``decision``: the adaptive decision-layer allocation head).
``vgmr+ogm`` is the paper's Table 4.6 combination. ``iibalance`` and
``decision`` replace the backbone's head, so they are not combined with
``vgmr`` (whose value targets come from the backbone's own head, docs/math.md §6).

Per run: AdamW, the best-validation-accuracy checkpoint is restored (the
paper's protocol) and evaluated on test: accuracy, macro-F1, modality removal
(Table 4.7), noise-robustness sweeps over ratio and weight (§4.8), the
gradient cosine between the first modality alone and all modalities over
training (§4.9). For the first seed: VGMR value/gate statistics clean vs. 30 %
of the dominant modality's steps replaced by noise (Table 4.4), the
refinement-difference heatmap (§4.10), decision-layer diagnostics of the
concat models against unimodally trained concat models (seed 000).

VGMR is the fused module ``vgmr_fast.VGMR`` (``--backend``, default
``auto``: the best fused backend for the device, the reference where none is
built) with its default dropout stream, the shared Philox stream, so this
command runs what users run. It trains with the docs/math.md §6 objective;
``--value-fraction`` and ``--value-every`` make its value supervision cheaper
(see ``vgmr_fast.objective``).

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process takes its slice of each
batch, gradients are averaged over processes before each optimiser step (gloo,
or NCCL for CUDA), and rank 0 alone writes the outputs.

Outputs in ``--out``: ``results.md``, ``results.json`` and PNG plots.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .analysis import diagnostics as A
from .balance.decision import (AllocatedModel, decision_diagnostics, modality_logits, plot_decision_diagnostics,
                               summarize_diagnostics)
from .balance.iibalance import IIBalanceModel, estimate_budgets
from .balance.ogm import OGMGE, modality_parameter_groups
from .data import MultimodalDataset, load_cremad, load_mosei, load_mosi, make_benchmark

__all__ = ["add_train_arguments", "run_train", "train_grid", "parse_method", "build_model", "make_optimizer",
           "train_one", "main"]

REFINERS = ("vgmr", "mlp", "gate", "cross_attention")
BALANCERS = ("ogm", "iibalance", "decision")
BACKBONES = ("concat", "transformer")


# --------------------------------------------------------------- arguments
def _csv(s: str) -> List[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def _floats(s: str) -> List[float]:
    return [float(t) for t in _csv(s)]


def _ints(s: str) -> List[int]:
    return [int(t) for t in _csv(s)]


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` options to ``parser`` (an argparse parser or subparser)."""
    g = parser.add_argument_group("grid")
    g.add_argument("--out", default="vgmr_train_out", help="output directory (created)")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (the controlled benchmark) or mosi:PATH, mosei:PATH, cremad:PATH")
    g.add_argument("--settings", type=_csv, default=["clean", "noisy"],
                   help="benchmark presets, comma-separated (clean, noisy, bimodal, imbalanced)")
    g.add_argument("--backbones", type=_csv, default=["concat", "transformer"], help="concat, transformer")
    g.add_argument("--methods", type=_csv, default=["none", "vgmr", "ogm", "iibalance", "decision"],
                   help="none, vgmr, ogm, iibalance, decision, mlp, gate, cross_attention, or X+Y combos")
    g.add_argument("--seeds", type=_ints, default=[0], help="training seeds, comma-separated")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    d = parser.add_argument_group("synthetic data")
    d.add_argument("--n-train", type=int, default=1600)
    d.add_argument("--n-val", type=int, default=400)
    d.add_argument("--n-test", type=int, default=800)
    d.add_argument("--num-classes", type=int, default=4)
    o = parser.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="adamw, or sgd (momentum 0.9: the OGM-GE paper's optimizer, under which its gradient "
                   "coefficients act; Adam's per-parameter normalisation cancels them)")
    o.add_argument("--batch-size", type=int, default=64)
    o.add_argument("--lr", type=float, default=2e-3)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--dropout", type=float, default=0.1)
    o.add_argument("--hidden", type=int, default=64, help="Concat hidden width")
    o.add_argument("--d-model", type=int, default=32, help="Transformer width")
    o.add_argument("--layers", type=int, default=1, help="Transformer layers")
    o.add_argument("--nhead", type=int, default=4)
    o.add_argument("--vgmr-d", type=int, default=32, help="VGMR latent width d")
    o.add_argument("--lambda-v", type=float, default=0.1)
    o.add_argument("--lambda-r", type=float, default=0.01)
    o.add_argument("--ogm-alpha", type=float, default=0.5)
    o.add_argument("--ogm-modulation", choices=("grad", "step"), default="grad",
                   help="OGM-GE: multiply the gradient (the paper; cancelled by Adam's normalisation) or the "
                   "modality's learning rate (acts under Adam too; docs/balance.md)")
    o.add_argument("--lambda-align", type=float, default=0.5, help="IIBalance: weight of the prototype alignment")
    o.add_argument("--lambda-uni", type=float, default=1.0,
                   help="IIBalance: weight of the unimodal heads' cross entropy (our choice, not the paper's)")
    o.add_argument("--threads", type=int, default=1,
                   help="torch threads (0 = torch default). 1 by default: these models are tiny and "
                   "dispatch-bound, and intra-op threads only add synchronisation (and thrash on a busy machine)")
    _add_objective_arguments(parser)
    a = parser.add_argument_group("analysis")
    a.add_argument("--noise-ratios", type=_floats, default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    a.add_argument("--noise-weight", type=float, default=1.0, help="weight of the ratio sweep")
    a.add_argument("--noise-weights", type=_floats, default=[0.0, 0.5, 1.0, 2.0, 3.0])
    a.add_argument("--noise-ratio", type=float, default=0.3, help="ratio of the weight sweep")
    a.add_argument("--noise-seeds", type=int, default=2, help="noise draws per sweep point")
    a.add_argument("--gate-noise-weight", type=float, default=3.0,
                   help="noise weight of the value/gate analysis (30 %% of the first modality's steps)")
    a.add_argument("--cosine-points", type=int, default=2, help="gradient-cosine checkpoints per epoch")
    a.add_argument("--probes", action="store_true",
                   help="linear probes on every frozen modality encoder vs. encoders trained on that modality "
                   "alone (the imbalance gap); always on for the 'imbalanced' setting")
    a.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bars")
    a.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test (overrides data sizes, epochs, sweeps)")
    return parser


def _add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    from .vgmr import BACKENDS

    v = parser.add_argument_group("VGMR module and objective")
    v.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="VGMR backend: auto (best fused backend for the device), cpu, cuda, triton, or reference")
    v.add_argument("--value-fraction", type=float, default=1.0,
                   help="share of each batch with exact value targets, in (0, 1]; 1 = the paper")
    v.add_argument("--value-every", type=int, default=1,
                   help="value supervision every k-th step (1 = every step, the paper)")


def _check_objective_arguments(args) -> None:
    from .objective import value_rows

    try:
        value_rows(1, getattr(args, "value_fraction", 1.0))
    except ValueError as exc:
        raise ValueError(f"--value-fraction: {exc}") from None
    every = getattr(args, "value_every", 1)
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"--value-every: expected an int >= 1, got {every!r}")


def _make_vgmr(widths, args) -> nn.Module:
    """The fused VGMR of a run (its default dropout stream: the shared Philox one)."""
    from .vgmr import VGMR

    return VGMR(widths, d=args.vgmr_d, dropout=args.dropout, backend=getattr(args, "backend", "auto"))


def _vgmr_options(method: str, args) -> Tuple[float, int]:
    """``(value_fraction, value_every)`` of a method: ``vgmr@0.25`` sets the fraction, ``vgmr%4`` the
    period (``vgmr@0.5%2`` both); what a method leaves out comes from ``--value-fraction``/``--value-every``."""
    from .objective import value_rows

    fraction, every = getattr(args, "value_fraction", 1.0), getattr(args, "value_every", 1)
    for part in method.split("+"):
        part = part.strip().lower()
        if not part.startswith(("vgmr@", "vgmr%")):
            continue
        rest, _, k = part[4:].partition("%")
        try:
            if rest:
                fraction = float(rest[1:])
                value_rows(1, fraction)
            if k:
                every = int(k)
                if every < 1:
                    raise ValueError
        except ValueError:
            raise ValueError(f"method {method!r}: expected vgmr@RHO (RHO in (0, 1]), vgmr%K (K an int >= 1) "
                             f"or vgmr@RHO%K") from None
    return fraction, every


def _vgmr_loss(core, method: str, xs, masks, y, args, step: int):
    from .objective import vgmr_objective

    fraction, every = _vgmr_options(method, args)
    return vgmr_objective(core, xs, masks, y, lambda_v=args.lambda_v, lambda_r=args.lambda_r,
                          value_fraction=fraction, value_every=every, step=step)


# ---------------------------------------------------------- several processes
def _world() -> Tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` outside an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(args) -> None:
    """Join the process group of a ``torchrun`` launch; rank != 0 writes to a scratch directory."""
    import tempfile

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = _world()
    # OGM-GE's coefficients and IIBalance's prototypes come from each process's own slice: the
    # processes would take different steps and drift apart, so they are refused, not run wrong.
    per_process = [m for m in args.methods if parse_method(m)[1] in ("ogm", "iibalance")]
    if world > 1 and per_process:
        raise ValueError(f"--methods: {per_process} keep per-process state (OGM-GE coefficients, IIBalance "
                         f"prototypes) and cannot run over {world} processes; run them in one process")
    if world > 1 and rank != 0:
        args.out = tempfile.mkdtemp(prefix=f"vgmr_train_rank{rank}_")
        args.no_progress = True


def _shard(xs, masks, y):
    """This process's slice of a batch: contiguous, sizes differing by at most one (a batch smaller
    than the number of processes leaves some slices empty; their process contributes no gradient)."""
    rank, world = _world()
    if world == 1:
        return xs, masks, y
    n = y.shape[0]
    sl = slice(rank * n // world, (rank + 1) * n // world)
    return ([x[sl] for x in xs], None if masks is None else [None if m is None else m[sl] for m in masks], y[sl])


def _average_gradients(model: nn.Module, count: int) -> None:
    """The whole batch's mean-loss gradient from every process's slice: each process's gradient of
    its slice's mean loss, weighted by its ``count`` samples (slices may differ in size), summed over
    processes and divided by the batch size; every process then takes the same optimiser step."""
    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.tensor([float(count)], device=params[0].device)
    dist.all_reduce(total)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.mul_(count / total.item())
        dist.all_reduce(p.grad)


def _apply_quick(args):
    if getattr(args, "quick", False):
        args.n_train, args.n_val, args.n_test = 96, 48, 48
        args.epochs = min(args.epochs, 2)
        args.batch_size = 32
        args.noise_ratios = [0.0, 0.5]
        args.noise_weights = [0.0, 2.0]
        args.noise_seeds = 1
        args.cosine_points = 1
    return args


def parse_method(method: str) -> Tuple[Optional[str], Optional[str]]:
    """``"vgmr+ogm"`` → ``("vgmr", "ogm")``; ``"none"`` → ``(None, None)``."""
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    refiner = balancer = None
    for part in method.split("+"):
        part = part.strip().lower()
        if part in ("none", "plain", ""):
            continue
        if part.startswith(("vgmr@", "vgmr%")):
            _vgmr_options(part, None)  # validates the options
            part = "vgmr"
        if part in REFINERS:
            if refiner is not None:
                raise ValueError(f"method {method!r}: at most one refiner ({REFINERS})")
            refiner = part
        elif part in BALANCERS:
            if balancer is not None:
                raise ValueError(f"method {method!r}: at most one balancer ({BALANCERS})")
            balancer = part
        else:
            raise ValueError(f"method {method!r}: unknown part {part!r} (refiners {REFINERS}, balancers {BALANCERS})")
    if refiner == "vgmr" and balancer in ("iibalance", "decision"):
        raise ValueError(f"method {method!r}: vgmr's value targets need the backbone's own head; "
                         f"combine vgmr with ogm only")
    return refiner, balancer


# ------------------------------------------------------------------- models
def build_model(backbone: str, method: str, train: MultimodalDataset, val: MultimodalDataset, args,
                seed: int, budget_cache: Optional[Dict] = None) -> Tuple[nn.Module, Dict]:
    """Build the model of one run (seeded). Returns ``(model, info)``."""
    from .models import Concat, Transformer, make_refiner

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


def _core(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def _is_vgmr(model: nn.Module) -> bool:
    ref = getattr(_core(model), "refiner", None)
    return ref is not None and getattr(ref, "has_aux", False)


def _train_step(model, method, xs, masks, y, opt, ogm, epoch, args, step: int = 0) -> float:
    xs, masks, y = _shard(xs, masks, y)
    refiner_kind, balancer = parse_method(method)
    core = _core(model)
    opt.zero_grad(set_to_none=True)
    if y.shape[0] == 0:  # an empty slice of a small batch: no loss here, zero gradients to the average
        _average_gradients(model, 0)
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
    _average_gradients(model, y.shape[0])
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
            losses.append(_train_step(model, method, xs, masks, y, opt, ogm, epoch, args, step))
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


def _train_unimodal(data: Dict[str, MultimodalDataset], m: int, args, seed: int) -> Tuple[nn.Module, MultimodalDataset]:
    """A Concat trained on modality ``m`` alone (for the decision-layer comparison)."""
    from .models import Concat

    def single(ds):
        masks = None if ds.masks is None else [ds.masks[m]]
        return MultimodalDataset([ds.xs[m]], ds.y, [ds.names[m]], masks, ds.num_classes)
    sub = {k: single(v) for k, v in data.items()}
    torch.manual_seed(seed)
    model = Concat(sub["train"].widths, sub["train"].num_classes, hidden=args.hidden, dropout=args.dropout)
    quiet = copy.copy(args)
    quiet.cosine_points = 0
    train_one(model, "none", sub, quiet, seed)
    return model, sub["test"]


def _command_line() -> Optional[str]:
    """The command that runs this process, when it is the package's CLI (not a test or a library call)."""
    import sys

    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    if prog == "__main__.py" and os.path.basename(os.path.dirname(sys.argv[0])) == "vgmr_fast":
        return "python -m vgmr_fast " + " ".join(sys.argv[1:])
    if prog in ("vgmr-fast", "train.py"):
        return " ".join(["vgmr-fast" if prog == "vgmr-fast" else "python -m vgmr_fast.train", *sys.argv[1:]])
    return None


# ------------------------------------------------- linear probes (imbalance gap)
def _probing(args, setting: str) -> bool:
    return bool(getattr(args, "probes", False)) or setting == "imbalanced"


def _single_modality(ds: MultimodalDataset, m: int) -> MultimodalDataset:
    masks = None if ds.masks is None else [ds.masks[m]]
    return MultimodalDataset([ds.xs[m]], ds.y, [ds.names[m]], masks, ds.num_classes)


def _probe_reference(cache: Dict, setting: str, data: Dict[str, MultimodalDataset], backbone: str, args,
                     seed: int) -> List[Dict]:
    """Per modality, a bare ``backbone`` trained on that modality alone (same seed and settings):
    its linear-probe accuracy and its own test accuracy. Cached per (setting, backbone, seed)."""
    from .analysis.probe import probe_accuracy

    key = (setting, backbone, seed)
    if key not in cache:
        quiet = copy.copy(args)
        quiet.cosine_points = 0
        rows = []
        for m in range(data["train"].num_modalities):
            sub = {k: _single_modality(v, m) for k, v in data.items()}
            model, _ = build_model(backbone, "none", sub["train"], sub["val"], quiet, seed)
            train_one(model, "none", sub, quiet, seed)
            rows.append({"probe": probe_accuracy(model, sub["train"], sub["test"], 0),
                         "accuracy": A.evaluate(model, sub["test"])["accuracy"]})
        cache[key] = rows
    return cache[key]


def _block_weight_norms(model: nn.Module) -> Dict:
    """Frobenius norm of each modality's block of the first layer that reads the modality features."""
    from .balance.decision import AllocatedModel

    if isinstance(model, IIBalanceModel):
        return {"layer": "unimodal heads", "norms": [float(h.weight.detach().norm()) for h in model.heads]}
    if isinstance(model, AllocatedModel):
        return {"layer": "unimodal heads", "norms": [float(h.weight.detach().norm()) for h in model.head.heads]}
    core = _core(model)
    layer = getattr(core, "classifier", None)
    name = "classifier W_m"
    if not isinstance(layer, nn.Linear):
        head = getattr(core, "head", None)
        layer = head[0] if isinstance(head, nn.Sequential) and isinstance(head[0], nn.Linear) else None
        name = "head[0] W_m"
    if layer is None:
        return {"layer": None, "norms": []}
    m = core.num_modalities
    return {"layer": name, "norms": [float(w.detach().norm()) for w in layer.weight.chunk(m, dim=1)]}


def _probe_run(model: nn.Module, data: Dict[str, MultimodalDataset], reference: List[Dict]) -> Dict:
    from .analysis.probe import probe_gap, probe_model

    joint = probe_model(model, data["train"], data["test"])
    uni = [r["probe"] for r in reference]
    out = {"names": list(data["train"].names), "joint": joint, "unimodal": uni, "gap": probe_gap(uni, joint),
           "unimodal_accuracy": [r["accuracy"] for r in reference], "block_norms": _block_weight_norms(model)}
    align = getattr(model, "align", None)
    if align is not None and hasattr(align, "trigger_rate"):
        out["align_trigger_rate"] = align.trigger_rate().tolist()
    return out


def _probe_summary(runs: List[Dict]) -> List[Dict]:
    """Per (setting, backbone, method): probe accuracy, gap, and Δ vs. the bare model paired by seed."""
    groups: Dict[Tuple[str, str, str], List[Dict]] = {}
    for r in runs:
        if "probe" in r:
            groups.setdefault((r["setting"], r["backbone"], r["method"]), []).append(r)
    rows = []
    for (setting, backbone, method), rs in groups.items():
        names = rs[0]["probe"]["names"]
        bare = {r["seed"]: r for r in groups.get((setting, backbone, "none"), [])}
        paired = [(r, bare[r["seed"]]) for r in rs if r["seed"] in bare]
        rows.append({
            "setting": setting, "backbone": backbone, "method": method, "names": names,
            "seeds": [r["seed"] for r in rs],
            "accuracy": _agg([r["test"]["accuracy"] for r in rs]),
            "macro_f1": _agg([r["test"]["macro_f1"] for r in rs]),
            "joint": [_agg([r["probe"]["joint"][m] for r in rs]) for m in range(len(names))],
            "unimodal": [_agg([r["probe"]["unimodal"][m] for r in rs]) for m in range(len(names))],
            "gap": [_agg([r["probe"]["gap"][m] for r in rs]) for m in range(len(names))],
            "delta_accuracy": _agg([r["test"]["accuracy"] - b["test"]["accuracy"] for r, b in paired]),
            "delta_macro_f1": _agg([r["test"]["macro_f1"] - b["test"]["macro_f1"] for r, b in paired]),
            "delta_gap": [_agg([b["probe"]["gap"][m] - r["probe"]["gap"][m] for r, b in paired])
                          for m in range(len(names))],
            "wins": sum(r["test"]["accuracy"] > b["test"]["accuracy"] for r, b in paired), "paired": len(paired),
        })
    return rows


def _verdict(a: Dict[str, float]) -> str:
    """Paired Δ over seeds: 'beats' needs mean > 2 standard errors, as in the VGMR verdict."""
    if a["n"] == 0:
        return "–"
    if a["mean"] > 0 and a["n"] > 1 and a["mean"] > 2 * a["std"] / math.sqrt(a["n"]):
        return "beats"
    if a["mean"] < 0 and a["n"] > 1 and -a["mean"] > 2 * a["std"] / math.sqrt(a["n"]):
        return "worse than"
    return "within seed noise of"


def _probe_markdown(runs: List[Dict]) -> List[str]:
    rows = _probe_summary(runs)
    if not rows:
        return []
    names = rows[0]["names"]
    L = ["## Linear probes on the frozen modality encoders (the imbalance gap)\n",
         "Per modality, a multinomial logistic-regression probe is fitted on the frozen encoder's pooled train "
         "features and scored on test (vgmr_fast/analysis/probe.py). *uni* = the same probe on an encoder of the "
         "same backbone trained on that modality alone (same seed, epochs, data); gap = uni − joint (points of "
         "accuracy the joint training left on the table). Δ vs. bare: paired by seed; Δgap > 0 = gap shrunk. "
         "'beats' = paired mean Δ above two standard errors.\n"]
    head = ["setting", "backbone", "method", "acc", "macro-F1"]
    head += [f"probe {n} (uni → joint)" for n in names] + [f"gap {n}" for n in names]
    head += ["Δacc vs bare", "ΔF1 vs bare", f"Δgap {names[-1]}", "verdict (acc)"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for r in rows:
        cells = [r["setting"], r["backbone"], r["method"], _fmt(r["accuracy"], 3), _fmt(r["macro_f1"], 3)]
        cells += [f"{u['mean']:.3f} → {_fmt(j, 3)}" for u, j in zip(r["unimodal"], r["joint"])]
        cells += [_fmt(g, 3, signed=True) for g in r["gap"]]
        bare = r["method"] == "none"
        cells += ["–" if bare else _fmt(r["delta_accuracy"], 3, signed=True),
                  "–" if bare else _fmt(r["delta_macro_f1"], 3, signed=True),
                  "–" if bare else _fmt(r["delta_gap"][-1], 3, signed=True),
                  "–" if bare else f"{_verdict(r['delta_accuracy'])} bare ({r['wins']}/{r['paired']} seeds)"]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    first = {}
    for r in runs:
        if "probe" in r:
            first.setdefault((r["setting"], r["backbone"], r["method"]), r)
    L.append("Decision-layer block norms of the first seed (‖W_m‖_F of each modality's block of the first layer "
             "that reads the features: the concat classifier, the Transformer head's first layer, or the "
             "per-modality heads of iibalance/decision); unimodal test accuracy of the reference encoders; "
             "iibalance: fraction of training steps on which the alignment loss was active per modality.\n")
    L.append("| setting | backbone | method | seed | layer | " + " | ".join(f"‖W_{n}‖" for n in names)
             + " | " + " | ".join(f"uni acc {n}" for n in names) + " | alignment active |")
    L.append("|" + "---|" * (6 + 2 * len(names)))
    for (setting, backbone, method), r in first.items():
        p = r["probe"]
        bn = p["block_norms"]
        rate = p.get("align_trigger_rate")
        L.append(f"| {setting} | {backbone} | {method} | {r['seed']} | {bn['layer'] or '–'} | "
                 + " | ".join(f"{x:.3f}" for x in bn["norms"]) + " | "
                 + " | ".join(f"{x:.3f}" for x in p["unimodal_accuracy"]) + " | "
                 + ("–" if rate is None else ", ".join(f"{x:.2f}" for x in rate)) + " |")
    L.append("")
    return L


# --------------------------------------------------------------- the grid
def _load_data(args, setting: str) -> Dict[str, MultimodalDataset]:
    if args.data == "synthetic":
        return make_benchmark(setting, seed=args.data_seed, n_train=args.n_train, n_val=args.n_val,
                              n_test=args.n_test, num_classes=args.num_classes)
    kind, _, path = args.data.partition(":")
    loaders = {"mosi": load_mosi, "mosei": load_mosei, "cremad": load_cremad}
    if kind not in loaders or not path:
        raise ValueError(f"--data must be 'synthetic' or one of mosi:PATH, mosei:PATH, cremad:PATH; got {args.data!r}")
    return loaders[kind](path)


def _agg(values: Sequence[float]) -> Dict[str, float]:
    t = torch.tensor([v for v in values if v == v], dtype=torch.float64)
    if t.numel() == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(t.mean()), "std": float(t.std()) if t.numel() > 1 else 0.0, "n": int(t.numel())}


def _fmt(a: Dict[str, float], nd: int = 4, signed: bool = False) -> str:
    if a["n"] == 0:
        return "–"
    return f"{a['mean']:{'+' if signed else ''}.{nd}f}" + (f" ± {a['std']:.{nd}f}" if a["n"] > 1 else "")


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s)


def run_train(args) -> int:
    """CLI entry (``vgmr-fast train``): run :func:`train_grid`; returns the exit status 0."""
    train_grid(args)
    return 0


def train_grid(args) -> Dict:
    """Run the whole grid described by ``args`` (see :func:`add_train_arguments`), write
    ``results.md``, ``results.json`` and the plots to ``args.out``, and return the results dict."""
    from tqdm.auto import tqdm

    args = _apply_quick(args)
    for m in args.methods:
        parse_method(m)
    for b in args.backbones:
        if b not in BACKBONES:
            raise ValueError(f"--backbones: unknown backbone {b!r} (choose from {BACKBONES})")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if not args.seeds:
        raise ValueError("--seeds must name at least one seed")
    _check_objective_arguments(args)
    _init_distributed(args)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _train_grid(args)
    finally:
        torch.set_num_threads(threads_before)  # leave the caller's process as it was


def _train_grid(args) -> Dict:
    from tqdm.auto import tqdm

    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    settings = args.settings if args.data == "synthetic" else [args.data.split(":")[0]]
    datasets = {s: _load_data(args, s) for s in settings}
    n_runs = len(settings) * len(args.backbones) * len(args.methods) * len(args.seeds)
    total_steps = sum(math.ceil(len(datasets[s]["train"]) / args.batch_size) * args.epochs
                      for s in settings) * len(args.backbones) * len(args.methods) * len(args.seeds)
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=args.no_progress, dynamic_ncols=True)
    runs: List[Dict] = []
    plots: List[str] = []
    budget_cache: Dict = {}
    first_models: Dict[Tuple[str, str, str], nn.Module] = {}
    probe_refs: Dict = {}
    for setting in settings:
        data = datasets[setting]
        stats = data["train"].feature_stats()
        noise_seeds = list(range(max(1, args.noise_seeds)))
        for backbone in args.backbones:
            for method in args.methods:
                for seed in args.seeds:
                    bar.set_description(f"{setting}/{backbone}/{method}/s{seed}")
                    t0 = time.time()
                    model, info = build_model(backbone, method, data["train"], data["val"], args, seed, budget_cache)
                    hist = train_one(model, method, data, args, seed, bar)
                    t_train = time.time() - t0
                    test = A.evaluate(model, data["test"])
                    removal = A.modality_removal(model, data["test"])
                    sweep_r = A.noise_sweep(model, data["test"], stats, args.noise_ratios, "ratio",
                                            args.noise_weight, noise_seeds)
                    sweep_w = A.noise_sweep(model, data["test"], stats, args.noise_weights, "weight",
                                            args.noise_ratio, noise_seeds)
                    run = {"setting": setting, "backbone": backbone, "method": method, "seed": seed,
                           "test": test, "removal": removal, "noise_ratio": sweep_r, "noise_weight": sweep_w,
                           "history": hist, "train_seconds": t_train, **info}
                    if seed == args.seeds[0]:
                        first_models[(setting, backbone, method)] = model
                    if _is_vgmr(model):  # every seed: cheap, and comparisons of methods need the spread
                        run["value_gate"] = A.value_gate_shift(model, data["test"], target=0, ratio=0.3,
                                                               weight=args.gate_noise_weight, stats=stats,
                                                               seed=seed)
                    runs.append(run)
                    if _probing(args, setting):
                        run["probe"] = _probe_run(model, data, _probe_reference(probe_refs, setting, data, backbone,
                                                                                args, seed))
    bar.close()
    analyses = _first_seed_analyses(args, datasets, first_models, plots)
    summary = _summarize(args, runs)
    _plots(args, runs, summary, plots)
    elapsed = time.time() - t_start
    result = {"config": {k: v for k, v in vars(args).items() if not callable(v) and not k.startswith("_")},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": torch.get_num_threads(), "machine": platform.machine(),
                              "world_size": _world()[1]},
              "elapsed_seconds": elapsed, "n_runs": n_runs, "summary": summary, "analyses": analyses,
              "probes": _probe_summary(runs), "runs": runs, "plots": [os.path.basename(p) for p in plots]}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(_markdown(args, summary, analyses, runs, elapsed, plots))
    if not args.no_progress:
        print(f"wrote {os.path.join(args.out, 'results.md')} ({elapsed:.0f} s)")
    return result


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _first_seed_analyses(args, datasets, models, plots) -> Dict:
    """Decision-layer diagnostics and refinement heatmaps on the first seed's models."""
    out: Dict = {"decision": {}, "refinement": {}}
    seed = args.seeds[0]
    for setting, data in datasets.items():
        test = data["test"]
        xs, masks, y = test.full()
        # decision layer: every concat model, and unimodal concat models for comparison
        concat_models = {meth: mdl for (s, b, meth), mdl in models.items() if s == setting and b == "concat"}
        if concat_models:
            uni_diags = {}
            uni_rows = []
            for m, name in enumerate(test.names):
                umodel, utest = _train_unimodal(data, m, args, seed)
                uxs, umasks, uy = utest.full()
                with torch.no_grad():
                    ud = decision_diagnostics(umodel, umodel.encode(uxs, umasks), uy, [name])
                uni_diags[name] = ud
                uni_rows.append({"modality": name, "accuracy": float(ud["accuracy"][0]),
                                 "weight_norm": float(ud["weight_norm"][0]),
                                 "feature_norm": float(ud["feature_norm"][0].mean())})
            out["decision"][setting] = {"unimodal": uni_rows, "multimodal": {}}
            for meth, mdl in concat_models.items():
                mdl.eval()
                with torch.no_grad():
                    diag = decision_diagnostics(mdl, mdl.encode(xs, masks), y, test.names)
                out["decision"][setting]["multimodal"][meth] = {"mode": diag["mode"],
                                                                "rows": summarize_diagnostics(diag)}
                p = os.path.join(args.out, f"decision_{_safe(setting)}_concat_{_safe(meth)}.png")
                plots.append(plot_decision_diagnostics(
                    diag, p, uni_diags if diag["mode"] == "linear" else None,
                    title=f"decision layer: {setting}, concat, {meth}"))
        # refinement difference for VGMR models
        for (s, b, meth), mdl in models.items():
            if s != setting or not _is_vgmr(mdl):
                continue
            ref = _core(mdl).refiner
            # show a sample whose inputs were corrupted, when the data records one
            corrupted = test.meta.get("corrupted")
            idx = 0
            if isinstance(corrupted, torch.Tensor) and corrupted.any():
                idx = int(corrupted.any(1).nonzero()[0])
            one = test.batch(torch.tensor([idx]))
            res = A.refinement_difference(ref, one[0], one[1])
            split_supp = A.refinement_over_split(_core(mdl), test)
            out["refinement"][f"{s}/{b}/{meth}"] = {
                "names": test.names, "sample_index": idx, "sample": res["suppression"][0].tolist(),
                "mean": split_supp.mean(0).tolist()}
            p = os.path.join(args.out, f"refinement_{_safe(s)}_{_safe(b)}_{_safe(meth)}.png")
            plots.append(A.plot_refinement([d[0] for d in res["diff"]], test.names, p, res["suppression"][0],
                                           split_supp.mean(0), title=f"VGMR refinement: {s}, {b}, {meth}, test sample {idx}"))
    return out


def _summarize(args, runs: List[Dict]) -> List[Dict]:
    groups: Dict[Tuple[str, str, str], List[Dict]] = {}
    for r in runs:
        groups.setdefault((r["setting"], r["backbone"], r["method"]), []).append(r)
    rows = []
    for (setting, backbone, method), rs in groups.items():
        row = {"setting": setting, "backbone": backbone, "method": method, "seeds": [r["seed"] for r in rs],
               "accuracy": _agg([r["test"]["accuracy"] for r in rs]),
               "macro_f1": _agg([r["test"]["macro_f1"] for r in rs]),
               "train_seconds": _agg([r["train_seconds"] for r in rs]),
               "step_seconds": _agg([r["history"]["step_seconds"] for r in rs]),
               "best_epoch": [r["history"]["best_epoch"] for r in rs]}
        row["removal"] = {}
        for j, cond in enumerate(rs[0]["removal"]):
            if cond["removed"] is None:
                continue
            row["removal"][cond["removed"]] = {
                "accuracy": _agg([r["removal"][j]["accuracy"] for r in rs]),
                "delta": _agg([r["removal"][j]["delta"] for r in rs])}
        for key in ("noise_ratio", "noise_weight"):
            vals = rs[0][key]["values"]
            per_point = [[a for r in rs for a in r[key]["accuracy"][k]] for k in range(len(vals))]
            aggs = [_agg(p) for p in per_point]
            row[key] = {"values": vals, "vary": rs[0][key]["vary"], "fixed": rs[0][key]["fixed"],
                        "mean": [a["mean"] for a in aggs], "std": [a["std"] if a["n"] > 1 else 0.0 for a in aggs]}
        cos = [c for r in rs for c in r["history"]["cosine"] if c == c]
        row["cosine"] = {"mean": _agg(cos)["mean"], "std": _agg(cos)["std"],
                         "mean_abs": _agg([abs(c) for c in cos])["mean"],
                         "step_std": _agg([abs(b - a) for r in rs for a, b in
                                           zip(r["history"]["cosine"], r["history"]["cosine"][1:])])["mean"]}
        rows.append(row)
    return rows


def _plots(args, runs, summary, plots):
    keys = sorted({(r["setting"], r["backbone"]) for r in summary})
    for setting, backbone in keys:
        rows = [r for r in summary if r["setting"] == setting and r["backbone"] == backbone]
        tag = f"{_safe(setting)}_{_safe(backbone)}"
        for key in ("noise_ratio", "noise_weight"):
            curves = {r["method"]: r[key] for r in rows}
            fixed = rows[0][key]["fixed"]
            other = "weight" if key == "noise_ratio" else "ratio"
            plots.append(A.plot_noise_sweep(curves, os.path.join(args.out, f"{key}_{tag}.png"),
                                            title=f"{setting}, {backbone} ({other} {fixed:g})"))
        seed0 = args.seeds[0]
        curves = {r["method"]: (r["history"]["cos_step"], r["history"]["cosine"]) for r in runs
                  if r["setting"] == setting and r["backbone"] == backbone and r["seed"] == seed0
                  and r["history"]["cosine"]}
        if curves:
            plots.append(A.plot_curves(curves, os.path.join(args.out, f"grad_cosine_{tag}.png"), "epoch",
                                       "cos(∇L_all, ∇L_first-modality)", f"gradient cosine: {setting}, {backbone}",
                                       hline=0.0))
        curves = {}
        for r in runs:
            if r["setting"] == setting and r["backbone"] == backbone and r["seed"] == seed0:
                ep = list(range(1, len(r["history"]["val_loss"]) + 1))
                curves[f"{r['method']} val"] = (ep, r["history"]["val_loss"])
        plots.append(A.plot_curves(curves, os.path.join(args.out, f"val_loss_{tag}.png"), "epoch",
                                   "validation loss", f"validation loss: {setting}, {backbone}"))


def _markdown(args, summary, analyses, runs, elapsed, plots) -> str:
    L: List[str] = []
    L.append("# vgmr-fast train: results\n")
    command = _command_line()
    if command:
        L.append(f"Produced by: `{command}`\n")
    seeds = ",".join(map(str, args.seeds))
    L.append(f"Data: `{args.data}`; settings {', '.join(args.settings) if args.data == 'synthetic' else '-'}; "
             f"seeds {seeds}; {args.epochs} epochs, batch {args.batch_size}, "
             f"{getattr(args, 'optimizer', 'adamw')} lr {args.lr}; n_train/val/test {args.n_train}/{args.n_val}/"
             f"{args.n_test}; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; wall time {elapsed:.0f} s. "
             "Test metrics of the best-validation checkpoint; mean ± std over seeds where there are several.\n")
    names = None
    for r in runs:
        names = [c["removed"] for c in r["removal"] if c["removed"]]
        break
    names = names or []
    L.append("## Accuracy, macro-F1, modality removal, noise robustness\n")
    rr = args.noise_ratios
    hi_r = max(rr) if rr else None
    hi_w = max(args.noise_weights) if args.noise_weights else None
    head = ["setting", "backbone", "method", "acc", "macro-F1"] + [f"w/o {n} (Δ)" for n in names]
    head += [f"acc @ noise ratio {hi_r:g}", f"acc @ noise weight {hi_w:g}", "train s"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for r in summary:
        cells = [r["setting"], r["backbone"], r["method"], _fmt(r["accuracy"]), _fmt(r["macro_f1"])]
        for n in names:
            rm = r["removal"].get(n)
            cells.append("–" if rm is None else f"{rm['accuracy']['mean']:.4f} ({rm['delta']['mean']:+.4f})")
        nr, nw = r["noise_ratio"], r["noise_weight"]
        cells.append(f"{nr['mean'][nr['values'].index(hi_r)]:.4f}" if hi_r is not None else "–")
        cells.append(f"{nw['mean'][nw['values'].index(hi_w)]:.4f}" if hi_w is not None else "–")
        cells.append(f"{r['train_seconds']['mean']:.1f}")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    # verdict
    L.extend(_probe_markdown(runs))
    L.append("## VGMR vs. the bare backbone (\"Concat\" in the paper's tables)\n")
    L.append("Paired by training seed (same data, same seed): Δ = VGMR − bare backbone.\n")
    for setting in dict.fromkeys(r["setting"] for r in summary):
        for backbone in dict.fromkeys(r["backbone"] for r in summary):
            def per_seed(method):
                return {r["seed"]: r for r in runs if r["setting"] == setting and r["backbone"] == backbone
                        and r["method"] == method}
            base, vg = per_seed("none"), per_seed("vgmr")
            seeds = sorted(set(base) & set(vg))
            if not seeds:
                continue
            d_acc = [vg[s]["test"]["accuracy"] - base[s]["test"]["accuracy"] for s in seeds]
            d_f1 = [vg[s]["test"]["macro_f1"] - base[s]["test"]["macro_f1"] for s in seeds]
            d_noise = [sum(v - b for v, b in zip(sum(vg[s]["noise_ratio"]["accuracy"], []),
                                                 sum(base[s]["noise_ratio"]["accuracy"], [])))
                       / max(1, len(sum(base[s]["noise_ratio"]["accuracy"], []))) for s in seeds]
            a, f, nz = _agg(d_acc), _agg(d_f1), _agg(d_noise)
            wins = sum(d > 0 for d in d_acc)
            if a["mean"] > 0 and (a["n"] < 2 or a["mean"] > a["std"] / math.sqrt(a["n"]) * 2):
                verdict = "beats" if a["n"] > 1 else "beats (one seed: not conclusive)"
            elif a["mean"] > 0:
                verdict = "is ahead within the seed noise of"
            elif a["mean"] == 0:
                verdict = "ties"
            else:
                verdict = "does not beat"
            L.append(f"- {setting}, {backbone}: VGMR {verdict} the bare backbone: Δacc {_fmt(a, signed=True)}, "
                     f"ΔF1 {_fmt(f, signed=True)}, better on {wins}/{len(seeds)} seeds; "
                     f"mean Δacc over the noise-ratio sweep {_fmt(nz, signed=True)}.")
    L.append("")
    L.append("## Noise-robustness sweeps (test accuracy, mean over training seeds × noise draws)\n")
    for key, label in (("noise_ratio", "ratio"), ("noise_weight", "weight")):
        vals = summary[0][key]["values"] if summary else []
        fixed = summary[0][key]["fixed"] if summary else 0
        other = "weight" if label == "ratio" else "ratio"
        L.append(f"Noise {label} sweep ({other} {fixed:g}, all modalities, per-feature train mean/std):\n")
        L.append("| setting | backbone | method | " + " | ".join(f"{v:g}" for v in vals) + " |")
        L.append("|" + "---|" * (3 + len(vals)))
        for r in summary:
            L.append(f"| {r['setting']} | {r['backbone']} | {r['method']} | "
                     + " | ".join(f"{m:.4f}" for m in r[key]["mean"]) + " |")
        L.append("")
    vg_runs = [r for r in runs if "value_gate" in r and r["seed"] == args.seeds[0]]
    if vg_runs:
        L.append("## VGMR value and gate statistics (Table 4.4 analogue)\n")
        L.append("Test split, clean vs. 30 % of the first (dominant) modality's steps replaced by Gaussian "
                 f"noise (train mean, {args.gate_noise_weight:g} × train std); mean ± sample std over test samples; "
                 "first seed.\n")
        L.append("| setting | backbone | method | modality | condition | global value | channel value | "
                 "channel std | gate |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in vg_runs:
            vgs = r["value_gate"]
            for name in vgs["clean"]:
                for cond in ("clean", "noisy"):
                    st = vgs[cond][name]
                    cells = [f"{st[k]['mean']:.3f} ± {st[k]['std']:.3f}" if k in st else "–"
                             for k in ("global_value", "channel_value", "channel_std", "gate")]
                    L.append(f"| {r['setting']} | {r['backbone']} | {r['method']} | {name} | "
                             f"{cond}{' (corrupted)' if cond == 'noisy' and name == vgs['target'] else ''} | "
                             + " | ".join(cells) + " |")
        L.append("")
    L.extend(_step_time_lines(args, summary))
    if analyses.get("decision"):
        L.append("## Decision-layer diagnostics (concat backbone, test split, first seed)\n")
        L.append("Per-modality logits `z_m = W_m h_m + b/M` (linear head) or the head with the other modalities "
                 "zeroed (non-linear heads); share = mean ‖W_m h_m‖ / Σ_k ‖W_k h_k‖; φ = Shapley value on "
                 "accuracy over modality subsets.\n")
        L.append("| setting | model | modality | acc(z_m) | ‖W_m‖_F | mean ‖h_m‖ | share | Shapley φ |")
        L.append("|---|---|---|---|---|---|---|---|")
        for setting, d in analyses["decision"].items():
            for meth, md in d["multimodal"].items():
                for row in md["rows"]:
                    wn = "–" if row["weight_norm"] is None else f"{row['weight_norm']:.3f}"
                    L.append(f"| {setting} | {meth} ({md['mode']}) | {row['modality']} | {row['accuracy']:.4f} | "
                             f"{wn} | {row['feature_norm']:.3f} | {row['share']:.3f} | {row['shapley']:+.4f} |")
            for row in d["unimodal"]:
                L.append(f"| {setting} | unimodal training | {row['modality']} | {row['accuracy']:.4f} | "
                         f"{row['weight_norm']:.3f} | {row['feature_norm']:.3f} | 1.000 | – |")
        L.append("")
    budget_rows = [r for r in runs if "budgets" in r]
    if budget_rows:
        L.append("## IIBalance budgets (unimodal probes, validation split)\n")
        L.append("| setting | backbone | seed | " + " | ".join(f"b/π {n}" for n in budget_rows[0]["budgets"]["names"])
                 + " | anchor | gate κ |")
        L.append("|" + "---|" * (5 + len(budget_rows[0]["budgets"]["names"])))
        for r in budget_rows:
            b = r["budgets"]
            cal = r["history"].get("gate_calibration", {})
            L.append(f"| {r['setting']} | {r['backbone']} | {r['seed']} | "
                     + " | ".join(f"{x:.3f}/{p:.3f}" for x, p in zip(b["budgets"], b["prior"]))
                     + f" | {b['anchor']} | {cal.get('kappa', '–')} |")
        L.append("")
    L.append("## Gradient cosine (first modality alone vs. all, shared parameters, validation batch)\n")
    L.append("| setting | backbone | method | mean cos | std | mean |cos| | mean |Δcos| between checkpoints |")
    L.append("|---|---|---|---|---|---|---|")
    for r in summary:
        c = r["cosine"]
        if not c["mean"] == c["mean"]:  # NaN: own heads (iibalance/decision), not computed
            continue
        L.append(f"| {r['setting']} | {r['backbone']} | {r['method']} | {c['mean']:.3f} | {c['std']:.3f} | "
                 f"{c['mean_abs']:.3f} | {c['step_std']:.3f} |")
    L.append("")
    if analyses.get("refinement"):
        L.append("## VGMR refinement difference (suppression mean(relu(LN(X) − X̃)), test)\n")
        L.append("| run | " + " | ".join(f"{n} (sample / mean)" for n in
                                          next(iter(analyses['refinement'].values()))["names"]) + " |")
        L.append("|" + "---|" * (1 + len(next(iter(analyses['refinement'].values()))["names"])))
        for k, v in analyses["refinement"].items():
            L.append(f"| {k} | " + " | ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(v["sample"], v["mean"])) + " |")
        L.append("")
    L.append("## Plots\n")
    for p in plots:
        L.append(f"- `{os.path.basename(p)}`")
    L.append("")
    return "\n".join(L)


def _step_time_lines(args, summary) -> List[str]:
    """Training-step time per method and its ratio to the bare backbone (same setting and backbone)."""
    base = {(r["setting"], r["backbone"]): r["step_seconds"]["mean"] for r in summary if r["method"] == "none"}
    L = ["## Training-step time\n",
         f"Mean wall time of one optimisation step (forward, objective, backward, optimiser; no evaluation), "
         f"batch {args.batch_size}, VGMR backend `{getattr(args, 'backend', 'auto')}`, value fraction "
         f"{getattr(args, 'value_fraction', 1.0):g} unless the method says `vgmr@RHO`, value every "
         f"{getattr(args, 'value_every', 1)} step(s); ratio to the bare backbone's step.\n",
         "| setting | backbone | method | step ms | × bare backbone |", "|---|---|---|---|---|"]
    for r in summary:
        b = base.get((r["setting"], r["backbone"]))
        ratio = f"{r['step_seconds']['mean'] / b:.2f}" if b else "–"
        L.append(f"| {r['setting']} | {r['backbone']} | {r['method']} | {1e3 * r['step_seconds']['mean']:.2f} | "
                 f"{ratio} |")
    L.append("")
    return L


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Stand-alone entry point: ``python -m vgmr_fast.train [options]``."""
    parser = add_train_arguments(argparse.ArgumentParser(prog="vgmr-fast train", description=__doc__.split("\n")[0]))
    return train_grid(parser.parse_args(argv))


if __name__ == "__main__":
    main()
