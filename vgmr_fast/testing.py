"""The pass rule: one definition, used by the tests (tests/helpers.py) and by ``vgmr-fast check``.

docs/math.md §9: truth is the reference in float64 on the same (dtype-rounded) inputs; a fused
result in dtype X passes when ::

    max |fused - truth| <= max(2 * max |eager - truth| + atol(X) * s,  floor(X) * s)

with ``s = max(1, max |truth|)`` (the tolerances are absolute for values up to 1 and
relative above), ``eager`` the reference run in dtype X, ``atol`` 1e-6 for float32 and 1e-3
for half types, and the fixed tolerances as the floor (fp32 1e-5, bf16 2e-2, fp16 2.5e-3:
about 5 ulp at 1, like bf16's 2e-2). Non-finite values must sit exactly where the truth has
them (NaN where NaN, the same infinity where ±inf). ``slack``: an extra per-element
allowance a caller may add for a known, documented deviation (the Triton interpreter's
truncating bf16 cast); it is never part of ``vgmr-fast check``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: added to twice the eager error, times max(1, max|truth|)
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-10}
#: the fixed tolerances, the floor of the bound, times max(1, max|truth|)
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2.5e-3, torch.float64: 1e-12}

RULE = ("pass when max|fused - truth| <= max(2 x max|eager - truth| + atol x s, floor x s), "
        "s = max(1, max|truth|); atol 1e-6 fp32 / 1e-3 half, floor 1e-5 fp32 / 2e-2 bf16 / 2.5e-3 fp16; "
        "non-finite values exactly where the truth has them")


@dataclass
class Comparison:
    err: float  # max |fused - truth| over the finite elements of the truth
    eager_err: float  # max |eager - truth| likewise
    scale: float  # max |truth| over its finite elements
    tol: float  # the bound err is held to (without any per-element slack)
    ok: bool
    note: str = ""

    @property
    def rel(self) -> float:
        """err / max(max|truth|, 1e-3): readable for exact-zero truths."""
        return self.err / max(self.scale, 1e-3)


def tolerance(eager_err: float, scale: float, dtype: torch.dtype) -> float:
    """The bound of the rule for an eager error ``eager_err`` and ``scale = max|truth|``."""
    s = max(1.0, scale)
    return max(2.0 * eager_err + ATOL[dtype] * s, FLOOR[dtype] * s)


def compare(fused, eager, truth, dtype: torch.dtype | None = None, slack=0.0) -> Comparison:
    """Apply the rule. ``dtype``: the dtype X of the fused computation (default: ``fused``'s).
    ``eager`` may be None (then its error counts as 0)."""
    if fused is None:
        return Comparison(math.inf, 0.0, 0.0, 0.0, False, "no output / no gradient")
    t = truth.detach().to("cpu", torch.float64)
    f = fused.detach().to("cpu", torch.float64)
    e = eager.detach().to("cpu", torch.float64) if eager is not None else t
    dtype = dtype or fused.dtype
    if tuple(f.shape) != tuple(t.shape):
        return Comparison(math.inf, 0.0, 0.0, 0.0, False, f"shape {tuple(f.shape)} != {tuple(t.shape)}")
    if t.numel() == 0:
        return Comparison(0.0, 0.0, 0.0, 0.0, True)
    finite = torch.isfinite(t)
    same_nan = torch.equal(torch.isnan(f), torch.isnan(t))
    inf_t = torch.isinf(t)
    same_inf = torch.equal(torch.isinf(f), inf_t) and torch.equal(f[inf_t], t[inf_t])
    if not (same_nan and same_inf):
        n_f, n_t = int((~torch.isfinite(f)).sum()), int((~finite).sum())
        return Comparison(math.inf, 0.0, 0.0, 0.0, False,
                          f"non-finite values differ from the truth's ({n_f} in fused, {n_t} in truth)")
    if not bool(finite.any()):
        return Comparison(0.0, 0.0, 0.0, 0.0, True)
    scale = float(t[finite].abs().max())
    diff = (f - t).abs()[finite]
    eager_err = float((e - t)[finite].abs().nan_to_num(math.inf).max())
    tol = tolerance(eager_err, scale, dtype)
    if isinstance(slack, torch.Tensor):
        slack = slack.detach().to("cpu", torch.float64).expand(t.shape)[finite]
    ok = bool((diff <= tol + slack).all())
    return Comparison(float(diff.max()), eager_err, scale, tol, ok)


def interp_bf16_slack(truth: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp of ``truth``: the Triton interpreter's fp32 -> bf16 cast truncates (on a GPU
    it rounds to nearest even and the plain rule applies). For the Triton tests only."""
    t = truth.detach().to("cpu", torch.float64).abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(t)) - 7)
