"""Peak memory of one call.

- GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus what was
  allocated before the call (caching-allocator level: bytes in live tensors, not reserved).
- CPU: torch 2.13 has no CPU allocator statistics API (``torch.cpu`` exposes no ``memory_*``),
  so the peak comes from the profiler: ``torch.profiler.profile(profile_memory=True)`` records
  every allocation and free that goes through c10's CPU allocator (all tensor storage, including
  what oneDNN/MKL get through ATen and what torch.compile's generated code allocates), with its
  address; the running sum in time order of the sizes allocated during the call, less those of
  these same blocks freed during it, maximised, is the peak of bytes newly allocated during the
  call. Memory held before the call (inputs, parameters, the previous step's gradients) is not
  counted, nor is its release: a step that drops gradients it did not allocate (``p.grad = None``)
  gets no head start from them, whichever peer ran before it. Gradients the call allocates are
  counted. Allocations made outside c10 (e.g. a library's private scratch via malloc) are
  not seen. No tracemalloc (it sees Python objects only).

:func:`timeline` draws one call's memory over time by what it holds (parameters, inputs,
activations, gradients, temporaries, ...): the profiler's memory timeline
(``torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True)``,
``export_memory_timeline``), which classifies each allocation from the autograd graph; memory
it cannot classify (e.g. buffers inside torch.compile's generated code) is "unknown".
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys

import torch

CPU_METHOD = ("torch.profiler profile_memory=True: max over time of the running sum of c10 CPU "
              "allocator allocations during one call less the frees of those same blocks (bytes "
              "newly allocated; inputs, parameters and earlier gradients held before the call, and "
              "their release, not counted)")
GPU_METHOD = "torch.cuda.max_memory_allocated() - memory_allocated() before the call"


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 (kineto prints "profiler_start/stop" lines there from C++)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _allocations(prof):
    """``(address, signed size)`` of every allocation and free the profiler saw, in time order."""
    alloc = torch._C._profiler._EventType.Allocation
    found, stack = [], list(reversed(prof.profiler.kineto_results.experimental_event_tree()))
    while stack:  # depth first in recorded order, so that ties in time keep it
        e = stack.pop()
        stack.extend(reversed(e.children))
        if e.tag == alloc:
            found.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size))
    found.sort(key=lambda item: item[0])
    return [(ptr, size) for _, ptr, size in found]


def peak_cpu(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
    # fd 2 silenced for the whole profiled call (fn already ran fine while being timed): kineto's
    # start/stop lines and c10's note about frees of blocks allocated before profiling started
    # (gradients reset to None) would otherwise land in the middle of the progress output.
    with _quiet_stderr():
        with prof:
            fn()
    cur = peak = 0
    live = {}  # address -> size of the blocks allocated during the call
    for ptr, size in _allocations(prof):
        if size > 0:
            live[ptr] = size
            cur += size
        elif ptr in live:
            cur -= live.pop(ptr)
        peak = max(peak, cur)
    return int(peak)


#: the categories of ``export_memory_timeline``'s sizes, after its leading unused column
TIMELINE_CATEGORIES = ("parameter", "optimizer state", "input", "temporary", "activation", "gradient",
                       "autograd detail", "unknown")


def timeline(fn, device: str) -> dict:
    """One call's memory over time: ``{"t_us": [...], "bytes": {category: [...]}, "peak": {...}}``
    (``peak``: each category's bytes at the instant of the largest total)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True)
    with _quiet_stderr():
        with prof:
            fn()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "timeline.json")
            prof.export_memory_timeline(path, device="cuda:0" if device == "cuda" else "cpu")
            with open(path) as fh:
                times, sizes = json.load(fh)
    t0 = times[0] if times else 0
    series = {c: [row[i + 1] for row in sizes] for i, c in enumerate(TIMELINE_CATEGORIES)}
    totals = [sum(row) for row in sizes]
    at = max(range(len(totals)), key=totals.__getitem__) if totals else 0
    return {"t_us": [t - t0 for t in times], "bytes": series,
            "peak": {c: v[at] for c, v in series.items()} if totals else {}}


def peak_cuda(fn) -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def peak_memory(fn, device: str) -> dict:
    """``{"peak_bytes": ..., "method": ...}`` for one call of ``fn`` (run it once before, to warm up)."""
    if device == "cuda":
        return {"peak_bytes": peak_cuda(fn), "method": GPU_METHOD}
    return {"peak_bytes": peak_cpu(fn), "method": CPU_METHOD}


def method(device: str) -> str:
    return GPU_METHOD if device == "cuda" else CPU_METHOD
