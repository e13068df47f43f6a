"""Scale level (``vgmr-fast bench --levels scale``, opt-in): VGMR beside the bare backbone as the
backbone, the sequence and the feature width grow. Every ratio is between peers timed interleaved in
the same run (``common.run_group``).

- **backbone**: ``vgmr_fast.models.Transformer`` (4 heads, FFN 2×d_model) from the paper's 2 × 176
  up; the MOSEI widths 768/74/35 with masks, the fused ``vgmr_fast.VGMR`` (d 128) as refiner. Training
  step (``zero_grad`` + ``vgmr_objective`` + backward + ``Adam.step``) per value-supervision schedule
  (``SCHEDULES``), inference (eval, ``inference_mode``) of bare and VGMR; × bare. A training call is
  one period of 4 optimiser steps for the ``value_every=4`` schedules (so each call holds exactly one
  supervised step), one step for the others; figures are per step.
- **sequence**: the layer alone (train step: forward + backward from fixed output gradients) at the
  MOSEI widths, T from 50 up with B·T about ``TOKENS``; eager reference, ``torch.compile`` of it
  (dynamic shapes: one compile for the sweep), fused. Time per token and peak memory per token
  (``memory.peak_memory``); the longest T that fits ``MEMORY_BUDGET`` at batch ``BUDGET_BATCH``,
  from the largest measured bytes per token (VGMR's memory is linear in B·T: no step attends to another).
- **width**: the layer alone with one modality of width D beside 74/35 (B 8, T 50): train and
  inference time, parameters, training peak memory; full-rank gate and low-rank gate ``gate_rank=r``
  (reference, fused: the fused rows need a ``vgmr_fast.VGMR`` that takes ``gate_rank``,
  ``fused_takes_gate_rank``), and the raw-gate GEMM alone (``X W_rᵀ`` forward +
  backward, the FLOPs the low-rank gate removes) for the share of the layer's step it takes.

Grids: ``GRIDS`` (``quick``, ``default``; ``large`` for a GPU, ``--scale-grid large``); a size left out
of the grid that runs, or needing more memory than is free, is reported as skipped with the reason.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F

from .. import reference as ref
from ..inputs import parse_gate_rank
from ..models import Transformer, param_count
from ..objective import vgmr_objective
from . import backends
from .common import Ctx, Skip, Task, record, run_group
from .settings import make_masks
from .timing import Rotator

WIDTHS = (768, 74, 35)  # the MOSEI text/audio/vision widths
D_LATENT = 128
DROPOUT = 0.1
#: name -> (value_fraction, value_every); ``bare`` is the backbone without VGMR
SCHEDULES = {"bare": None, "rho1": (1.0, 1), "rho0.25": (0.25, 1), "every4": (1.0, 4),
             "rho0.25+every4": (0.25, 4)}
TOKENS = 4096  # B·T of the sequence sweep
MEMORY_BUDGET = 16 * 2**30  # bytes, the sequence sweep's budget (a 16 GiB accelerator or host share)
BUDGET_BATCH = 16
RANKS = (64, 256)

#: backbone (layers, d_model) and batch; sequence lengths; widths
GRIDS = {
    "tiny": {"backbones": [(1, 16)], "B": 2, "T": 4, "seq": [4, 8], "tokens": 16,
             "widths": [40], "ranks": (4,), "width_B": 2, "width_T": 4},
    "quick": {"backbones": [(2, 176), (4, 384)], "B": 4, "T": 50, "seq": [50, 400, 1600], "tokens": TOKENS,
              "widths": [35, 768, 2048], "ranks": RANKS, "width_B": 4, "width_T": 50},
    "default": {"backbones": [(2, 176), (4, 384), (6, 544)], "B": 8, "T": 50, "seq": [50, 256, 1024, 4096],
                "tokens": TOKENS, "widths": [35, 256, 768, 2048, 4096], "ranks": RANKS, "width_B": 8, "width_T": 50},
    "large": {"backbones": [(2, 176), (4, 384), (6, 544), (12, 768), (24, 1024)], "B": 32, "T": 50,
              "seq": [50, 256, 1024, 4096, 16384], "tokens": 4 * TOKENS, "widths": [35, 256, 768, 2048, 4096, 8192],
              "ranks": RANKS, "width_B": 32, "width_T": 50},
}


def grid_name(ctx: Ctx, choice: str | None) -> str:
    return "tiny" if ctx.tiny else (choice or ("quick" if ctx.quick else "default"))


def _free_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _check_fits(ctx: Ctx, need: float) -> None:
    """Skip (with the estimate) a size whose estimated need exceeds 80 % of the free memory."""
    free = _free_bytes(ctx.device)
    if need > 0.8 * free:
        raise Skip(f"skipped: needs {need / 2**30:.1f} GiB (estimate), {free / 2**30:.1f} GiB free")


def _dtype(ctx: Ctx) -> torch.dtype:
    return torch.bfloat16 if ctx.device == "cuda" else torch.float32


def _inputs(ctx: Ctx, B: int, T: int, widths, seed: int, sets: int = 2, grads: bool = False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sets):
        xs = [torch.randn(B, T, D, generator=gen).to(device=ctx.device, dtype=_dtype(ctx)) for D in widths]
        masks = make_masks(B, T, len(widths), ctx.device, gen)
        extra = ([torch.randn(x.shape, generator=gen).to(device=ctx.device, dtype=x.dtype) for x in xs] if grads
                 else torch.randint(0, 2, (B,), generator=gen).to(ctx.device))
        out.append((xs, masks, extra))
    return out


# ------------------------------------------------------------------------------ backbone size
def backbone_params(layers: int, d_model: int) -> int:
    return param_count(Transformer(list(WIDTHS), 2, d_model=d_model, num_layers=layers))


def _backbone_need(layers: int, d_model: int, B: int, T: int) -> float:
    """Bytes estimate of a training step: fp32 weights, gradients and Adam's two moments, the VGMR
    removal pass's (M+1)·B rows, ~30 activations of d_model per token and layer, attention maps."""
    M, S = len(WIDTHS), len(WIDTHS) * T
    rows = (M + 2) * B
    return 16 * backbone_params(layers, d_model) + 4 * rows * S * layers * (30 * d_model + 3 * 4 * S)


def measure_backbone(ctx: Ctx, grid: dict, layers: int, d_model: int) -> None:
    B, T = grid["B"], grid["T"]
    size = f"{layers}x{d_model}"
    _check_fits(ctx, _backbone_need(layers, d_model, B, T))
    sets = _inputs(ctx, B, T, WIDTHS, seed=layers * 1000 + d_model)
    models = {}
    for row, sched in SCHEDULES.items():
        torch.manual_seed(0)
        refiner = None
        if sched is not None:
            if not ctx.backends:
                raise Skip("no fused backend runs here")
            refiner = backends.fused_module(list(WIDTHS), D_LATENT, ctx.backends[0], dropout=DROPOUT)
        torch.manual_seed(1)
        model = Transformer(list(WIDTHS), 2, d_model=d_model, num_layers=layers, refiner=refiner)
        models[row] = model.to(device=ctx.device, dtype=_dtype(ctx))
    bare_params = param_count(models["bare"])

    def train_builder(row):
        model, sched = models[row], SCHEDULES[row]
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        rot = Rotator(sets)
        per_call = 4 if sched is not None and sched[1] > 1 else 1
        counter = [0]

        def step():
            for _ in range(per_call):
                xs, masks, y = rot.next()
                opt.zero_grad(set_to_none=True)
                if sched is None:
                    loss = F.cross_entropy(model(xs, masks).float(), y)
                else:
                    loss, _ = vgmr_objective(model, xs, masks, y, value_fraction=sched[0], value_every=sched[1],
                                             step=counter[0])
                counter[0] += 1
                loss.backward()
                opt.step()

        def build():
            model.train()
            return step, {"steps_per_call": per_call, "rotation_sets": len(rot)}
        return build

    def infer_builder(row):
        model, rot = models[row], Rotator(sets)

        def step():
            xs, masks, _ = rot.next()
            with torch.inference_mode():
                return model(xs, masks)

        def build():
            model.eval()
            return step, {"steps_per_call": 1, "rotation_sets": len(rot)}
        return build

    for mode, rows, builder in (("train", list(SCHEDULES), train_builder), ("infer", ["bare", "rho1"], infer_builder)):
        res = run_group(ctx, f"scale backbone {size} {mode}", {r: builder(r) for r in rows}, graph=(mode == "infer"))
        base = res.get("bare")
        for row, r in res.items():
            per_step = r["timing"].median / r["steps_per_call"]
            rec = record(ctx, level="scale", part="backbone", size=size, layers=layers, d_model=d_model, B=B, T=T,
                         mode=mode, peer=row, params=param_count(models[row]), backbone_params=bare_params, **r)
            rec["step_s"] = per_step
            rec["x_bare"] = per_step / (base["timing"].median / base["steps_per_call"]) if base else None


# ------------------------------------------------------------------------------ layer peers
def fused_takes_gate_rank() -> bool:
    """Whether the installed fused module takes ``gate_rank`` (then the width table gets fused rows)."""
    try:
        from vgmr_fast.vgmr import VGMR
    except Exception:  # noqa: BLE001
        return False
    return "gate_rank" in inspect.signature(VGMR.__init__).parameters


def _layer_module(ctx: Ctx, widths, peer: str):
    """``(callable, module)``: ``reference[-rR]``, ``compile`` (of the reference), ``fused[-rR]``."""
    base, _, rank = peer.partition("-r")
    gate_rank = int(rank) if rank else None
    torch.manual_seed(0)
    refm = ref.VGMR(list(widths), D_LATENT, dropout=DROPOUT, gate_rank=gate_rank)
    refm.dropout_rng = "torch"
    refm = refm.to(device=ctx.device, dtype=_dtype(ctx))
    if base == "reference":
        return refm, refm
    if base == "compile":
        return torch.compile(refm, dynamic=True), refm
    if base == "fused":
        if not ctx.backends:
            raise Skip("no fused backend runs here")
        extra = {} if gate_rank is None else {"gate_rank": gate_rank}
        try:
            mod = backends.fused_module(list(widths), D_LATENT, ctx.backends[0], dropout=DROPOUT, **extra)
        except RuntimeError as exc:
            raise Skip(str(exc)) from exc
        mod = mod.to(device=ctx.device, dtype=_dtype(ctx))
        mod.load_state_dict(refm.state_dict())
        return mod, mod
    raise ValueError(peer)


def _layer_builders(ctx: Ctx, widths, sets, peers, mode: str, modules: dict) -> dict:
    def builder(peer):
        def build():
            fn, mod = modules[peer] if peer in modules else modules.setdefault(peer, _layer_module(ctx, widths, peer))
            mod.train(mode == "train")
            params = list(mod.parameters())
            rot = Rotator(sets)

            def step():
                xs, masks, grads = rot.next()
                if mode == "infer":
                    with torch.inference_mode():
                        return fn(xs, masks)
                for p in params:
                    p.grad = None
                torch.autograd.backward(list(fn(xs, masks)), grads)
            return step, {"rotation_sets": len(rot)}
        return build
    return {p: builder(p) for p in peers}


def _layer_need(B: int, T: int, widths) -> float:
    """Bytes estimate of a layer training step: ~12 saved tensors of each width per step, weights ×3."""
    D_sum = sum(widths)
    weights = sum(D * D + 4 * D * D_LATENT for D in widths)
    return 4 * B * T * (12 * D_sum + 8 * D_LATENT * len(widths)) + 12 * weights


# ------------------------------------------------------------------------------ sequence length
def measure_sequence(ctx: Ctx, grid: dict, T: int) -> None:
    B = max(1, round(grid["tokens"] / T))
    _check_fits(ctx, _layer_need(B, T, WIDTHS))
    sets = _inputs(ctx, B, T, WIDTHS, seed=T, grads=True)
    peers = ["reference"] + (["compile"] if ctx.compile else []) + (["fused"] if ctx.backends else [])
    modules = ctx.cache.setdefault("scale-seq-modules", {})  # one compile for the whole sweep
    res = run_group(ctx, f"scale sequence T={T}", _layer_builders(ctx, WIDTHS, sets, peers, "train", modules),
                    memory=True)
    for peer, r in res.items():
        rec = record(ctx, level="scale", part="sequence", T=T, B=B, mode="train", peer=peer, **r)
        tokens = B * T
        rec["s_per_token"] = rec["median_s"] / tokens
        if rec.get("peak_bytes"):
            rec["bytes_per_token"] = rec["peak_bytes"] / tokens


def longest_T(records) -> dict:
    """Per peer: the longest T with ``BUDGET_BATCH × T × bytes/token <= MEMORY_BUDGET``, bytes/token the
    largest measured over the sweep (linear in B·T), rounded down to a multiple of 64."""
    out = {}
    for r in records:
        if r.get("level") == "scale" and r.get("part") == "sequence" and r.get("bytes_per_token"):
            out[r["peer"]] = max(out.get(r["peer"], 0.0), r["bytes_per_token"])
    return {p: int(MEMORY_BUDGET / (BUDGET_BATCH * b) // 64 * 64) for p, b in out.items()}


# ------------------------------------------------------------------------------ feature width
def gate_gemm_builder(ctx: Ctx, D: int, sets, mode: str):
    """The raw gate's GEMM alone (``X W_rᵀ``; in training also ``dX = dZ W_r`` and ``dW_r = dZᵀ X``)."""
    def build():
        torch.manual_seed(0)
        W = torch.nn.Linear(D, D, bias=False).weight.detach().to(device=ctx.device, dtype=_dtype(ctx))
        W.requires_grad_(mode == "train")
        leaves = [(x[0].detach().clone().requires_grad_(mode == "train"), g[0]) for x, _, g in sets]
        rot = Rotator(leaves)

        def step():
            x, g = rot.next()
            if mode == "infer":
                with torch.inference_mode():
                    return x @ W.t()
            W.grad = x.grad = None
            (x @ W.t()).backward(g)
        return step, {"rotation_sets": len(rot)}
    return build


def layer_params(D: int, gate_rank=None) -> dict:
    m = ref.VGMR([D, *WIDTHS[1:]], D_LATENT, gate_rank=gate_rank)
    gate = m.blocks[0].gate_raw
    return {"params": param_count(m), "gate_raw_params": param_count(gate)}


def width_peers(ctx: Ctx, D: int, ranks) -> list:
    """Full rank (reference, fused), low rank per r < D (reference; fused once it takes gate_rank)."""
    peers = ["reference"] + (["fused"] if ctx.backends else [])
    for r in ranks:
        if r < D:
            peers.append(f"reference-r{r}")
            if ctx.backends and fused_takes_gate_rank():
                peers.append(f"fused-r{r}")
    return peers + ["gate-gemm"]


def measure_width(ctx: Ctx, grid: dict, D: int) -> None:
    B, T = grid["width_B"], grid["width_T"]
    widths = (D, *WIDTHS[1:])
    _check_fits(ctx, _layer_need(B, T, widths))
    sets = _inputs(ctx, B, T, widths, seed=D, grads=True)
    peers = width_peers(ctx, D, grid["ranks"])
    if ctx.backends and not fused_takes_gate_rank():
        ctx.skip(f"scale width D={D} fused low-rank", "vgmr_fast.VGMR takes no gate_rank yet (reference rows only)")
    modules: dict = {}
    for mode in ("train", "infer"):
        builders = _layer_builders(ctx, widths, sets, [p for p in peers if p != "gate-gemm"], mode, modules)
        builders["gate-gemm"] = gate_gemm_builder(ctx, D, sets, mode)
        res = run_group(ctx, f"scale width D={D} {mode}", builders, memory=(mode == "train"))
        for peer, r in res.items():
            _, _, rank = peer.partition("-r")
            counts = layer_params(D, int(rank) if rank else None) if peer != "gate-gemm" else {}
            rec = record(ctx, level="scale", part="width", D=D, B=B, T=T, mode=mode, peer=peer,
                         gate_rank=int(rank) if rank else None, **counts, **r)
            rec["flops"] = layer_flops(D, int(rank) if rank else None, B * T, mode, peer == "gate-gemm")
    for mode in ("train", "infer"):
        rows = {r["peer"]: r for r in ctx.records if r.get("part") == "width" and r["D"] == D and r["mode"] == mode}
        full = rows.get("reference")
        for r in rows.values():
            if full and "median_s" in r:
                r["time_vs_full"] = r["median_s"] / full["median_s"]
                if r.get("params"):
                    r["params_vs_full"] = r["params"] / full["params"]
                if r.get("peak_bytes") and full.get("peak_bytes"):
                    r["mem_vs_full"] = r["peak_bytes"] / full["peak_bytes"]


def layer_flops(D: int, gate_rank, tokens: int, mode: str, gate_only: bool = False) -> float:
    """Multiply-add FLOPs (2 per MAC) of the per-step GEMMs of the width table's layer (the
    per-sample MLPs on ``B`` rows are negligible at T = 50); training = 3× the forward's."""
    d = D_LATENT
    if gate_only:
        per_token = 2 * D * D
    else:
        per_token = 0.0
        widths = (D, *WIDTHS[1:])
        for w, r in zip(widths, parse_gate_rank(gate_rank, None, list(widths))):  # r applies to every w > r
            g = 2 * w * w if r is None else 4 * w * r
            per_token += 2 * w * d + 2 * d * d + g + 2 * d * w  # P1, P2, W_r, W_h
    return per_token * tokens * (3 if mode == "train" else 1)


# ------------------------------------------------------------------------------ tasks, report
PARTS = ("backbone", "sequence", "width")


def tasks(ctx: Ctx, choice: str | None = None, parts=PARTS) -> list:
    name = grid_name(ctx, choice)
    grid = dict(GRIDS[name])
    for part, key in (("backbone", "backbones"), ("sequence", "seq"), ("width", "widths")):
        if part not in parts:
            ctx.skip(f"scale {part}", "left out by --scale-parts")
            grid[key] = []
    sctx = dataclasses.replace(ctx, min_blocks=min(ctx.min_blocks, 3), min_time=min(ctx.min_time, 0.2))
    out = [Task(f"scale backbone {L}x{dm}", (lambda L=L, dm=dm: measure_backbone(sctx, grid, L, dm)),
                group=f"scale/backbone/{L}x{dm}") for L, dm in grid["backbones"]]
    out += [Task(f"scale sequence T={T}", (lambda T=T: measure_sequence(sctx, grid, T)), group="scale/sequence")
            for T in grid["seq"]]
    out += [Task(f"scale width D={D}", (lambda D=D: measure_width(sctx, grid, D)), group=f"scale/width/{D}")
            for D in grid["widths"]]
    if name != "large" and tuple(parts) == PARTS:
        big = GRIDS["large"]
        left = ([f"backbone {L}x{dm}" for L, dm in big["backbones"] if (L, dm) not in grid["backbones"]]
                + [f"sequence T={T}" for T in big["seq"] if T not in grid["seq"]]
                + [f"width D={D}" for D in big["widths"] if D not in grid["widths"]])
        if left:
            ctx.skip(f"scale {name} grid: " + ", ".join(left), "skipped: in the large grid only "
                     "(--scale-grid large, sized for a GPU)")
    return out


def _fmt_ms(s) -> str:
    return "–" if s is None else f"{1e3 * s:.3g}"


def _fmt_x(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _fmt_mb(b) -> str:
    return "–" if not b else f"{b / 2**20:.1f}"


def _table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def render(records, skipped=()) -> str:
    recs = [r for r in records if r.get("level") == "scale" and "median_s" in r]
    if not recs and not skipped:
        return ""
    parts = []
    bb = [r for r in recs if r["part"] == "backbone"]
    if bb:
        rows = [[r["size"], f"{r['backbone_params'] / 1e6:.2f}M", r["mode"], r["peer"], _fmt_ms(r["step_s"]),
                 _fmt_x(r["x_bare"])] for r in bb]
        parts.append(f"== scale: backbone size (Transformer, widths {'/'.join(map(str, WIDTHS))}, B {bb[0]['B']}, "
                     f"T {bb[0]['T']}, fused VGMR d {D_LATENT}) ==\n"
                     + _table(["layers×d_model", "bare params", "mode", "schedule", "ms/step", "× bare"], rows))
    sq = [r for r in recs if r["part"] == "sequence"]
    if sq:
        rows = [[r["T"], r["B"], r["peer"], f"{1e6 * r['s_per_token']:.3g}", _fmt_mb(r.get("peak_bytes")),
                 f"{r['bytes_per_token'] / 1024:.1f}" if r.get("bytes_per_token") else "–"] for r in sq]
        fits = longest_T(records)
        parts.append(f"== scale: sequence length (layer train step, B·T ≈ {sq[0]['B'] * sq[0]['T']}) ==\n"
                     + _table(["T", "B", "peer", "µs/token", "peak MiB", "KiB/token"], rows)
                     + f"\n\nLongest T within {MEMORY_BUDGET / 2**30:g} GiB at B = {BUDGET_BATCH} (largest measured "
                     "bytes/token × B·T): " + ", ".join(f"{p} {t}" for p, t in fits.items()))
    wd = [r for r in recs if r["part"] == "width"]
    if wd:
        rows = []
        for r in wd:
            share = ""
            if r["peer"] == "gate-gemm":
                full = next((x for x in wd if x["D"] == r["D"] and x["mode"] == r["mode"] and x["peer"] == "reference"),
                            None)
                share = f"{r['median_s'] / full['median_s']:.0%} of reference" if full else ""
            rows.append([r["D"], r["mode"], r["peer"], _fmt_ms(r["median_s"]), _fmt_x(r.get("time_vs_full")),
                         f"{r['params'] / 1e6:.3g}M" if r.get("params") else "–",
                         _fmt_x(r.get("params_vs_full")), f"{r['flops'] / 1e9:.3g}",
                         _fmt_mb(r.get("peak_bytes")), share])
        parts.append(f"== scale: feature width (layer, widths D/{WIDTHS[1]}/{WIDTHS[2]}, B {wd[0]['B']}, "
                     f"T {wd[0]['T']}; -rR = gate_rank R) ==\n"
                     + _table(["D", "mode", "peer", "ms", "time vs full", "params", "params vs full", "GFLOP",
                               "peak MiB", "gate GEMM share"], rows))
    scale_skips = [s for s in skipped if s["what"].startswith("scale")]
    if scale_skips:
        parts.append("== scale: not measured ==\n" + "\n".join(f"- {s['what']}: {s['reason']}" for s in scale_skips))
    return "\n\n".join(parts)


def plot(path, records) -> bool:
    recs = [r for r in records if r.get("level") == "scale" and "median_s" in r]
    if not recs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    bb = [r for r in recs if r["part"] == "backbone"]
    for mode, peer in [("train", p) for p in SCHEDULES if p != "bare"] + [("infer", "rho1")]:
        rs = sorted((r for r in bb if r["mode"] == mode and r["peer"] == peer), key=lambda r: r["backbone_params"])
        if rs:
            axes[0].plot([r["backbone_params"] / 1e6 for r in rs], [r["x_bare"] for r in rs], marker="o",
                         linestyle="-" if mode == "train" else ":", label=f"{mode} {peer}")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bare Transformer parameters (M)")
    axes[0].set_ylabel("× bare backbone")
    axes[0].set_title("backbone size (fused VGMR)", fontsize=10)
    sq = [r for r in recs if r["part"] == "sequence"]
    for peer in dict.fromkeys(r["peer"] for r in sq):
        rs = sorted((r for r in sq if r["peer"] == peer), key=lambda r: r["T"])
        axes[1].plot([r["T"] for r in rs], [1e6 * r["s_per_token"] for r in rs], marker="o", label=peer)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("T (B·T about constant)")
    axes[1].set_ylabel("layer train step, µs per token")
    axes[1].set_title("sequence length", fontsize=10)
    wd = [r for r in recs if r["part"] == "width" and r["mode"] == "train"]
    for peer in dict.fromkeys(r["peer"] for r in wd):
        rs = sorted((r for r in wd if r["peer"] == peer), key=lambda r: r["D"])
        axes[2].plot([r["D"] for r in rs], [1e3 * r["median_s"] for r in rs], marker="o", label=peer,
                     linestyle="--" if peer == "gate-gemm" else "-")
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("feature width D")
    axes[2].set_ylabel("layer train step, ms")
    axes[2].set_title("feature width (-rR: gate_rank R)", fontsize=10)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

