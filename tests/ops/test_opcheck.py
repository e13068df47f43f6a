"""torch.library.opcheck on every vgmr:: op (schema, fake kernel, autograd registration,
AOT dispatch with static and dynamic shapes), backward ops included."""
from __future__ import annotations

import pytest
import torch

import vgmr_fast.ops  # noqa: F401  (loads vgmr_fast._C, registers fake + autograd)
from helpers import gen

V = torch.ops.vgmr


def _r(*shape, dtype=torch.float32, grad=False, seed=0):
    t = torch.randn(*shape, generator=gen(seed)).to(dtype)
    return t.requires_grad_(grad)


def _mask(B, T, seed=0):
    m = torch.rand(B, T, generator=gen(seed)) > 0.4
    m[0] = False
    return m


def _gate_args(B, T, D, dtype, grad, p, seed=3):
    return (
        _r(B, T, D, dtype=dtype, grad=grad, seed=1),
        _r(B, D, grad=grad, seed=2) if dtype != torch.float64 else _r(B, D, dtype=dtype, grad=grad, seed=2),
        _r(B, T, D, dtype=dtype, grad=grad, seed=3),
        _r(D, grad=grad, seed=4) if dtype != torch.float64 else _r(D, dtype=dtype, grad=grad, seed=4),
        _r(D, grad=grad, seed=5) if dtype != torch.float64 else _r(D, dtype=dtype, grad=grad, seed=5),
        0.5,
        0.2,
        p,
        torch.tensor(seed, dtype=torch.int64),
    )


CASES = [
    ("summary_pool", lambda: (_r(3, 5, 7, grad=True), _mask(3, 5))),
    ("summary_pool", lambda: (_r(2, 4, 3, grad=True), None)),
    ("summary_pool", lambda: (_r(2, 4, 3, dtype=torch.bfloat16, grad=True), _mask(2, 4))),
    ("summary_pool_backward",
     lambda: (_r(3, 7), _r(3, 7, seed=1), _mask(3, 5), V.summary_pool(_r(3, 5, 7), _mask(3, 5))[2], 5)),
    ("summary_pool_backward", lambda: (_r(2, 3), _r(2, 3, seed=1), None, V.summary_pool(_r(2, 4, 3), None)[2], 4)),
    ("interaction", lambda: (_r(2, 3, 5, grad=True),)),
    ("interaction", lambda: (_r(2, 2, 4, dtype=torch.float16, grad=True),)),
    ("interaction_backward", lambda: (_r(2, 4, 11 * 3), _r(2, 4, 3))),
    ("gate_norm", lambda: _gate_args(2, 3, 9, torch.float32, True, 0.0)),
    ("gate_norm", lambda: _gate_args(2, 3, 9, torch.float32, True, 0.3)),
    ("gate_norm", lambda: _gate_args(1, 2, 5, torch.bfloat16, True, 0.1)),
    ("gate_norm", lambda: _gate_args(2, 2, 4, torch.float64, True, 0.2)),
    ("philox_words", lambda: (7, torch.arange(10, dtype=torch.int64).view(2, 5))),
    # the CPU GEMMs: ATen's path (small) and oneDNN's (float32, >= 1 M multiply-adds), both forms
    ("gemm", lambda: (_r(4, 6), _r(6, 3, seed=1), None, 1.0, 1.0)),
    ("gemm", lambda: (_r(2, 40, 300), _r(2, 300, 100, seed=1), _r(2, 1, 100, seed=2), 0.5, 2.0)),
    ("gemm", lambda: (_r(5, 3, dtype=torch.float64), _r(3, 2, dtype=torch.float64, seed=1), None, 1.0, 1.0)),
    ("gemm_into", lambda: (_r(64, 300), _r(64, 200, seed=1), _r(200, 300, seed=2), None, 1.0, 0.5)),
    ("gemm_into", lambda: (_r(64, 300), _r(64, 200, seed=1), _r(200, 300, seed=2), _r(300, seed=3), 1.0, 1.0)),
]


def _gate_backward_args():
    args = _gate_args(2, 3, 9, torch.float32, False, 0.25)
    y, mean, rstd = V.gate_norm(*args)
    zpre, bias_row, x, w, _b, alpha, beta, p, seed = args
    return (_r(2, 3, 9, seed=9), zpre, bias_row, x, w, mean, rstd, alpha, beta, p, seed)


CASES.append(("gate_norm_backward", _gate_backward_args))


@pytest.mark.parametrize("name,make", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_opcheck(name, make):
    torch.library.opcheck(getattr(V, name).default, make())


def test_ops_have_pt2_tag():
    for name in ("summary_pool", "interaction", "gate_norm", "summary_pool_backward", "interaction_backward",
                 "gate_norm_backward"):
        assert torch.Tag.pt2_compliant_tag in getattr(V, name).default.tags
