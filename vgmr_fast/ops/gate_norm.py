"""``gate_norm``: gate, amplification, retention, product with x, LayerNorm, dropout (docs/math.md §5).

One pass per row; the op saves only per-row fp32 mean/rstd (and the seed tensor); the backward
recomputes the gate and the dropout keep mask (shared Philox stream, ``ops.dropout``). The seed
reaches the kernels as a one-element int64 tensor they read from memory (docs/ops.md), so a
seed drawn on the device needs no host synchronisation and a compiled graph no recompile.
"""
from __future__ import annotations

import torch

from . import _checks as C
from . import backend as _backend

__all__ = ["gate_norm", "gate_norm_grouped"]


def gate_norm(
    zpre: torch.Tensor,
    bias_row: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    *,
    alpha: float = 0.5,
    beta: float = 0.2,
    p: float = 0.0,
    seed: int | torch.Tensor = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """``Dropout_p(LayerNorm(G_eff(zpre + bias_row) * x))`` (eps 1e-5), dropout from the shared
    Philox stream keyed by ``seed`` (element ``(b, t, c)`` is row ``b*T + t``, column ``c``).

    ``zpre``, ``x``: ``[B, T, D]``, same floating dtype; ``bias_row``: ``[B, D]``; ``ln_weight``,
    ``ln_bias``: ``[D]`` (cast to float32, or float64 for float64 ``x``; gradients come back in
    their own dtype). ``alpha``, ``beta``: finite reals. ``seed``: an int in ``[0, 2**63)`` or a
    one-element int64 tensor on ``x``'s device (read by the kernel; unused when ``p == 0``).
    Returns ``y`` ``[B, T, D]`` in ``x``'s dtype.
    """
    zpre, bias_row, x, ln_weight, ln_bias = _prepare(zpre, bias_row, x, ln_weight, ln_bias, _NAMES)
    alpha = C.finite_real(alpha, "alpha")
    beta = C.finite_real(beta, "beta")
    p = C.probability(p, "p")
    seed = C.seed_tensor(seed, x, p, "seed")
    be = _backend.resolve(backend, x, "gate_norm")
    if be == "triton":
        _backend.check_transforms("vgmr_triton::gate_norm", zpre, bias_row, x, ln_weight, ln_bias)
    y, _, _ = _backend.namespace(be).gate_norm(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, seed)
    return y


_NAMES = ("zpre", "bias_row", "x", "ln_weight", "ln_bias")


def _prepare(zpre, bias_row, x, ln_weight, ln_bias, names):
    """Check one modality's tensors (errors name them by ``names``) and return them as the raw
    ops take them: contiguous, side inputs in float32 (float64 for float64 ``x``)."""
    nz, nb, nx, nw, nlb = names
    C.float_tensor(x, nx)
    C.rank(x, 3, nx, "[B, T, D]")
    C.float_tensor(zpre, nz)
    if zpre.dtype != x.dtype:
        raise TypeError(f"{nz}: expected the dtype of {nx} ({x.dtype}), got {zpre.dtype}")
    C.shape(zpre, x.shape, nz, f"[B, T, D] of {nx}")
    B, _, D = x.shape
    if D < 1:
        raise ValueError(f"{nx}: expected D >= 1 features, got shape {tuple(x.shape)}")
    C.float_tensor(bias_row, nb)
    C.shape(bias_row, (B, D), nb, "[B, D]")
    C.float_tensor(ln_weight, nw)
    C.shape(ln_weight, (D,), nw, "[D]")
    C.float_tensor(ln_bias, nlb)
    C.shape(ln_bias, (D,), nlb, "[D]")
    C.check_same_device(x, nx, (zpre, bias_row, ln_weight, ln_bias), (nz, nb, nw, nlb))
    pdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if bias_row.dtype != pdt:
        bias_row = bias_row.to(pdt)
    if ln_weight.dtype != pdt:
        ln_weight = ln_weight.to(pdt)
    if ln_bias.dtype != pdt:
        ln_bias = ln_bias.to(pdt)
    return zpre.contiguous(), bias_row.contiguous(), x.contiguous(), ln_weight.contiguous(), ln_bias.contiguous()


def _grouped_seeds(seeds, M: int, p, ref: torch.Tensor) -> torch.Tensor:
    """``seeds`` of :func:`gate_norm_grouped` as the raw op takes it: int64 ``[M]`` on ``ref``'s device."""
    if seeds is None:
        if not (type(p) is float and p == 0.0):
            raise ValueError(f"seeds: required when p > 0 (one seed per modality, M = {M}), got None")
        return C.unused_seeds(ref, (M,))
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype != torch.int64:
            raise TypeError(f"seeds: expected an int64 tensor (or a list of ints), got dtype {seeds.dtype}")
        if tuple(seeds.shape) != (M,):
            raise ValueError(f"seeds: expected shape [M] = ({M},), one seed per modality, got {tuple(seeds.shape)}")
        if seeds.device != ref.device:
            raise ValueError(f"seeds: on {seeds.device}, but xs[0] is on {ref.device}")
        return seeds.contiguous()
    if not isinstance(seeds, (list, tuple)):
        raise TypeError(f"seeds: expected None, an int64 tensor [M] or a list of ints, got {type(seeds).__name__}")
    if len(seeds) != M:
        raise ValueError(f"seeds: expected {M} seeds (one per modality), got {len(seeds)}")
    values = [C.seed(v, f"seeds[{m}]") for m, v in enumerate(seeds)]
    return torch.tensor(values, dtype=torch.int64, device=ref.device)


def gate_norm_grouped(
    zpres,
    bias_rows,
    xs,
    ln_weights,
    ln_biases,
    *,
    alpha: float = 0.5,
    beta: float = 0.2,
    p: float = 0.0,
    seeds=None,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """:func:`gate_norm` of every modality in one call: ``ys[m] = gate_norm(zpres[m], bias_rows[m],
    xs[m], ln_weights[m], ln_biases[m], alpha=alpha, beta=beta, p=p, seed=seeds[m])``, bit for bit.

    Lists of one tensor per modality (each its own ``T_m``, ``D_m``; one batch size ``B``).
    ``seeds``: None when ``p == 0``, else an int64 ``[M]`` tensor on the inputs' device (read by
    the kernels) or a list of ints. The C++ backends (``"cpu"``, ``"cuda"``) run one operator
    call and one autograd node for all modalities; the others loop over :func:`gate_norm`.
    """
    names = ("zpres", "bias_rows", "xs", "ln_weights", "ln_biases")
    lists = (zpres, bias_rows, xs, ln_weights, ln_biases)
    for lst, name in zip(lists, names):
        if not isinstance(lst, (list, tuple)):
            raise TypeError(f"{name}: expected a list of tensors (one per modality), got {type(lst).__name__}")
    M = len(xs)
    if M == 0:
        raise ValueError("xs: expected at least one modality, got an empty list")
    for lst, name in zip(lists, names):
        if len(lst) != M:
            raise ValueError(f"{name}: expected {M} tensors (one per modality, as xs), got {len(lst)}")
    C.float_tensor(xs[0], "xs[0]")
    C.rank(xs[0], 3, "xs[0]", "[B, T, D]")
    B = xs[0].shape[0]
    for m in range(1, M):
        C.float_tensor(xs[m], f"xs[{m}]")
        C.rank(xs[m], 3, f"xs[{m}]", "[B, T, D]")
        if xs[m].shape[0] != B:
            raise ValueError(f"xs[{m}]: expected the batch size B = {B} of xs[0], got shape {tuple(xs[m].shape)}")
    alpha = C.finite_real(alpha, "alpha")
    beta = C.finite_real(beta, "beta")
    p = C.probability(p, "p")
    ref = xs[0]
    seed_t = _grouped_seeds(seeds, M, p, ref)
    be = _backend.resolve(backend, ref, "gate_norm")
    if be == "triton":  # no grouped kernel: M launches of the one-modality op
        return [
            gate_norm(zpres[m], bias_rows[m], xs[m], ln_weights[m], ln_biases[m], alpha=alpha, beta=beta, p=p,
                      seed=seed_t[m], backend=be)
            for m in range(M)
        ]
    args = [[], [], [], [], []]
    for m in range(M):
        a = _prepare(zpres[m], bias_rows[m], xs[m], ln_weights[m], ln_biases[m],
                     tuple(f"{n}[{m}]" for n in names))
        if m > 0 and a[2].device != ref.device:
            raise ValueError(f"xs[{m}]: on {a[2].device}, but xs[0] is on {ref.device} (mixed devices)")
        for k in range(5):
            args[k].append(a[k])
    ys, _, _ = _backend.namespace(be).gate_norm_grouped(*args, alpha, beta, p, seed_t)
    return list(ys)


def dx_shape(x: torch.Tensor, need_dx: bool):
    """Shape of the backward's dx: x's, or ``(0,)`` (an empty tensor) when no input gradient is asked for."""
    return x.shape if need_dx else (0,)


def _register(ns: str, needs_fake: bool) -> None:
    """Fake kernels and autograd for ``<ns>::gate_norm`` (ns = vgmr or vgmr_triton)."""
    if needs_fake:

        @torch.library.register_fake(f"{ns}::gate_norm")
        def _fake(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, seed):
            C.op_seed(f"{ns}::gate_norm", seed, None)
            B, T, _ = x.shape
            stat = torch.float64 if x.dtype == torch.float64 else torch.float32
            return x.new_empty(x.shape), x.new_empty(B, T, dtype=stat), x.new_empty(B, T, dtype=stat)

        @torch.library.register_fake(f"{ns}::gate_norm_backward")
        def _fake_backward(dy, zpre, bias_row, x, ln_weight, mean, rstd, alpha, beta, p, seed, need_dx=True):
            C.op_seed(f"{ns}::gate_norm_backward", seed, None)
            return (
                zpre.new_empty(zpre.shape),
                bias_row.new_empty(bias_row.shape),
                x.new_empty(dx_shape(x, need_dx)),
                ln_weight.new_empty(ln_weight.shape),
                ln_weight.new_empty(ln_weight.shape),
            )

    if needs_fake and _backend.op_exists(ns, "gate_norm_grouped"):

        @torch.library.register_fake(f"{ns}::gate_norm_grouped")
        def _fake_grouped(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, seeds):
            C.op_seeds(f"{ns}::gate_norm_grouped", seeds, len(x))
            ys = [t.new_empty(t.shape) for t in x]
            stats = [t.new_empty(t.shape[:2], dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
                     for t in x]
            return ys, stats, [s.new_empty(s.shape) for s in stats]

        @torch.library.register_fake(f"{ns}::gate_norm_grouped_backward")
        def _fake_grouped_backward(dy, zpre, bias_row, x, ln_weight, mean, rstd, alpha, beta, p, seeds,
                                   need_dx=None):
            C.op_seeds(f"{ns}::gate_norm_grouped_backward", seeds, len(x))
            need = [True] * len(x) if need_dx is None else need_dx
            return ([t.new_empty(t.shape) for t in zpre], [t.new_empty(t.shape) for t in bias_row],
                    [t.new_empty(dx_shape(t, n)) for t, n in zip(x, need)], [t.new_empty(t.shape) for t in ln_weight],
                    [t.new_empty(t.shape) for t in ln_weight])

    ops = getattr(torch.ops, ns)

    def setup_context(ctx, inputs, output):
        zpre, bias_row, x, ln_weight, _ln_bias, alpha, beta, p, seed = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(zpre, bias_row, x, ln_weight, mean, rstd, seed)
        ctx.args = (alpha, beta, p)

    def backward(ctx, dy, _dmean, _drstd):
        zpre, bias_row, x, ln_weight, mean, rstd, seed = ctx.saved_tensors
        _backend.no_double_backward(f"{ns}::gate_norm", dy, zpre, bias_row, x, ln_weight)
        alpha, beta, p = ctx.args
        need_dx = ctx.needs_input_grad[2]
        dzpre, dbias_row, dx, dw, db = ops.gate_norm_backward(
            dy.to(x.dtype).contiguous(), zpre, bias_row, x, ln_weight, mean, rstd, alpha, beta, p, seed, need_dx
        )
        return dzpre, dbias_row, dx if need_dx else None, dw, db, None, None, None, None

    if _backend.autograd_in_cpp(ns):
        return  # vgmr:: ops carry a C++ autograd kernel (csrc/ops.cpp): same math, less overhead
    torch.library.register_autograd(f"{ns}::gate_norm", backward, setup_context=setup_context)


_backend.add_registrar("gate_norm", _register)
