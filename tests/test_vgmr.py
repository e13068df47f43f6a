"""The fused drop-in module against the reference: same weights -> same outputs and gradients."""
import copy
import warnings

import pytest
import torch

import vgmr_fast
from vgmr_fast import reference as R
from vgmr_fast.vgmr import VGMR, from_reference


def module_backends():
    """C++ always (CI builds it: a missing build must fail, not skip); CUDA and Triton on a GPU;
    Triton under the interpreter on the CPU (these module cases are a few dozen rows)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    try:
        import vgmr_fast.triton as T

        if T.AVAILABLE:
            out.append("triton")
    except ImportError:
        pass
    return out


BACKENDS = module_backends()


def inputs(widths, B=3, Ts=None, dtype=torch.float32, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    Ts = Ts or [5 + 2 * i for i in range(len(widths))]
    xs = [torch.randn(B, T, D, generator=g).to(dtype) for T, D in zip(Ts, widths)]
    masks = None
    if masked:
        masks = [torch.rand(B, T, generator=g) > 0.3 for T in Ts]
        masks[0][0] = False  # an absent modality for sample 0
        masks[-1][-1] = True
    return xs, masks


def device_of(backend):
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def pair(widths, backend, d=8, seed=0, **kw):
    torch.manual_seed(seed)
    r = R.VGMR(widths, d=d, **kw).to(device_of(backend))
    f = from_reference(r, backend=backend)
    return r, f


def on(backend, xs, masks):
    dev = device_of(backend)
    return [x.to(dev) for x in xs], None if masks is None else [m.to(dev) for m in masks]


def grads(module, xs):
    """Parameter gradients in the reference's order (the fused module maps its stacked layout),
    then the inputs' gradients."""
    if isinstance(module, VGMR):
        by_name = module.reference_grads()
        names = list(module.state_dict())
    else:
        by_name = {n: p.grad for n, p in module.named_parameters()}
        names = list(by_name)
    return [by_name.get(n) for n in names] + [x.grad for x in xs]


def run(module, xs, masks, seed=123):
    torch.manual_seed(seed)  # both modules draw the same dropout seeds (training mode)
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = module(xs, masks)
    loss = sum((o.float() * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum() for o in out)
    module.zero_grad(set_to_none=True)
    loss.backward()
    return out, grads(module, xs)


def assert_rule(got, ref_same_dtype, truth, atol):
    """The docs/math.md §9 test rule: |fused - truth| <= 2 |reference - truth| + atol (elementwise max),
    atol scaled by the tensor's magnitude (gradients sum many terms)."""
    for a, b, t in zip(got, ref_same_dtype, truth):
        assert (a is None) == (t is None)
        if t is None:
            continue
        assert a.shape == t.shape and a.dtype == b.dtype
        err_f = (a.double() - t).abs().max().item()
        err_r = (b.double() - t).abs().max().item()
        tol = 2 * err_r + atol * (1.0 + t.abs().max().item())
        assert err_f <= tol, (err_f, err_r, tol)


def check_module(r, f, xs, masks, atol=1e-6):
    """Fused vs reference (same dtype) vs float64 truth, outputs and all gradients."""
    truth = copy.deepcopy(r).double()
    out_t, g_t = run(truth, [x.double() for x in xs], masks)
    out_r, g_r = run(r, xs, masks)
    out_f, g_f = run(f, xs, masks)
    assert_rule(out_f, out_r, out_t, atol)
    assert_rule(g_f, g_r, g_t, atol)
    return out_f


@pytest.mark.parametrize("kw", [{}, {"projection": "linear"}, {"use_global_value": False},
                                {"use_channel_value": False, "use_agreement": False},
                                {"use_global_value": False, "use_channel_value": False}])
def test_state_dict_equals_reference_both_ways(kw):
    """Stacked layout inside, the reference's state_dict outside: same keys in the same order,
    equal values, and strict loading of either module's state into either."""
    widths = {"t": 12, "a": 5, "v": 3}
    torch.manual_seed(0)
    r = R.VGMR(widths, d=4, **kw)
    torch.manual_seed(0)
    f = VGMR(widths, d=4, **kw)
    sr, sf = r.state_dict(), f.state_dict()
    assert list(sr) == list(sf)
    for k in sr:  # the same seed draws the same initial weights in the same order
        assert torch.equal(sr[k], sf[k]), k
    torch.manual_seed(1)
    r2 = R.VGMR(widths, d=4, **kw)
    f.load_state_dict(r2.state_dict())  # reference -> fused
    for k, v in r2.state_dict().items():
        assert torch.equal(f.state_dict()[k], v), k
    torch.manual_seed(2)
    f2 = VGMR(widths, d=4, **kw)
    r.load_state_dict(f2.state_dict())  # fused -> reference
    f.load_state_dict(f2.state_dict())  # fused -> fused
    for k, v in f2.state_dict().items():
        assert torch.equal(r.state_dict()[k], v) and torch.equal(f.state_dict()[k], v), k
    assert vgmr_fast.VGMR is VGMR


def test_load_state_dict_strict_errors_and_nesting():
    widths = [6, 4]
    f = VGMR(widths, d=4)
    sd = R.VGMR(widths, d=4).state_dict()
    missing = dict(sd)
    del missing["blocks.1.gate_channel.bias"]
    with pytest.raises(RuntimeError, match="gate_channel.bias"):
        f.load_state_dict(missing)
    wrong = dict(sd)
    wrong["blocks.0.norm.weight"] = torch.ones(7)
    with pytest.raises(RuntimeError, match="size mismatch for blocks.0.norm.weight"):
        f.load_state_dict(wrong)
    extra = dict(sd)
    extra["blocks.0.bogus"] = torch.ones(1)
    with pytest.raises(RuntimeError, match="bogus"):
        f.load_state_dict(extra)
    # as a submodule (prefixed keys), and through torch.save / torch.load
    import io

    outer_r, outer_f = torch.nn.Sequential(R.VGMR(widths, d=4)), torch.nn.Sequential(VGMR(widths, d=4))
    outer_f.load_state_dict(outer_r.state_dict())
    buf = io.BytesIO()
    torch.save(outer_f.state_dict(), buf)
    buf.seek(0)
    outer_r.load_state_dict(torch.load(buf))
    for k, v in outer_r.state_dict().items():
        assert torch.equal(outer_f.state_dict()[k], v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("widths,Ts", [([12, 5], [4, 1]), ([24, 7, 3], [6, 5, 1]), ([9, 1, 4, 6], [3, 2, 4, 1]),
                                        ([10, 6, 3], [4, 4, 4])])
def test_matches_reference_fp32(backend, widths, Ts):
    r, f = pair(widths, backend)
    xs, masks = inputs(widths, Ts=Ts)
    xs, masks = on(backend, xs, masks)
    check_module(r, f, xs, masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_dropout_matches_reference(backend):
    widths = [10, 6, 3]
    r, f = pair(widths, backend, dropout=0.3)
    r.train(), f.train()
    xs, masks = inputs(widths)
    xs, masks = on(backend, xs, masks)
    out_f = check_module(r, f, xs, masks)
    assert all((a == 0).sum() > 0 for a in out_f)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_within_rule(backend, dtype):
    """docs/math.md §9: fused error vs float64 truth <= 2x the eager reference's error in that dtype + atol."""
    widths = [24, 7, 3]
    r, f = pair(widths, backend)
    xs, masks = inputs(widths)
    xs, masks = on(backend, xs, masks)
    truth = R.VGMR(widths, d=8).double()
    truth.load_state_dict(r.state_dict())
    out_t = truth([x.double() for x in xs], masks)
    out_r = r.to(dtype).eval()([x.to(dtype) for x in xs], masks)
    out_f = f.to(dtype).eval()([x.to(dtype) for x in xs], masks)
    for a, b, t in zip(out_f, out_r, out_t):
        assert a.dtype == dtype
        err_f = (a.double() - t).abs().max().item()
        err_r = (b.double() - t).abs().max().item()
        assert err_f <= 2 * err_r + 1e-3, (err_f, err_r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{"gate_gemm": "stacked"}, {"projection": "linear"},
                                {"use_agreement": False, "use_global_value": False},
                                {"use_discrepancy": False, "use_channel_value": False}])
def test_variants_match_reference(backend, kw):
    widths = [12, 5, 3]
    gate_gemm = kw.pop("gate_gemm", "two")
    torch.manual_seed(3)
    r = R.VGMR(widths, d=8, **kw)
    f = from_reference(r, backend=backend, gate_gemm=gate_gemm)
    xs, masks = inputs(widths)
    xs, masks = on(backend, xs, masks)
    check_module(r, f, xs, masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_matches_reference(backend):
    widths = [12, 5, 3]
    r, f = pair(widths, backend)
    r.eval(), f.eval()
    xs, masks = inputs(widths)
    xs, masks = on(backend, xs, masks)
    _, ar = r(xs, masks, return_aux=True)
    _, af = f(xs, masks, return_aux=True)
    for k in ("global_value", "channel_value", "gate_mean"):
        torch.testing.assert_close(af[k], ar[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_eval_no_autograd_state(backend):
    r, f = pair([12, 5], backend)
    f.eval()
    xs, masks = inputs([12, 5])
    xs, masks = on(backend, xs, masks)
    with torch.inference_mode():
        out = f(xs, masks)
    assert all(not o.requires_grad for o in out)
    with torch.no_grad():
        out = f([x.requires_grad_() for x in xs], masks)
    assert all(o.grad_fn is None for o in out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_off", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
@pytest.mark.parametrize("widths,Ts,kw", [([24, 7, 3], [6, 5, 1], {}), ([10, 6, 3], [4, 4, 4], {}),
                                           ([12, 5], [4, 3], {"projection": "linear"})])
def test_forward_without_autograd_matches_reference(backend, grad_off, widths, Ts, kw):
    """The forward that keeps nothing for a backward (P's GELU in place, buffers released early),
    against the reference and float64 truth, with an absent modality (all-masked rows)."""
    r, f = pair(widths, backend, **kw)
    r.eval(), f.eval()
    xs, masks = inputs(widths, Ts=Ts)
    xs, masks = on(backend, xs, masks)
    truth = copy.deepcopy(r).double()
    with grad_off():
        out_t = truth([x.double() for x in xs], masks)
        out_r = r(xs, masks)
        out_f = f(xs, masks)
    assert all(o.grad_fn is None for o in out_f)
    assert_rule(out_f, out_r, out_t, 1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_torch_compile_fullgraph(backend):
    r, f = pair([12, 5, 3], backend)
    f.eval()
    xs, masks = inputs([12, 5, 3])
    xs, masks = on(backend, xs, masks)
    expect = f(xs, masks)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(xs, masks)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # training step (no dropout): forward + backward through the compiled graph
    f.train()
    f.p = 0.0
    xs_g = [x.clone().requires_grad_() for x in xs]
    sum(o.sum() for o in compiled(xs_g, masks)).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs_g)


def test_autocast_cpu_bf16():
    r, f = pair([24, 7, 3], "cpu")
    r.eval(), f.eval()
    xs, masks = inputs([24, 7, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_r = r(xs, masks)
        out_f = f(xs, masks)
    truth = r(xs, masks)
    for a, b, t in zip(out_f, out_r, truth):
        assert a.dtype == b.dtype
        err_f = (a.float() - t).abs().max().item()
        err_r = (b.float() - t).abs().max().item()
        assert err_f <= 2 * err_r + 1e-2, (err_f, err_r)


def test_auto_falls_back_with_one_warning(monkeypatch):
    from vgmr_fast import vgmr as V
    from vgmr_fast.ops import backend as B

    def missing(*a, **k):
        raise RuntimeError("no fused backend built")

    monkeypatch.setattr(B, "resolve", missing)
    monkeypatch.setattr(V, "_warned", set())
    r, f = pair([12, 5], "auto")
    xs, masks = inputs([12, 5])
    with pytest.warns(RuntimeWarning, match="reference"):
        out = f(xs, masks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(xs, masks)  # the warning is given once
    for a, x in zip(out, xs):
        assert a.shape == x.shape
    with pytest.raises(RuntimeError):
        from_reference(r, backend="cpu")(xs, masks)


def test_bad_backend_argument():
    with pytest.raises(ValueError, match="backend"):
        VGMR([4, 3], d=2, backend="metal")
    with pytest.raises(ValueError, match="gate_gemm"):
        VGMR([4, 3], d=2, gate_gemm="three")


def test_torch_compile_training_dropout_no_recompiles():
    """Each step draws a new dropout seed; it must not become a guarded constant of the graph."""
    from torch._dynamo.utils import counters

    r, f = pair([12, 5, 3], "cpu", dropout=0.3)
    xs, masks = inputs([12, 5, 3])
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager")
    for step in range(3):
        torch.manual_seed(step)
        got = compiled(xs, masks)
        torch.manual_seed(step)
        expect = r(xs, masks)
        for a, b in zip(got, expect):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    for step in range(3, 6):
        compiled(xs, masks)
    assert counters["stats"]["unique_graphs"] == graphs
