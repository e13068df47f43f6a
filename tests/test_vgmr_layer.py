"""The fused VGMR as a layer: launch and memory budgets, graph safety of
the dropout seed, input handling shared with the reference, and the cases that used to fail."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from vgmr_fast import reference as R
from vgmr_fast.bench.memory import peak_cpu
from vgmr_fast.bench.opcount import count_aten_ops, saved_tensor_bytes
from vgmr_fast.ops import backend as ops_backend
from vgmr_fast.vgmr import VGMR, from_reference

from test_vgmr import assert_rule, check_module, grads, inputs, run

# The size the budgets are set at (a MOSEI-like layer): B=32, T=50, widths 768/74/35, d=128, fp32.
B, T, WIDTHS, D_LATENT = 32, 50, [768, 74, 35], 128
INFERENCE_BUDGET, TRAINING_BUDGET, SAVED_FRACTION, SAVED_FRACTION_NO_INPUT_GRAD = 30, 100, 0.35, 0.37
# A training step's peak of bytes newly allocated (bench.memory.peak_cpu: output gradients given,
# parameter gradients reset to None), as a share of the reference's, without / with input gradients.
PEAK_FRACTION, PEAK_FRACTION_INPUT_GRAD = 0.75, 0.8


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    r = R.VGMR(WIDTHS, d=D_LATENT, dropout=0.1)
    f = from_reference(r, backend="cpu", **kw)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, T, D, generator=g) for D in WIDTHS]
    masks = [torch.rand(B, T, generator=g) > 0.2 for _ in WIDTHS]
    return r, f, xs, masks


def _training_step(module, xs, masks):
    xg = [x.clone().requires_grad_() for x in xs]
    gy = [torch.randn_like(x) for x in xs]

    def step():
        torch.autograd.backward(list(module(xg, masks)), gy)

    return step


def test_op_budgets():
    """ATen ops dispatched (about one kernel launch each on a GPU; views left out)."""
    _, f, xs, masks = _layer()
    f.eval()
    with torch.no_grad():
        _, inference = count_aten_ops(f, xs, masks)
    f.train()  # dropout on
    _, training = count_aten_ops(_training_step(f, xs, masks))
    assert inference.total <= INFERENCE_BUDGET, dict(inference.by_name)
    assert training.total <= TRAINING_BUDGET, dict(training.by_name)


def test_saved_activations_budget_and_recompute_trade_off():
    r, f, xs, masks = _layer()
    fr = from_reference(r, backend="cpu", recompute_gate_gemm=True)
    saved = {}
    for name, mod in (("reference", r), ("fused", f), ("recompute", fr)):
        mod.train()
        xg = [x.clone().requires_grad_() for x in xs]
        out, saved[name] = saved_tensor_bytes(mod, xg, masks, exclude=list(mod.parameters()) + xg + masks)
        del out
    assert saved["fused"] <= SAVED_FRACTION * saved["reference"], saved
    # recomputing the gate GEMM keeps no Zpre: B * sum(T * D_m) float32 values fewer
    assert saved["fused"] - saved["recompute"] >= B * T * sum(WIDTHS) * 4, saved


@pytest.mark.parametrize("kw", [{}, {"projection": "linear"}, {"use_global_value": False, "use_channel_value": False},
                                {"use_agreement": False, "use_global_value": False}])
def test_recompute_gate_gemm_matches_reference(kw):
    widths = [12, 5, 3]
    torch.manual_seed(3)
    r = R.VGMR(widths, d=8, **kw)
    f = from_reference(r, backend="cpu", recompute_gate_gemm=True)
    xs, masks = inputs(widths)
    check_module(r, f, xs, masks)


def test_aux_gradients_match_reference():
    """The auxiliaries feed the value loss: their gradients reach the parameters as in the reference."""
    widths = [12, 5, 3]
    torch.manual_seed(4)
    r = R.VGMR(widths, d=8, dropout=0.0)
    f = from_reference(r, backend="cpu")
    xs, masks = inputs(widths)

    def run(module):
        xg = [x.clone().requires_grad_() for x in xs]
        out, aux = module(xg, masks, return_aux=True)
        loss = sum((o * o).mean() for o in out) + aux["global_value"].pow(2).sum() \
            + aux["channel_value"].sin().sum() + aux["gate_mean"].sum() + aux["gate"][1].mean()
        module.zero_grad(set_to_none=True)
        loss.backward()
        return grads(module, xg)

    for a, b in zip(run(f), run(r)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- the dropout seed: a device tensor, graph-safe ----------------------------------------
def test_manual_seed_reproduces_and_masks_change_between_steps():
    widths = [10, 6, 3]
    r, xs_masks = R.VGMR(widths, d=8, dropout=0.3), inputs(widths)
    f = from_reference(r, backend="cpu").train()
    xs, masks = xs_masks
    torch.manual_seed(11)
    a = f(xs, masks)
    b = f(xs, masks)
    torch.manual_seed(11)
    c = f(xs, masks)
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def test_gemm_route_of_the_composable_path():
    """The composable path's inference forward: the reference backend never calls the layer's CPU
    GEMM operators; gate_gemm="stacked" does (at this size), unless the caller turned the route
    off, which the path leaves as it found it."""
    from vgmr_fast.ops.gemm import onednn_active, use_onednn

    if not onednn_active():
        pytest.skip("oneDNN's matmul is not in this torch: the layer's CPU GEMMs are ATen's")
    r, _, xs, masks = _layer()
    names = {}
    for label, kw, route in (("reference", {"backend": "reference"}, True), ("stacked", {"gate_gemm": "stacked"}, True),
                             ("stacked, route off", {"gate_gemm": "stacked"}, False)):
        m = from_reference(r, **kw).eval()
        with torch.inference_mode(), use_onednn(route):
            _, c = count_aten_ops(m, xs, masks)
        names[label] = c.by_name["vgmr::gemm"] + c.by_name["vgmr::gemm_into"]
    assert names["reference"] == 0 and names["stacked"] > 0 and names["stacked, route off"] == 0, names


def test_inductor_compiled_module_calls_the_cpu_gemms():
    """torch.compile (Inductor, fullgraph) of the fused module at the budget size keeps the layer's
    oneDNN GEMM operators in its generated code, and its training step (dropout, input gradients)
    and inference satisfy the pass rule against the reference, every gradient included."""
    from vgmr_fast.bench.opcount import capture_inductor_code
    from vgmr_fast.ops.gemm import onednn_active

    if not onednn_active():
        pytest.skip("oneDNN's matmul is not in this torch: the layer's CPU GEMMs are ATen's")
    r, f, xs, masks = _layer()
    truth = copy.deepcopy(r).double()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    with capture_inductor_code() as codes:
        torch.manual_seed(123)  # the dropout seeds test_vgmr.run draws
        xg = [x.detach().clone().requires_grad_() for x in xs]
        out = compiled(xg, masks)
        loss = sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in out)
        f.zero_grad(set_to_none=True)
        loss.backward()
        got = grads(f, xg)
        out_t, g_t = run(truth, [x.double() for x in xs], masks)
        out_r, g_r = run(r, xs, masks)
        assert_rule(out, out_r, out_t, 1e-6)
        assert_rule(got, g_r, g_t, 1e-6)
        for m in (f, r, truth):
            m.eval()
        with torch.inference_mode():
            out = compiled(xs, masks)
            assert_rule(out, r(xs, masks), truth([x.double() for x in xs], masks), 1e-6)
    torch._dynamo.reset()
    assert len(codes) == 3  # training forward and backward, inference
    assert all("torch.ops.vgmr.gemm" in code for code in codes)


def test_compile_fullgraph_training_dropout_one_graph():
    """torch.compile(fullgraph=True) of a training step with dropout: one graph, no recompiles over
    three steps with different masks; each step equals eager under the same torch.manual_seed."""
    from torch._dynamo.testing import CompileCounterWithBackend

    widths = [12, 5, 3]
    r, f = R.VGMR(widths, d=8, dropout=0.3), None
    f = from_reference(r, backend="cpu").train()
    eager = copy.deepcopy(f)
    xs, masks = inputs(widths)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    previous = None
    for step in range(3):
        xg = [x.clone().requires_grad_() for x in xs]
        torch.manual_seed(step)
        got = compiled(xg, masks)
        sum(o.sum() for o in got).backward()
        torch.manual_seed(step)
        expect = eager(xs, masks)
        for a, b in zip(got, expect):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        zeros = [o == 0 for o in got]
        if previous is not None:
            assert any(not torch.equal(a, b) for a, b in zip(zeros, previous))  # fresh masks
        previous = zeros
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xg)
    assert counter.frame_count == 1, counter.frame_count
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
def test_cuda_graph_capture_forward_backward_fresh_masks():
    """Capture forward + backward with dropout once; each replay draws fresh masks (the seeds come
    from the device generator inside the graph) and gradients are finite."""
    widths = [24, 7, 3]
    torch.manual_seed(0)
    f = VGMR(widths, d=16, dropout=0.3).cuda().train()
    xs = [torch.randn(4, 6, D, device="cuda", requires_grad=True) for D in widths]
    masks = [torch.rand(4, 6, device="cuda") > 0.2 for _ in widths]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the capture
            sum(o.sum() for o in f(xs, masks)).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    f.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        outs = f(xs, masks)
        sum(o.sum() for o in outs).backward()
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seen.append([(o == 0).clone() for o in outs])
        assert all(torch.isfinite(x.grad).all() for x in xs)
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))


# ---- input handling shared with the reference ----------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter: the package imports (and its warning) happen once per process.
_REFERENCE_RUNS = (
    "import vgmr_fast.reference as R, torch\n"
    "m = R.VGMR([5, 3], d=4, dropout=0.2).train()\n"
    "y = m([torch.randn(2, 3, 5), torch.randn(2, 4, 3)])\n"
    "assert all(torch.isfinite(t).all() for t in y)\n"
    "import vgmr_fast\n"
    "assert not hasattr(torch.ops.vgmr, 'summary_pool'), 'ops registered without the extension'\n"
)
_BROKEN_EXTENSION = (
    "import importlib.abc, importlib.util, sys\n"
    "class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        return importlib.util.spec_from_loader(name, self) if name == 'vgmr_fast._C' else None\n"
    "    def create_module(self, spec):\n"
    "        return None\n"
    "    def exec_module(self, module):\n"
    "        raise ImportError('undefined symbol: _ZN3c10 (a build for another torch)')\n"
    "sys.meta_path.insert(0, Broken())\n"
)


def _run(code):
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_reference_imports_without_the_extension():
    done = _run("import sys\n"
                "sys.modules['vgmr_fast._C'] = None  # importing it now raises ImportError\n"
                + _REFERENCE_RUNS +
                "assert 'vgmr_fast.ops' not in sys.modules, 'the package imported the op layer without a build'\n"
                "print('ok')\n")
    assert done.stdout.strip() == "ok" and "Warning" not in done.stderr, done.stderr


def test_a_broken_extension_warns_and_the_reference_still_works():
    done = _run(_BROKEN_EXTENSION + _REFERENCE_RUNS + "print('ok')\n")
    assert done.stdout.strip() == "ok", done.stderr
    assert "RuntimeWarning: vgmr_fast: the compiled extension vgmr_fast._C did not load" in done.stderr
    assert "undefined symbol" in done.stderr


@pytest.mark.skipif(not ops_backend.has_cpp(), reason=f"vgmr_fast._C not built here: {ops_backend.cpp_error()}")
def test_importing_the_package_registers_the_ops():
    done = _run("import sys, torch, vgmr_fast\n"
                "op = torch.ops.vgmr.summary_pool\n"
                "print(type(op).__name__)\n")
    assert done.stdout.strip() == "OpOverloadPacket" and "Warning" not in done.stderr, done.stderr


@pytest.mark.parametrize("make", [R.VGMR, lambda *a, **k: VGMR(*a, backend="cpu", **k)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_input_dtype_differs_from_module(make, dtype):
    m = make([5, 3], d=4)
    xs = [torch.randn(2, 3, 5), torch.randn(2, 4, 3).to(dtype)]
    with pytest.raises(TypeError, match=r"xs\[1\].*float32"):
        m(xs)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast is the supported way to mix
        out = m([x.float() for x in xs])
    assert [o.shape for o in out] == [x.shape for x in xs]


@pytest.mark.parametrize("make", [R.VGMR, lambda *a, **k: VGMR(*a, backend="cpu", **k)])
def test_list_of_features_with_dict_of_masks(make):
    m = make({"a": 5, "b": 3}, d=4)
    xs = [torch.randn(2, 3, 5), torch.randn(2, 4, 3)]
    with pytest.raises(TypeError, match="masks.*dict.*list"):
        m(xs, {"a": torch.ones(2, 3, dtype=torch.bool), "b": None})
    m_list = make([5, 3], d=4)
    with pytest.raises(ValueError, match="xs: got a dict"):
        m_list({"a": xs[0], "b": xs[1]})


@pytest.mark.parametrize("kw", [{}, {"use_global_value": False}])
def test_empty_batch_gives_empty_outputs(kw):
    widths = [5, 3, 2]
    torch.manual_seed(0)
    r = R.VGMR(widths, d=4, **kw)
    f = from_reference(r, backend="cpu")
    xs = [torch.randn(0, 3 + m, D) for m, D in enumerate(widths)]
    masks = [torch.ones(0, 3 + m, dtype=torch.bool) for m in range(3)]
    for module in (r, f):
        out, aux = module(xs, masks, return_aux=True)
        assert [o.shape for o in out] == [x.shape for x in xs]
        assert aux["gate_mean"].shape == (0, 3)
        assert aux["channel_value"].shape == (0, 3, 4)
        assert (aux["global_value"] is None) == ("use_global_value" in kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_masked_steps_do_not_reach_pooling(bad):
    """docs/math.md §1 pools over valid steps only: a NaN or infinity at a masked-out step changes nothing
    at the valid steps, in the reference and in the fused module."""
    h = torch.randn(3, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 2] = mask[2, 4] = False
    mask[1] = False
    clean_mean, clean_max = R.summary_pool(h, mask)
    h[0, 2], h[2, 4], h[1, 0] = bad, bad, bad
    mean, mx = R.summary_pool(h, mask)
    assert torch.equal(mean, clean_mean) and torch.equal(mx, clean_max)

    widths = [6, 4]
    torch.manual_seed(1)
    r = R.VGMR(widths, d=4).eval()
    f = from_reference(r, backend="cpu")
    xs, masks = inputs(widths, Ts=[5, 4])
    poisoned = [x.clone() for x in xs]
    for x, mk in zip(poisoned, masks):
        x[~mk] = bad
    for module in (r, f):
        clean = module(xs, masks)
        out = module(poisoned, masks)
        for o, c, mk in zip(out, clean, masks):
            assert torch.equal(o[mk], c[mk])


def test_fused_accessors_for_code_written_against_the_reference():
    """``blocks[m].norm`` (read by the analyses) and ``reference_grads`` (reference-keyed gradients)."""
    widths = [6, 4]
    torch.manual_seed(2)
    r = R.VGMR(widths, d=4)
    f = from_reference(r, backend="cpu")
    for br, bf in zip(r.blocks, f.blocks):
        assert torch.equal(br.norm.weight, bf.norm.weight) and br.norm.eps == bf.norm.eps
    xs, masks = inputs(widths)
    sum(o.sum() for o in f(xs, masks)).backward()
    g = f.reference_grads()
    assert set(g) == set(r.state_dict())
    assert g["blocks.1.gate_raw.weight"].shape == r.blocks[1].gate_raw.weight.shape


def test_double_backward_raises_naming_the_layer_and_reference_supports_it():
    widths = [12, 5, 3]
    torch.manual_seed(5)
    r = R.VGMR(widths, d=8, dropout=0.0)
    xs, masks = inputs(widths)
    for module, ok in ((from_reference(r, backend="cpu"), False), (from_reference(r, backend="reference"), True)):
        xg = [x.clone().requires_grad_() for x in xs]
        out = module(xg, masks)
        if not ok:
            with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
                torch.autograd.grad(sum((o * o).sum() for o in out), xg, create_graph=True)
            continue
        g = torch.autograd.grad(sum((o * o).sum() for o in out), xg, create_graph=True)
        penalty = sum(gi.pow(2).sum() for gi in g)
        penalty.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


# ---- only the gradients asked for ----------------------------------------------------------
# Frozen groups, named by the fused module's parameters (the reference's keys follow from the
# state-dict slots, so both modules freeze the same weights).
FROZEN = {
    "nothing": (),
    "norms": ("norm_weight", "norm_bias"),
    "gate weights": ("gate_latent_weight", "row_weight"),
    "all parameters": None,  # every parameter
}


def _freeze(r, f, group):
    names = [n for n, _ in f.named_parameters()] if FROZEN[group] is None else \
        [n for n, _ in f.named_parameters() if n.split(".")[0] in FROZEN[group]]
    for n in names:
        f.get_parameter(n).requires_grad_(False)
    keys = {key for key, pname, _ in f._slots if pname in names}
    for key, p in r.named_parameters():
        if key in keys:
            p.requires_grad_(False)


def _grads_with(module, xs, masks, x_grad, seed=123):
    torch.manual_seed(seed)
    xg = [x.detach().clone().requires_grad_(need) for x, need in zip(xs, x_grad)]
    out = module(xg, masks)
    loss = sum((o.double() * torch.linspace(-1, 1, o.shape[-1], dtype=torch.float64)).sum() for o in out)
    module.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
    return out, grads(module, xg)


# (nothing frozen and no feature requiring grad is test_nothing_requires_grad_runs_no_backward)
@pytest.mark.parametrize("x_grad,group", [
    (x_grad, group) for x_grad in [(True, True, True), (False, True, False), (False, False, False)]
    for group in FROZEN if not (group == "all parameters" and not any(x_grad))])
@pytest.mark.parametrize("kw", [{}, {"projection": "linear", "use_global_value": False}])
def test_only_the_gradients_asked_for_match_the_reference(x_grad, group, kw):
    """Every gradient computed equals the reference's under the pass rule; every None sits where
    the reference's None is (frozen parameters, inputs that don't require grad)."""
    from vgmr_fast.testing import compare

    widths = [12, 5, 3]
    torch.manual_seed(6)
    r = R.VGMR(widths, d=8, dropout=0.2, **kw).train()
    f = from_reference(r, backend="cpu")
    truth = copy.deepcopy(r).double()
    _freeze(r, f, group)
    _freeze(truth, f, group)  # same keys (the fused module is already frozen: idempotent)
    xs, masks = inputs(widths)
    _, g_t = _grads_with(truth, [x.double() for x in xs], masks, x_grad)
    _, g_r = _grads_with(r, xs, masks, x_grad)
    _, g_f = _grads_with(f, xs, masks, x_grad)
    assert len(g_f) == len(g_t)
    for i, (a, b, t) in enumerate(zip(g_f, g_r, g_t)):
        assert (a is None) == (t is None), (i, a is None, t is None)
        if t is not None:
            c = compare(a, b, t, torch.float32)
            assert c.ok, (i, c)


def test_nothing_requires_grad_runs_no_backward():
    widths = [12, 5, 3]
    r = R.VGMR(widths, d=8)
    f = from_reference(r, backend="cpu")
    _freeze(r, f, "all parameters")
    xs, masks = inputs(widths)
    out = f(xs, masks)
    assert not any(o.requires_grad for o in out)


def _no_grad_step(module, xs, masks):
    gy = [torch.randn_like(x) for x in xs]

    def step():
        torch.autograd.backward(list(module(xs, masks)), gy)

    return step


def test_op_budget_and_saved_bytes_without_input_grad():
    """Features that don't require grad (pre-extracted features): no dX GEMM, no gate_norm dX,
    fewer ops than the step with input gradients, the same saved bytes."""
    _, f, xs, masks = _layer()
    f.train()
    _, with_x = count_aten_ops(_training_step(f, xs, masks))
    f.zero_grad(set_to_none=True)
    _, without_x = count_aten_ops(_no_grad_step(f, xs, masks))
    assert without_x.total <= TRAINING_BUDGET, dict(without_x.by_name)
    # the dX GEMMs (two per modality, accumulating into gate_norm's dX) are gone
    accumulating = ("aten::addmm_", "vgmr::gemm_into")  # (the CPU GEMMs: vgmr_fast/ops/gemm.py)
    assert (sum(with_x.by_name[n] for n in accumulating) - sum(without_x.by_name[n] for n in accumulating)
            == 2 * len(WIDTHS))
    assert with_x.total - without_x.total == 2 * len(WIDTHS), (dict(with_x.by_name), dict(without_x.by_name))
    r, _, _, _ = _layer()
    r.train()
    _, ref_saved = saved_tensor_bytes(r, xs, masks, exclude=list(r.parameters()) + xs + masks)
    _, saved = saved_tensor_bytes(f, xs, masks, exclude=list(f.parameters()) + xs + masks)
    xg = [x.clone().requires_grad_() for x in xs]
    _, saved_x = saved_tensor_bytes(f, xg, masks, exclude=list(f.parameters()) + xg + masks)
    assert saved == saved_x  # the same tensors either way: each one serves a weight gradient
    # the reference saves less without input gradients; the fused module's share stays below
    assert saved <= SAVED_FRACTION_NO_INPUT_GRAD * ref_saved, (saved, ref_saved)


def test_frozen_module_computes_input_gradients_only():
    """A frozen refiner (every parameter frozen) with features that need grad: only dX."""
    r, f, xs, masks = _layer()
    _freeze(r, f, "all parameters")
    f.train()
    _, c = count_aten_ops(_training_step(f, xs, masks))
    full_r, full_f, _, _ = _layer()
    full_f.train()
    _, full = count_aten_ops(_training_step(full_f, xs, masks))
    assert c.total < full.total - 20, (dict(c.by_name), dict(full.by_name))


def test_meta_device_forward_and_backward():
    """A module moved to ``device="meta"`` runs forward and backward as shape inference."""
    widths = [12, 5, 3]
    f = VGMR(widths, d=8, dropout=0.1).to("meta").train()
    xs = [torch.randn(2, 4, D, device="meta", requires_grad=True) for D in widths]
    out = f(xs)
    assert [o.shape for o in out] == [x.shape for x in xs] and out[0].device.type == "meta"
    sum(o.sum() for o in out).backward()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in xs)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in f.parameters())


# ---- autocast: the same one-node path ------------------------------------------------------
def _autocast_step(module, xs, masks, x_grad):
    xg = [x.clone().requires_grad_(x_grad) for x in xs]
    gy = [torch.randn_like(x) for x in xs]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xg, masks)
        torch.autograd.backward(list(out), gy)

    return step


# Ops a bf16-autocast training step adds to the float32 one: casts as groups (one allocation and
# one copy each: the features and GEMM weights, Zpre to float32 in the forward and again in the
# backward, dZ to bf16, the gradients to float32), the float32 bias rows and heads' gradient, a
# float32 workspace; minus the two LayerNorm gradient concatenations the last cast does; plus
# one float32 accumulation of dX per modality when the features need grad.
AUTOCAST_EXTRA_OPS = 11


@pytest.mark.parametrize("x_grad", [False, True], ids=["features don't need grad", "features need grad"])
def test_autocast_runs_the_one_node_path_with_grouped_casts(x_grad):
    """bf16 autocast: one autograd node, every cast grouped (no per-tensor cast), gate_norm in
    float32 on the features as given (float32 outputs and statistics), float32 gradients."""
    _, f, xs, masks = _layer()
    f.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f(xs, masks)
    assert type(out[0].grad_fn).__name__ == "_FusedVGMRBackward" and out[0].dtype == torch.float32
    f.zero_grad(set_to_none=True)
    _, low = count_aten_ops(_autocast_step(f, xs, masks, x_grad))
    assert all(p.grad.dtype == torch.float32 for p in f.parameters() if p.requires_grad)
    f.zero_grad(set_to_none=True)
    step = _training_step(f, xs, masks) if x_grad else _no_grad_step(f, xs, masks)
    _, full = count_aten_ops(step)
    extra = AUTOCAST_EXTRA_OPS + (len(WIDTHS) if x_grad else 0)
    assert low.total == full.total + extra, (dict(low.by_name), dict(full.by_name))
    if not x_grad:  # pre-extracted features: the autocast step keeps the float32 step's budget
        assert low.total <= TRAINING_BUDGET, dict(low.by_name)
    assert low.by_name["aten::_foreach_copy_"] == 5 and low.by_name.get("aten::_to_copy", 0) == 2, dict(low.by_name)


def test_autocast_saved_bytes_budget():
    """Under autocast the node saves its bf16 copies of the features and GEMM weights (the
    reference's autocast saves its casts too) and half-size activations: the same share of the
    reference's saved bytes under the same autocast as in float32."""
    r, f, xs, masks = _layer()
    r.train()
    f.train()
    xg = [x.clone().requires_grad_() for x in xs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ref_saved = saved_tensor_bytes(r, xg, masks, exclude=list(r.parameters()) + xg + masks)
        _, saved = saved_tensor_bytes(f, xg, masks, exclude=list(f.parameters()) + xg + masks)
    assert saved <= SAVED_FRACTION * ref_saved, (saved, ref_saved)


def test_autocast_gradients_match_the_reference_under_autocast():
    """The pass rule in bf16: eager = the reference under the same autocast, truth = float64."""
    from vgmr_fast.testing import compare

    widths = [12, 5, 3]
    torch.manual_seed(7)
    r = R.VGMR(widths, d=8, dropout=0.0).train()
    f = from_reference(r, backend="cpu")
    truth = copy.deepcopy(r).double()
    xs, masks = inputs(widths)

    def run(module, dtype, autocast):
        xg = [x.detach().clone().to(dtype).requires_grad_() for x in xs]
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(xg, masks)
        loss = sum((o.double() * torch.linspace(-1, 1, o.shape[-1], dtype=torch.float64)).sum() for o in out)
        loss.backward()
        return list(out) + grads(module, xg)

    got, eager, exact = run(f, torch.float32, True), run(r, torch.float32, True), run(truth, torch.float64, False)
    for i, (a, b, t) in enumerate(zip(got, eager, exact)):
        assert (a is None) == (t is None), i
        if t is not None:
            c = compare(a, b, t, torch.bfloat16)
            assert c.ok, (i, c)


def test_autocast_compile_fullgraph_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    widths = [12, 5, 3]
    f = from_reference(R.VGMR(widths, d=8, dropout=0.3), backend="cpu").train()
    xs, masks = inputs(widths)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for step in range(2):
        xg = [x.clone().requires_grad_() for x in xs]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(xg, masks)
        sum(o.float().sum() for o in out).backward()
        assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in xg)
    assert counter.frame_count == 1, counter.frame_count
    torch._dynamo.reset()


# ---- activations released at their last use -------------------------------------------------
def _peak_step(module, xs, masks, x_grad):
    xg = [x.clone().requires_grad_(x_grad) for x in xs]
    gy = [torch.randn_like(x) for x in xs]
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        torch.autograd.backward(list(module(xg, masks)), gy)

    step()
    return step


@pytest.mark.parametrize("x_grad", [False, True], ids=["features don't need grad", "features need grad"])
def test_training_step_peak_memory_below_the_reference(x_grad):
    """Bytes allocated during one training step at their peak (counted by the allocator, not timed):
    the fused backward drops each activation and gradient buffer at its last use."""
    r, f, xs, masks = _layer()
    r.train()
    f.train()
    ref_peak = peak_cpu(_peak_step(r, xs, masks, x_grad))
    fused_peak = peak_cpu(_peak_step(f, xs, masks, x_grad))
    assert fused_peak <= (PEAK_FRACTION_INPUT_GRAD if x_grad else PEAK_FRACTION) * ref_peak, (fused_peak, ref_peak)


def test_inference_peak_memory_is_the_outputs_and_the_gate_gemm():
    """An inference forward's peak of bytes newly allocated (counted, not timed): its outputs and
    Zpre, which gate_norm reads while writing them; P's activations and H are released first."""
    _, f, xs, masks = _layer()
    f.eval()
    with torch.inference_mode():
        f(xs, masks)
        peak = peak_cpu(lambda: f(xs, masks))
    outputs_and_zpre = 2 * sum(x.numel() * x.element_size() for x in xs)
    assert peak <= 1.1 * outputs_and_zpre, (peak, outputs_and_zpre)


def test_second_backward_over_one_forward_is_a_clear_error():
    widths = [12, 5, 3]
    torch.manual_seed(5)
    f = from_reference(R.VGMR(widths, d=8), backend="cpu").train()
    xs, masks = inputs(widths)
    loss = sum(o.sum() for o in f(xs, masks))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()


def test_saved_tensor_hooks_see_every_activation():
    """The activations the node keeps pass through the saved-tensor hooks in force (offloading,
    counting) as autograd's saved tensors do; gradients under ``save_on_cpu`` are unchanged."""
    widths = [12, 5, 3]
    torch.manual_seed(6)
    f = from_reference(R.VGMR(widths, d=8, dropout=0.0), backend="cpu").train()
    xs, masks = inputs(widths)
    xg = [x.clone().requires_grad_() for x in xs]
    packed, unpacked = [], []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t,
                                                  lambda t: unpacked.append(1) or t):
        out = f(xg, masks)
    torch.autograd.backward(list(out), [torch.ones_like(o) for o in out])
    # every activation packed was unpacked once, and there are more of them than the inputs
    assert len(packed) == len(unpacked) > len(list(f.parameters())) + len(xs), (len(packed), len(unpacked))
    plain = torch.autograd.grad([o.square().sum() for o in f(xg, masks)], xg + list(f.parameters()))
    with torch.autograd.graph.save_on_cpu():
        out = f(xg, masks)
    offloaded = torch.autograd.grad([o.square().sum() for o in out], xg + list(f.parameters()))
    for a, b in zip(plain, offloaded):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
