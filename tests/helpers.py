"""Helpers shared by the op tests (and any other test folder).

- ``BACKENDS``: pytest params for the op backends: "cpu" always (a missing C++ build fails,
  it does not skip), "triton" when Triton can run (CUDA, or the interpreter on the CPU:
  tiny sizes only, see :func:`cap`), "cuda" when the extension has CUDA kernels and a GPU
  is present; unavailable ones are skipped visibly.
- :func:`assert_close_to_truth`: the pass rule, defined once in :mod:`vgmr_fast.testing`.
"""
from __future__ import annotations

import os

import pytest
import torch

from vgmr_fast import testing

HALF = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

#: Under the Triton interpreter (~5 ms per row-program) cases above this many rows are skipped.
TRITON_INTERP_MAX_ROWS = 64


def _triton_state():
    try:
        from vgmr_fast.ops import backend

        if backend.has_triton():
            return True, ""
        return False, backend.triton_error() or "unavailable"
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"


def _cuda_state():
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        from vgmr_fast.ops import backend

        if backend.has_cuda_kernels():
            return True, ""
        return False, "vgmr_fast._C built without CUDA kernels"
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"


_TRITON_OK, _TRITON_WHY = _triton_state()
_CUDA_OK, _CUDA_WHY = _cuda_state()
TRITON_INTERPRETED = _TRITON_OK and not torch.cuda.is_available()

BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(not _TRITON_OK, reason=f"triton: {_TRITON_WHY}")),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not _CUDA_OK, reason=f"cuda: {_CUDA_WHY}")),
]


def device_of(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def cap(backend: str, rows: int, dtype: torch.dtype | None = None) -> str:
    """Skip (visibly) what a backend cannot run here: big cases under the Triton interpreter,
    float64 outside the CPU kernels. Returns the device the backend's tensors live on."""
    if backend == "triton" and TRITON_INTERPRETED and rows > TRITON_INTERP_MAX_ROWS:
        pytest.skip(f"triton interpreter: {rows} rows > {TRITON_INTERP_MAX_ROWS}")
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 is supported by the CPU kernels only")
    return device_of(backend)


def interp_slack(backend: str, dtype: torch.dtype, truth: torch.Tensor) -> torch.Tensor | float:
    """One bf16 ulp of the truth under the Triton interpreter, whose fp32 -> bf16 cast truncates
    (on a GPU it rounds to nearest even and the plain rule applies)."""
    if backend == "triton" and TRITON_INTERPRETED and dtype == torch.bfloat16:
        return testing.interp_bf16_slack(truth)
    return 0.0


def kernel_cast(backend: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (float32) cast to ``dtype`` the way ``backend``'s kernels cast their outputs: the
    Triton interpreter's fp32 -> bf16 cast truncates (the GPU's rounds to nearest even, as torch)."""
    if backend == "triton" and TRITON_INTERPRETED and dtype == torch.bfloat16 and t.dtype == torch.float32:
        bits = t.contiguous().view(torch.int32) & -65536  # keep the upper 16 bits
        return bits.view(torch.float32).to(dtype)
    return t.to(dtype)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0, device="cpu", scale=1.0) -> torch.Tensor:
    """Fresh random values, generated in float32 and rounded once to ``dtype``."""
    t = torch.randn(*shape, generator=gen(seed)) * scale
    return t.to(dtype).to(device)


def assert_close_to_truth(fused, ref, truth, dtype=None, *, name: str = "", slack=0.0,
                          backend: str | None = None, atol: float | None = None) -> None:
    """The pass rule of :mod:`vgmr_fast.testing` (the one ``vgmr-fast check`` applies).

    ``fused``: the fused result in dtype X; ``ref``: the eager reference run in dtype X;
    ``truth``: the reference in float64 on the upcast inputs. ``slack``: an extra per-element
    allowance (tensor or float). ``atol``: a wider absolute allowance for a sum of many terms
    (counts only above the rule's floor). Also checks the shape and (when ``dtype`` is given) the dtype
    of ``fused``. ``backend``: adds :func:`interp_slack`.
    """
    assert fused is not None, f"{name}: fused result is None"
    assert tuple(fused.shape) == tuple(truth.shape), f"{name}: shape {tuple(fused.shape)} != {tuple(truth.shape)}"
    if dtype is not None:
        assert fused.dtype == dtype, f"{name}: dtype {fused.dtype} != {dtype}"
    dt = dtype or fused.dtype
    if backend is not None:
        slack = slack + interp_slack(backend, dt, truth)
    if atol is not None and atol > testing.FLOOR[dt]:
        slack = slack + atol
    c = testing.compare(fused, ref, truth, dt, slack=slack)
    assert c.ok, (f"{name}: {c.note or 'fused error %.3e exceeds the bound %.3e' % (c.err, c.tol)} "
                  f"(eager error {c.eager_err:.3e}, max|truth| {c.scale:.3e}, dtype {dt}; {testing.RULE})")


def assert_no_nan(*tensors, name: str = "") -> None:
    for i, t in enumerate(tensors):
        if t is None:
            continue
        assert not bool(torch.isnan(t.detach().float()).any()), f"{name}[{i}]: NaN in an output of NaN-free inputs"


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a wider buffer)."""
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    big[..., 1::2] = float("nan")
    v = big[..., ::2]
    assert not v.is_contiguous() or t.shape[-1] <= 1
    return v


def threads_env() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))


def gate_norm_inputs(B, T, D, dtype, seed, device="cpu"):
    """``([zpre, bias_row, x, ln_weight, ln_bias], dy)`` for gate_norm: zpre and x in ``dtype``,
    the rest float32 (dy too: callers cast it to the output's dtype), drawn from ``gen(seed)``."""
    g = gen(seed)
    zpre = (torch.randn(B, T, D, generator=g) * 2).to(dtype)
    x = torch.randn(B, T, D, generator=g).to(dtype)
    bias_row = torch.randn(B, D, generator=g) * 0.5
    w = 1 + 0.3 * torch.randn(D, generator=g)
    b = 0.3 * torch.randn(D, generator=g)
    dy = torch.randn(B, T, D, generator=g)
    return [t.to(device) for t in (zpre, bias_row, x, w, b)], dy.to(device)
