"""One pass rule (vgmr_fast/testing.py): the tests and ``vgmr-fast check`` agree on every case,
also next to the bound (they used to disagree: check passed results the tests rejected)."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close_to_truth
from vgmr_fast import check, testing


def _case(dtype, scale, eager_err, fused_err):
    """A fused result in ``dtype`` whose only error is ``fused_err`` (at a zero of the truth,
    where ``dtype`` resolves it finely), an eager one whose only error is ``eager_err``."""
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(64, generator=g, dtype=torch.float64)
    truth = (truth / truth.abs().max() * scale).to(dtype).double()  # representable in dtype
    truth[7] = 0.0
    eager = truth.clone()
    eager[3] += eager_err
    fused = truth.to(dtype)
    fused[7] = -fused_err
    return fused, eager, truth


def _tests_accept(fused, eager, truth, dtype):
    try:
        assert_close_to_truth(fused, eager, truth, dtype)
        return True
    except AssertionError:
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [0.5, 1.0, 300.0])
@pytest.mark.parametrize("eager_rel", [0.0, 1e-7, 1e-4, 3e-2])
@pytest.mark.parametrize("side", [0.97, 1.03])
def test_check_and_tests_agree_at_the_boundary(dtype, scale, eager_rel, side):
    eager_err = eager_rel * scale
    bound = testing.tolerance(eager_err, scale, dtype)
    fused, eager, truth = _case(dtype, scale, eager_err, side * bound)
    by_check = check.compare(fused, eager, truth, dtype)[3]
    by_tests = _tests_accept(fused, eager, truth, dtype)
    assert by_check == by_tests == (side < 1), (by_check, by_tests, bound)


def test_the_floor_and_the_doubling():
    # floor: fp32 1e-5 at |truth| <= 1 even with an exact eager result
    assert testing.tolerance(0.0, 1.0, torch.float32) == pytest.approx(1e-5)
    # relative above 1
    assert testing.tolerance(0.0, 300.0, torch.bfloat16) == pytest.approx(6.0)
    # 2 x eager + atol when that is above the floor
    assert testing.tolerance(1e-3, 1.0, torch.float32) == pytest.approx(2e-3 + 1e-6)


def test_non_finite_must_match_the_truth():
    truth = torch.tensor([1.0, float("nan"), float("inf"), -2.0], dtype=torch.float64)
    assert testing.compare(truth.float(), truth.float(), truth, torch.float32).ok
    wrong_inf = truth.clone()
    wrong_inf[2] = float("-inf")
    assert not testing.compare(wrong_inf.float(), truth.float(), truth, torch.float32).ok
    nan_where_finite = truth.clone()
    nan_where_finite[0] = float("nan")
    assert not testing.compare(nan_where_finite.float(), truth.float(), truth, torch.float32).ok
    assert not check.compare(nan_where_finite.float(), truth.float(), truth, torch.float32)[3]
