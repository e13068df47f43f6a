"""The fused layer as one autograd node (:class:`_FusedVGMR`): the raw fused ops, the GEMMs, and a
backward written out by hand, computing only the gradients asked for.

The module :class:`vgmr_fast.vgmr.VGMR` owns the parameters and their layout and calls this node
with them flattened in ``_PARAM_ORDER`` (per-modality names once per modality); ``_Spec`` is the
call's static configuration. Section marks (§N) refer to docs/math.md.
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

from .ops import backend as _backend


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
    tail = ``A = X V`` (no bias: ``b_r`` joins the ``A U^T`` GEMM, :func:`_zpre`)."""
    if u is None:
        o = torch.addmm(b, x2, w.t())
        return o[:, :d], o[:, d:]
    o = torch.mm(x2, w.t())
    return o[:, :d] + b[:d], o[:, d:]


def _zpre(tail, b, u, h, wh, d):
    """§4 ``Zpre = (X W_r^T + b_r) + H W_h^T`` from :func:`_x_gemm`'s tail: at full rank the tail
    already holds ``X W_r^T + b_r``; at low rank ``A U^T + b_r`` is a fresh buffer, so ``H W_h^T``
    accumulates into it in place (one pass over ``[B*T, D]`` fewer than a new output)."""
    if u is None:
        return torch.addmm(tail, h, wh.t())
    return torch.addmm(b[d:], tail, u.t()).addmm_(h, wh.t())


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
        zpres = [_zpre(o[1], b, u, h, wh, d).view(B, T, D)
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
            zpres = [_zpre(tail, b, u, h, wh, d).view(B, T, D)
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
