"""What the fused ops refuse, each with a clear error naming the op or the argument:

- non-finite ``alpha`` / ``beta`` (they would make every output NaN);
- double backward: a backward run with ``create_graph=True`` that would build a graph through
  a fused backward (gradgradcheck, gradient penalties) raises at that moment instead of
  returning wrong second derivatives; without a graph to build, first-order results stay right;
- ``torch.func`` transforms and forward-mode AD (``torch.autograd.forward_ad``).

Every error points to the plain-torch reference (``vgmr_fast.reference.<op>`` /
``VGMR(backend="reference")``), which supports all of these; the tests check that too.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from helpers import BACKENDS, cap, gen
from vgmr_fast import ops
from vgmr_fast import reference as ref

OPS = ("summary_pool", "interaction", "gate_norm")


def _inputs(op: str, device: str, dtype=torch.float64, grad=True):
    """Small inputs of ``op`` and a function ``f(*inputs, backend)`` -> one tensor, plus the reference."""
    g = gen(5)
    if op == "summary_pool":
        h = torch.randn(2, 4, 3, generator=g, dtype=dtype)
        mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
        ins = [h.to(device).requires_grad_(grad)]

        def f(h, backend):
            mean, mx = ops.summary_pool(h, mask.to(device), backend=backend)
            return mean * 2 + mx

        def r(h):
            mean, mx = ref.summary_pool(h, mask.to(device))
            return mean * 2 + mx

        return ins, f, r
    if op == "interaction":
        ins = [torch.randn(2, 3, 4, generator=g, dtype=dtype).to(device).requires_grad_(grad)]
        return ins, (lambda s, backend: ops.interaction(s, backend=backend)), ref.interaction
    ins = [
        torch.randn(2, 3, 5, generator=g, dtype=dtype),
        torch.randn(2, 5, generator=g, dtype=dtype),
        torch.randn(2, 3, 5, generator=g, dtype=dtype),
        1 + 0.3 * torch.randn(5, generator=g, dtype=dtype),
        0.3 * torch.randn(5, generator=g, dtype=dtype),
    ]
    ins = [t.to(device).requires_grad_(grad) for t in ins]
    return ins, (lambda *a, backend: ops.gate_norm(*a, backend=backend)), (lambda *a: ref.gate_norm(*a))


def _backend_inputs(op: str, backend: str, grad=True):
    """``_inputs`` on ``backend``'s device (float64 on the CPU, float32 where kernels lack it);
    skips visibly when the backend is unavailable."""
    return _inputs(op, cap(backend, 8), torch.float64 if backend == "cpu" else torch.float32, grad)


# ---- alpha / beta ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["alpha", "beta"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_alpha_beta(name, value):
    ins, _, _ = _inputs("gate_norm", "cpu", grad=False)
    with pytest.raises(ValueError, match=f"{name}: expected a finite real number"):
        ops.gate_norm(*ins, **{name: value})


def test_finite_alpha_beta_of_other_types_still_accepted():
    ins, _, _ = _inputs("gate_norm", "cpu", grad=False)
    a = ops.gate_norm(*ins, alpha=1, beta=torch.tensor(0.25).item())
    b = ops.gate_norm(*ins, alpha=1.0, beta=0.25)
    assert torch.equal(a, b)


# ---- double backward ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_gradgradcheck_raises_naming_the_op(op, backend):
    ins, f, _ = _backend_inputs(op, backend)
    with pytest.raises(RuntimeError, match=rf"{op}: double backward .* not supported .*reference\.{op}"):
        torch.autograd.gradgradcheck(lambda *a: f(*a, backend=backend), ins)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_gradient_penalty_raises(op, backend):
    # The gradient-penalty pattern: grad with create_graph=True, then a loss on the gradient.
    ins, f, _ = _backend_inputs(op, backend)
    out = f(*ins, backend=backend)
    with pytest.raises(RuntimeError, match=rf"{op}: double backward"):
        torch.autograd.grad(out.pow(2).sum(), ins, create_graph=True)


@pytest.mark.parametrize("op", OPS)
def test_reference_supports_double_backward(op):
    # What the error points to works: the reference passes gradgradcheck.
    ins, _, r = _inputs(op, "cpu")
    assert torch.autograd.gradgradcheck(r, ins)


@pytest.mark.parametrize("op, needs_grad", [("summary_pool", [0]), ("gate_norm", [4])], ids=["summary_pool", "gate_norm"])
def test_create_graph_without_a_graph_to_build_is_first_order_correct(op, needs_grad):
    # create_graph=True where nothing the fused backward reads requires grad (summary_pool's
    # backward reads only the incoming gradient; gate_norm's dln_bias needs none of the saved
    # inputs when only ln_bias requires grad): no error, first-order gradients as the reference's.
    ins, f, r = _inputs(op, "cpu", grad=False)
    ins = [t.requires_grad_(i in needs_grad) for i, t in enumerate(ins)]
    leaves = [ins[i] for i in needs_grad]
    w = torch.randn(f(*ins, backend="cpu").shape, generator=gen(9), dtype=torch.float64)
    got = torch.autograd.grad((f(*ins, backend="cpu") * w).sum(), leaves, create_graph=True)
    want = torch.autograd.grad((r(*ins) * w).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- torch.func and forward-mode AD ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("transform", ["grad", "jvp", "jacrev", "forward_ad"])
def test_transforms_raise_naming_the_op(op, backend, transform):
    ins, f, _ = _backend_inputs(op, backend, grad=False)

    def loss(*a):
        return f(*a, backend=backend).sum()

    with pytest.raises(RuntimeError, match=rf"{op}: .* not supported by the fused kernels; .*reference\.{op}"):
        if transform == "grad":
            torch.func.grad(loss)(*ins)
        elif transform == "jvp":
            torch.func.jvp(loss, tuple(ins), tuple(torch.ones_like(t) for t in ins))
        elif transform == "jacrev":
            torch.func.jacrev(loss)(*ins)
        else:
            with fwAD.dual_level():
                duals = [fwAD.make_dual(t, torch.ones_like(t)) for t in ins]
                loss(*duals)


@pytest.mark.parametrize("op", OPS)
def test_reference_supports_torch_func(op):
    ins, _, r = _inputs(op, "cpu", grad=False)
    g = torch.func.grad(lambda *a: r(*a).pow(2).sum())(*ins)
    leaves = [t.clone().requires_grad_(True) for t in ins]
    want = torch.autograd.grad(r(*leaves).pow(2).sum(), leaves[0])[0]
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_vmap_without_autograd_matches_the_reference(op):
    # vmap alone (no grad transform) runs the C++ op once per batch entry: allowed, and right.
    ins, f, r = _inputs(op, "cpu", grad=False)
    stacked = [torch.stack([t, t * 0.5]) for t in ins]
    got = torch.func.vmap(lambda *a: f(*a, backend="cpu"))(*stacked)
    for i in range(2):
        torch.testing.assert_close(got[i], r(*[t[i] for t in stacked]), rtol=1e-10, atol=1e-12)
