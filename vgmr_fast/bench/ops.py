"""Per-op level: summary_pool, interaction, gate_norm, as one VGMR layer calls them.

Each op is timed over what one layer step feeds it: ``summary_pool`` on the M projected features
``H_m [B, T, d]`` (with masks), ``interaction`` on ``S [B, M, d]``, ``gate_norm`` on the M
modalities ``[B, T, D_m]``. Modes: ``fwd`` (inference mode, no dropout), ``bwd`` (the backward
alone, replayed on retained graphs), ``fwd+bwd`` (training: dropout p=0.1 in gate_norm).
Peers: ``eager`` (the reference functions; dropout by ``F.dropout``, as a plain-PyTorch user
writes it), ``compile`` (``torch.compile`` of the same), ``fused-<backend>`` (``vgmr_fast.ops``).
Floors: bytes that must move once (inputs read, outputs written; see ``benchmarks/README.md``)
divided by the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import backends
from .common import Ctx, Task, compiled, fused_peers, record, run_group
from .settings import Setting, elem_size, make_masks
from .timing import Rotator, rotation_count

OPS = ("summary_pool", "interaction", "gate_norm")
MODES = ("fwd", "bwd", "fwd+bwd")
ALPHA, BETA, P_TRAIN = 0.5, 0.2, 0.1


# ---------------------------------------------------------------------------------------------
# Bytes that must move once (the floor), per op and direction.
# ---------------------------------------------------------------------------------------------
def floor_bytes(op: str, s: Setting) -> dict:
    B, T, d, M = s.B, s.T, s.d, s.M
    e = elem_size(s.torch_dtype)
    if op == "summary_pool":
        fwd = M * (B * T * d * e + B * T + 2 * B * d * e + 4 * B * d)
        bwd = M * (2 * B * d * e + 4 * B * d + B * T + B * T * d * e)
    elif op == "interaction":
        U = B * M * (3 * M - 1) * d * e
        fwd = B * M * d * e + U
        bwd = U + 2 * B * M * d * e
    elif op == "gate_norm":
        fwd = bwd = 0
        for D in s.widths:
            N = B * T * D
            fwd += 3 * N * e + 4 * B * D + 8 * D + 8 * B * T
            bwd += 5 * N * e + 8 * B * D + 12 * D + 8 * B * T
    else:
        raise ValueError(op)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


# ---------------------------------------------------------------------------------------------
# The op calls, per peer kind: each returns the list of output tensors.
# ---------------------------------------------------------------------------------------------
def eager_summary_pool(hs, masks):
    out = []
    for h, mk in zip(hs, masks):
        out.extend(ref.summary_pool(h, mk))
    return out


def eager_interaction(s):
    return [ref.interaction(s)]


def eager_gate_norm(zs, brs, xs, ws, bs, p: float):
    out = []
    for z, br, x, w, b in zip(zs, brs, xs, ws, bs):
        y = ref.gate_norm(z, br, x, w, b, ALPHA, BETA, 0.0)
        if p > 0:
            y = F.dropout(y, p, training=True)
        out.append(y)
    return out


def fused_calls(backend: str):
    sp, it, gn = (backends.fused_op(n) for n in OPS)

    def summary_pool(hs, masks):
        out = []
        for h, mk in zip(hs, masks):
            out.extend(sp(h, mk, backend=backend))
        return out

    def interaction(s):
        return [it(s, backend=backend)]

    def gate_norm(zs, brs, xs, ws, bs, p: float):
        return [gn(z, br, x, w, b, alpha=ALPHA, beta=BETA, p=p, seed=1234 + m, backend=backend)
                for m, (z, br, x, w, b) in enumerate(zip(zs, brs, xs, ws, bs))]

    return {"summary_pool": summary_pool, "interaction": interaction, "gate_norm": gate_norm}


EAGER = {"summary_pool": eager_summary_pool, "interaction": eager_interaction, "gate_norm": eager_gate_norm}


def peer_fn(ctx: Ctx, op: str, peer: str, s: Setting):
    if peer == "eager":
        return EAGER[op]
    if peer == "compile":
        key = ("ops-compiled", op, s.name)
        if key not in ctx.cache:
            ctx.cache[key] = compiled(EAGER[op])
        return ctx.cache[key]
    if peer.startswith("fused-"):
        return fused_calls(peer[len("fused-"):])[op]
    raise ValueError(peer)


# ---------------------------------------------------------------------------------------------
# Inputs: a set = (args for the call, tensors that need gradients).
# ---------------------------------------------------------------------------------------------
def make_set(op: str, s: Setting, device: str, gen: torch.Generator, p: float):
    dt = s.torch_dtype

    def rnd(*shape, dtype=dt):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    if op == "summary_pool":
        hs = [rnd(s.B, s.T, s.d) for _ in s.widths]
        masks = make_masks(s.B, s.T, s.M, device, gen)
        return (hs, masks), list(hs)
    if op == "interaction":
        sm = rnd(s.B, s.M, s.d)
        return (sm,), [sm]
    zs = [rnd(s.B, s.T, D) for D in s.widths]
    xs = [rnd(s.B, s.T, D) for D in s.widths]
    brs = [rnd(s.B, D, dtype=torch.float32) for D in s.widths]
    ws = [(1 + 0.1 * torch.randn(D, generator=gen)).to(device).requires_grad_(True) for D in s.widths]
    bs = [(0.1 * torch.randn(D, generator=gen)).to(device).requires_grad_(True) for D in s.widths]
    return (zs, brs, xs, ws, bs, p), zs + brs + xs + ws + bs


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _flat(args):
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
        elif isinstance(a, torch.Tensor):
            out.append(a)
    return out


def prepared_sets(ctx: Ctx, op: str, s: Setting, p: float):
    """Rotating input sets with output gradients, cached per (op, setting, p)."""
    key = ("ops-sets", op, s.name, p)
    if key in ctx.cache:
        return ctx.cache[key]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{op}/{s.name}".encode()))
    first_args, first_leaves = make_set(op, s, ctx.device, gen, p)
    with torch.no_grad():
        outs = EAGER[op](*first_args)
    grads = [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in outs]
    set_bytes = _nbytes(_flat(first_args)) + _nbytes(grads)
    k = rotation_count(set_bytes, ctx.device)
    sets = [(first_args, first_leaves, grads)]
    for _ in range(k - 1):
        a, leaves = make_set(op, s, ctx.device, gen, p)
        g = [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in outs]
        sets.append((a, leaves, g))
    ctx.cache[key] = sets
    return sets


def make_step(ctx: Ctx, op: str, peer: str, s: Setting, mode: str):
    fn = peer_fn(ctx, op, peer, s)
    p = 0.0 if mode == "fwd" else P_TRAIN
    sets = prepared_sets(ctx, op, s, p)
    if mode == "fwd":
        rot = Rotator([a for a, _, _ in sets])

        def step():
            with torch.inference_mode():
                return fn(*rot.next())

        return step, len(rot)
    if mode == "fwd+bwd":
        rot = Rotator(sets)

        def step():
            args, leaves, grads = rot.next()
            outs = fn(*args)
            return torch.autograd.grad(outs, leaves, grads)

        return step, len(rot)
    # bwd: one retained graph per set, the backward replayed
    graphs = []
    for args, leaves, grads in sets:
        outs = fn(*args)
        graphs.append((outs, leaves, grads))
    rot = Rotator(graphs)

    def step():
        outs, leaves, grads = rot.next()
        return torch.autograd.grad(outs, leaves, grads, retain_graph=True)

    return step, len(rot)


def measure(ctx: Ctx, s: Setting, op: str, mode: str, peers: list) -> None:
    """One comparison group: every peer on the same op, setting and mode."""
    builders = {}
    for peer in peers:
        def build(peer=peer):
            step, nsets = make_step(ctx, op, peer, s, mode)
            return step, {"rotation_sets": nsets}
        builders[peer] = build
    fb = floor_bytes(op, s)[mode]
    floor_s = ctx.floor(fb)
    res = run_group(ctx, f"ops {s.name} {op} {mode}", builders, graph=(mode == "fwd" and s.name == "mosei"))
    for peer, r in res.items():
        t = r.pop("timing")
        record(ctx, level="ops", setting=s.name, shape=s.describe(), dtype=s.dtype, op=op, mode=mode, peer=peer,
               timing=t, floor_bytes=fb, floor_s=floor_s, floor_frac=(floor_s / t.median) if floor_s else None,
               achieved_bytes_per_s=fb / t.median, **r)


def peers_for(ctx: Ctx) -> list:
    return ["eager"] + (["compile"] if ctx.compile else []) + fused_peers(ctx)


def tasks(ctx: Ctx, settings: list) -> list:
    peers = peers_for(ctx)
    out = []
    for s in settings:
        for op in OPS:
            for mode in MODES:
                out.append(Task(f"ops {s.name} {op} {mode}",
                                (lambda s=s, op=op, mode=mode: measure(ctx, s, op, mode, peers)),
                                group=f"ops/{s.name}/{op}"))
    return out
