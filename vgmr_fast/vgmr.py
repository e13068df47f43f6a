"""The fused drop-in VGMR: the reference's constructor and ``state_dict``, its own parameter layout.

Data flow, grouped across modalities wherever the shapes agree (one launch serves all M):

    X_m -> X P1_m^T + b1 (into one buffer of every modality) and X W_r^T (its own output)
        -> GELU of all modalities at once -> P2 GEMM (batched when the modalities' rows agree)
        -> H_m -> summary_pool
    [mean; max] of all m -> E (batched GEMMs over stacked [M, ...] weights) -> interaction
        -> V (batched GEMMs) -> the global and channel heads (one batched GEMM)
        -> per-sample gate terms: one GEMM per modality into the bias row (A_g, A_c, every bias,
           b_r among them)
    Zpre_m = X W_r^T + H_m W_h^T (accumulated in place);   gate_norm(Zpre, bias_row, X) -> X~
    (grouped when the backend has a grouped kernel)

Every GEMM of the fused path is :mod:`vgmr_fast.ops.gemm`'s: on CPU in float32, oneDNN's matmul
(ATen would send it to MKL's sgemm), ATen's GEMM elsewhere.

A low-rank raw gate (docs/math.md §4a) changes only the GEMM chain: the GEMM on X is
[P1_m; V_m^T], giving P's pre-activation and A = X V, and X W_r^T becomes A U^T.
The one autograd node of the fused path lives in :mod:`vgmr_fast.fused_node`.

Parameters live in that layout (stacked ``[M, ...]`` where all modalities share a shape,
concatenated along the feature axis ``sum D_m`` where they do not). ``state_dict()`` gives the
reference's keys and values, and ``load_state_dict`` takes either the reference's state or
this layout's own, through state-dict hooks. ``reference_grads()`` maps gradients the same way.

The heads' sigmoid enters the gate only as ``sigma(z) - 1/2``; the module computes it as
``tanh(z/2) / 2`` (the same function, one launch fewer: the 1/2 folds into the GEMMs' alpha).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import inputs
from . import reference as ref
from .ops import backend as _backend
from .ops.gemm import use_onednn
from .dropout_stream import draw_seeds
from .fused_node import _FusedVGMR, _Spec, _bias_rows, _seed_arg, _unflatten_params, _values

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
EPS = ref.EPS
_warned: set = set()
_ATEN_GEMMS = use_onednn(False)


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device``; meta has no autocast (``is_autocast_enabled("meta")`` raises).

    A plain comparison, not ``torch.amp.is_autocast_available``: torch 2.11's Dynamo cannot trace
    that builtin, and the fused path runs only on CPU, CUDA and meta tensors."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def _linear_init(out_features: int, in_features: int):
    """``(weight, bias)`` initialised as ``nn.Linear`` does (same draws from torch's generator)."""
    lin = nn.Linear(in_features, out_features)
    return lin.weight.detach(), lin.bias.detach()


class _AutogradOps:
    """The autograd-capable ops of one backend in the raw ops' call signature, so that the
    composable path runs the one-node path's stage functions (:mod:`vgmr_fast.fused_node`)."""

    def __init__(self, ops, backend: str):
        self.ops, self.backend = ops, backend

    def summary_pool(self, h, mask):
        mean, mx = self.ops.summary_pool(h, mask, backend=self.backend)
        return mean, mx, None

    def interaction(self, s):
        return self.ops.interaction(s, backend=self.backend)


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
    hand-written backward (:class:`vgmr_fast.fused_node._FusedVGMR`); under ``torch.autocast`` that node casts the
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

        # per modality: [P1; W_r] (low rank: [P1; V^T]) share X; P1's bias b1; P2 stacked (d x d for
        # every m); W_h; U of each low-rank raw gate, keyed by modality index (b_r is a bias column
        # of row_weight: it reaches the gate only through Zpre + bias row)
        ranks = self.gate_ranks
        self.x_weight = nn.ParameterList(param(d + (D if r is None else r), D) for D, r in zip(dims, ranks))
        self.x_bias = nn.ParameterList(param(d) for _ in dims)
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
        # [A_g | A_c | b_h | b_g | b_c | b_r] (the biases multiply constant inputs, one GEMM per modality)
        nb = 2 + g + (1 if self.use_channel_value else 0)
        self._nb = nb
        self.row_weight = param(total, k + nb)
        self.norm_weight, self.norm_bias = param(total), param(total)

        for m, D in enumerate(dims):
            pre, rows = f"blocks.{m}.", slice(offsets[m], offsets[m] + D)
            lead, tail = slice(0, d), slice(d, d + D)
            if self.projection == "mlp":
                slots += [(pre + "proj.0.weight", f"x_weight.{m}", (lead,)),
                          (pre + "proj.0.bias", f"x_bias.{m}", ()),
                          (pre + "proj.2.weight", "proj2_weight", (m,)),
                          (pre + "proj.2.bias", "proj2_bias", (m,))]
            else:
                slots += [(pre + "proj.weight", f"x_weight.{m}", (lead,)),
                          (pre + "proj.bias", f"x_bias.{m}", ())]
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
            slots += [(pre + "gate_raw.bias", "row_weight", (rows, k + nb - 1)),
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
        if backend == "reference":  # plain PyTorch throughout, its GEMMs included
            with _ATEN_GEMMS:
                return self._forward_composable(xs, xs_list, masks_list, B, backend, ops, return_aux)
        return self._forward_composable(xs, xs_list, masks_list, B, backend, ops, return_aux)

    def _forward_composable(self, xs, xs_list, masks_list, B, backend, ops, return_aux):
        """The composable path (``backend="reference"``, ``gate_gemm="stacked"``, an empty batch):
        autograd-capable ops, the one-node path's §1-§4 stages where they are shared."""
        M, d, k = self.num_modalities, self.d, self._k
        dims = self.widths
        Ts = [x.shape[1] for x in xs_list]
        x2s = [x.reshape(B * T, D) for x, T, D in zip(xs_list, Ts, dims)]
        stacked = self.gate_gemm == "stacked"

        # Per-modality pieces of stacked tensors are taken with split / unbind (one launch in the
        # backward: a cat / stack), never with indexing (a scatter and an add per piece).
        # P's first layer, and X W_r^T in its own output (H W_h^T accumulates into it; b_r rides
        # in the bias row), unless the gate GEMM is stacked
        pres, zrs = [], []
        for m in range(M):
            if self._low_rank[m]:  # §4a: [P1; V^T] on X gives P's pre-activation and A = X V
                pre, a = torch.mm(x2s[m], self.x_weight[m].t()).split([d, self.gate_ranks[m]], dim=1)
                pres.append(pre + self.x_bias[m])
                zrs.append(a if stacked else torch.mm(a, self._gate_u(m).t()))
            elif stacked:
                pres.append(torch.addmm(self.x_bias[m], x2s[m], self.x_weight[m][:d].t()))
                zrs.append(None)
            else:
                pres.append(torch.addmm(self.x_bias[m], x2s[m], self.x_weight[m][:d].t()))
                zrs.append(torch.mm(x2s[m], self.x_weight[m][d:].t()))  # H W_h^T accumulates into it
        if self.projection == "mlp":
            acts = F.gelu(torch.cat(pres)).split([B * T for T in Ts])  # one GELU for every modality
            hs = [torch.addmm(b2, a, w2.t()) for a, w2, b2 in
                  zip(acts, self.proj2_weight.unbind(0), self.proj2_bias.unbind(0))]
        else:
            hs = pres

        # §1 summary, §2 interaction, §3 values and the heads: the one-node path's stage, through
        # the autograd-capable ops (t = tanh(z/2), see the module docstring)
        p = self.p if self.training else 0.0
        spec = self._spec(p, backend, None, return_aux)
        P = _unflatten_params(spec, self._flat_params(spec))
        t, t_ext, _ = _values(spec, _AutogradOps(ops, backend), P, [h.reshape(B, T, d) for h, T in zip(hs, Ts)],
                              masks_list, B, Ts)

        # §4 gate logits and the per-sample bias row, §5 gate_norm
        zpres = []
        for m, (x2, h, T, D) in enumerate(zip(x2s, hs, Ts, dims)):
            if stacked:  # one GEMM over [X; H] (low rank: over [A; H], with [U, W_h])
                wr, left = (self.x_weight[m][d:], x2) if zrs[m] is None else (self._gate_u(m), zrs[m])
                w = torch.cat([wr, self.gate_latent_weight[m]], dim=1)
                z = torch.mm(torch.cat([left, h], dim=1), w.t())
            else:
                z = zrs[m].addmm_(h, self.gate_latent_weight[m].t())
            zpres.append(z.view(B, T, D).to(x2.dtype))  # autocast may hand back a lower precision
        rows = _bias_rows(spec, P, t_ext, dims)
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
        spec = self._spec(p, backend, low, return_aux)
        params = self._flat_params(spec)
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

    def _spec(self, p: float, backend: str, low, aux: bool) -> _Spec:
        """The static configuration of one call (the one-node path's, whose stages both paths run)."""
        grouped = backend != "reference" and _backend.has_grouped(backend)
        return _Spec(self.num_modalities, self.d, self.alpha, self.beta, p, backend, self.projection == "mlp", self._k,
                     self._nb, tuple(self.u_blocks), self.recompute_gate_gemm, grouped, low, tuple(self.gate_ranks),
                     bool(aux))

    def _flat_params(self, spec: _Spec) -> list:
        """The parameters in the one-node path's input order (``fused_node._PARAM_ORDER``)."""
        M = self.num_modalities
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
        return params + [self.row_weight, self.norm_weight, self.norm_bias, self._zero]

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
