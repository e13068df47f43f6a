"""The shared dropout stream (docs/backends.md): Philox4x32-10 test vectors and the 3x6 keep
mask, for the pure-torch stream (vgmr_fast.ops.dropout) and the C++ header
(csrc/vgmr_math.h, through the debug op vgmr::philox_words and through gate_norm)."""
from __future__ import annotations

import pytest
import torch

from helpers import gen
from vgmr_fast import ops
from vgmr_fast.ops import dropout

VECTORS = [
    (0, 0, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    (20261123, 1, [0x0D8A7843, 0xAC11ED5B, 0xB0F47B0B, 0x0BB6ECAE]),
    (20261123, 4294967301, [0x471D3993, 0x69EBA11B, 0x5FFEA423, 0x62485B0B]),
    (1099511627779, 1000003, [0x49BBBE9F, 0xAED87E2C, 0x4ABA550D, 0x013C58EF]),
]
MASK_3x6 = [[0, 0, 1, 1, 0, 1], [1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 1]]


@pytest.mark.parametrize("seed,n,words", VECTORS)
def test_vectors_torch_stream(seed, n, words):
    assert dropout.philox4x32(seed, torch.tensor([n])).tolist() == [words]


@pytest.mark.parametrize("seed,n,words", VECTORS)
def test_vectors_cpp_header(seed, n, words):
    assert torch.ops.vgmr.philox_words(seed, torch.tensor([n])).tolist() == [words]


def test_cpp_matches_torch_stream_on_random_counters():
    g = gen(0)
    counters = torch.randint(0, 2**62, (500,), generator=g)
    counters[:5] = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**32 + 1])
    for seed in (0, 1, 2**32 - 1, 2**32, 2**62 + 12345):
        assert torch.equal(torch.ops.vgmr.philox_words(seed, counters), dropout.philox4x32(seed, counters))


def test_keep_mask_torch_stream():
    assert dropout.keep_mask(20261123, 3, 6, 0.5).int().tolist() == MASK_3x6


def test_keep_mask_cpp_via_gate_norm():
    # ln_weight = 0, ln_bias = 1: y = keep / (1 - p) exactly, so the mask is visible
    D = 6
    zpre = torch.randn(1, 3, D, generator=gen(1))
    x = torch.randn(1, 3, D, generator=gen(2))
    y = ops.gate_norm(zpre, torch.zeros(1, D), x, torch.zeros(D), torch.ones(D), p=0.5, seed=20261123,
                      backend="cpu")
    assert (y[0] / 2).int().tolist() == MASK_3x6


@pytest.mark.parametrize("p", [1e-9, 0.1, 0.5, 0.999999])
@pytest.mark.parametrize("R,D", [(5, 7), (3, 1), (2, 1023), (64, 33)])
def test_gate_norm_mask_equals_keep_mask(p, R, D):
    seed = 2**40 + 17
    y = ops.gate_norm(torch.randn(1, R, D), torch.zeros(1, D), torch.randn(1, R, D), torch.zeros(D),
                      torch.ones(D), p=p, seed=seed, backend="cpu")
    assert torch.equal(y[0] != 0, dropout.keep_mask(seed, R, D, p))


def test_threshold():
    assert dropout.threshold(0.0) == 0
    assert dropout.threshold(0.5) == 2**31
    assert dropout.threshold(0.999999999999) == 2**32 - 1 - 0 or dropout.threshold(0.999999999999) < 2**32
    with pytest.raises(ValueError):
        dropout.threshold(1.0)
    with pytest.raises(ValueError):
        dropout.threshold(-0.01)


def test_philox_words_checks():
    # (a negative seed is a uint64 key: tests/ops/test_seed_tensor.py)
    with pytest.raises((TypeError, RuntimeError), match="int64"):
        torch.ops.vgmr.philox_words(0, torch.tensor([0], dtype=torch.int32))
