"""Backend choice (vgmr_fast.ops.backend): names, resolve, fallbacks and errors."""
from __future__ import annotations

import warnings

import pytest
import torch

from vgmr_fast import ops
from vgmr_fast.ops import backend as B


def test_extension_loaded_and_parallel():
    assert B.has_cpp(), B.cpp_error()
    assert B._C.WITH_OPENMP, "vgmr_fast._C was compiled without -fopenmp: at::parallel_for would run serially"
    assert B._C.num_threads() == torch.get_num_threads()
    assert isinstance(B._C.WITH_CUDA, bool)


def test_resolve_cpu():
    t = torch.ones(1)
    assert B.resolve("auto", t) == "cpu"
    assert B.resolve("cpu", t) == "cpu"
    assert B.resolve("auto", torch.device("cpu")) == "cpu"
    assert B.GPU_AUTO in ("triton", "cuda")
    assert set(B.BACKENDS) == {"auto", "cpu", "cuda", "triton"}
    assert "cpu" in B.available_backends()


def test_resolve_errors():
    t = torch.ones(1)
    with pytest.raises(ValueError, match="backend"):
        B.resolve("gpu", t)
    with pytest.raises(ValueError, match="CUDA tensors"):
        B.resolve("cuda", t)
    with pytest.raises(ValueError, match="no fused backend"):
        B.resolve("auto", torch.device("xpu"))
    # meta tensors resolve to an op namespace (shape inference through the fake kernels)
    assert B.resolve("auto", torch.ones(1, device="meta")) == "cpu"


def test_explicit_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(B, "_C", None)
    monkeypatch.setattr(B, "_C_ERROR", ImportError("simulated missing build"))
    with pytest.raises(RuntimeError, match="simulated missing build"):
        B.resolve("cpu", torch.ones(1))


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(B, "_C", None)
    monkeypatch.setattr(B, "_C_ERROR", ImportError("simulated"))
    monkeypatch.setattr(B, "_WARNED", set())
    monkeypatch.setattr(B, "triton_usable_on_cpu", lambda: True)
    monkeypatch.setattr(B, "has_triton", lambda op=None: True)
    with pytest.warns(RuntimeWarning, match="using 'triton'"):
        assert B.resolve("auto", torch.ones(1)) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert B.resolve("auto", torch.ones(1)) == "triton"  # warned once only
    monkeypatch.setattr(B, "has_triton", lambda op=None: False)
    monkeypatch.setattr(B, "triton_error", lambda: "simulated: no triton")
    with pytest.raises(RuntimeError, match="no backend available"):
        B.resolve("auto", torch.ones(1))


def test_triton_failure_never_breaks_cpu(monkeypatch):
    monkeypatch.setattr(B, "_TRITON_STATE", {"loaded": False, "error": "simulated broken triton"})
    h = torch.randn(2, 3, 4)
    mean, mx = ops.summary_pool(h)
    assert mean.shape == (2, 4)
    assert not B.has_triton()
    with pytest.raises(RuntimeError, match="simulated broken triton"):
        B.resolve("triton", h)


def test_namespace():
    assert B.namespace("cpu") is torch.ops.vgmr
    assert B.namespace("cuda") is torch.ops.vgmr
