"""gate_norm_grouped (docs/ops.md): every modality in one call, bit-identical to
per-modality gate_norm with seed = seeds[m], forward and every gradient, with and without
dropout; one raw-op call and one autograd node on the C++ backends; clear errors."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import BACKENDS, cap, gen
from vgmr_fast import ops

pytestmark = pytest.mark.usefixtures("vgmr_debug_nan_fill")

ALPHA, BETA = 0.4, 0.3
# (T_m, D_m) per modality: odd sizes, D not a power of 2, T = 1, D = 1
LAYOUT = [(3, 7), (1, 35), (5, 1), (2, 74)]


def _modalities(B, layout, dtype, device, seed=0):
    g = gen(seed)
    mods = []
    for T, D in layout:
        zpre = (torch.randn(B, T, D, generator=g) * 2).to(dtype)
        x = torch.randn(B, T, D, generator=g).to(dtype)
        pdt = torch.float64 if dtype == torch.float64 else torch.float32
        bias_row = (torch.randn(B, D, generator=g) * 0.5).to(pdt)
        w = (1 + 0.3 * torch.randn(D, generator=g)).to(pdt)
        b = (0.3 * torch.randn(D, generator=g)).to(pdt)
        mods.append([t.to(device) for t in (zpre, bias_row, x, w, b)])
    dys = [torch.randn(B, T, D, generator=g).to(dtype).to(device) for T, D in layout]
    return mods, dys


def _leaves(mods):
    return [[t.detach().clone().requires_grad_(True) for t in m] for m in mods]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_grouped_equals_per_modality_bitwise(backend, dtype, p):
    B = 2
    dev = cap(backend, B * max(T for T, _ in LAYOUT), dtype)
    mods, dys = _modalities(B, LAYOUT, dtype, dev)
    M = len(mods)
    seeds = torch.randint(0, 2**62, (M,), dtype=torch.int64, generator=gen(11)).to(dev) if p > 0 else None
    # grouped
    g_leaves = _leaves(mods)
    ys = ops.gate_norm_grouped(*[[m[k] for m in g_leaves] for k in range(5)], alpha=ALPHA, beta=BETA, p=p,
                               seeds=seeds, backend=backend)
    torch.autograd.backward(ys, dys)
    # one modality at a time
    s_leaves = _leaves(mods)
    for m in range(M):
        y = ops.gate_norm(*s_leaves[m], alpha=ALPHA, beta=BETA, p=p, seed=seeds[m] if p > 0 else 0,
                          backend=backend)
        y.backward(dys[m])
        assert torch.equal(ys[m], y), f"y[{m}]"
        for k in range(5):
            assert torch.equal(g_leaves[m][k].grad, s_leaves[m][k].grad), f"grad {k} of modality {m}"
    if p > 0:  # dropout really happened
        assert any(bool((y == 0).any()) for y in ys if y.numel() > 8)


def test_seeds_as_list_of_ints_equal_tensor():
    mods, _ = _modalities(2, LAYOUT, torch.float32, "cpu")
    lists = [[m[k] for m in mods] for k in range(5)]
    values = [3, 2**62 + 7, 0, 123456789012]
    a = ops.gate_norm_grouped(*lists, p=0.2, seeds=values)
    b = ops.gate_norm_grouped(*lists, p=0.2, seeds=torch.tensor(values))
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_one_raw_op_call_and_one_autograd_node_on_cpu():
    mods, dys = _modalities(2, LAYOUT, torch.float32, "cpu")
    leaves = _leaves(mods)
    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    seeds = torch.tensor([1, 2, 3, 4])
    with Count():
        ys = ops.gate_norm_grouped(*[[m[k] for m in leaves] for k in range(5)], p=0.1, seeds=seeds)
    assert seen.count("vgmr.gate_norm_grouped") == 1 and "vgmr.gate_norm" not in seen
    assert len({y.grad_fn for y in ys}) == 1  # one node for every modality
    seen.clear()
    with Count():
        torch.autograd.backward(ys, dys)
    assert seen.count("vgmr.gate_norm_grouped_backward") == 1


def test_unused_outputs_get_zero_gradients():
    mods, dys = _modalities(2, LAYOUT, torch.float32, "cpu")
    leaves = _leaves(mods)
    ys = ops.gate_norm_grouped(*[[m[k] for m in leaves] for k in range(5)])
    (ys[1] * dys[1]).sum().backward()
    for m in (0, 2, 3):
        for t in leaves[m]:
            assert t.grad is not None and bool((t.grad == 0).all())
    ref = _leaves(mods)[1]
    ops.gate_norm(*ref, alpha=0.5, beta=0.2).backward(dys[1])
    for a, b in zip(leaves[1], ref):
        assert torch.equal(a.grad, b.grad)


def test_grouped_opcheck():
    mods, dys = _modalities(2, LAYOUT[:3], torch.float32, "cpu")
    lists = [[m[k].clone().requires_grad_(True) for m in mods] for k in range(5)]
    seeds = torch.tensor([5, 6, 7])
    torch.library.opcheck(torch.ops.vgmr.gate_norm_grouped.default, (*lists, ALPHA, BETA, 0.2, seeds))
    plain = [[t.detach() for t in lst] for lst in lists]
    ys, means, rstds = torch.ops.vgmr.gate_norm_grouped(*plain, ALPHA, BETA, 0.2, seeds)
    torch.library.opcheck(torch.ops.vgmr.gate_norm_grouped_backward.default,
                          (dys, plain[0], plain[1], plain[2], plain[3], means, rstds, ALPHA, BETA, 0.2, seeds))


def test_grouped_meta():
    mods, _ = _modalities(2, LAYOUT, torch.float32, "meta")
    leaves = _leaves(mods)
    ys = ops.gate_norm_grouped(*[[m[k] for m in leaves] for k in range(5)], p=0.1, seeds=[1, 2, 3, 4])
    assert [tuple(y.shape) for y in ys] == [(2, T, D) for T, D in LAYOUT]
    sum(y.sum() for y in ys).backward()
    assert all(t.grad.shape == t.shape for m in leaves for t in m)


def test_grouped_compiles_to_one_graph():
    mods, dys = _modalities(2, LAYOUT, torch.float32, "cpu")

    def f(lists, seeds):
        ys = ops.gate_norm_grouped(*lists, p=0.25, seeds=seeds)
        return sum((y * dy).sum() for y, dy in zip(ys, dys))

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for s in ((1, 2, 3, 4), (5, 6, 7, 8)):
        seeds = torch.tensor(s)
        l1 = _leaves(mods)
        l2 = _leaves(mods)
        a = f([[m[k] for m in l1] for k in range(5)], seeds)
        b = cf([[m[k] for m in l2] for k in range(5)], seeds)
        a.backward()
        b.backward()
        assert torch.equal(a, b)
        for m1, m2 in zip(l1, l2):
            for u, v in zip(m1, m2):
                assert torch.equal(u.grad, v.grad)


def _good_lists():
    mods, _ = _modalities(2, LAYOUT[:2], torch.float32, "cpu")
    return [[m[k] for m in mods] for k in range(5)]


@pytest.mark.parametrize(
    "mutate, kw, exc, match",
    [
        (lambda L: [L[0][:1]] + L[1:], {}, ValueError, "zpres: expected 2 tensors"),
        (lambda L: [L[0], L[1], L[2][0]] + L[3:], {}, TypeError, "xs: expected a list"),
        (lambda L: [[], [], [], [], []], {}, ValueError, "xs: expected at least one modality"),
        (lambda L: L[:2] + [[L[2][0], L[2][1][:1]]] + L[3:], {}, ValueError, r"xs\[1\]: expected the batch size"),
        (lambda L: [[L[0][0], L[0][1].double()]] + L[1:], {}, TypeError, r"zpres\[1\]"),
        (lambda L: L[:3] + [[L[3][0], L[3][1][:3]]] + L[4:], {}, ValueError, r"ln_weights\[1\]"),
        (lambda L: L, {"p": 0.1}, ValueError, "seeds: required when p > 0"),
        (lambda L: L, {"p": 0.1, "seeds": [1]}, ValueError, "seeds: expected 2 seeds"),
        (lambda L: L, {"p": 0.1, "seeds": [1, 2**64]}, ValueError, r"seeds\[1\]"),
        (lambda L: L, {"p": 0.1, "seeds": torch.tensor([1, 2], dtype=torch.int32)}, TypeError, "seeds"),
        (lambda L: L, {"p": 0.1, "seeds": torch.tensor([1, 2, 3])}, ValueError, "seeds: expected shape"),
        (lambda L: L, {"alpha": float("nan")}, ValueError, "alpha"),
    ],
)
def test_grouped_bad_arguments(mutate, kw, exc, match):
    with pytest.raises(exc, match=match):
        ops.gate_norm_grouped(*mutate(_good_lists()), **kw)


def test_grouped_raw_op_checks_name_the_modality():
    L = _good_lists()
    op = torch.ops.vgmr.gate_norm_grouped
    with pytest.raises(ValueError, match=r"vgmr::gate_norm_grouped \(modality 1\): ln_weight"):
        op(L[0], L[1], L[2], [L[3][0], L[3][1][:3].contiguous()], L[4], ALPHA, BETA, 0.0, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="seeds must have shape"):
        op(*L, ALPHA, BETA, 0.1, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="ln_bias has 1 tensors"):
        op(L[0], L[1], L[2], L[3], L[4][:1], ALPHA, BETA, 0.0, torch.zeros(2, dtype=torch.int64))


def test_grouped_double_backward_raises():
    mods, _ = _modalities(2, LAYOUT[:2], torch.float64, "cpu")
    lists = [[m[k].clone().requires_grad_(True) for m in mods] for k in range(5)]
    ys = ops.gate_norm_grouped(*lists)
    with pytest.raises(RuntimeError, match="gate_norm_grouped: double backward"):
        torch.autograd.grad(sum(y.pow(2).sum() for y in ys), lists[2], create_graph=True)
