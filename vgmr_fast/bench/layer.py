"""Layer level: the whole VGMR module, and the sweep over T.

Modes: ``train`` (module in train mode, dropout p=0.1, forward + backward from fixed random
output gradients, parameter gradients reset to None each step as ``zero_grad`` does; the
features need no gradient: pre-extracted features, the paper's setting), ``train-xgrad`` (the
same with features that require grad: a backbone trained below the layer) and ``infer`` (eval
mode under ``torch.inference_mode``), with masks. At the first setting also ``train-bf16`` (the
``train`` step under ``torch.autocast(dtype=torch.bfloat16)``, how GPU users train),
``train-frozen`` (every parameter of the layer frozen, features that require grad: a frozen
refiner in front of a backbone being trained) and ``infer`` over the batch sizes of
:data:`INFER_BATCHES` (settings ``<name>-B<B>``).

Peers: ``eager`` (``vgmr_fast.reference.VGMR`` with ``dropout_rng = "torch"``: what a plain-PyTorch
user writes), ``compile`` (``torch.compile`` of it), on a GPU at the large size also
``compile-max-autotune``, ``fused-<backend>`` (``vgmr_fast.VGMR`` with the reference's
state_dict), ``fused-<backend>+compile`` (``torch.compile`` of the fused module), and the floor
``gemm-only``: the per-step GEMMs alone, with the same weights and inputs -- both layers of P_m
(``X W_1^T``, ``A W_2^T``) and the gate GEMMs (``X W_r^T`` then ``+= H W_h^T`` in place), forward
(+ backward: every weight and activation gradient GEMM) -- no bias, activation, pooling,
small per-sample MLP or normalisation. ``× GEMM-only`` is the layer's time over this floor.

On a CPU where the fused layer's float32 GEMMs run on oneDNN (:mod:`vgmr_fast.ops.gemm`; ATen,
and so eager and torch.compile, send them to MKL) two more peers separate the GEMM library from
the rest: ``gemm-only-onednn``, the same floor through the layer's GEMM operators, and
``fused-cpu/aten-gemm``, the fused module with its GEMMs on ATen's (``use_onednn(False)``).
"""
from __future__ import annotations

import zlib

import torch
from torch import nn

from .. import reference as ref
from ..ops.gemm import gemm, gemm_into, onednn_active, use_onednn
from . import backends
from .common import Ctx, Skip, Task, compiled, fused_peers, record, run_group, short_exc
from .settings import Setting, make_batch, with_B
from .timing import Rotator, rotation_count

MODES = ("train", "train-xgrad", "infer")
FIRST_SETTING_MODES = ("train-bf16", "train-frozen")  # only at the paper's size
TRAIN_MODES = ("train", "train-xgrad", "train-bf16", "train-frozen")
X_GRAD_MODES = ("train-xgrad", "train-frozen")  # features that require grad
TIMELINE_MODES = ("train", "train-xgrad")
INFER_BATCHES = (1, 4, 32, 128)
DROPOUT = 0.1
ATEN_GEMM = "/aten-gemm"  # peer suffix: the fused module with ATen's GEMMs


def _seed(s: Setting) -> int:
    return zlib.crc32(s.name.encode()) & 0x7FFFFFFF


def reference_module(ctx: Ctx, s: Setting):
    key = ("layer-ref", s.name)
    if key not in ctx.cache:
        torch.manual_seed(_seed(s))
        m = ref.VGMR(list(s.widths), s.d, dropout=DROPOUT)
        m.dropout_rng = "torch"
        ctx.cache[key] = m.to(device=ctx.device, dtype=s.torch_dtype)
    return ctx.cache[key]


def peer_module(ctx: Ctx, s: Setting, peer: str):
    """(callable module, its parameters) for a peer; raises Skip with the reason when unavailable."""
    key = ("layer-peer", s.name, peer)
    if key in ctx.cache:
        return ctx.cache[key]
    refm = reference_module(ctx, s)
    base = peer.split("+")[0]
    if base in ("eager", "compile", "compile-max-autotune"):
        mod = refm
    elif base.startswith("fused-"):
        backend = base[len("fused-"):].removesuffix(ATEN_GEMM)
        try:
            mod = backends.fused_module(list(s.widths), s.d, backend, dropout=DROPOUT)
        except RuntimeError as exc:
            raise Skip(str(exc)) from exc
        mod = mod.to(device=ctx.device, dtype=s.torch_dtype)
        mod.load_state_dict(refm.state_dict())
    else:
        raise ValueError(peer)
    params = list(mod.parameters())
    fn = mod
    if peer == "compile" or peer.endswith("+compile"):
        fn = compiled(mod)
    elif peer == "compile-max-autotune":
        fn = compiled(mod, mode="max-autotune")
    ctx.cache[key] = (fn, mod, params)
    return ctx.cache[key]


def gemm_weights(refm) -> list:
    """Per modality: ([P_m weights], W_r, W_h) as fresh leaves with the reference's values."""
    out = []
    for blk in refm.blocks:
        if isinstance(blk.proj, nn.Sequential):
            P = [blk.proj[0].weight, blk.proj[2].weight]
        else:
            P = [blk.proj.weight]
        leaf = lambda w: w.detach().clone().requires_grad_(True)  # noqa: E731
        out.append(([leaf(w) for w in P], leaf(blk.gate_raw.weight), leaf(blk.gate_latent.weight)))
    return out


def gemm_forward(weights, xs, onednn: bool = False):
    """The floor's GEMMs: ATen's (autograd records them), or the fused layer's CPU GEMM operators
    (``onednn``: each product an autograd node whose backward is the same operators)."""
    outs = []
    for x, (P, Wr, Wh) in zip(xs, weights):
        x2 = x.reshape(-1, x.shape[-1])
        h = x2
        if onednn:
            for W in P:
                h = _LayerGemm.apply(h, W, None, None)
            z = _LayerGemm.apply(x2, Wr, h, Wh)
        else:
            for W in P:
                h = h @ W.t()
            z = x2 @ Wr.t()
            z.addmm_(h, Wh.t().to(z.dtype))  # in place, so autocast casts nothing: the GEMM dtype is z's
        outs.append(z.view(x.shape))
    return outs


class _LayerGemm(torch.autograd.Function):
    """``x W^T (+ h V^T)`` through :mod:`vgmr_fast.ops.gemm`, forward and backward, each gradient
    only when asked (as autograd does for the ATen floor)."""

    @staticmethod
    def forward(ctx, x, W, h, V):
        z = gemm(x, W.t())
        if h is not None:
            gemm_into(z, h, V.t())
        ctx.save_for_backward(x, W, h, V)
        return z

    @staticmethod
    def backward(ctx, dz):
        x, W, h, V = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (gemm(dz, W) if need[0] else None, gemm(dz.t(), x) if need[1] else None,
                gemm(dz, V) if need[2] else None, gemm(dz.t(), h) if need[3] else None)


def input_sets(ctx: Ctx, s: Setting):
    key = ("layer-sets", s.name)
    if key in ctx.cache:
        return ctx.cache[key]
    gen = torch.Generator().manual_seed(_seed(s) + 1)
    xs, masks = make_batch(s, ctx.device, gen)
    grads = [torch.randn(x.shape, generator=gen).to(device=ctx.device, dtype=x.dtype) for x in xs]
    set_bytes = sum(t.numel() * t.element_size() for t in xs + grads + masks)
    sets = [(xs, masks, grads)]
    for _ in range(rotation_count(set_bytes, ctx.device) - 1):
        xs, masks = make_batch(s, ctx.device, gen)
        grads = [torch.randn(x.shape, generator=gen).to(device=ctx.device, dtype=x.dtype) for x in xs]
        sets.append((xs, masks, grads))
    ctx.cache[key] = sets
    return sets


def make_step(ctx: Ctx, s: Setting, peer: str, mode: str):
    if mode == "train-bf16" and (peer == "gemm-only-onednn" or peer.endswith(ATEN_GEMM)):
        raise Skip("under bf16 autocast the fused layer's GEMMs are ATen's (the oneDNN route serves float32)")
    sets = input_sets(ctx, s)
    rot = Rotator(sets)
    if peer.startswith("gemm-only"):
        key = ("layer-gemm", s.name)
        if key not in ctx.cache:
            ctx.cache[key] = gemm_weights(reference_module(ctx, s))
        weights = ctx.cache[key]
        params = [w for P, Wr, Wh in weights for w in P + [Wr, Wh]]
        onednn = peer == "gemm-only-onednn"

        def fwd(xs, masks):
            return gemm_forward(weights, xs, onednn)
    else:
        fn, mod, params = peer_module(ctx, s, peer)
        mod.train(mode in TRAIN_MODES)

        def fwd(xs, masks):
            return fn(xs, masks)

    gemm_library = use_onednn(not peer.endswith(ATEN_GEMM))
    if mode == "infer":
        def step():
            xs, masks, _ = rot.next()
            with torch.inference_mode(), gemm_library:
                return fwd(xs, masks)
    else:
        xgrad, frozen = mode in X_GRAD_MODES, mode == "train-frozen"
        autocast = mode == "train-bf16"
        for p in params:  # (peers share the reference module: each group sets its own; measure() thaws)
            p.requires_grad_(not frozen)

        def step():
            xs, masks, grads = rot.next()
            for p in params:
                p.grad = None
            if xgrad:  # leaves that require grad, as a backbone's outputs would
                xs = [x.detach().requires_grad_() for x in xs]
            with gemm_library:
                with torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=autocast):
                    outs = fwd(xs, masks)
                torch.autograd.backward(list(outs), grads)

    return step, len(rot)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def floor_bytes(ctx: Ctx, s: Setting, mode: str) -> int:
    """Bytes a step must move once: features, masks and parameters read, outputs written; in
    training also the output gradients read and the parameter gradients written (no activation
    round trip: that is what a fused layer may avoid)."""
    xs, masks, grads = input_sets(ctx, s)[0]
    params = _nbytes(reference_module(ctx, s).parameters())
    once = _nbytes(xs) + _nbytes(masks) + params + _nbytes(xs)  # outputs have the inputs' shapes
    if mode in TRAIN_MODES:
        once += _nbytes(grads) + (0 if mode == "train-frozen" else params)
    if mode in X_GRAD_MODES:
        once += _nbytes(xs)  # the features' gradients written
    return once


def saved_activation_bytes(ctx: Ctx, s: Setting, peer: str) -> int:
    """Bytes autograd saves for backward in one training forward of ``peer`` (inputs, masks and
    parameters left out: they live anyway); the backward then runs so nothing is left behind."""
    from .opcount import saved_tensor_bytes

    fn, mod, params = peer_module(ctx, s, peer)
    mod.train()
    xs, masks, grads = input_sets(ctx, s)[0]
    outs, saved = saved_tensor_bytes(fn, xs, masks, exclude=list(xs) + list(masks) + list(params))
    torch.autograd.backward(list(outs), grads)
    for p in params:
        p.grad = None
    return saved


def measure(ctx: Ctx, s: Setting, mode: str, peers: list, level: str = "layer") -> None:
    """One comparison group: every peer on the same setting and mode (memory for layer train steps;
    ATen ops / generated kernels, saved activations and floors at the layer level)."""
    builders = {}
    for peer in peers:
        def build(peer=peer):
            step, nsets = make_step(ctx, s, peer, mode)
            return step, {"rotation_sets": nsets}
        builders[peer] = build
    is_layer = level == "layer"
    res = run_group(ctx, f"{level} {s.name} {mode}", builders, graph=(mode == "infer" and s.name == "mosei"),
                    memory=is_layer, counts=is_layer)
    if mode == "train-frozen":  # the modules are shared with the other groups
        for peer in peers:
            entry = ctx.cache.get(("layer-peer", s.name, peer))
            for p in (entry[2] if entry else ()):
                p.requires_grad_(True)
    once = floor_bytes(ctx, s, mode) if is_layer else None
    for peer, r in res.items():
        extra = {}
        if is_layer:
            extra["floor_bytes"] = once
            extra["floor_s"] = ctx.floor(once)
            launches = r.get("aten_ops") or (r.get("compiled_kernels") or {}).get("total")
            extra["launch_floor_s"] = ctx.launch_floor(launches)
            if mode in TIMELINE_MODES and (peer == "eager" or _own_fused(peer)):
                try:
                    extra["saved_bytes"] = saved_activation_bytes(ctx, s, peer)
                except Exception as exc:  # noqa: BLE001
                    extra["saved_bytes_error"] = short_exc(exc)
        record(ctx, level=level, setting=s.name, shape=s.describe(), dtype=s.dtype, T=s.T, mode=mode, peer=peer,
               **r, **extra)


def measure_timeline(ctx: Ctx, s: Setting, mode: str, peers: list) -> None:
    """One training step's memory over time by category, per peer (the bench's memory PNG)."""
    from .memory import timeline

    for peer in peers:
        try:
            step, _ = make_step(ctx, s, peer, mode)
            step()  # warm (compiles)
            result = timeline(step, ctx.device)
        except Exception as exc:  # noqa: BLE001
            ctx.skip(f"memory timeline {s.name} {mode} {peer}", short_exc(exc))
            continue
        record(ctx, level="memory-timeline", setting=s.name, shape=s.describe(), dtype=s.dtype, mode=mode,
               peer=peer, **result)


def measure_fullgraph(ctx: Ctx, s: Setting, peers: list) -> None:
    """``torch.compile(fullgraph=True)`` of a training step with dropout, per module (graphcheck.py)."""
    from .graphcheck import fullgraph_training

    xs, masks, _ = input_sets(ctx, s)[0]
    for peer in peers:
        try:
            _, mod, _ = peer_module(ctx, s, peer)
        except Skip as exc:
            ctx.skip(f"fullgraph {s.name} {peer}", str(exc))
            continue
        # Dynamo's state from the compiled peers measured before (a frame it gave up on after a
        # graph break is skipped from then on, and its submodules compiled one by one) must not
        # decide this check; those peers are done with (this task ends its group).
        torch._dynamo.reset()
        result = fullgraph_training(mod, xs, masks)
        torch._dynamo.reset()
        record(ctx, level="fullgraph", setting=s.name, shape=s.describe(), dtype=s.dtype, mode="train", peer=peer,
               **result)


def layer_peers(ctx: Ctx, s: Setting) -> list:
    peers = ["eager"]
    if ctx.compile:
        peers.append("compile")
        if ctx.max_autotune and ctx.device == "cuda" and s.name == "large":
            peers.append("compile-max-autotune")
    for p in fused_peers(ctx):
        peers.append(p)
        if ctx.compile:
            peers.append(p + "+compile")
    onednn = onednn_gemms(ctx)
    if onednn:
        peers.append("fused-cpu" + ATEN_GEMM)
    peers.append("gemm-only")
    if onednn:
        peers.append("gemm-only-onednn")
    return peers


def _own_fused(peer: str) -> bool:
    """A fused module as the package runs it: not compiled, its own GEMM route."""
    return peer.startswith("fused-") and "+" not in peer and not peer.endswith(ATEN_GEMM)


def onednn_gemms(ctx: Ctx) -> bool:
    """Whether the fused CPU layer's float32 GEMMs run on oneDNN in this run."""
    return ctx.device == "cpu" and "cpu" in ctx.backends and onednn_active()


def tasks(ctx: Ctx, settings: list, fullgraph: bool = True) -> list:
    """Train and infer groups per setting; at the first (the paper's MOSEI-like) setting also the
    ``fullgraph=True`` check of the reference and each fused module."""
    out = []
    for i, s in enumerate(settings):
        peers = layer_peers(ctx, s)
        for mode in MODES + (FIRST_SETTING_MODES if i == 0 else ()):
            out.append(Task(f"layer {s.name} {mode}", (lambda s=s, mode=mode, peers=peers: measure(ctx, s, mode, peers)),
                            group=f"layer/{s.name}"))
        if i == 0:  # memory over time of the training steps, beside eager and compile
            tl_peers = [p for p in peers if p in ("eager", "compile") or _own_fused(p)]
            for mode in TIMELINE_MODES:
                out.append(Task(f"layer {s.name} {mode} memory timeline",
                                (lambda s=s, mode=mode, p=tl_peers: measure_timeline(ctx, s, mode, p)),
                                group=f"layer/{s.name}"))
        if i == 0:  # the batch sweep of inference at the paper's size (B = s.B is the group above)
            for B in INFER_BATCHES:
                if B != s.B:
                    sb = with_B(s, B)
                    out.append(Task(f"layer {sb.name} infer",
                                    (lambda sb=sb, peers=peers: measure(ctx, sb, "infer", peers)),
                                    group=f"layer/{sb.name}"))
        if fullgraph and i == 0:
            modules = ["eager"] + fused_peers(ctx)
            out.append(Task(f"layer {s.name} fullgraph", (lambda s=s, m=modules: measure_fullgraph(ctx, s, m)),
                            group=f"layer/{s.name}"))
    return out


def sweep_tasks(ctx: Ctx, base: Setting, Ts: list) -> list:
    from .settings import with_T

    out = []
    peers = ["eager"] + fused_peers(ctx) + ["gemm-only"] + (["gemm-only-onednn"] if onednn_gemms(ctx) else [])
    for T in Ts:
        s = with_T(base, T)
        out.append(Task(f"sweep T={T} train", (lambda s=s: measure(ctx, s, "train", peers, level="sweep")),
                        group=f"sweep/{T}"))
    return out
