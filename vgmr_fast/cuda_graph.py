"""Capturing a function into a CUDA graph, shared by the benchmarks and the graph tests.

A leaf module (torch only). Warm-up runs on a side stream, as CUDA graph capture requires, so
lazy initialisation (allocator pools, cuBLAS handles, Triton compiles) happens outside the graph.
"""
from __future__ import annotations

import torch


def capture(fn, calls: int = 1, warmup: int = 3):
    """Run ``fn()`` ``warmup`` times on a side stream, then capture ``calls`` calls of it in one
    ``torch.cuda.CUDAGraph``. Returns ``(graph, out)``: ``out`` is what the last captured call
    returned, its tensors the graph's static outputs (``graph.replay()`` rewrites them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    return graph, out
