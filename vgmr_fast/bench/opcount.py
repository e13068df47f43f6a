"""Counts that do not vary between runs: ATen ops dispatched (about one kernel launch each on a
GPU) and bytes saved for backward. Used by ``vgmr-fast bench`` and asserted by the tests.

``count_aten_ops`` counts every ATen op that reaches the dispatcher below autograd, leaving out
views and metadata-only ops (they launch nothing). Ops of this project's extension
(``vgmr::``, ``vgmr_triton::``) count as one each, like any other op.
"""
from __future__ import annotations

import re
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "count_aten_ops", "saved_tensor_bytes", "SavedTensorBytes", "count_generated_kernels",
           "capture_inductor_code"]

# Ops that launch nothing: views, metadata, aliasing, and size queries.
_NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "squeeze", "unsqueeze",
    "select", "slice", "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "chunk",
    "narrow", "view_as", "expand_as", "lift_fresh", "_reshape_alias", "unflatten", "flatten",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "size", "stride",
    "dim", "numel", "empty_like_meta", "_to_copy_meta", "movedim", "diagonal", "indices", "values",
}


def _is_view(func) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in _NO_LAUNCH:
        return True
    # Ops whose outputs alias inputs without writing (schema alias info, no in-place write).
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched while active: ``total`` and ``by_name`` (views left out)."""

    def __init__(self):
        super().__init__()
        self.by_name: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _is_view(func):
            self.by_name[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_name.values())


def count_aten_ops(fn, *args, **kwargs):
    """``(result, OpCounter)`` for one call of ``fn`` (views and metadata ops left out)."""
    with OpCounter() as counter:
        out = fn(*args, **kwargs)
    return out, counter


class SavedTensorBytes:
    """Bytes of the tensors autograd saves for backward, leaving out tensors in ``exclude``
    (inputs, parameters: they live anyway). Each storage is counted once."""

    def __init__(self, exclude=()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
        self._seen: set = set()
        self.bytes = 0

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._exclude and key not in self._seen and t.device.type != "meta":
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return t

    @contextmanager
    def __call__(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def saved_tensor_bytes(fn, *args, exclude=(), **kwargs):
    """``(result, bytes)``: bytes autograd saves for backward during ``fn(*args, **kwargs)``."""
    counter = SavedTensorBytes(exclude=exclude)
    with counter():
        out = fn(*args, **kwargs)
    return out, counter.bytes


# ---------------------------------------------------------------------------------------------
# torch.compile: kernels in Inductor's generated code
# ---------------------------------------------------------------------------------------------
# A statement in the generated ``call`` function that launches work: an Inductor kernel (C++
# ``cpp_fused_*`` on the CPU, ``triton_*.run`` on a GPU), a library call (``extern_kernels.mm``,
# ``addmm``, ``bmm``, ...) or an ATen / custom op Inductor falls back to (``torch.ops.<ns>.<op>``,
# ``aten.<op>``). Buffer allocations, ``reinterpret_tensor`` views, asserts and ``del`` are not launches.
_KERNEL_CALL = re.compile(
    r"^(?:[\w\[\], ]+=\s*)?"
    r"(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\s*\(")
_NOT_A_LAUNCH = {"extern_kernels.reinterpret_tensor"}


def _call_body(code: str) -> list:
    """Lines of the generated ``call`` function (the one Inductor runs per step)."""
    lines = code.splitlines()
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith("def call("):
            indent = len(line) - len(stripped)
            body = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt.strip())
            return body
    return []


def count_generated_kernels(codes) -> dict:
    """Launches in Inductor output code: ``{"total", "graphs", "by_kind"}`` summed over the
    graphs given (a training step has a forward and a backward graph; graph breaks add more)."""
    by_kind: Counter = Counter()
    graphs = 0
    for code in codes:
        body = _call_body(code)
        if not body:
            continue
        graphs += 1
        for line in body:
            m = _KERNEL_CALL.match(line)
            if m and m.group(1) not in _NOT_A_LAUNCH:
                name = m.group(1)
                kind = ("inductor kernel" if name.startswith(("cpp_fused_", "triton_"))
                        else "library call" if name.startswith("extern_kernels.") else "fallback op")
                by_kind[kind] += 1
    return {"total": sum(by_kind.values()), "graphs": graphs, "by_kind": dict(by_kind)}


@contextmanager
def capture_inductor_code():
    """Collects the output code of every graph Inductor compiles while active (as
    ``torch._inductor.utils.run_and_get_code`` does, without its ``torch._dynamo.reset()``, so other
    compiled peers stay compiled). A graph loaded from Inductor's FX-graph or AOT-autograd cache
    reports its code through the same hook. Yields a list that fills with the code strings."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    codes: list = []
    with mock.patch.object(GraphLowering, "save_output_code", lambda code: codes.append(code)):
        yield codes
