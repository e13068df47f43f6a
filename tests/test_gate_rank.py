"""The low-rank raw gate of the reference (docs/math.md §4a): ``X W_rᵀ`` -> ``(X V) Uᵀ``.

The low-rank module is checked against the full-rank reference whose ``gate_raw.weight`` is set to
``U Vᵀ`` (the same function, computed as one D×D GEMM), and its ``u``/``v`` gradients against the chain
rule through ``W = U Vᵀ`` (``dU = dW V``, ``dV = dWᵀ U``).
"""
from __future__ import annotations

import pytest
import torch

from vgmr_fast import reference as ref

WIDTHS = {"wide": 40, "mid": 19, "narrow": 6}  # odd widths; r = 7 leaves "narrow" full rank


def _inputs(B=3, Ts=(5, 4, 6), dtype=torch.float64, seed=0, masks=False):
    g = torch.Generator().manual_seed(seed)
    xs = {n: torch.randn(B, T, D, generator=g, dtype=dtype) for (n, D), T in zip(WIDTHS.items(), Ts)}
    if not masks:
        return xs, None
    mk = {n: torch.arange(T).unsqueeze(0) < torch.randint(1, T + 1, (B, 1), generator=g)
          for n, T in zip(WIDTHS, Ts)}
    mk["mid"][0] = False  # one absent modality
    return xs, mk


def _pair(gate_rank=7, dtype=torch.float64, **kwargs):
    """A low-rank module and the full-rank one computing the same function."""
    torch.manual_seed(0)
    low = ref.VGMR(WIDTHS, d=8, dropout=0.0, gate_rank=gate_rank, **kwargs).to(dtype)
    full = ref.VGMR(WIDTHS, d=8, dropout=0.0, **kwargs).to(dtype)
    state = {}
    for key, value in low.state_dict().items():
        if key.endswith("gate_raw.u"):
            stem = key[: -len("u")]
            state[stem + "weight"] = value @ low.state_dict()[stem + "v"].t()
        elif not key.endswith("gate_raw.v"):
            state[key] = value
    full.load_state_dict(state, strict=True)
    return low, full


def test_ranks_and_narrower_modality_rule():
    m = ref.VGMR(WIDTHS, d=8, gate_rank=7)
    assert m.gate_ranks == [7, 7, None]
    assert isinstance(m.blocks[2].gate_raw, torch.nn.Linear)
    assert ref.VGMR(WIDTHS, d=8, gate_rank=6).gate_ranks == [6, 6, None]  # D = r stays full rank
    assert ref.VGMR(WIDTHS, d=8, gate_rank=64).gate_ranks == [None, None, None]
    assert ref.VGMR(WIDTHS, d=8, gate_rank={"mid": 3}).gate_ranks == [None, 3, None]
    assert ref.VGMR(WIDTHS, d=8, gate_rank={"wide": 5, "mid": None}).gate_ranks == [5, None, None]
    assert ref.VGMR([40, 6], d=8, gate_rank={0: 4}).gate_ranks == [4, None]
    assert ref.VGMR(WIDTHS, d=8).gate_ranks == [None, None, None]


def test_parameter_counts_and_keys():
    full = ref.VGMR(WIDTHS, d=8)
    low = ref.VGMR(WIDTHS, d=8, gate_rank=7)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    saved = sum(D * D - 2 * D * 7 for D in (40, 19))
    assert n(full) - n(low) == saved
    assert n(low.blocks[0].gate_raw) == 2 * 40 * 7 + 40
    keys_low, keys_full = set(low.state_dict()), set(full.state_dict())
    assert keys_full - keys_low == {"blocks.0.gate_raw.weight", "blocks.1.gate_raw.weight"}
    assert keys_low - keys_full == {f"blocks.{m}.gate_raw.{p}" for m in (0, 1) for p in ("u", "v")}
    assert low.state_dict()["blocks.0.gate_raw.u"].shape == (40, 7)
    assert low.state_dict()["blocks.0.gate_raw.v"].shape == (40, 7)
    assert low.state_dict()["blocks.0.gate_raw.bias"].shape == (40,)


@pytest.mark.parametrize("gate_rank, pattern", [
    (0, "positive int"), (-3, "positive int"), (2.0, "positive int"), ("16", "positive int"), (True, "positive int"),
    ({"wide": 40}, "1 <= r < D_m = 40"), ({"wide": 0}, "1 <= r < D_m"), ({"wide": 4.0}, "1 <= r < D_m"),
    ({"text": 4}, "unknown modality 'text'"),
])
def test_bad_gate_rank(gate_rank, pattern):
    with pytest.raises(ValueError, match="gate_rank: .*" + pattern.replace("(", r"\(")):
        ref.VGMR(WIDTHS, d=8, gate_rank=gate_rank)


def test_init_scale_matches_full_rank():
    torch.manual_seed(0)
    D, r = 512, 64
    u, v, bias = ref.low_rank_init(D, r)
    full = torch.nn.Linear(D, D)
    ratio = (u @ v.t()).std() / full.weight.detach().std()
    assert 0.95 < float(ratio) < 1.05
    assert float(bias.abs().max()) <= D ** -0.5


def test_state_dict_round_trip_strict():
    torch.manual_seed(1)
    a = ref.VGMR(WIDTHS, d=8, gate_rank={"wide": 5, "mid": 3}).eval()
    torch.manual_seed(2)
    b = ref.VGMR(WIDTHS, d=8, gate_rank={"wide": 5, "mid": 3}).eval()
    xs, masks = _inputs(dtype=torch.float32, masks=True)
    assert not torch.equal(a(xs, masks)["wide"], b(xs, masks)["wide"])
    b.load_state_dict(a.state_dict(), strict=True)
    for n in WIDTHS:
        assert torch.equal(a(xs, masks)[n], b(xs, masks)[n])
    with pytest.raises(RuntimeError, match="gate_raw"):  # a full-rank state does not fit
        b.load_state_dict(ref.VGMR(WIDTHS, d=8).state_dict(), strict=True)


ABLATIONS = [{}, {"use_global_value": False}, {"use_channel_value": False}, {"use_agreement": False},
             {"use_discrepancy": False}, {"projection": "linear"},
             {"use_global_value": False, "use_channel_value": False}]


@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: ",".join(k) or "paper")
@pytest.mark.parametrize("with_masks", [False, True], ids=["no-mask", "mask"])
def test_matches_full_rank_product_forward_and_gradients(kwargs, with_masks):
    low, full = _pair(**kwargs)
    xs, masks = _inputs(masks=with_masks)
    xl = {n: x.clone().requires_grad_() for n, x in xs.items()}
    xf = {n: x.clone().requires_grad_() for n, x in xs.items()}
    yl, auxl = low(xl, masks, return_aux=True)
    yf, auxf = full(xf, masks, return_aux=True)
    w = {n: torch.randn_like(y) for n, y in yl.items()}
    for n in WIDTHS:
        torch.testing.assert_close(yl[n], yf[n], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(auxl["gate_mean"], auxf["gate_mean"], rtol=1e-10, atol=1e-10)
    sum((yl[n] * w[n]).sum() for n in WIDTHS).backward()
    sum((yf[n] * w[n]).sum() for n in WIDTHS).backward()
    for n in WIDTHS:
        torch.testing.assert_close(xl[n].grad, xf[n].grad, rtol=1e-10, atol=1e-10)
    pf = dict(full.named_parameters())
    for name, p in low.named_parameters():
        if name.endswith("gate_raw.u") or name.endswith("gate_raw.v"):
            stem = name[:-1]
            dW = pf[stem + "weight"].grad
            u, v = low.get_parameter(stem + "u"), low.get_parameter(stem + "v")
            expect = dW @ v if name.endswith("u") else dW.t() @ u
            torch.testing.assert_close(p.grad, expect, rtol=1e-10, atol=1e-10)
        else:
            torch.testing.assert_close(p.grad, pf[name].grad, rtol=1e-10, atol=1e-10)


def test_gate_is_the_explicit_product():
    """``gate_raw(x)`` is ``(x V) Uᵀ + b`` written out, values and gradients."""
    torch.manual_seed(0)
    gate = ref.LowRankLinear(19, 5).double()
    x = torch.randn(3, 4, 19, dtype=torch.float64, requires_grad=True)
    u, v, b = (t.detach().clone().requires_grad_() for t in (gate.u, gate.v, gate.bias))
    explicit = torch.matmul(torch.matmul(x, v), u.t()) + b
    torch.testing.assert_close(gate(x), explicit)
    w = torch.randn_like(explicit)
    gx, gu, gv, gb = torch.autograd.grad((gate(x) * w).sum(), (x, gate.u, gate.v, gate.bias))
    ex = torch.autograd.grad((explicit * w).sum(), (x, u, v, b))
    for a, e in zip((gx, gu, gv, gb), ex):
        torch.testing.assert_close(a, e)


def test_gradcheck_float64():
    torch.manual_seed(0)
    m = ref.VGMR({"a": 9, "b": 4}, d=3, dropout=0.0, gate_rank=2).double()
    xs = [torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a, b: tuple(m([a, b])), xs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_close_to_float64(dtype):
    low, _ = _pair()
    xs, masks = _inputs(masks=True)
    truth = low(xs, masks)
    low_x = low.to(dtype)
    out = low_x({n: x.to(dtype) for n, x in xs.items()}, masks)
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}[dtype]
    for n in WIDTHS:
        assert out[n].dtype == dtype
        err = float((out[n].double() - truth[n]).abs().max())
        assert err <= tol * max(1.0, float(truth[n].abs().max())), (n, err)


def test_autocast_bfloat16():
    low, _ = _pair(dtype=torch.float32)
    xs, masks = _inputs(dtype=torch.float32, masks=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low(xs, masks)
    assert all(torch.isfinite(out[n].float()).all() for n in WIDTHS)
    ref32 = low(xs, masks)
    for n in WIDTHS:
        assert float((out[n].float() - ref32[n]).abs().max()) < 0.2


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    low = ref.VGMR(WIDTHS, d=8, dropout=0.0, gate_rank=7)
    xs, masks = _inputs(dtype=torch.float32, masks=True)
    compiled = torch.compile(low, fullgraph=True, dynamic=False)
    xe = {n: x.clone().requires_grad_() for n, x in xs.items()}
    xc = {n: x.clone().requires_grad_() for n, x in xs.items()}
    ye, yc = low(xe, masks), compiled(xc, masks)
    for n in WIDTHS:
        torch.testing.assert_close(yc[n], ye[n], rtol=1e-4, atol=1e-5)
    sum(y.square().sum() for y in ye.values()).backward()
    ge = {n: p.grad.clone() for n, p in low.named_parameters()}
    low.zero_grad(set_to_none=True)
    sum(y.square().sum() for y in yc.values()).backward()
    for n, p in low.named_parameters():
        torch.testing.assert_close(p.grad, ge[n], rtol=1e-4, atol=1e-5)
    for n in WIDTHS:
        torch.testing.assert_close(xc[n].grad, xe[n].grad, rtol=1e-4, atol=1e-5)


def test_train_flag_builds_the_fused_module_with_the_rank():
    import argparse

    from vgmr_fast import train
    from vgmr_fast.train import loop

    p = train.add_train_arguments(argparse.ArgumentParser())
    assert p.parse_args([]).gate_rank is None
    assert p.parse_args(["--gate-rank", "16"]).gate_rank == 16
    args = p.parse_args(["--gate-rank", "dominant=8, weak=4", "--vgmr-d", "4"])
    assert args.gate_rank == {"dominant": 8, "weak": 4}
    module = loop._make_vgmr({"dominant": 32, "weak": 24, "noisy": 16}, args)
    from vgmr_fast.vgmr import VGMR

    assert isinstance(module, VGMR) and module.gate_ranks == [8, 4, None] and module.backend == "auto"
    assert "gate_raw.u" in " ".join(module.state_dict())
    with pytest.raises(ValueError, match="gate_rank: unknown modality 'text'"):
        loop._make_vgmr({"dominant": 32, "weak": 24}, p.parse_args(["--gate-rank", "text=4"]))


# ---- the fused module -----------------------------------------------------------------------
# vgmr_fast.VGMR with the same gate_rank: same keys and values, same outputs and gradients (the
# pass rule of vgmr_fast.testing) on every backend that runs here.
from test_vgmr import BACKENDS, check_module, grads, inputs, on  # noqa: E402

from vgmr_fast.vgmr import VGMR, from_reference  # noqa: E402

LIST_WIDTHS = list(WIDTHS.values())  # [40, 19, 6]: r = 7 leaves the 6-wide modality full rank


def _fused_pair(backend="cpu", gate_rank=7, seed=0, **kwargs):
    torch.manual_seed(seed)
    r = ref.VGMR(LIST_WIDTHS, d=8, gate_rank=gate_rank, **kwargs)
    return r, from_reference(r, backend=backend)


def test_fused_same_seed_same_state_and_strict_round_trips_both_ways():
    gate_rank = {"wide": 5, "mid": 3}  # mixed: "narrow" full rank
    torch.manual_seed(0)
    r = ref.VGMR(WIDTHS, d=8, gate_rank=gate_rank)
    torch.manual_seed(0)
    f = VGMR(WIDTHS, d=8, gate_rank=gate_rank)
    assert f.gate_ranks == r.gate_ranks == [5, 3, None]
    sr, sf = r.state_dict(), f.state_dict()
    assert list(sr) == list(sf)
    for key in sr:  # the same seed draws the same initial weights
        assert torch.equal(sr[key], sf[key]), key
    torch.manual_seed(1)
    r2 = ref.VGMR(WIDTHS, d=8, gate_rank=gate_rank)
    f.load_state_dict(r2.state_dict(), strict=True)  # reference -> fused
    for key, value in r2.state_dict().items():
        assert torch.equal(f.state_dict()[key], value), key
    torch.manual_seed(2)
    f2 = VGMR(WIDTHS, d=8, gate_rank=gate_rank)
    r.load_state_dict(f2.state_dict(), strict=True)  # fused -> reference
    f.load_state_dict(f2.state_dict(), strict=True)  # fused -> fused
    for key, value in f2.state_dict().items():
        assert torch.equal(r.state_dict()[key], value) and torch.equal(f.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="gate_raw"):  # a full-rank state does not fit
        f.load_state_dict(ref.VGMR(WIDTHS, d=8).state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="gate_raw"):  # nor a state of another rank
        f.load_state_dict(ref.VGMR(WIDTHS, d=8, gate_rank=4).state_dict(), strict=True)


def test_fused_parameter_count_equals_the_reference():
    for gate_rank in (None, 7, {"mid": 3}):
        r = ref.VGMR(LIST_WIDTHS, d=8, gate_rank=gate_rank if not isinstance(gate_rank, dict) else {1: 3})
        f = VGMR(LIST_WIDTHS, d=8, gate_rank=gate_rank if not isinstance(gate_rank, dict) else {1: 3})
        assert sum(p.numel() for p in f.parameters()) == sum(p.numel() for p in r.parameters())
    full, low = VGMR(LIST_WIDTHS, d=8), VGMR(LIST_WIDTHS, d=8, gate_rank=7)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert n(full) - n(low) == sum(D * D - 2 * D * 7 for D in (40, 19))
    assert tuple(low.x_weight[0].shape) == (8 + 7, 40) and tuple(low.gate_u["0"].shape) == (40, 7)
    assert tuple(low.x_weight[2].shape) == (8 + 6, 6) and "2" not in low.gate_u


@pytest.mark.parametrize("gate_rank, pattern", [
    (0, "positive int"), (-3, "positive int"), ({"wide": 40}, "1 <= r < D_m = 40"), ({"text": 4}, "unknown modality"),
])
def test_fused_bad_gate_rank(gate_rank, pattern):
    with pytest.raises(ValueError, match="gate_rank: .*" + pattern):
        VGMR(WIDTHS, d=8, gate_rank=gate_rank)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", ABLATIONS + [{"gate_gemm": "stacked"}, {"recompute_gate_gemm": True}],
                         ids=lambda k: ",".join(k) or "paper")
def test_fused_matches_reference_forward_and_every_gradient(backend, kwargs):
    """Odd widths and ranks (40, 19 at r = 7; 6 left full rank), masks with an all-masked row."""
    kwargs = dict(kwargs)
    layout = {k: kwargs.pop(k) for k in ("gate_gemm", "recompute_gate_gemm") if k in kwargs}
    torch.manual_seed(3)
    r = ref.VGMR(LIST_WIDTHS, d=8, gate_rank=7, **kwargs)
    f = from_reference(r, backend=backend, **layout)
    xs, masks = inputs(LIST_WIDTHS)
    assert not masks[0][0].any()  # sample 0 has no valid step in the widest modality
    xs, masks = on(backend, xs, masks)
    check_module(r, f, xs, masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_training_dropout_and_per_modality_rank(backend):
    torch.manual_seed(4)
    r = ref.VGMR(LIST_WIDTHS, d=8, dropout=0.3, gate_rank={1: 5})  # only the middle modality low rank
    f = from_reference(r, backend=backend)
    r.train(), f.train()
    xs, masks = on(backend, *inputs(LIST_WIDTHS))
    out = check_module(r, f, xs, masks)
    assert all((o == 0).sum() > 0 for o in out)


# frozen groups by the fused module's parameter names; the reference freezes the same keys
FROZEN_LOW_RANK = {"nothing": (), "low-rank gate": ("gate_u", "x_weight"), "gate u only": ("gate_u",),
                   "all parameters": None}


# (nothing requiring grad at all: test_vgmr_layer.test_nothing_requires_grad_runs_no_backward)
@pytest.mark.parametrize("x_grad,group", [
    (x_grad, group) for x_grad in [(True, True, True), (False, True, False), (False, False, False)]
    for group in FROZEN_LOW_RANK if not (group == "all parameters" and not any(x_grad))])
def test_fused_only_the_gradients_asked_for(x_grad, group):
    import copy

    from test_vgmr_layer import _grads_with

    r, f = _fused_pair(dropout=0.2)
    r.train(), f.train()
    truth = copy.deepcopy(r).double()
    names = [n for n, _ in f.named_parameters()
             if FROZEN_LOW_RANK[group] is None or n.split(".")[0] in FROZEN_LOW_RANK[group]]
    keys = {key for key, pname, _ in f._slots if pname in names}
    for n in names:
        f.get_parameter(n).requires_grad_(False)
    for module in (r, truth):
        for key, p in module.named_parameters():
            p.requires_grad_(key not in keys)
    xs, masks = inputs(LIST_WIDTHS)
    _, g_t = _grads_with(truth, [x.double() for x in xs], masks, x_grad)
    _, g_r = _grads_with(r, xs, masks, x_grad)
    _, g_f = _grads_with(f, xs, masks, x_grad)
    _assert_within_rule(g_f, g_r, g_t, torch.float32)


def _assert_within_rule(got, eager, truth, dtype):
    """Each tensor within the pass rule (vgmr_fast.testing); every None where the truth's is."""
    from vgmr_fast.testing import compare

    assert len(got) == len(truth)
    for i, (a, b, t) in enumerate(zip(got, eager, truth)):
        assert (a is None) == (t is None), (i, a is None, t is None)
        if t is not None:
            c = compare(a, b, t, dtype)
            assert c.ok, (i, c)


def test_fused_autocast_bfloat16_training_step():
    """bf16 autocast runs the one-node path: outputs and gradients within the pass rule of the
    reference under the same autocast (truth: float64)."""
    import copy

    r, f = _fused_pair(dropout=0.0)
    truth = copy.deepcopy(r).double()
    xs, masks = inputs(LIST_WIDTHS)
    results = []
    for module, autocast in ((truth, False), (r, True), (f, True)):
        xg = [(x.double() if module is truth else x).requires_grad_() for x in xs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(xg, masks)
        module.zero_grad(set_to_none=True)
        sum((o.double() * torch.linspace(-1, 1, o.shape[-1], dtype=torch.float64)).sum() for o in out).backward()
        results.append((list(out), grads(module, xg)))
    (out_t, g_t), (out_r, g_r), (out_f, g_f) = results
    _assert_within_rule(out_f + g_f, out_r + g_r, out_t + g_t, torch.bfloat16)


def test_fused_torch_compile_fullgraph():
    r, f = _fused_pair()
    xs, masks = inputs(LIST_WIDTHS)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    f.eval()
    for a, b in zip(compiled(xs, masks), f(xs, masks)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    f.train()
    f.p = 0.0
    xe = [x.clone().requires_grad_() for x in xs]
    xc = [x.clone().requires_grad_() for x in xs]
    sum(o.square().sum() for o in f(xe, masks)).backward()
    expect = [g.clone() for g in grads(f, xe)]
    f.zero_grad(set_to_none=True)
    sum(o.square().sum() for o in compiled(xc, masks)).backward()
    for a, b in zip(grads(f, xc), expect):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_train_grid_runs_the_fused_low_rank_gate(tmp_path):
    """A tiny ``vgmr-fast train --gate-rank`` grid: the fused low-rank module trains, alone and
    under OGM-GE (whose per-modality groups follow the fused module's state-dict slots)."""
    from test_train import _args

    from vgmr_fast import train

    args = _args(tmp_path, "--settings", "noisy", "--backbones", "concat", "--methods", "vgmr,vgmr+ogm",
                 "--gate-rank", "4", "--backend", "cpu")
    res = train.train_grid(args)
    assert res["n_runs"] == 2
    for row in res["summary"]:
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0
