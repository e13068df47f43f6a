"""Peak memory of one call.

- GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus what was
  allocated before the call (caching-allocator level: bytes in live tensors, not reserved).
- CPU: torch 2.13 has no CPU allocator statistics API (``torch.cpu`` exposes no ``memory_*``),
  so the peak comes from the profiler: ``torch.profiler.profile(profile_memory=True)`` records
  every allocation and free that goes through c10's CPU allocator (all tensor storage, including
  what oneDNN/MKL get through ATen and what torch.compile's generated code allocates); the running
  sum of those signed sizes in time order, maximised, is the peak of bytes newly allocated during
  the call. Memory held before the call (inputs, parameters) is not counted; gradients the call
  allocates are. Allocations made outside c10 (e.g. a library's private scratch via malloc) are
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
              "allocator allocations/frees during one call (bytes newly allocated; inputs and "
              "parameters held before the call not counted)")
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
    events = prof.profiler.kineto_results.events()
    mem = [(e.start_ns(), i, e.nbytes()) for i, e in enumerate(events) if e.name() == "[memory]"]
    mem.sort()
    cur = peak = 0
    for _, _, nb in mem:
        cur += nb
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
