"""End-to-end level: the paper's Table 7 on this machine (docs/math.md §8).

Transformer backbone (``vgmr_fast.models.Transformer``: 4 heads, 2 layers, ``d_model`` chosen -- a
multiple of 16 -- so that the bare backbone has about the paper's 0.72M parameters; the paper's ratios
depend on how big the backbone is next to the refiner) at the MOSEI-like size, binary labels, with:
bare; Concat+MLP, Sigmoid+Tanh gate and cross-attention refiners, each parameter-matched to the
VGMR refiner (``make_refiner(kind, widths, target_params=param_count(VGMR))``); the reference VGMR
(eager, ``dropout_rng="torch"``); the reference VGMR under ``torch.compile`` (the refiner module
compiled); the fused VGMR per backend. Also the Concat backbone: bare, reference VGMR, fused VGMR.

Training step = ``zero_grad`` + forward + loss + backward + ``Adam.step``; for VGMR rows the loss is
``vgmr_objective`` (task + value supervision, whose M+1 backbone passes without gradient are part
of the step), for the others cross entropy. The fused rows are repeated with
``vgmr_objective(..., value_fraction=0.25)`` (the cheaper value pass; training only). A row that
cannot be built here is printed in its table as unavailable, with the reason. Inference = eval
mode, ``torch.inference_mode``, one batch. Every figure is also given as a ratio to the bare
backbone, beside the paper's ratios.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference as ref
from ..models import Concat, Transformer, make_refiner, param_count
from ..objective import vgmr_objective
from . import backends
from .common import Ctx, Skip, Task, compiled, fused_peers, record, run_group, short_exc
from .settings import Setting, make_batch
from .timing import Rotator, rotation_count

# docs/math.md §8 (MOSEI, Transformer backbone, Table 7): params (M), train/epoch (s), inference/batch (ms)
PAPER = {
    "bare": (0.72, 4.26, 1.17),
    "mlp": (3.04, 4.82, 1.33),
    "gate": (3.07, 5.25, 1.46),
    "cross_attention": (3.06, 7.32, 2.86),
    "vgmr": (3.04, 10.01, 3.87),
}


def paper_ratios(kind: str) -> dict | None:
    if kind not in PAPER:
        return None
    p, t, i = PAPER[kind]
    p0, t0, i0 = PAPER["bare"]
    return {"params": p / p0, "train": t / t0, "infer": i / i0}


ROW_LABELS = {
    "bare": "bare backbone",
    "mlp": "+ Concat+MLP (param-matched)",
    "gate": "+ Sigmoid+Tanh gate (param-matched)",
    "cross_attention": "+ cross-attention (param-matched)",
    "vgmr-eager": "+ VGMR reference, eager",
    "vgmr-compile": "+ VGMR reference, torch.compile",
}


VALUE_FRACTION = 0.25  # the cheaper value-supervision pass measured beside the full one
_VF_SUFFIX = f"-vf{VALUE_FRACTION:g}"


def split_value_fraction(row: str):
    """``("vgmr-fused-cpu", 0.25)`` for ``"vgmr-fused-cpu-vf0.25"``; ``(row, None)`` otherwise."""
    if row.endswith(_VF_SUFFIX):
        return row[: -len(_VF_SUFFIX)], VALUE_FRACTION
    return row, None


def row_label(row: str) -> str:
    row, vf = split_value_fraction(row)
    if vf is not None:
        return f"{row_label(row)}, value_fraction {vf:g}"
    if row in ROW_LABELS:
        return ROW_LABELS[row]
    if row.startswith("vgmr-fused-"):
        return f"+ VGMR fused ({row[len('vgmr-fused-'):]})"
    return row


def paper_kind(row: str) -> str | None:
    if row in ("bare", "mlp", "gate", "cross_attention"):
        return row
    if row.startswith("vgmr"):
        return "vgmr"
    return None


PAPER_BARE_PARAMS = 0.72e6


def transformer_width(ctx: Ctx, s: Setting) -> int:
    """``d_model`` (multiple of 16, 32..512) whose bare Transformer is closest to the paper's 0.72M params."""
    key = ("e2e-dmodel", s.widths)
    if key not in ctx.cache:
        if ctx.tiny:
            ctx.cache[key] = 16
        else:
            best = min(range(32, 513, 16),
                       key=lambda dm: abs(param_count(Transformer(list(s.widths), 2, d_model=dm)) - PAPER_BARE_PARAMS))
            ctx.cache[key] = best
    return ctx.cache[key]


def build_model(ctx: Ctx, s: Setting, backbone: str, row: str):
    row, _ = split_value_fraction(row)
    widths = list(s.widths)
    torch.manual_seed(0)
    vgmr_ref = ref.VGMR(widths, s.d)
    vgmr_ref.dropout_rng = "torch"
    target = param_count(vgmr_ref)
    refiner = None
    if row == "bare":
        pass
    elif row in ("mlp", "gate", "cross_attention"):
        refiner = make_refiner(row, widths, target_params=target)
    elif row == "vgmr-eager":
        refiner = vgmr_ref
    elif row == "vgmr-compile":
        refiner = compiled(vgmr_ref)
    elif row.startswith("vgmr-fused-"):
        try:
            refiner = backends.fused_module(widths, s.d, row[len("vgmr-fused-"):])
        except RuntimeError as exc:
            raise Skip(str(exc)) from exc
        refiner.load_state_dict(vgmr_ref.state_dict())
    else:
        raise ValueError(row)
    torch.manual_seed(1)
    if backbone == "transformer":
        model = Transformer(widths, num_classes=2, d_model=transformer_width(ctx, s), refiner=refiner)
    else:
        model = Concat(widths, num_classes=2, refiner=refiner)
    model = model.to(device=ctx.device, dtype=s.torch_dtype)
    return model, row.startswith("vgmr")


def batches(ctx: Ctx, s: Setting):
    key = ("e2e-sets", s.name)
    if key in ctx.cache:
        return ctx.cache[key]
    gen = torch.Generator().manual_seed(7)
    sets = []
    xs, masks = make_batch(s, ctx.device, gen)
    set_bytes = sum(t.numel() * t.element_size() for t in xs + masks)
    for i in range(rotation_count(set_bytes, ctx.device)):
        if i:
            xs, masks = make_batch(s, ctx.device, gen)
        y = torch.randint(0, 2, (s.B,), generator=gen).to(ctx.device)
        sets.append((xs, masks, y))
    ctx.cache[key] = sets
    return sets


def measure(ctx: Ctx, s: Setting, backbone: str, rows: list) -> None:
    """All rows of one backbone: built once, then one comparison group per mode (train, infer)."""
    built = {}
    for row in rows:
        why = None
        try:
            model, is_vgmr = build_model(ctx, s, backbone, row)
            built[row] = (model, is_vgmr, torch.optim.Adam(model.parameters(), lr=1e-4), Rotator(batches(ctx, s)),
                          split_value_fraction(row)[1])
        except Skip as exc:
            why = str(exc)
        except Exception as exc:  # noqa: BLE001
            why = short_exc(exc)
        if why is not None:  # said in the table itself, not only in the skipped list
            ctx.skip(f"e2e {backbone} {row}", why)
            record(ctx, level="e2e", setting=s.name, shape=s.describe(), dtype=s.dtype, backbone=backbone, row=row,
                   label=row_label(row), mode="unavailable", peer=row, unavailable=why)

    def train_step(model, is_vgmr, opt, rot, vf):
        objective_kwargs = {} if vf is None else {"value_fraction": vf}

        def step():
            xs, masks, y = rot.next()
            opt.zero_grad(set_to_none=True)
            if is_vgmr:
                loss, _ = vgmr_objective(model, xs, masks, y, **objective_kwargs)
            else:
                loss = F.cross_entropy(model(xs, masks).float(), y)
            loss.backward()
            opt.step()
        return step

    def infer_step(model, rot):
        def step():
            xs, masks, _ = rot.next()
            with torch.inference_mode():
                return model(xs, masks)
        return step

    for mode in ("train", "infer"):
        builders = {}
        for row, (model, is_vgmr, opt, rot, vf) in built.items():
            if mode == "infer" and vf is not None:
                continue  # value_fraction changes the training objective only
            def build(model=model, is_vgmr=is_vgmr, opt=opt, rot=rot, vf=vf):
                model.train(mode == "train")
                step = train_step(model, is_vgmr, opt, rot, vf) if mode == "train" else infer_step(model, rot)
                return step, {"rotation_sets": len(rot)}
            builders[row] = build
        res = run_group(ctx, f"e2e {backbone} {mode}", builders, graph=(mode == "infer"), counts=True)
        for row, r in res.items():
            model = built[row][0]
            kind = paper_kind(row)
            record(ctx, level="e2e", setting=s.name, shape=s.describe(), dtype=s.dtype, backbone=backbone, row=row,
                   backbone_width=transformer_width(ctx, s) if backbone == "transformer" else model.hidden,
                   label=row_label(row), mode=mode, peer=row, params=param_count(model),
                   paper_kind=kind if backbone == "transformer" else None,
                   value_fraction=built[row][4] if built[row][4] is not None else 1.0, **r)


def rows_for(ctx: Ctx, backbone: str) -> list:
    fused = ["vgmr-" + p for p in fused_peers(ctx)]
    if backbone == "transformer":
        return (["bare", "mlp", "gate", "cross_attention", "vgmr-eager"]
                + (["vgmr-compile"] if ctx.compile else []) + fused + [f + _VF_SUFFIX for f in fused])
    return ["bare", "vgmr-eager"] + fused


def tasks(ctx: Ctx, s: Setting) -> list:
    return [Task(f"e2e {backbone}", (lambda b=backbone: measure(ctx, s, b, rows_for(ctx, b))), group=f"e2e/{s.name}")
            for backbone in ("transformer", "concat")]
