"""Shared pytest setup for every test folder.

TRITON_INTERPRET must be set before anything imports triton: on a machine without CUDA
the Triton kernels then run under the interpreter (docs/backends.md).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def vgmr_debug_nan_fill():
    """The C++ kernels fill every output with NaN before writing it (an unwritten element
    then shows up as NaN); the Triton kernels poison theirs likewise."""
    from vgmr_fast.ops import backend

    old = backend.set_debug_nan_fill(True)
    triton_cfg = None
    try:
        import sys

        if "vgmr_fast.triton" in sys.modules:
            triton_cfg = sys.modules["vgmr_fast.triton"].CONFIG
    except Exception:  # noqa: BLE001
        triton_cfg = None
    old_poison = triton_cfg.get("poison_outputs") if triton_cfg is not None else None
    if triton_cfg is not None:
        triton_cfg["poison_outputs"] = True
    yield
    backend.set_debug_nan_fill(old)
    if triton_cfg is not None:
        triton_cfg["poison_outputs"] = old_poison
