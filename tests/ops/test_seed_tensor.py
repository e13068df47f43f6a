"""The dropout seed as a tensor (docs/ops.md): the raw ops take a one-element int64
tensor the kernels read from memory; the public op takes an int or such a tensor.

Same keep mask for the same seed value whichever way it is passed; the kernel (not the host)
reads the value, so changing the tensor's contents changes the mask without re-tracing; a
compiled training step with a seed tensor is one graph across seeds; clear errors naming
``seed``.
"""
from __future__ import annotations

import pytest
import torch

from helpers import BACKENDS, cap, device_of, gate_norm_inputs
from vgmr_fast import ops
from vgmr_fast.dropout_stream import _philox_words
from vgmr_fast.ops import dropout

pytestmark = pytest.mark.usefixtures("vgmr_debug_nan_fill")

ALPHA, BETA = 0.5, 0.2
BIG_SEED = 2**62 + 1099511627779  # both Philox key words non-zero, high bit of the range


def _args(B, T, D, dtype=torch.float32, device="cpu", seed=0):
    args, dy = gate_norm_inputs(B, T, D, dtype, seed, device)
    return args, dy.to(dtype)


def _fwd_bwd(args, dy, **kw):
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    y = ops.gate_norm(*leaves, alpha=ALPHA, beta=BETA, **kw)
    grads = torch.autograd.grad(y, leaves, dy)
    return [y, *grads]


def test_schemas_take_a_seed_tensor():
    for name in ("gate_norm", "gate_norm_backward"):
        schema = str(getattr(torch.ops.vgmr, name).default._schema)
        assert "Tensor seed" in schema, schema


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0d", "1elem"])
def test_int_and_tensor_seed_agree(backend, dtype, shape):
    dev = device_of(backend)
    B, T, D = 2, 3, 37
    cap(backend, B * T, dtype)
    args, dy = _args(B, T, D, dtype, dev, seed=1)
    seed_t = torch.full(shape, BIG_SEED, dtype=torch.int64, device=dev)
    a = _fwd_bwd(args, dy, p=0.3, seed=BIG_SEED, backend=backend)
    b = _fwd_bwd(args, dy, p=0.3, seed=seed_t, backend=backend)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    # the mask is the shared stream's: zero exactly where dropout.keep_mask drops
    keep = dropout.keep_mask(BIG_SEED, B * T, D, 0.3, device=dev).view(B, T, D)
    assert bool((b[0][~keep] == 0).all())
    assert not bool((b[0][keep] == 0).any())


def test_kernel_reads_the_seed_from_memory():
    # Same tensor object, new contents: the forward and the backward see the new value
    # (nothing was baked in on the host).
    args, dy = _args(2, 4, 33)
    seed_t = torch.tensor(7, dtype=torch.int64)
    y7 = _fwd_bwd(args, dy, p=0.5, seed=seed_t)
    seed_t.fill_(8)
    y8 = _fwd_bwd(args, dy, p=0.5, seed=seed_t)
    ref8 = _fwd_bwd(args, dy, p=0.5, seed=8)
    assert not torch.equal(y7[0], y8[0])
    for u, v in zip(y8, ref8):
        assert torch.equal(u, v)


def test_seed_changed_after_forward_is_caught_by_autograd():
    # The backward re-reads the saved seed tensor; modifying it in place in between would
    # give the backward a different mask, and autograd's version counter refuses that.
    args, dy = _args(1, 2, 8)
    seed_t = torch.tensor(3, dtype=torch.int64)
    leaves = [a.clone().requires_grad_(True) for a in args]
    y = ops.gate_norm(*leaves, p=0.5, seed=seed_t)
    seed_t.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


def test_p_zero_never_reads_the_seed():
    args, _ = _args(2, 3, 9)
    y0 = ops.gate_norm(*args, p=0.0, seed=0)
    y1 = torch.ops.vgmr.gate_norm(*args, ALPHA, BETA, 0.0, torch.tensor(-5))[0]
    assert torch.equal(y0, y1)


# A seed tensor's 64 bits are the uint64 Philox key on every backend (docs/math.md §5a): a
# negative value v is the key v + 2**64, both key words non-zero or the high one all ones.
NEGATIVE_SEEDS = [-5, -(2**63), -(2**32) + 3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", NEGATIVE_SEEDS, ids=["minus5", "int64-min", "minus-2**32+3"])
def test_negative_seed_tensor_is_its_uint64_key(backend, value):
    dev = device_of(backend)
    B, T, D = 2, 3, 37
    cap(backend, B * T)
    args, dy = _args(B, T, D, device=dev, seed=2)
    key = value + 2**64
    keep = dropout.keep_mask(torch.tensor(value), B * T, D, 0.3, device=dev).view(B, T, D)
    # the stream itself: the tensor's key words are those of the uint64 value
    counters = torch.arange(5, dtype=torch.int64)
    words = dropout.philox4x32(torch.tensor(value), counters)
    assert torch.equal(words, _philox_words(key, counters))
    assert not torch.equal(keep, dropout.keep_mask(2**62, B * T, D, 0.3, device=dev).view(B, T, D))
    y = ops.gate_norm(*args, alpha=ALPHA, beta=BETA, p=0.3, seed=torch.tensor(value, device=dev), backend=backend)
    assert bool((y[~keep] == 0).all())
    assert not bool((y[keep] == 0).any())


def test_philox_words_op_takes_all_64_bits():
    counters = torch.arange(9, dtype=torch.int64)
    for value in NEGATIVE_SEEDS:
        assert torch.equal(torch.ops.vgmr.philox_words(value, counters),
                           _philox_words(value + 2**64, counters))


def test_unused_seed_is_not_an_inference_tensor():
    # The seed the op layer passes at p == 0 may first be made under inference_mode; a later
    # training call saves it for backward, which an inference tensor would refuse.
    args, dy = _args(1, 2, 5)
    with torch.inference_mode():
        ops.gate_norm(*args)
    out = _fwd_bwd(args, dy)
    assert all(bool(torch.isfinite(t).all()) for t in out)


@pytest.mark.parametrize(
    "seed, exc, match",
    [
        (2**64, ValueError, r"seed: expected an int in \[0, 2\*\*63\)"),
        (2**63, ValueError, "seed"),
        (-1, ValueError, "seed"),
        (1.0, TypeError, "seed"),
        (True, TypeError, "seed"),
        ("3", TypeError, "seed"),
        (torch.tensor(3, dtype=torch.int32), TypeError, "seed: expected an int64 tensor"),
        (torch.tensor(3.0), TypeError, "seed"),
        (torch.tensor([1, 2]), ValueError, "seed: expected a tensor with exactly one element"),
        (torch.zeros(0, dtype=torch.int64), ValueError, "seed"),
        (torch.tensor(3, device="meta"), ValueError, "seed: on meta"),
    ],
    ids=["2**64", "2**63", "negative", "float", "bool", "str", "int32", "float-tensor", "two-elems", "empty",
         "other-device"],
)
def test_bad_seed(seed, exc, match):
    args, _ = _args(2, 3, 4)
    with pytest.raises(exc, match=match):
        ops.gate_norm(*args, p=0.1, seed=seed)


def test_raw_op_seed_checks():
    args, _ = _args(2, 3, 4)
    op = torch.ops.vgmr.gate_norm
    with pytest.raises(TypeError, match="vgmr::gate_norm: seed must be an int64 tensor"):
        op(*args, ALPHA, BETA, 0.1, torch.tensor(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="vgmr::gate_norm: seed must have exactly one element"):
        op(*args, ALPHA, BETA, 0.1, torch.tensor([1, 2]))
    y, mean, rstd = op(*args, ALPHA, BETA, 0.1, torch.tensor(1))
    with pytest.raises(ValueError, match="vgmr::gate_norm_backward: seed must have exactly one element"):
        torch.ops.vgmr.gate_norm_backward(y, args[0], args[1], args[2], args[3], mean, rstd, ALPHA, BETA, 0.1,
                                          torch.zeros(0, dtype=torch.int64))


def test_compiled_step_is_one_graph_across_seeds():
    # A seed tensor is a graph input, not a constant: three steps with three seeds, one
    # compiled graph, each step bit-identical to eager.
    from torch._dynamo.testing import CompileCounterWithBackend

    args, dy = _args(2, 3, 12)
    counter = CompileCounterWithBackend("aot_eager")

    def step(zpre, bias_row, x, w, b, seed):
        y = ops.gate_norm(zpre, bias_row, x, w, b, alpha=ALPHA, beta=BETA, p=0.25, seed=seed)
        return (y * dy).sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    for s in (11, 12, 2**62 + 5):
        seed_t = torch.tensor(s, dtype=torch.int64)
        a1 = [a.clone().requires_grad_(True) for a in args]
        a2 = [a.clone().requires_grad_(True) for a in args]
        l1 = step(*a1, seed_t)
        l2 = compiled(*a2, seed_t)
        l1.backward()
        l2.backward()
        assert torch.equal(l1, l2)
        for u, v in zip(a1, a2):
            assert torch.equal(u.grad, v.grad)
    assert counter.frame_count == 1
