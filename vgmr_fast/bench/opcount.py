"""Counts that do not vary between runs: ATen ops dispatched (about one kernel launch each on a
GPU) and bytes saved for backward. Used by ``vgmr-fast bench`` and asserted by the tests.

``count_aten_ops`` counts every ATen op that reaches the dispatcher below autograd, leaving out
views and metadata-only ops (they launch nothing). Ops of this project's extension
(``vgmr::``, ``vgmr_triton::``) count as one each, like any other op.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "count_aten_ops", "saved_tensor_bytes", "SavedTensorBytes"]

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
