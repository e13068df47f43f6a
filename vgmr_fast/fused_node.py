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
from .ops.gemm import gemm, gemm_into


# Static configuration of one fused call (a named tuple: compilers treat it as a constant).
# ``low``: the autocast dtype the layer computes in (None: the parameters' dtype).
# ``ranks``: the raw gate's rank per modality (None: full rank, docs/math.md §4a).
# ``aux``: also return what the auxiliaries are made of (t, Zpre, the bias rows).
_Spec = collections.namedtuple("_Spec", ("M", "d", "alpha", "beta", "p", "backend", "mlp", "k", "nb", "u_blocks",
                                         "recompute", "grouped", "low", "ranks", "aux"))

# Under autocast these stay in float32: the bias-row GEMM (its output feeds gate_norm's float32
# side input), the LayerNorm parameters, and the beta = 0 input of the bias-row GEMMs.
_FULL_PRECISION = ("rw", "lnw", "lnb", "zero")

_TWICE = ("vgmr_fast.VGMR: the fused layer's backward ran a second time over one forward (retain_graph=True); "
          "it releases each activation at its last use. Run the forward again for each backward, or build the "
          "module with backend='reference' to backpropagate through one graph several times")


def _pdt(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _linear_grads(g: dict, need: dict, w: str, b: str, dout: torch.Tensor, inp: torch.Tensor) -> None:
    """Weight and bias gradients of a batched linear ``out = inp W^T + b``, each only when asked:
    ``g[w] = dout^T inp``, ``g[b] = sum of dout over rows``."""
    if need[w]:
        g[w] = gemm(dout.transpose(1, 2), inp)
    if need[b]:
        g[b] = dout.sum(1)


def _gelu_linear_backward(g: dict, need: dict, w: str, b: str, dnext: torch.Tensor, w_next: torch.Tensor,
                          pre: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """Backward of a batched ``next = GELU(pre) W_next^T``, ``pre = inp W^T + b`` from ``dnext``:
    ``g[w]``, ``g[b]`` as asked (:func:`_linear_grads`); returns ``dpre``."""
    dpre = torch.ops.aten.gelu_backward(gemm(dnext, w_next), pre)
    _linear_grads(g, need, w, b, dpre, inp)
    return dpre


# ---- what the forward keeps for the backward --------------------------------------------------
def _keep(ctx, inputs: list, kept: dict, release: bool) -> None:
    """Keep ``inputs`` (the call's own inputs) through ``save_for_backward`` and the activations
    ``kept`` (name -> tensor, list of tensors or None) for the backward.

    ``release``: the activations are held on ``ctx`` instead, so that the backward drops each one
    at its last use (autograd frees what ``save_for_backward`` holds only after the whole backward);
    they pass through the saved-tensor hooks in force (``torch.autograd.graph.saved_tensors_hooks``:
    offloading, counting) as saved tensors do. Used when they are none of the call's outputs (an
    output held on ``ctx`` would be a reference cycle) and no compiler traces the call (it plans
    the backward's memory itself)."""
    ctx.kept_layout = tuple((n, None if v is None or isinstance(v, torch.Tensor) else len(v)) for n, v in kept.items())
    flat = [t for v in kept.values() for t in (v if isinstance(v, (list, tuple)) else [v])]
    ctx.n_inputs, ctx.release = len(inputs), release
    if release:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        ctx.kept = [(None, t) if t is None or hooks is None else (hooks[1], hooks[0](t)) for t in flat]
        ctx.save_for_backward(*inputs)
    else:
        ctx.save_for_backward(*inputs, *flat)


def _take(ctx) -> tuple:
    """``(inputs, kept)`` as :func:`_keep` was given them; released activations leave ``ctx``."""
    saved = list(ctx.saved_tensors)
    inputs = saved[:ctx.n_inputs]
    if ctx.release:
        packed, ctx.kept = ctx.kept, None
        if packed is None:
            raise RuntimeError(_TWICE)
        flat = [t if unpack is None else unpack(t) for unpack, t in packed]
        del packed
    else:
        flat = saved[ctx.n_inputs:]
    del saved
    kept, i = {}, 0
    for name, n in ctx.kept_layout:
        if n is None:
            kept[name], i = flat[i], i + 1
        else:
            kept[name], i = flat[i:i + n], i + n
    return inputs, kept


# ---- forward stages (docs/math.md §1-§5) -------------------------------------------------------
def _projection(spec, P, x2s, rows_per, pre_all=None):
    """§1 P's first layer and the X side of the §4 gate GEMM, both on X: ``(pre_all, tails)``.

    ``pre_all``: P's pre-activation of every modality in one ``[sum B T_m, d]`` buffer (one GELU
    serves all). Full rank: tail = ``X W_r^T``, its own contiguous GEMM output, into which
    ``H W_h^T`` accumulates (:func:`_zpre`; ``b_r`` is a bias column of the bias rows, whose sum
    with Zpre is all the gate reads). Low rank: one GEMM on ``[P1; V^T]``, tail = ``A = X V``."""
    d = spec.d
    if pre_all is None:
        pre_all = x2s[0].new_empty(sum(rows_per), d)
    tails = []
    for x2, w, b, u, pre in zip(x2s, P["xw"], P["xb"], P["gu"], pre_all.split(rows_per)):
        if u is None:
            gemm_into(pre, x2, w[:d].t(), b)
            tails.append(gemm(x2, w[d:].t()))
        else:
            o = gemm(x2, w.t())
            torch.add(o[:, :d], b, out=pre)
            tails.append(o[:, d:])
    return pre_all, tails


def _hidden(spec, P, pre_all, rows_per, m=None, in_place=False):
    """§1 H = P's output: every modality's (``m`` None) or modality m's; ``(GELU output, H)``.
    ``in_place``: the GELU overwrites ``pre_all`` (a forward that keeps nothing for a backward)."""
    if not spec.mlp:
        pres = pre_all.split(rows_per)
        return None, (list(pres) if m is None else pres[m])
    if m is None:
        acts = torch._C._nn.gelu_(pre_all) if in_place else F.gelu(pre_all)
        if len(set(rows_per)) == 1:  # every modality has as many rows: one batched GEMM
            hs = gemm(acts.view(len(rows_per), rows_per[0], -1), P["w2"].transpose(1, 2), P["b2"].unsqueeze(1))
            return acts, list(hs.unbind(0))
        return acts, [gemm(a, w2.t(), b2)
                      for a, w2, b2 in zip(acts.split(rows_per), P["w2"].unbind(0), P["b2"].unbind(0))]
    act = F.gelu(pre_all.split(rows_per)[m])
    return act, gemm(act, P["w2"][m].t(), P["b2"][m])


def _zpre(tail, u, h, wh):
    """§4 ``Zpre = X W_r^T + H W_h^T`` (low rank: ``A U^T + H W_h^T``), accumulated in place into
    a fresh GEMM output (the tail at full rank, ``A U^T`` at low rank)."""
    z = tail if u is None else gemm(tail, u.t())
    return gemm_into(z, h, wh.t())


def _values(spec, ns, P, hs, masks, B, Ts, s_bm=None):
    """§1 summary, §2 interaction, §3 values and the heads: ``(t, t_ext, kept)``; ``t_ext`` is t
    with the constant columns the bias row's bias columns meet. ``s_bm``: a ``[B, M, d]`` buffer
    for the summary (the layout the interaction reads), or None."""
    M, d = spec.M, spec.d
    if not spec.k:
        return None, hs[0].new_full((M, B, spec.nb), 2.0, dtype=P["rw"].dtype), {}
    pooled, argmaxes = [], []
    for h, T, mk in zip(hs, Ts, masks):
        mean, mx, am = ns.summary_pool(h.view(B, T, d), mk)
        pooled += [mean, mx]
        argmaxes.append(am)
    summary_in = torch.stack(pooled, dim=1).view(B, M, 2 * d).transpose(0, 1)  # [M, B, 2d]
    e_pre = gemm(summary_in, P["ew1"].transpose(1, 2), P["eb1"].unsqueeze(1))
    e = F.gelu(e_pre)
    if s_bm is None:
        s_bm = gemm(e, P["ew2"].transpose(1, 2), P["eb2"].unsqueeze(1)).transpose(0, 1).contiguous()
    else:  # written straight into the layout the interaction reads (Dynamo takes no strided out=)
        gemm_into(s_bm.transpose(0, 1), e, P["ew2"].transpose(1, 2), P["eb2"].unsqueeze(1))
    u = ns.interaction(s_bm)
    if len(spec.u_blocks) != 3 * M - 1:
        u = u.view(B, M, 3 * M - 1, d)[:, :, list(spec.u_blocks)].reshape(B, M, len(spec.u_blocks) * d)
    r_pre = gemm(u.transpose(0, 1), P["vw1"].transpose(1, 2), P["vb1"].unsqueeze(1))
    r1 = F.gelu(r_pre)
    r = gemm(r1, P["vw2"].transpose(1, 2), P["vb2"].unsqueeze(1))
    # heads: t = tanh(z/2) = 2 sigmoid(z) - 1 (vgmr.py's module docstring)
    t = torch.tanh(gemm(r, P["hw"].transpose(1, 2), P["hb"].unsqueeze(1), beta=0.5, alpha=0.5))
    t_ext = F.pad(t, (0, spec.nb), value=2.0).to(P["rw"].dtype)
    kept = dict(summary_in=summary_in, e_pre=e_pre, e=e, s_bm=s_bm, u=u, r_pre=r_pre, r1=r1, r=r, t=t,
                argmaxes=argmaxes)
    return t, t_ext, kept


def _bias_rows(spec, P, t_ext, dims):
    """§4 the per-sample bias row of every modality: ``(t_ext RW^T) / 2`` (every bias, b_r among
    them, meets a constant 2 of ``t_ext``)."""
    return [gemm(tm, rw.t(), P["zero"], beta=0.0, alpha=0.5) for tm, rw in zip(t_ext.unbind(0), P["rw"].split(dims))]


def _gate_norm(spec, ns, zpres, rows, xs, lnws, lnbs, seeds):
    """§5 gate_norm of every modality: ``(ys, stats)`` (stats: mean and rstd of each modality)."""
    if spec.grouped:  # every modality in one operator call
        ys, means, rstds = ns.gate_norm_grouped(zpres, rows, xs, lnws, lnbs, spec.alpha, spec.beta, spec.p, seeds)
        return list(ys), [s for pair in zip(means, rstds) for s in pair]
    ys, stats = [], []
    for m in range(spec.M):
        y, mean, rstd = ns.gate_norm(zpres[m], rows[m], xs[m], lnws[m], lnbs[m], spec.alpha, spec.beta, spec.p,
                                     _seed_arg(seeds, m))
        ys.append(y)
        stats += [mean, rstd]
    return ys, stats


def _gate_norm_backward(spec, ns, dys, zpres, rows, xs, lnws, stats, seeds, need_x):
    """§5 backward of every modality: ``[(dZpre, dbias_row, dX, dln_weight, dln_bias)] * M``."""
    if spec.grouped:
        out = ns.gate_norm_grouped_backward(dys, zpres, rows, xs, lnws, stats[0::2], stats[1::2], spec.alpha,
                                            spec.beta, spec.p, seeds, need_x)
        return list(zip(*out))
    return [ns.gate_norm_backward(dys[m], zpres[m], rows[m], xs[m], lnws[m], stats[2 * m], stats[2 * m + 1],
                                  spec.alpha, spec.beta, spec.p, _seed_arg(seeds, m), need_x[m])
            for m in range(spec.M)]


def _needs(spec, needs_input_grad) -> tuple:
    """What the backward computes: ``(need_x, need, need_p1, need_h, chain)``, from the inputs' and
    each parameter's ``needs_input_grad``; each stage of the chain back to X runs only when
    something before it needs it."""
    M = spec.M
    need_x = list(needs_input_grad[2:2 + M])
    need = _unflatten_params(spec, needs_input_grad[2 + 2 * M:])
    need_p1 = [need_x[m] or need["xw"][m] or need["xb"][m] for m in range(M)]  # P's first layer
    need_h = [need_p1[m] or (spec.mlp and (need["w2"] or need["b2"])) for m in range(M)]  # dH_m
    chain, below = {}, any(need_h)
    for stage, (w_name, b_name) in (("e1", ("ew1", "eb1")), ("e2", ("ew2", "eb2")), ("v1", ("vw1", "vb1")),
                                    ("v2", ("vw2", "vb2")), ("heads", ("hw", "hb"))):  # summary back to heads
        below = below or bool(need.get(w_name)) or bool(need.get(b_name))
        chain[stage] = bool(spec.k) and below
    return need_x, need, need_p1, need_h, chain


def _values_backward(spec, ns, P, kept, g, need, chain, drows, dt_extra, dims, dt_half, du_buf, need_summary):
    """Backward of :func:`_values` from the bias rows' gradients (§4 heads, §3 values, §2
    interaction, §1 summary): the weight gradients asked for, into ``g``; returns ``(dmean, dmax)``
    (``[M, B, d]`` each, the pooled summary's gradients) when H needs them, else ``(None, None)``."""
    M, d, k = spec.M, spec.d, spec.k
    summary_in, e_pre, e, s_bm, u, r_pre, r1, r, t = (kept.pop(n) for n in (
        "summary_in", "e_pre", "e", "s_bm", "u", "r_pre", "r1", "r", "t"))
    if not chain["heads"]:
        return None, None
    B = s_bm.shape[0]
    # heads: t = tanh((hb + r hw^T) / 2), so dz = tanh'(.) dt / 2; the 1/2 rides on the GEMMs
    for dr, rw, out in zip(drows, P["rw"].split(dims), dt_half.unbind(0)):
        gemm_into(out, dr, rw[:, :k], P["zero"], beta=0.0, alpha=0.25)
    if dt_extra is not None:
        dt_half = dt_half + 0.5 * dt_extra
    dzh = torch.ops.aten.tanh_backward(dt_half.to(t.dtype), t)
    del dt_half, t
    _linear_grads(g, need, "hw", "hb", dzh, r)
    if not chain["v2"]:
        return None, None
    dr_ = gemm(dzh, P["hw"])  # §3 values
    del dzh
    _linear_grads(g, need, "vw2", "vb2", dr_, r1)
    if not chain["v1"]:
        return None, None
    dr_pre = _gelu_linear_backward(g, need, "vw1", "vb1", dr_, P["vw2"], r_pre, u.transpose(0, 1))
    del dr_
    if not chain["e2"]:
        return None, None
    width = len(spec.u_blocks) * d
    if du_buf is not None and not torch.compiler.is_compiling():
        # written as [B, M, width], the layout the interaction reads (a compiler fuses the
        # transpose itself, and Dynamo takes no strided out=)
        du = du_buf
        gemm_into(du.transpose(0, 1), dr_pre, P["vw1"], beta=0.0)
    else:
        du = gemm(dr_pre, P["vw1"]).transpose(0, 1)  # [B, M, width]
    del dr_pre
    if width != (3 * M - 1) * d:
        full = du.new_zeros(B, M, 3 * M - 1, d)
        full[:, :, list(spec.u_blocks)] = du.reshape(B, M, len(spec.u_blocks), d)
        du = full.view(B, M, (3 * M - 1) * d)
    # §2 interaction, §1 summary
    ds = ns.interaction_backward(du.contiguous(), s_bm).transpose(0, 1)  # [M, B, d]
    del du
    _linear_grads(g, need, "ew2", "eb2", ds, e)
    if not chain["e1"]:
        return None, None
    de_pre = _gelu_linear_backward(g, need, "ew1", "eb1", ds, P["ew2"], e_pre, summary_in)
    del ds
    if not need_summary:
        return None, None
    return gemm(de_pre, P["ew1"][:, :, :d]), gemm(de_pre, P["ew1"][:, :, d:])  # contiguous per m


def _p2_backward(spec, P, g, ws_w2, ws_b2, dh_all, acts, rows_per, need_p1, equal):
    """Backward of P's second layer ``H = GELU(pre) P2^T + b2`` over every modality's rows
    (``dh_all``, ``[sum B T_m, d]``): the weight and bias gradients asked for, into ``g``; returns
    GELU's output gradient (None when P's first layer needs none). Batched over the modalities
    when their rows agree, one GEMM (reduction) per modality otherwise."""
    M = spec.M
    if equal:
        n = rows_per[0]
        dh3 = dh_all.view(M, n, -1)
        if ws_w2 is not None:
            g["w2"] = gemm_into(ws_w2(), dh3.transpose(1, 2), acts.view(M, n, -1), beta=0.0)
        if ws_b2 is not None:
            g["b2"] = torch.sum(dh3, 1, out=ws_b2())
        return gemm(dh3, P["w2"]).view(dh_all.shape) if any(need_p1) else None
    dhs, act_m = dh_all.split(rows_per), acts.split(rows_per)
    if ws_w2 is not None:
        g["w2"] = ws_w2()
        for dh, a, out in zip(dhs, act_m, g["w2"].unbind(0)):
            gemm_into(out, dh.t(), a, beta=0.0)
    if ws_b2 is not None:
        g["b2"] = ws_b2()
        for dh, out in zip(dhs, g["b2"].unbind(0)):
            torch.sum(dh, 0, out=out)
    if not any(need_p1):
        return None
    dact = torch.empty_like(dh_all)
    for dh, w2, out in zip(dhs, P["w2"].unbind(0), dact.split(rows_per)):
        gemm_into(out, dh, w2, beta=0.0)
    return dact


def _autocast_operands(spec, xs, params):
    """Under autocast: the features and every GEMM weight in the autocast dtype, one cast for all
    (the bias-row GEMM, the LayerNorm and the zero stay as given)."""
    low = [i for i, n in enumerate(_param_slots(spec)) if n not in _FULL_PRECISION and params[i] is not None]
    _, cast = _cast_group(xs + [params[i] for i in low], spec.low)
    params = list(params)
    for i, t in zip(low, cast[len(xs):]):
        params[i] = t
    return list(cast[:len(xs)]), params


def _norm_params(P, xs, dims, bias=True):
    """The LayerNorm's weight and bias of each modality, in gate_norm's statistics dtype."""
    pdt = _pdt(xs[0])
    lnws = [w.to(pdt) for w in P["lnw"].split(dims)]
    return lnws, ([b.to(pdt) for b in P["lnb"].split(dims)] if bias else None)


class _FusedVGMR(torch.autograd.Function):
    """The whole layer as one autograd node: the raw fused ops, the GEMMs, and a backward written
    out by hand, stage by stage (§5 back to §1), so that it launches what the math needs (no
    per-piece scatters, no zero-filled gradients of unused outputs, only the gradients asked for)
    and keeps only what it cannot cheaply recompute: P's pre-activation, Zpre (or, with
    ``recompute_gate_gemm``, not even that), and small per-row or per-sample tensors, each dropped
    at its last use in the backward. Inputs: ``spec, seeds, *xs, *masks, *params``; outputs:
    ``*ys``, and with ``spec.aux`` also ``t (when the value heads exist), *zpres, *rows``.
    """

    @staticmethod
    def forward(ctx, spec, seeds, *flat):
        M, d = spec.M, spec.d
        ns = _backend.namespace(spec.backend)
        # the raw ops read dense rows (no-ops for the usual contiguous inputs)
        xs_given = [x.contiguous() for x in flat[:M]]
        masks = [None if mk is None else mk.contiguous() for mk in flat[M:2 * M]]
        params_given = list(flat[2 * M:])
        xs, params = xs_given, params_given  # what the GEMMs read
        if spec.low is not None:
            xs, params = _autocast_operands(spec, xs_given, params_given)
        P = _unflatten_params(spec, params)
        B = xs[0].shape[0]
        Ts, dims = [x.shape[1] for x in xs], [x.shape[2] for x in xs]
        rows_per = [B * T for T in Ts]
        x2s = [x.reshape(B * T, D) for x, T, D in zip(xs, Ts, dims)]
        # P's pre-activation and the summary (the interaction's [B, M, d] input) share one allocation
        fw = _Workspace(x2s[0])
        pre_buffer = fw.take(sum(rows_per), d)
        s_buffer = fw.take(B, M, d) if spec.k and not torch.compiler.is_compiling() else None
        fw.allocate()
        pre_all, tails = _projection(spec, P, x2s, rows_per, pre_buffer())
        # without a backward P's pre-activation is dead once activated: GELU in place
        hs = _hidden(spec, P, pre_all, rows_per, in_place=ctx is None)[1]
        t, t_ext, kept_values = _values(spec, ns, P, hs, masks, B, Ts, None if s_buffer is None else s_buffer())
        rows = _bias_rows(spec, P, t_ext, dims)
        a_low = [None if u is None else tail for tail, u in zip(tails, P["gu"])]
        zpres = [_zpre(tail, u, h, wh).view(B, T, D) for tail, u, h, wh, T, D in zip(tails, P["gu"], hs, P["wh"], Ts, dims)]
        del tails
        # what gate_norm no longer reads is released before its outputs are allocated: H (the
        # backward works from pre_all) and, without a backward, the workspace of P's activation
        if spec.mlp:
            del hs
        if ctx is None:
            del fw, pre_buffer, s_buffer, pre_all, kept_values
        # under autocast gate_norm runs in float32 on the features as given: Zpre (the GEMMs'
        # output, in the autocast dtype) is cast once for all modalities
        zpres_g = zpres if spec.low is None else _cast_group(zpres, xs_given[0].dtype)[1]
        lnws, lnbs = _norm_params(P, xs_given, dims)
        rows = [r_.to(_pdt(xs_given[0])) for r_ in rows]
        ys, stats = _gate_norm(spec, ns, zpres_g, rows, xs_given, lnws, lnbs, seeds)
        outs = tuple(ys + (([t] if spec.k else []) + zpres_g + rows if spec.aux else []))
        if ctx is None:  # no gradient asked for: nothing to keep
            return outs
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.shape = spec, (B, tuple(Ts), tuple(dims))
        ctx.has_mask = [mk is not None for mk in masks]
        kept = dict(xs_low=None if spec.low is None else xs, params_low=None if spec.low is None else params,
                    pre_all=pre_all, hs=None if spec.mlp else hs, zpres=None if spec.recompute else zpres,
                    a_low=None if spec.recompute else a_low, t_ext=t_ext, rows=rows, stats=stats, **kept_values)
        _keep(ctx, [seeds, *xs_given, *[mk for mk in masks if mk is not None], *params_given], kept,
              release=not spec.aux and not torch.compiler.is_compiling())
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
        rows_per = [B * T for T in Ts]
        inputs, kept = _take(ctx)
        seeds, xs_given = inputs[0], inputs[1:1 + M]
        n_masks = sum(ctx.has_mask)
        present = list(inputs[1 + M:1 + M + n_masks])
        masks = [present.pop(0) if has else None for has in ctx.has_mask]
        params_given = list(inputs[1 + M + n_masks:])
        del inputs
        xs = kept.pop("xs_low") or xs_given
        params = kept.pop("params_low") or params_given
        P = _unflatten_params(spec, params)
        x2s = [x.reshape(B * T, D) for x, T, D in zip(xs, Ts, dims)]
        pre_all = kept.pop("pre_all")
        need_x, need, need_p1, need_h, chain = _needs(spec, ctx.needs_input_grad)
        dys = grads[:M]
        aux_grads = grads[M:] if spec.aux else ()
        dt_extra = aux_grads[0] if aux_grads and k else None
        dz_extra = list(aux_grads[(1 if k else 0):][:M]) or [None] * M
        drow_extra = list(aux_grads[(1 if k else 0) + M:][:M]) or [None] * M
        lnws, _ = _norm_params(P, xs_given, dims, bias=False)

        # §5 gate_norm (Zpre recomputed first with recompute_gate_gemm: the forward's GEMMs, same
        # shapes and strides, so bit for bit the Zpre gate_norm saw)
        acts = hs = None
        if spec.recompute:
            _, tails = _projection(spec, P, x2s, rows_per)
            acts, hs = _hidden(spec, P, pre_all, rows_per)
            a_low = [None if u is None else tail for tail, u in zip(tails, P["gu"])]
            zpres = [_zpre(tail, u, h, wh).view(B, T, D)
                     for tail, u, h, wh, T, D in zip(tails, P["gu"], hs, P["wh"], Ts, dims)]
            del tails
        else:
            zpres, a_low = kept.pop("zpres"), kept.pop("a_low")
        if spec.low is not None:  # the forward's cast again: the Zpre gate_norm saw
            zpres = _cast_group(zpres, xs_given[0].dtype)[1]
        dys = [torch.zeros_like(x) if dy is None else dy.to(x.dtype).contiguous() for dy, x in zip(dys, xs_given)]
        per_modality = _gate_norm_backward(spec, ns, dys, zpres, kept.pop("rows"), list(xs_given), lnws,
                                           kept.pop("stats"), seeds, need_x)
        del dys, zpres
        dzs, drows, dxs, dlnw, dlnb = [], [], [], [], []
        for m, (dz, drow, dx, dw, db) in enumerate(per_modality):
            if dz_extra[m] is not None:
                dz = dz + dz_extra[m]
            if drow_extra[m] is not None:
                drow = drow + drow_extra[m]
            dzs.append(dz.view(B * Ts[m], dims[m]))
            drows.append(drow.to(P["rw"].dtype))
            dxs.append(dx.view(B * Ts[m], dims[m]) if need_x[m] else None)
            dlnw.append(dw)
            dlnb.append(db)
        del per_modality, dz, drow, dx, dw, db
        if spec.low is not None:  # the GEMMs below take dZ in the autocast dtype
            dzs = list(_cast_group(dzs, spec.low)[1])

        # The gradients that gather per-modality pieces share one allocation: each GEMM writes its
        # piece in place (out=), so gathering costs no cat / stack (under autocast a second one,
        # float32, for the bias-row GEMM's gradients).
        ws = _Workspace(xs[0])
        ws_full = ws if P["rw"].dtype == xs[0].dtype else _Workspace(P["rw"])
        ws_rw = ws_full.take(sum(dims), P["rw"].shape[1]) if need["rw"] else None
        ws_dt = ws_full.take(M, B, k) if chain["heads"] else None
        width = len(spec.u_blocks) * d
        ws_du = ws.take(B, M, width) if chain["e2"] and width == (3 * M - 1) * d else None
        ws_w2 = ws.take(M, d, d) if spec.mlp and need["w2"] else None
        ws_b2 = ws.take(M, d) if spec.mlp and need["b2"] else None
        ws_xw = [ws.take(d + (D if r is None else r), D) if need["xw"][m] else None
                 for m, (D, r) in enumerate(zip(dims, spec.ranks))]
        ws_xb = ws.take(M, d) if all(need["xb"]) else None  # (one reduction when the rows agree)
        ws.allocate()
        if ws_full is not ws:
            ws_full.allocate()
        g = {"xw": [None if w is None else w() for w in ws_xw], "gu": [None] * M, "wh": [None] * M,
             "xb": list(ws_xb().unbind(0)) if ws_xb is not None else [None] * M}
        if spec.low is None:  # (under autocast the final cast gathers them)
            if need["lnw"]:
                g["lnw"] = torch.cat(dlnw).to(P["lnw"].dtype)
            if need["lnb"]:
                g["lnb"] = torch.cat(dlnb).to(P["lnb"].dtype)

        # §4 bias rows: rows_m = (t_ext_m RW_m^T) / 2
        t_ext = kept.pop("t_ext")
        if ws_rw is not None:
            g["rw"] = ws_rw()
            for dr, tm, out in zip(drows, t_ext.unbind(0), g["rw"].split(dims)):
                gemm_into(out, dr.t(), tm, P["zero"], beta=0.0, alpha=0.5)
        del t_ext
        dmean = dmax = None
        if k:
            dmean, dmax = _values_backward(spec, ns, P, kept, g, need, chain, drows, dt_extra, dims,
                                           None if ws_dt is None else ws_dt(), None if ws_du is None else ws_du(),
                                           any(need_h))
        argmaxes = kept.pop("argmaxes", None)
        del drows

        # §1 and the §4 gate GEMM, modality by modality: Zpre = X W_r^T + H W_h^T (low rank
        # A U^T + H W_h^T), H = GELU(X P1^T + b1) P2^T + b2; each modality's dZ is dropped at its
        # last use, and dX accumulates in place into gate_norm's dX
        if not spec.mlp:
            hs = list(pre_all.split(rows_per))  # H is P's (linear) output
        elif acts is None and (any(need["wh"]) or any(need_h)):
            acts = F.gelu(pre_all)  # (H itself is not recomputed: see dW_h below)
        acts_m = acts.split(rows_per) if acts is not None else [None] * M
        # the column sums of each dZ (dW_h's rank-one part): the b_r column of RW's gradient holds
        # them (rows = Zpre's per-sample sums' gradient) unless the auxiliaries bring their own
        dz_sums = ([None] * M if not spec.mlp or not any(need["wh"])
                   else [c[:, -1] for c in g["rw"].split(dims)] if need["rw"] and not spec.aux
                   else [dz.sum(0) for dz in dzs])
        equal = len(set(rows_per)) == 1  # P's second layer and the biases batched over modalities
        dh_all = dpre_all = None  # dH of every modality, allocated once the first dZ is gone
        dpres, dx_low = [None] * M, [None] * M
        for m in range(M):
            dz, x2, u, wh = dzs[m], x2s[m], P["gu"][m], P["wh"][m]
            if need["wh"][m]:
                if hs is not None:
                    g["wh"][m] = gemm(dz.t(), hs[m])
                else:  # dZ^T H = (dZ^T GELU(pre)) P2^T + (column sums of dZ) b2^T: no [rows, d] GEMM
                    g["wh"][m] = gemm(gemm(dz.t(), acts_m[m]), P["w2"][m].t())
                    g["wh"][m].addr_(dz_sums[m], P["b2"][m])
            dtail = dz  # the gradient of the tail: dZ at full rank, dA = dZ U at low rank
            if u is not None:  # §4a: dU = dZ^T A, dA = dZ U
                if need["gu"][m]:
                    g["gu"][m] = gemm(dz.t(), a_low[m])
                dtail = gemm(dz, u) if need_x[m] or need["xw"][m] else None
            if g["xw"][m] is not None:
                gemm_into(g["xw"][m][d:], dtail.t(), x2, beta=0.0)
            dh = None
            if need_h[m]:
                pool = None if dmean is None else ns.summary_pool_backward(dmean[m], dmax[m], masks[m], argmaxes[m],
                                                                           Ts[m])
                if spec.mlp:  # into the buffer P's second layer reads as a whole
                    if dh_all is None:  # (zeros where a modality needs no dH: P2's gradients read every row)
                        dh_all = pre_all.new_empty(pre_all.shape) if all(need_h) else pre_all.new_zeros(pre_all.shape)
                    out = dh_all.split(rows_per)[m]
                    dh = gemm_into(out, dz, wh, None if pool is None else pool.view(B * Ts[m], d),
                                   beta=0.0 if pool is None else 1.0)
                else:
                    dh = gemm(dz, wh) if pool is None else gemm_into(pool.view(B * Ts[m], d), dz, wh)
                del pool
            if need_x[m]:  # (under autocast gathered in the autocast dtype, added to the float32 dX once)
                if spec.low is None:
                    gemm_into(dxs[m], dtail, P["xw"][m][d:])
                else:
                    dx_low[m] = gemm(dtail, P["xw"][m][d:])
            dzs[m] = dz = dtail = None
            if not spec.mlp:
                dpres[m] = dh
            del dh
        del dzs, hs
        if spec.mlp and dh_all is not None:  # §1 P's second layer: H = GELU(pre) P2^T + b2
            dact = _p2_backward(spec, P, g, ws_w2, ws_b2, dh_all, acts, rows_per, need_p1, equal)
            del dh_all
            if dact is not None:  # every modality: one GELU backward over all rows
                dpre_all = torch.ops.aten.gelu_backward(dact, pre_all)
                dpres = list(dpre_all.split(rows_per))
            del dact
        del acts, acts_m, pre_all
        if ws_xb is not None:  # b1 of every modality
            if dpre_all is not None and equal:
                torch.sum(dpre_all.view(M, rows_per[0], d), 1, out=ws_xb())
            else:
                for dpre, out in zip(dpres, g["xb"]):
                    torch.sum(dpre, 0, out=out)
        del dpre_all
        for m in range(M):
            dpre = dpres[m]
            if dpre is None or not need_p1[m]:
                continue
            if g["xw"][m] is not None:
                gemm_into(g["xw"][m][:d], dpre.t(), x2s[m], beta=0.0)
            if need_x[m]:
                if spec.low is None:
                    gemm_into(dxs[m], dpre, P["xw"][m][:d])
                else:
                    gemm_into(dx_low[m], dpre, P["xw"][m][:d])
            dpres[m] = dpre = None
        for dx, dxl in zip(dxs, dx_low):
            if dxl is not None:
                dx.add_(dxl)
        del dx_low
        dx_out = [None if dx is None else dx.view(B, T, D) for dx, T, D in zip(dxs, Ts, dims)]
        if spec.low is not None:
            return (None, None, *_full_precision_grads(spec, g, dx_out, dlnw, dlnb, need))
        return (None, None, *dx_out, *[None] * M, *_flatten_grads(spec, g, params_given))


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
    if torch.compiler.is_compiling():
        # Inductor lowers the foreach copy below to one loop over every tensor that runs ~10x
        # slower than its per-tensor casts (a bf16-autocast training step: 40 ms against 22)
        buffer = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        return buffer, [piece.view(t.shape) for piece, t in zip(buffer.split(sizes), tensors)]
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
