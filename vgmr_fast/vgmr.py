"""The fused drop-in VGMR: the reference's constructor and ``state_dict``, its own parameter layout.

Data flow, grouped across modalities wherever the shapes agree (one launch serves all M):

    X_m -> [P1_m; W_r] GEMM (one per m: P's first layer and the gate's X W_r^T + b_r share X)
        -> GELU of all modalities at once -> P2_m GEMM -> H_m -> summary_pool
    [mean; max] of all m -> E (batched GEMMs over stacked [M, ...] weights) -> interaction
        -> V (batched GEMMs) -> the global and channel heads (one batched GEMM)
        -> per-sample gate terms: one GEMM per modality into the bias row (A_g, A_c, every bias)
    Zpre_m = (X W_r^T + b_r) + H_m W_h^T;   gate_norm(Zpre, bias_row, X) -> X~ (grouped when
    the backend has a grouped kernel)

Parameters live in that layout (stacked ``[M, ...]`` where all modalities share a shape,
concatenated along the feature axis ``sum D_m`` where they do not). ``state_dict()`` gives the
reference's keys and values, and ``load_state_dict`` takes either the reference's state or
this layout's own, through state-dict hooks. ``reference_grads()`` maps gradients the same way.

The heads' sigmoid enters the gate only as ``sigma(z) - 1/2``; the module computes it as
``tanh(z/2) / 2`` (the same function, one launch fewer: the 1/2 folds into the GEMMs' alpha).
"""
from __future__ import annotations

import collections
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import inputs
from . import reference as ref
from .ops import backend as _backend
from .dropout_stream import draw_seeds

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
EPS = ref.EPS
_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device`` (meta and other devices without autocast: never)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def _linear_init(out_features: int, in_features: int):
    """``(weight, bias)`` initialised as ``nn.Linear`` does (same draws from torch's generator)."""
    lin = nn.Linear(in_features, out_features)
    return lin.weight.detach(), lin.bias.detach()


class _ReferenceOps:
    """The plain-torch functions of the reference, with the fused ops' call signature."""

    @staticmethod
    def summary_pool(h, mask, backend=None):
        return ref.summary_pool(h, mask)

    @staticmethod
    def interaction(s, backend=None):
        return ref.interaction(s)

    @staticmethod
    def gate_norm(zpre, bias_row, x, ln_weight, ln_bias, *, alpha, beta, p=0.0, seed=0, backend=None):
        return ref.gate_norm(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, seed)


# Static configuration of one fused call (a named tuple: compilers treat it as a constant).
# ``low``: the autocast dtype the layer computes in (None: the parameters' dtype).
# ``ranks``: the raw gate's rank per modality (None: full rank, docs/math.md §4a).
_Spec = collections.namedtuple("_Spec", ("M", "d", "alpha", "beta", "p", "backend", "mlp", "k", "nb", "u_blocks",
                                         "recompute", "grouped", "low", "ranks"))

# Under autocast these stay in float32: the bias-row GEMM (its output feeds gate_norm's float32
# side input), the LayerNorm parameters, and the beta = 0 input of the bias-row GEMMs.
_FULL_PRECISION = ("rw", "lnw", "lnb", "zero")


def _pdt(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _linear_grads(g: dict, need: dict, w: str, b: str, dout: torch.Tensor, inp: torch.Tensor) -> None:
    """Weight and bias gradients of a batched linear ``out = inp W^T + b``, each only when asked:
    ``g[w] = dout^T inp``, ``g[b] = sum of dout over rows``."""
    if need[w]:
        g[w] = _bmm_t(dout, inp)
    if need[b]:
        g[b] = dout.sum(1)


def _bmm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` over a batch: ``[M, n, i]^T [M, n, j] -> [M, i, j]`` (a weight's gradient)."""
    return torch.bmm(a.transpose(1, 2), b)


def _x_gemm(x2, w, b, u, d):
    """The GEMM on X shared by P's first layer and the raw gate: ``(P's pre-activation, tail)``.
    Full rank (``u`` None): ``w = [P1; W_r]``, tail = ``X W_r^T + b_r``. Low rank: ``w = [P1; V^T]``,
    tail = ``A = X V`` (no bias: ``b_r`` joins the ``A U^T`` GEMM, :func:`_raw_gate`)."""
    if u is None:
        o = torch.addmm(b, x2, w.t())
        return o[:, :d], o[:, d:]
    o = torch.mm(x2, w.t())
    return o[:, :d] + b[:d], o[:, d:]


def _raw_gate(tail, b, u, d):
    """``X W_r^T + b_r`` from :func:`_x_gemm`'s tail: the tail itself, or ``A U^T + b_r`` at low rank."""
    return tail if u is None else torch.addmm(b[d:], tail, u.t())


class _FusedVGMR(torch.autograd.Function):
    """The whole layer as one autograd node: the raw fused ops, the GEMMs, and a backward written
    out by hand, so that it launches what the math needs (no per-piece scatters, no zero-filled
    gradients of unused outputs) and saves only what it cannot cheaply recompute: the P
    pre-activation, H, Zpre (or, with ``recompute_gate_gemm``, not even Zpre), and small per-row
    or per-sample tensors. Inputs: ``spec, seeds, *xs, *masks, *params, zero``; outputs:
    ``*ys, t (when the value heads exist), *zpres, *rows`` (the last three feed the auxiliaries).
    """

    @staticmethod
    def forward(ctx, spec, seeds, *flat):
        M, d, k = spec.M, spec.d, spec.k
        ns = _backend.namespace(spec.backend)
        # the raw ops read dense rows (no-ops for the usual contiguous inputs)
        xs = [x.contiguous() for x in flat[:M]]
        masks = [None if mk is None else mk.contiguous() for mk in flat[M:2 * M]]
        params = list(flat[2 * M:])
        xs_full = xs  # gate_norm reads the features as given (float32 under autocast)
        if spec.low is not None:
            # autocast: the features and every GEMM weight in the autocast dtype, one cast for all
            low = [i for i, n in enumerate(_param_slots(spec)) if n not in _FULL_PRECISION and params[i] is not None]
            _, cast = _cast_group(xs + [params[i] for i in low], spec.low)
            xs = cast[:M]
            for i, t in zip(low, cast[M:]):
                params[i] = t
        P = _unflatten_params(spec, params)
        B = xs[0].shape[0]
        Ts, dims = [x.shape[1] for x in xs], [x.shape[2] for x in xs]
        x2s = [x.reshape(B * T, D) for x, T, D in zip(xs, Ts, dims)]
        xo = [_x_gemm(x2, w, b, u, d) for x2, w, b, u in zip(x2s, P["xw"], P["xb"], P["gu"])]
        if spec.mlp:
            pre_all = torch.cat([o[0] for o in xo])
            acts = F.gelu(pre_all).split([B * T for T in Ts])
            hs = [torch.addmm(b2, a, w2.t()) for a, w2, b2 in zip(acts, P["w2"].unbind(0), P["b2"].unbind(0))]
        else:
            pre_all = None
            hs = [o[0].contiguous() for o in xo]
        saved_small = []
        if k:
            pooled, argmaxes = [], []
            for h, T, mk in zip(hs, Ts, masks):
                mean, mx, am = ns.summary_pool(h.view(B, T, d), mk)
                pooled += [mean, mx]
                argmaxes.append(am)
            summary_in = torch.stack(pooled, dim=1).view(B, M, 2 * d).transpose(0, 1)  # [M, B, 2d]
            e_pre = torch.baddbmm(P["eb1"].unsqueeze(1), summary_in, P["ew1"].transpose(1, 2))
            e = F.gelu(e_pre)
            s = torch.baddbmm(P["eb2"].unsqueeze(1), e, P["ew2"].transpose(1, 2))
            s_bm = s.transpose(0, 1).contiguous()  # the interaction op reads [B, M, d]
            u = ns.interaction(s_bm)
            if len(spec.u_blocks) != 3 * M - 1:
                u = u.view(B, M, 3 * M - 1, d)[:, :, list(spec.u_blocks)].reshape(B, M, len(spec.u_blocks) * d)
            u_t = u.transpose(0, 1)
            r_pre = torch.baddbmm(P["vb1"].unsqueeze(1), u_t, P["vw1"].transpose(1, 2))
            r1 = F.gelu(r_pre)
            r = torch.baddbmm(P["vb2"].unsqueeze(1), r1, P["vw2"].transpose(1, 2))
            t = torch.tanh(torch.baddbmm(P["hb"].unsqueeze(1), r, P["hw"].transpose(1, 2), beta=0.5, alpha=0.5))
            t_ext = F.pad(t, (0, spec.nb), value=2.0).to(P["rw"].dtype)
            saved_small = [summary_in, e_pre, e, s_bm, u, r_pre, r1, r, t, *argmaxes]
        else:
            t = None
            t_ext = xs[0].new_full((M, B, spec.nb), 2.0, dtype=P["rw"].dtype)
        row_ws = P["rw"].split(dims)
        rows = [torch.addmm(P["zero"], tm, rw.t(), beta=0.0, alpha=0.5) for tm, rw in zip(t_ext.unbind(0), row_ws)]
        zpres = [torch.addmm(_raw_gate(o[1], b, u, d), h, wh.t()).view(B, T, D)
                 for o, b, u, h, wh, T, D in zip(xo, P["xb"], P["gu"], hs, P["wh"], Ts, dims)]
        kept_a = [] if spec.recompute else [o[1] for o, u in zip(xo, P["gu"]) if u is not None]
        del xo
        # under autocast gate_norm runs in float32 on the features as given: Zpre (the GEMMs'
        # output, in the autocast dtype) is cast once for all modalities
        zpres_g = zpres if spec.low is None else _cast_group(zpres, xs_full[0].dtype)[1]
        pdt = _pdt(xs_full[0])
        lnws = [w.to(pdt) for w in P["lnw"].split(dims)]
        lnbs = [b.to(pdt) for b in P["lnb"].split(dims)]
        rows_p = [r_.to(pdt) for r_ in rows]
        ys, stats = [], []
        if spec.grouped:  # every modality in one operator call
            ys, means, rstds = ns.gate_norm_grouped(zpres_g, rows_p, list(xs_full), lnws, lnbs,
                                                    spec.alpha, spec.beta, spec.p, seeds)
            ys = list(ys)
            for mean, rstd in zip(means, rstds):
                stats += [mean, rstd]
        else:
            for m in range(M):
                y, mean, rstd = ns.gate_norm(zpres_g[m], rows_p[m], xs_full[m], lnws[m], lnbs[m],
                                             spec.alpha, spec.beta, spec.p, _seed_arg(seeds, m))
                ys.append(y)
                stats += [mean, rstd]
        outs = tuple(ys + ([t] if k else []) + zpres_g + rows)
        if ctx is None:  # no gradient asked for: nothing to keep
            return outs
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.shape = spec, (B, tuple(Ts), tuple(dims))
        ctx.has_mask = [mk is not None for mk in masks]
        kept_z = [] if spec.recompute else zpres
        kept_h = [] if spec.mlp else hs  # H is recomputed from the saved pre-activation
        full_x = [] if spec.low is None else xs_full
        ctx.save_for_backward(seeds, *xs, *full_x, *[mk for mk in masks if mk is not None], *params,
                              pre_all, *kept_h, *kept_z, *kept_a, t_ext, *rows_p, *stats, *saved_small)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True: this backward is not itself differentiable
            raise RuntimeError(
                "vgmr_fast.VGMR: double backward (autograd.grad(..., create_graph=True), e.g. a gradient "
                "penalty) through the fused layer is not supported; build the module with "
                "backend='reference' (or use vgmr_fast.reference.VGMR) for higher-order gradients")
        spec = ctx.spec
        M, d, k = spec.M, spec.d, spec.k
        ns = _backend.namespace(spec.backend)
        B, Ts, dims = ctx.shape
        saved = list(ctx.saved_tensors)
        seeds = saved.pop(0)
        xs = [saved.pop(0) for _ in range(M)]
        xs_full = xs if spec.low is None else [saved.pop(0) for _ in range(M)]
        masks = [saved.pop(0) if has else None for has in ctx.has_mask]
        n_params = _param_count(spec)
        flat_params = [saved.pop(0) for _ in range(n_params)]
        P = _unflatten_params(spec, flat_params)
        pre_all = saved.pop(0)
        if spec.mlp:  # GELU and P's second GEMM again, instead of saving H and the GELU output
            acts = F.gelu(pre_all).split([B * T for T in Ts])
            hs = [torch.addmm(b2, a, w2.t()) for a, w2, b2 in zip(acts, P["w2"].unbind(0), P["b2"].unbind(0))]
        else:
            hs = [saved.pop(0) for _ in range(M)]
        x2s = [x.reshape(B * T, D) for x, T, D in zip(xs, Ts, dims)]
        if spec.recompute:
            # the forward's GEMMs again, same shapes and strides: bit for bit the Zpre gate_norm saw
            tails = [_x_gemm(x2, w, b, u, d)[1] for x2, w, b, u in zip(x2s, P["xw"], P["xb"], P["gu"])]
            zpres = [torch.addmm(_raw_gate(tail, b, u, d), h, wh.t()).view(B, T, D)
                     for tail, b, u, h, wh, T, D in zip(tails, P["xb"], P["gu"], hs, P["wh"], Ts, dims)]
            a_low = [tail if u is not None else None for tail, u in zip(tails, P["gu"])]
            tails = None
        else:
            zpres = [saved.pop(0) for _ in range(M)]
            a_low = [saved.pop(0) if u is not None else None for u in P["gu"]]
        if spec.low is not None:  # the forward's cast again: the Zpre gate_norm saw
            zpres = _cast_group(zpres, xs_full[0].dtype)[1]
        t_ext = saved.pop(0)
        rows_p = [saved.pop(0) for _ in range(M)]
        stats = [saved.pop(0) for _ in range(2 * M)]
        if k:
            summary_in, e_pre, e, s_bm, u, r_pre, r1, r, t = saved[:9]
            argmaxes = saved[9:9 + M]
        dys = grads[:M]
        dt_extra = grads[M] if k else None
        dz_extra = grads[M + (1 if k else 0):][:M]
        drow_extra = grads[M + (1 if k else 0) + M:][:M]
        pdt = _pdt(xs_full[0])
        lnws = [w.to(pdt) for w in P["lnw"].split(dims)]

        # Only the gradients asked for: the inputs' and each parameter's needs_input_grad, and
        # each stage of the chain back to X only when something before it needs it.
        need_x = list(ctx.needs_input_grad[2:2 + M])
        need = _unflatten_params(spec, ctx.needs_input_grad[2 + 2 * M:])
        need_p1 = [need_x[m] or need["xw"][m] or need["xb"][m] for m in range(M)]  # P's first layer
        need_h = [need_p1[m] or (spec.mlp and (need["w2"] or need["b2"])) for m in range(M)]  # dH_m
        chain, below = {}, any(need_h)
        for stage in ("e1", "e2", "v1", "v2", "heads"):  # from the summary back to the heads
            w_name, b_name = {"e1": ("ew1", "eb1"), "e2": ("ew2", "eb2"), "v1": ("vw1", "vb1"),
                              "v2": ("vw2", "vb2"), "heads": ("hw", "hb")}[stage]
            below = below or bool(need.get(w_name)) or bool(need.get(b_name))
            chain[stage] = bool(k) and below

        # §5 gate_norm
        dys = [torch.zeros_like(x) if dy is None else dy.to(x.dtype).contiguous() for dy, x in zip(dys, xs_full)]
        if spec.grouped:
            grouped = ns.gate_norm_grouped_backward(dys, zpres, rows_p, list(xs_full), lnws, stats[0::2], stats[1::2],
                                                    spec.alpha, spec.beta, spec.p, seeds, need_x)
            per_modality = list(zip(*grouped))
        else:
            per_modality = [ns.gate_norm_backward(dys[m], zpres[m], rows_p[m], xs_full[m], lnws[m], stats[2 * m],
                                                  stats[2 * m + 1], spec.alpha, spec.beta, spec.p,
                                                  _seed_arg(seeds, m), need_x[m]) for m in range(M)]
        dys = zpres = stats = None
        dzs, drows, dxs, dlnw, dlnb = [], [], [], [], []
        for m in range(M):
            dz, drow, dx, dw, db = per_modality[m]
            if dz_extra[m] is not None:
                dz = dz + dz_extra[m]
            if drow_extra[m] is not None:
                drow = drow + drow_extra[m]
            dzs.append(dz.view(B * Ts[m], dims[m]))
            drows.append(drow.to(P["rw"].dtype))
            dxs.append(dx if need_x[m] else None)
            dlnw.append(dw)
            dlnb.append(db)
        per_modality = None
        if spec.low is not None:  # the GEMMs below take dZ in the autocast dtype
            dzs = _cast_group(dzs, spec.low)[1]
        # One workspace holds every gradient that gathers per-modality pieces: each GEMM writes its
        # piece in place (out=), so gathering costs one allocation instead of a cat / stack each
        # (under autocast a second one, float32, for the bias-row GEMM's gradients).
        ws = _Workspace(xs[0])
        ws_full = ws if P["rw"].dtype == xs[0].dtype else _Workspace(P["rw"])
        width = len(spec.u_blocks) * d
        ws_rw = ws_full.take(sum(dims), P["rw"].shape[1]) if need["rw"] else None
        if chain["heads"]:
            ws_dt = ws_full.take(M, B, k)
            ws_du = ws.take(B, M, width) if chain["e2"] and width == (3 * M - 1) * d else None
        ws_w2 = ws.take(M, d, d) if spec.mlp and need["w2"] else None
        ws_dh = ws.take(sum(B * T for T in Ts), d) if spec.mlp and need["b2"] else None  # b2: one reduction
        ws_dact = ws.take(sum(B * T for T in Ts), d) if spec.mlp and all(need_p1) else None
        ws_xw = [ws.take(d + (D if r is None else r), D) if need["xw"][m] else None
                 for m, (D, r) in enumerate(zip(dims, spec.ranks))]
        ws_xb = [ws.take(d + D) if need["xb"][m] else None for m, D in enumerate(dims)]
        ws.allocate()
        if ws_full is not ws:
            ws_full.allocate()
        g = {}
        if spec.low is None:  # (under autocast the final cast gathers them)
            if need["lnw"]:
                g["lnw"] = torch.cat(dlnw).to(P["lnw"].dtype)
            if need["lnb"]:
                g["lnb"] = torch.cat(dlnb).to(P["lnb"].dtype)
        # §4 bias rows: rows_m = (t_ext_m RW_m^T) / 2
        if ws_rw is not None:
            for dr, tm, out in zip(drows, t_ext.unbind(0), ws_rw().split(dims)):
                torch.addmm(P["zero"], dr.t(), tm, beta=0.0, alpha=0.5, out=out)
            g["rw"] = ws_rw()
        g["wh"] = [torch.mm(dz.t(), h) if need["wh"][m] else None for m, (dz, h) in enumerate(zip(dzs, hs))]
        dhs = [None] * M
        if chain["heads"]:
            # heads: t = tanh((hb + r hw^T) / 2), so dz = tanh'(.) dt / 2; the 1/2 rides on the GEMMs
            dt_half = ws_dt()
            for dr, rw, out in zip(drows, P["rw"].split(dims), dt_half.unbind(0)):
                torch.addmm(P["zero"], dr, rw[:, :k], beta=0.0, alpha=0.25, out=out)
            if dt_extra is not None:
                dt_half = dt_half + 0.5 * dt_extra
            dzh = torch.ops.aten.tanh_backward(dt_half.to(t.dtype), t)
            dt_half = None
            _linear_grads(g, need, "hw", "hb", dzh, r)
        drows = None
        if chain["v2"]:
            # §3 values
            dr_ = torch.bmm(dzh, P["hw"])
            dzh = None
            _linear_grads(g, need, "vw2", "vb2", dr_, r1)
        if chain["v1"]:
            dr_pre = torch.ops.aten.gelu_backward(torch.bmm(dr_, P["vw2"]), r_pre)
            dr_ = None
            _linear_grads(g, need, "vw1", "vb1", dr_pre, u.transpose(0, 1))
        if chain["e2"]:
            if ws_du is not None and not torch.compiler.is_compiling():
                # written as [B, M, width], the layout the interaction reads (a compiler fuses the
                # transpose itself, and Dynamo takes no strided out=)
                du = ws_du()
                torch.bmm(dr_pre, P["vw1"], out=du.transpose(0, 1))
            else:
                du = torch.bmm(dr_pre, P["vw1"]).transpose(0, 1)  # [B, M, width]
            dr_pre = None
            if len(spec.u_blocks) != 3 * M - 1:
                full = du.new_zeros(B, M, 3 * M - 1, d)
                full[:, :, list(spec.u_blocks)] = du.reshape(B, M, len(spec.u_blocks), d)
                du = full.view(B, M, (3 * M - 1) * d)
            # §2 interaction, §1 summary
            ds = ns.interaction_backward(du.contiguous(), s_bm).transpose(0, 1)  # [M, B, d]
            du = None
            _linear_grads(g, need, "ew2", "eb2", ds, e)
        if chain["e1"]:
            de_pre = torch.ops.aten.gelu_backward(torch.bmm(ds, P["ew2"]), e_pre)
            ds = None
            _linear_grads(g, need, "ew1", "eb1", de_pre, summary_in)
            if any(need_h):
                dmean = torch.bmm(de_pre, P["ew1"][:, :, :d])  # [M, B, d], contiguous per modality
                dmax = torch.bmm(de_pre, P["ew1"][:, :, d:])
                dhs = [ns.summary_pool_backward(dmean[m], dmax[m], masks[m], argmaxes[m], Ts[m]).view(B * Ts[m], d)
                       if need_h[m] else None for m in range(M)]
                dmean = dmax = None
            de_pre = None
        # gate GEMM: zpre = (x W_r^T + b_r) + h W_h^T
        if ws_dh is not None:  # every modality's dH, written into one buffer
            pieces = ws_dh().split([B * T for T in Ts])
            dhs = [torch.mm(dz, wh, out=out) if dh is None else torch.addmm(dh, dz, wh, out=out)
                   for dh, dz, wh, out in zip(dhs, dzs, P["wh"], pieces)]
        else:
            dhs = [None if not need_h[m] else dz @ wh if dh is None else dh.addmm_(dz, wh)
                   for m, (dh, dz, wh) in enumerate(zip(dhs, dzs, P["wh"]))]
        dpres = dhs
        if spec.mlp:
            if ws_w2 is not None:
                g["w2"] = ws_w2()
                for dh, a, out in zip(dhs, acts, g["w2"].unbind(0)):
                    torch.mm(dh.t(), a, out=out)
            if need["b2"]:
                lengths = torch.tensor([B * T for T in Ts], device=pre_all.device)
                g["b2"] = torch.segment_reduce(ws_dh(), "sum", lengths=lengths)  # [M, d], one launch
            acts = None
            if ws_dact is not None:  # every modality: one GELU backward over all rows
                dact = ws_dact()
                for dh, w2, out in zip(dhs, P["w2"].unbind(0), dact.split([B * T for T in Ts])):
                    torch.mm(dh, w2, out=out)
                dhs = None
                dpres = list(torch.ops.aten.gelu_backward(dact, pre_all).split([B * T for T in Ts]))
                dact = None
            else:
                pres = pre_all.split([B * T for T in Ts])
                dpres = [torch.ops.aten.gelu_backward(dh @ w2, pre) if need_p1[m] else None
                         for m, (dh, w2, pre) in enumerate(zip(dhs, P["w2"].unbind(0), pres))]
                dhs = None
        # [P1; W_r] (or [P1; V^T]) share one GEMM on X: each half of its weight gradient is written
        # into its final buffer, and dX accumulates in place into gate_norm's dX (no [BT, d + D] buffer)
        g["xw"], g["xb"], g["gu"], dx_out = [None] * M, [None] * M, [None] * M, [None] * M
        for m in range(M):
            dpre, dz, x2, u = dpres[m], dzs[m], x2s[m], P["gu"][m]
            dtail = dz  # the gradient of the shared GEMM's tail: dZ at full rank, dA = dZ U at low rank
            if u is not None:  # §4a: dU = dZ^T A, dA = dZ U
                if need["gu"][m]:
                    g["gu"][m] = torch.mm(dz.t(), a_low[m])
                dtail = torch.mm(dz, u) if need_x[m] or need["xw"][m] else None
            if ws_xw[m] is not None:
                gw = ws_xw[m]()
                torch.mm(dpre.t(), x2, out=gw[:d])
                torch.mm(dtail.t(), x2, out=gw[d:])
                g["xw"][m] = gw
            if ws_xb[m] is not None:
                gb = ws_xb[m]()
                torch.sum(dpre, 0, out=gb[:d])
                torch.sum(dz, 0, out=gb[d:])
                g["xb"][m] = gb
            if need_x[m]:
                w = P["xw"][m]
                dx = dxs[m].view(B * Ts[m], dims[m])
                if spec.low is None:
                    dx.addmm_(dpre, w[:d]).addmm_(dtail, w[d:])
                else:  # accumulated in float32, the features' dtype
                    dx.add_(torch.mm(dpre, w[:d]).addmm_(dtail, w[d:]))
                dx_out[m] = dx.view(B, Ts[m], dims[m])
            dpres[m] = dzs[m] = dtail = None  # free each modality's buffers at their last use
        if spec.low is not None:
            return (None, None, *_full_precision_grads(spec, g, dx_out, dlnw, dlnb, need))
        return (None, None, *dx_out, *[None] * M, *_flatten_grads(spec, g, flat_params))


class _Workspace:
    """One allocation carved into several tensors: ``take(*shape)`` returns a getter for a view."""

    def __init__(self, like: torch.Tensor):
        self.like, self.sizes, self.buffer = like, [], None

    def take(self, *shape):
        start = sum(n for _, n in self.sizes)
        numel = 1
        for n in shape:
            numel *= n
        self.sizes.append((shape, numel))
        return lambda: self.buffer[start:start + numel].view(shape)

    def allocate(self) -> None:
        self.buffer = self.like.new_empty(sum(n for _, n in self.sizes))


_PARAM_ORDER = ("xw", "xb", "w2", "b2", "wh", "gu", "ew1", "eb1", "ew2", "eb2", "vw1", "vb1", "vw2", "vb2",
                "hw", "hb", "rw", "lnw", "lnb", "zero")
_PER_MODALITY = ("xw", "xb", "wh", "gu")  # "gu": U of a low-rank raw gate (None at full rank)


def _param_names(spec) -> list:
    names = []
    for n in _PARAM_ORDER:
        if n in ("w2", "b2") and not spec.mlp:
            continue
        if n in ("hw", "hb") and not spec.k:
            continue
        if n == "gu" and all(r is None for r in spec.ranks):
            continue
        names.append(n)
    return names


def _param_count(spec) -> int:
    return sum(spec.M if n in _PER_MODALITY else 1 for n in _param_names(spec))


def _unflatten_params(spec, flat) -> dict:
    P, i = {}, 0
    for n in _param_names(spec):
        if n in _PER_MODALITY:
            P[n] = list(flat[i:i + spec.M])
            i += spec.M
        else:
            P[n] = flat[i]
            i += 1
    P.setdefault("gu", [None] * spec.M)  # every modality full rank
    return P


def _flatten_grads(spec, g: dict, flat_params) -> list:
    out, i = [], 0
    for n in _param_names(spec):
        if n in _PER_MODALITY:
            items = g.get(n) or [None] * spec.M
            for gi in items:
                out.append(None if gi is None else gi.to(flat_params[i].dtype))
                i += 1
        else:
            gi = g.get(n)
            out.append(None if gi is None else gi.to(flat_params[i].dtype))
            i += 1
    return out


def _param_slots(spec) -> list:
    """The parameter name of each flat parameter input, in order (per-modality names repeated)."""
    return [n for n in _param_names(spec) for _ in range(spec.M if n in _PER_MODALITY else 1)]


def _cast_group(tensors, dtype):
    """``[t.to(dtype) for t in tensors]`` as one allocation and one copy (two ops, not one per
    tensor): ``(buffer, views)``, the views laid out in order in the one buffer."""
    sizes = [t.numel() for t in tensors]
    buffer = tensors[0].new_empty(sum(sizes), dtype=dtype)
    out = [piece.view(t.shape) for piece, t in zip(buffer.split(sizes), tensors)]
    torch._foreach_copy_(out, list(tensors))
    return buffer, out


def _full_precision_grads(spec, g: dict, dx_out, dlnw, dlnb, need) -> list:
    """Under autocast: the backward's outputs (the features' gradients, float32 already, then the
    parameters' in input order) in float32, the inputs' dtype, through one cast; the LayerNorm
    gradients of all modalities gathered by the same copy."""
    M = spec.M
    groups = []
    for n in _param_names(spec):
        if n in ("lnw", "lnb"):
            if need[n]:
                groups.append(((n, 0), dlnw if n == "lnw" else dlnb))
            continue
        items = (g.get(n) or [None] * M) if n in _PER_MODALITY else [g.get(n)]
        groups += [((n, j), [gi]) for j, gi in enumerate(items) if gi is not None]
    full = {}
    if groups:
        buffer, _ = _cast_group([t for _, parts in groups for t in parts], torch.float32)
        start = 0
        for key, parts in groups:
            numel = sum(t.numel() for t in parts)
            full[key] = buffer[start:start + numel].view(parts[0].shape if len(parts) == 1 else (numel,))
            start += numel
    grads = [full.get((n, j)) for n in _param_names(spec) for j in range(M if n in _PER_MODALITY else 1)]
    return [*dx_out, *[None] * M, *grads]


def _seed_arg(seeds, m: int):
    """Modality m's dropout seed as the raw ops take it: a one-element int64 tensor on the
    inputs' device, read by the kernel (no host sync)."""
    return seeds[m:m + 1]


class VGMR(nn.Module):
    """Fused VGMR. Arguments as ``vgmr_fast.reference.VGMR``, plus:

    Args:
        backend: ``"auto"`` (best available for the inputs' device; falls back to the reference
            with a one-time warning when no fused backend is available), ``"reference"``,
            ``"cpu"`` (C++), ``"cuda"`` (CUDA C++) or ``"triton"``.
        gate_gemm: ``"two"`` (X W_r^T comes out of P's first GEMM, H W_h^T accumulates into it)
            or ``"stacked"`` (one GEMM over the concatenation ``[X; H]``).
        recompute_gate_gemm: recompute the gate GEMM (Zpre) in the backward instead of saving it:
            activations saved for backward drop by ``B * sum T_m D_m`` elements, for two more
            GEMMs per modality in the backward.

    On a fused backend (``gate_gemm="two"``) the layer runs as one autograd node with a
    hand-written backward (:class:`_FusedVGMR`); under ``torch.autocast`` that node casts the
    features and GEMM weights to the autocast dtype in one copy, runs gate_norm with float32
    statistics, and returns float32 gradients. Otherwise (reference backend, ``gate_gemm="stacked"``,
    an empty batch) the layer runs as torch autograd over the same grouped steps.

    Dropout (training, ``dropout > 0``) draws one int64 tensor of M seeds per forward on the
    inputs' device (``torch.randint`` on that device's generator); on the CPU the reference
    draws the same and drops the same elements under the same ``torch.manual_seed``.

    With ``return_aux=True`` the auxiliaries match the reference's; the gate statistics
    (``gate``, ``gate_mean``) cost one extra elementwise pass, done only on request.
    """

    has_aux = True  # backbones ask for the auxiliaries with return_aux=True

    def __init__(self, widths, d: int = 128, alpha: float = 0.5, beta: float = 0.2, dropout: float = 0.1,
                 *, use_global_value: bool = True, use_channel_value: bool = True, use_agreement: bool = True,
                 use_discrepancy: bool = True, projection: str = "mlp", gate_rank=None, backend: str = "auto",
                 gate_gemm: str = "two", recompute_gate_gemm: bool = False):
        super().__init__()
        cfg = inputs.parse_config(widths, d, alpha, beta, dropout, use_global_value, use_channel_value,
                                  use_agreement, use_discrepancy, projection)
        self.gate_rank = gate_rank
        self.gate_ranks = inputs.parse_gate_rank(gate_rank, cfg.names, cfg.widths)
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if gate_gemm not in ("two", "stacked"):
            raise ValueError(f"gate_gemm: expected 'two' or 'stacked', got {gate_gemm!r}")
        self.names, self.widths, self.d = cfg.names, cfg.widths, cfg.d
        self.alpha, self.beta, self.p = cfg.alpha, cfg.beta, cfg.p
        self.use_global_value, self.use_channel_value = cfg.use_global_value, cfg.use_channel_value
        self.use_agreement, self.use_discrepancy = cfg.use_agreement, cfg.use_discrepancy
        self.projection = cfg.projection
        self.backend, self.gate_gemm = backend, gate_gemm
        self.recompute_gate_gemm = bool(recompute_gate_gemm)
        M = len(self.widths)
        self.u_blocks = ref.interaction_blocks(M, self.use_agreement, self.use_discrepancy)
        self._build(self._initial_state())
        self.register_state_dict_post_hook(_state_dict_to_reference)
        self.register_load_state_dict_pre_hook(_load_reference_state)

    # -- layout -------------------------------------------------------------------------
    @property
    def num_modalities(self) -> int:
        return len(self.widths)

    def _initial_state(self) -> dict:
        """The reference's state for a fresh module, drawn in the reference's order (so the same
        ``torch.manual_seed`` gives both modules the same initial weights)."""
        d, u_width = self.d, len(self.u_blocks) * self.d
        state = {}
        for m, D in enumerate(self.widths):
            pre = f"blocks.{m}."
            pieces = []
            if self.projection == "mlp":
                pieces += [("proj.0", _linear_init(d, D)), ("proj.2", _linear_init(d, d))]
            else:
                pieces += [("proj", _linear_init(d, D))]
            pieces += [("summary.0", _linear_init(d, 2 * d)), ("summary.2", _linear_init(d, d)),
                       ("value.0", _linear_init(d, u_width)), ("value.2", _linear_init(d, d))]
            if self.use_global_value:
                pieces.append(("global_head", _linear_init(1, d)))
            if self.use_channel_value:
                pieces.append(("channel_head", _linear_init(d, d)))
            r = self.gate_ranks[m]
            if r is None:
                pieces.append(("gate_raw", _linear_init(D, D)))
            else:  # §4a: u, v and the bias drawn as the reference's LowRankLinear draws them
                u, v, bias = ref.low_rank_init(D, r)
                state[pre + "gate_raw.u"], state[pre + "gate_raw.v"] = u, v
                pieces.append(("gate_raw", (None, bias)))
            pieces.append(("gate_latent", _linear_init(D, d)))
            if self.use_global_value:
                pieces.append(("gate_global", _linear_init(D, 1)))
            if self.use_channel_value:
                pieces.append(("gate_channel", _linear_init(D, d)))
            pieces.append(("norm", (torch.ones(D), torch.zeros(D))))
            for name, (w, b) in pieces:
                if w is not None:
                    state[pre + name + ".weight"] = w
                state[pre + name + ".bias"] = b
        return state

    def _build(self, state: dict) -> None:
        """Allocate the stacked parameters and the map ``reference key -> (parameter, index)``."""
        M, d, dims = self.num_modalities, self.d, self.widths
        u_width = len(self.u_blocks) * d
        g = 1 if self.use_global_value else 0
        k = g + (d if self.use_channel_value else 0)
        offsets = [sum(dims[:m]) for m in range(M)]
        total = sum(dims)
        self._offsets, self._k, self._g = offsets, k, g
        slots: list[tuple[str, str, tuple]] = []  # (reference key, parameter name, index)

        def param(*shape):
            return nn.Parameter(torch.empty(*shape))

        # per modality: [P1; W_r] (low rank: [P1; V^T]) share X; P2 stacked (d x d for every m); W_h;
        # the bias [b1; b_r] either way; U of each low-rank raw gate, keyed by modality index
        ranks = self.gate_ranks
        self.x_weight = nn.ParameterList(param(d + (D if r is None else r), D) for D, r in zip(dims, ranks))
        self.x_bias = nn.ParameterList(param(d + D) for D in dims)
        self._low_rank = [r is not None for r in ranks]
        if any(self._low_rank):
            self.gate_u = nn.ParameterDict({str(m): param(D, r) for m, (D, r) in enumerate(zip(dims, ranks))
                                            if r is not None})
        # reference keys whose value is the transpose of their slot (V is stored as V^T)
        self._transposed = set()
        if self.projection == "mlp":
            self.proj2_weight, self.proj2_bias = param(M, d, d), param(M, d)
        self.gate_latent_weight = nn.ParameterList(param(D, d) for D in dims)
        # shared networks on d, stacked over modalities
        self.summary_w1, self.summary_b1 = param(M, d, 2 * d), param(M, d)
        self.summary_w2, self.summary_b2 = param(M, d, d), param(M, d)
        self.value_w1, self.value_b1 = param(M, d, u_width), param(M, d)
        self.value_w2, self.value_b2 = param(M, d, d), param(M, d)
        if k:
            self.head_weight, self.head_bias = param(M, k, d), param(M, k)
        # the per-sample gate terms of every modality, stacked along D: columns
        # [A_g | A_c | b_h | b_g | b_c] (the biases multiply constant inputs, one GEMM per modality)
        nb = 1 + g + (1 if self.use_channel_value else 0)
        self._nb = nb
        self.row_weight = param(total, k + nb)
        self.norm_weight, self.norm_bias = param(total), param(total)

        for m, D in enumerate(dims):
            pre, rows = f"blocks.{m}.", slice(offsets[m], offsets[m] + D)
            lead, tail = slice(0, d), slice(d, d + D)
            if self.projection == "mlp":
                slots += [(pre + "proj.0.weight", f"x_weight.{m}", (lead,)),
                          (pre + "proj.0.bias", f"x_bias.{m}", (lead,)),
                          (pre + "proj.2.weight", "proj2_weight", (m,)),
                          (pre + "proj.2.bias", "proj2_bias", (m,))]
            else:
                slots += [(pre + "proj.weight", f"x_weight.{m}", (lead,)),
                          (pre + "proj.bias", f"x_bias.{m}", (lead,))]
            for name, w, b in (("summary.0", "summary_w1", "summary_b1"), ("summary.2", "summary_w2", "summary_b2"),
                               ("value.0", "value_w1", "value_b1"), ("value.2", "value_w2", "value_b2")):
                slots += [(pre + name + ".weight", w, (m,)), (pre + name + ".bias", b, (m,))]
            if g:
                slots += [(pre + "global_head.weight", "head_weight", (m, slice(0, 1))),
                          (pre + "global_head.bias", "head_bias", (m, slice(0, 1)))]
            if self.use_channel_value:
                slots += [(pre + "channel_head.weight", "head_weight", (m, slice(g, k))),
                          (pre + "channel_head.bias", "head_bias", (m, slice(g, k)))]
            if ranks[m] is None:
                slots.append((pre + "gate_raw.weight", f"x_weight.{m}", (tail,)))
            else:
                slots += [(pre + "gate_raw.u", f"gate_u.{m}", ()),
                          (pre + "gate_raw.v", f"x_weight.{m}", (slice(d, d + ranks[m]),))]
                self._transposed.add(pre + "gate_raw.v")
            slots += [(pre + "gate_raw.bias", f"x_bias.{m}", (tail,)),
                      (pre + "gate_latent.weight", f"gate_latent_weight.{m}", ()),
                      (pre + "gate_latent.bias", "row_weight", (rows, k))]
            if g:
                slots += [(pre + "gate_global.weight", "row_weight", (rows, slice(0, 1))),
                          (pre + "gate_global.bias", "row_weight", (rows, k + 1))]
            if self.use_channel_value:
                slots += [(pre + "gate_channel.weight", "row_weight", (rows, slice(g, k))),
                          (pre + "gate_channel.bias", "row_weight", (rows, k + 1 + g))]
            slots += [(pre + "norm.weight", "norm_weight", (rows,)), (pre + "norm.bias", "norm_bias", (rows,))]
        self._slots = slots
        # the ignored input of the bias-row GEMMs (beta = 0): a buffer, so no launch per step
        self.register_buffer("_zero", torch.zeros(()), persistent=False)
        # the seeds the raw ops are given when there is no dropout (they never read them)
        self.register_buffer("_no_seeds", torch.zeros(M, dtype=torch.int64), persistent=False)
        with torch.no_grad():
            for key, pname, index in slots:
                self._slot_view(key, self.get_parameter(pname), index).copy_(state[key])

    def _slot_view(self, key: str, tensor: torch.Tensor, index: tuple) -> torch.Tensor:
        """The reference's view of ``tensor[index]`` for reference key ``key`` (transposed for V)."""
        view = tensor[index]
        return view.t() if key in self._transposed else view

    def reference_view(self, tensors: dict) -> dict:
        """``{reference key: tensors[parameter name][index]}`` for a dict keyed by this module's
        parameter names (e.g. their gradients): the reference's view of per-parameter tensors."""
        return {key: self._slot_view(key, tensors[pname], index)
                for key, pname, index in self._slots if tensors.get(pname) is not None}

    def reference_grads(self) -> dict:
        """The parameters' gradients keyed and shaped as the reference's parameters (views)."""
        return self.reference_view({n: p.grad for n, p in self.named_parameters()})

    @property
    def blocks(self):
        """Per-modality read-only views for code written against the reference's ``blocks[m]``:
        ``blocks[m].norm`` (``weight``, ``bias``, ``eps``). Parameters are stacked across
        modalities here, so there is no per-modality ``nn.Module``."""
        return [_BlockView(self, m) for m in range(self.num_modalities)]

    def extra_repr(self) -> str:
        return (
            f"widths={self.widths}, d={self.d}, alpha={self.alpha}, beta={self.beta}, dropout={self.p}, "
            f"global={self.use_global_value}, channel={self.use_channel_value}, "
            f"agreement={self.use_agreement}, discrepancy={self.use_discrepancy}, projection={self.projection!r}, "
            f"backend={self.backend!r}, gate_gemm={self.gate_gemm!r}, recompute_gate_gemm={self.recompute_gate_gemm}"
            + ("" if self.gate_rank is None else f", gate_rank={self.gate_rank!r}")
        )

    def resolved_backend(self, device: torch.device) -> str:
        """The backend this module runs on ``device`` (``"reference"`` when nothing fused is available)."""
        if self.backend == "reference":
            return "reference"
        try:
            return _backend.resolve(self.backend, device)
        except (RuntimeError, OSError) as exc:
            if self.backend != "auto":
                raise
            _warn_once(f"fallback-{device.type}",
                       f"vgmr_fast: no fused backend available for {device.type} tensors ({exc}); "
                       "using the reference implementation")
            return "reference"

    # -- forward ----------------------------------------------------------------------
    def forward(self, xs, masks=None, return_aux: bool = False):
        xs_list, masks_list = inputs.prepare(xs, masks, self.names, self.widths, self.norm_weight.dtype)
        B = xs_list[0].shape[0]
        backend = self.resolved_backend(xs_list[0].device)
        if backend == "reference" or B == 0:
            ops = _ReferenceOps  # plain torch handles every case, an empty batch included
        else:
            from . import ops

            if self.gate_gemm == "two":
                return self._forward_fused(xs, xs_list, masks_list, backend, return_aux)
        M, d, k = self.num_modalities, self.d, self._k
        dims = self.widths
        Ts = [x.shape[1] for x in xs_list]
        x2s = [x.reshape(B * T, D) for x, T, D in zip(xs_list, Ts, dims)]
        stacked = self.gate_gemm == "stacked"

        # Per-modality pieces of stacked tensors are taken with split / unbind (one launch in the
        # backward: a cat / stack), never with indexing (a scatter and an add per piece).
        # P's first layer, and X W_r^T + b_r from the same GEMM (unless the gate GEMM is stacked)
        pres, zrs = [], []
        for m in range(M):
            if self._low_rank[m]:  # §4a: [P1; V^T] on X gives P's pre-activation and A = X V
                b1, br = self.x_bias[m].split([d, dims[m]])
                pre, a = torch.mm(x2s[m], self.x_weight[m].t()).split([d, self.gate_ranks[m]], dim=1)
                pres.append(pre + b1)
                zrs.append(a if stacked else torch.addmm(br, a, self._gate_u(m).t()))
            elif stacked:
                w1, wr = self.x_weight[m].split([d, dims[m]])
                b1, br = self.x_bias[m].split([d, dims[m]])
                pres.append(torch.addmm(b1, x2s[m], w1.t()))
                zrs.append(None)
            else:
                pre, zr = torch.addmm(self.x_bias[m], x2s[m], self.x_weight[m].t()).split([d, dims[m]], dim=1)
                pres.append(pre)
                zrs.append(zr)
        if self.projection == "mlp":
            acts = F.gelu(torch.cat(pres)).split([B * T for T in Ts])  # one GELU for every modality
            hs = [torch.addmm(b2, a, w2.t()) for a, w2, b2 in
                  zip(acts, self.proj2_weight.unbind(0), self.proj2_bias.unbind(0))]
        else:
            hs = pres

        # §1 summary: pooled [mean; max] of every modality -> E as batched GEMMs
        pooled = []
        for h, T, mk in zip(hs, Ts, masks_list):
            pooled.extend(ops.summary_pool(h.reshape(B, T, d), mk, backend=backend))
        summary_in = torch.stack(pooled, dim=1).view(B, M, 2 * d).transpose(0, 1)  # [M, B, 2d]
        e = F.gelu(torch.baddbmm(self.summary_b1.unsqueeze(1), summary_in, self.summary_w1.transpose(1, 2)))
        s = torch.baddbmm(self.summary_b2.unsqueeze(1), e, self.summary_w2.transpose(1, 2))  # [M, B, d]
        # §2 interaction, §3 values
        u = ops.interaction(s.transpose(0, 1), backend=backend)  # [B, M, (3M-1)d]
        if len(self.u_blocks) != 3 * M - 1:
            u = u.view(B, M, 3 * M - 1, d)[:, :, self.u_blocks].reshape(B, M, len(self.u_blocks) * d)
        r = F.gelu(torch.baddbmm(self.value_b1.unsqueeze(1), u.transpose(0, 1), self.value_w1.transpose(1, 2)))
        r = torch.baddbmm(self.value_b2.unsqueeze(1), r, self.value_w2.transpose(1, 2))
        # heads: t = tanh(z/2) = 2 sigmoid(z) - 1, so A (sigmoid(z) - 1/2) = (A t) / 2; the bias
        # columns of row_weight meet constant 2s (times the GEMM's 1/2: every bias once)
        t = None
        if k:
            t = torch.tanh(torch.baddbmm(self.head_bias.unsqueeze(1), r, self.head_weight.transpose(1, 2),
                                         beta=0.5, alpha=0.5))  # [M, B, k]
            t_ext = F.pad(t, (0, self._nb), value=2.0)
        else:
            t_ext = r.new_full((M, B, self._nb), 2.0)

        # §4 gate logits and the per-sample bias row, §5 gate_norm
        zpres, rows = [], []
        row_ws = self.row_weight.split(dims)
        for m, (x2, h, T, D, tm) in enumerate(zip(x2s, hs, Ts, dims, t_ext.unbind(0))):
            if stacked:  # one GEMM over [X; H] (low rank: over [A; H], with [U, W_h])
                br = self.x_bias[m][d:]
                wr, left = (self.x_weight[m][d:], x2) if zrs[m] is None else (self._gate_u(m), zrs[m])
                w = torch.cat([wr, self.gate_latent_weight[m]], dim=1)
                z = torch.addmm(br, torch.cat([left, h], dim=1), w.t())
            else:
                z = torch.addmm(zrs[m], h, self.gate_latent_weight[m].t())
            zpres.append(z.view(B, T, D).to(x2.dtype))  # autocast may hand back a lower precision
            rows.append(torch.addmm(self._zero, tm, row_ws[m].t(), beta=0.0, alpha=0.5))
        p = self.p if self.training else 0.0
        outs = self._gate_norm(ops, backend, zpres, rows, xs_list, p)
        refined = inputs.pack(xs, self.names, outs)
        if not return_aux:
            return refined
        return refined, self._aux(t, zpres, rows)

    def _forward_fused(self, xs, xs_list, masks_list, backend, return_aux):
        M = self.num_modalities
        p = self.p if self.training else 0.0
        device = xs_list[0].device
        seeds = draw_seeds(M, device=device) if p > 0 else self._no_seeds
        autocast = _autocast_on(device)
        # autocast casts float32 only; the layer then computes in its dtype inside the one node
        low = torch.get_autocast_dtype(device.type) if autocast and self.norm_weight.dtype == torch.float32 else None
        spec = _Spec(*(M, self.d, self.alpha, self.beta, p, backend, self.projection == "mlp", self._k, self._nb,
                      tuple(self.u_blocks), self.recompute_gate_gemm,
                      _backend.has_grouped(backend), low, tuple(self.gate_ranks)))
        # indexed, not unpacked: Dynamo traces ParameterList indexing, not its iteration
        params = [self.x_weight[m] for m in range(M)] + [self.x_bias[m] for m in range(M)]
        if spec.mlp:
            params += [self.proj2_weight, self.proj2_bias]
        params += [self.gate_latent_weight[m] for m in range(M)]
        if any(self._low_rank):
            params += [self._gate_u(m) for m in range(M)]
        params += [self.summary_w1, self.summary_b1, self.summary_w2, self.summary_b2,
                   self.value_w1, self.value_b1, self.value_w2, self.value_b2]
        if self._k:
            params += [self.head_weight, self.head_bias]
        params += [self.row_weight, self.norm_weight, self.norm_bias, self._zero]
        # no gradient asked for (inference): the forward alone, without an autograd node
        run = (_FusedVGMR.apply if torch.is_grad_enabled() and any(t.requires_grad for t in xs_list + params)
               else functools.partial(_FusedVGMR.forward, None))
        if autocast:  # the casts are the node's own (one for every weight), not autocast's per op
            with torch.autocast(device.type, enabled=False):
                outs = run(spec, seeds, *xs_list, *masks_list, *params)
        else:
            outs = run(spec, seeds, *xs_list, *masks_list, *params)
        ys = list(outs[:M])
        refined = inputs.pack(xs, self.names, ys)
        if not return_aux:
            return refined
        t = outs[M] if self._k else None
        rest = outs[M + (1 if self._k else 0):]
        return refined, self._aux(t, list(rest[:M]), list(rest[M:2 * M]))

    def _gate_u(self, m: int):
        """U of modality m's low-rank raw gate (None at full rank)."""
        return self.gate_u[str(m)] if self._low_rank[m] else None

    def _gate_norm(self, ops, backend, zpres, rows, xs_list, p):
        lnw, lnb = self.norm_weight.split(self.widths), self.norm_bias.split(self.widths)
        if p == 0:
            return [ops.gate_norm(z, r, x, w, b, alpha=self.alpha, beta=self.beta, backend=backend)
                    for z, r, x, w, b in zip(zpres, rows, xs_list, lnw, lnb)]
        seeds = draw_seeds(self.num_modalities, device=xs_list[0].device)
        return [ops.gate_norm(z, r, x, w, b, alpha=self.alpha, beta=self.beta, p=p,
                              seed=_seed_arg(seeds, m), backend=backend)
                for m, (z, r, x, w, b) in enumerate(zip(zpres, rows, xs_list, lnw, lnb))]

    def _aux(self, t, zpres, rows):
        g = self._g
        values = None if t is None else 0.5 * t + 0.5  # sigmoid(z), [M, B, k]
        gates = [torch.sigmoid(z + r.unsqueeze(1).to(z.dtype)) for z, r in zip(zpres, rows)]
        return {
            "global_value": values[:, :, 0].t().contiguous() if g else None,
            "channel_value": values[:, :, g:].transpose(0, 1).contiguous() if self.use_channel_value else None,
            "gate_mean": torch.stack([G.float().mean(dim=(1, 2)) for G in gates], dim=1),
            "gate": gates,
        }


class _NormView:
    def __init__(self, weight, bias):
        self.weight, self.bias, self.eps = weight, bias, EPS
        self.normalized_shape = tuple(weight.shape)


class _BlockView:
    """``blocks[m]`` of a fused VGMR: the modality's LayerNorm as views of the stacked parameters."""

    def __init__(self, module: VGMR, m: int):
        o, D = module._offsets[m], module.widths[m]
        self.norm = _NormView(module.norm_weight[o:o + D], module.norm_bias[o:o + D])


def _state_dict_to_reference(module: VGMR, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: replace this layout's entries by the reference's keys and values."""
    own = {}
    for name, _ in module.named_parameters():
        own[name] = state_dict.pop(prefix + name)
    for key, pname, index in module._slots:
        state_dict[prefix + key] = module._slot_view(key, own[pname], index)


def _load_reference_state(module: VGMR, state_dict, prefix, local_metadata, strict, missing_keys,
                          unexpected_keys, error_msgs) -> None:
    """Load pre-hook: a state in the reference's keys becomes this layout's (strict loading then
    checks this layout's keys); a state already in this layout passes through."""
    if not any(prefix + key in state_dict for key, _, _ in module._slots):
        return
    own = {name: p.detach().clone() for name, p in module.named_parameters()}
    for key, pname, index in module._slots:
        full = prefix + key
        if full not in state_dict:
            missing_keys.append(full)
            continue
        value = state_dict.pop(full)
        target = module._slot_view(key, own[pname], index)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(target.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            error_msgs.append(f"size mismatch for {full}: copying a param with shape {shape} from checkpoint, "
                              f"the shape in current model is {tuple(target.shape)}.")
            continue
        target.copy_(value)
    for name, tensor in own.items():
        state_dict[prefix + name] = tensor


def from_reference(module: ref.VGMR, **kwargs) -> VGMR:
    """A fused VGMR with the same configuration and weights as a reference one."""
    fused = VGMR(
        dict(zip(module.names, module.widths)) if module.names else list(module.widths),
        module.d, module.alpha, module.beta, module.p,
        use_global_value=module.use_global_value, use_channel_value=module.use_channel_value,
        use_agreement=module.use_agreement, use_discrepancy=module.use_discrepancy,
        projection=module.projection, gate_rank=getattr(module, "gate_rank", None), **kwargs,
    )
    param = next(module.parameters())
    fused = fused.to(device=param.device, dtype=param.dtype)
    fused.load_state_dict(module.state_dict())
    return fused.train(module.training)


__all__ = ["VGMR", "from_reference", "BACKENDS"]
