"""Timing: medians with spread, warm-up, inputs rotated through a working set larger than cache.

- CPU: blocks of calls timed like ``torch.utils.benchmark.Timer`` (``timeit`` on ``perf_counter``;
  per-call time of each block; median and quartiles over blocks), run long enough for at least
  ``min_blocks`` blocks; several peers interleaved block by block (``time_cpu_interleaved``).
- GPU: CUDA events around each call (median and quartiles over calls); with ``graph=True``
  the calls are captured once in a CUDA graph and the replay is timed (per-call time = replay /
  calls captured), which removes launch overhead from small-size latency figures. A capture
  that fails falls back to events, and the record says so.

The function timed takes no arguments; rotation is the caller's job (``Rotator``), so every
call reads a different input set and the sets together exceed the last-level cache.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import cuda_graph


@dataclass
class Timing:
    median: float  # seconds per call
    q25: float
    q75: float
    n: int  # number of samples (blocks on CPU, calls or replays on GPU)
    calls: int  # calls timed in total
    method: str
    note: str = ""
    samples: list = field(default_factory=list)  # seconds per call, one per sample

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    def to_dict(self) -> dict:
        d = asdict(self)
        d["iqr"] = self.iqr
        return d


def quantiles(xs):
    xs = sorted(float(x) for x in xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def cache_bytes(device: str) -> int:
    """Size of the last-level cache the rotation must defeat (L3 on CPU, L2 on GPU)."""
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(os.path.join(base, idx, "size")) as f:
                    s = f.read().strip()
                mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
                val = int(s[:-1]) * mult if s[-1:] in "KMG" else int(s)
                best = max(best, val)
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return best or 32 * 2**20


def rotation_count(set_bytes: int, device: str, factor: float = 2.0, cap: int = 64) -> int:
    """Input sets needed so that they together exceed ``factor`` × the last-level cache (at least 2)."""
    need = factor * cache_bytes(device)
    return int(min(cap, max(2, math.ceil(need / max(1, set_bytes)))))


class Rotator:
    """Cycles through a list of prepared input sets: ``next()`` returns the next one."""

    def __init__(self, sets):
        self.sets = list(sets)
        self.i = 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s

    def __len__(self):
        return len(self.sets)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _warmup(fn, device: str, warmup: int, warmup_time: float) -> float:
    """Run ``fn`` at least ``warmup`` times (and for ``warmup_time`` s); return the fastest call's time."""
    t_end = time.perf_counter() + warmup_time
    best, k = math.inf, 0
    while k < warmup or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
        k += 1
        if k >= 1000:
            break
    return best


def _block_timer(fn):
    """``timeit.Timer`` on ``time.perf_counter``: the clock and loop ``torch.utils.benchmark.Timer`` uses on
    the CPU, without the extra warm-up calls its ``timeit()`` runs before every block (which would
    triple the cost of a slow step). Threads: torch's global setting (``--threads``)."""
    import timeit

    return timeit.Timer(stmt=fn, timer=time.perf_counter)


def time_cpu(fn, *, min_time: float = 0.3, min_blocks: int = 7, max_time: float = 30.0,
             warmup: int = 1, warmup_time: float = 0.05) -> Timing:
    """Blocks of ``number`` calls timed by ``timeit`` on ``perf_counter`` (per-call mean of each
    block is one sample) until ``min_time`` s are spent *and* at least ``min_blocks`` samples exist.

    ``number`` makes a block last >= ~1 ms (timer overhead < 0.1%) but keeps many blocks in
    ``min_time``; this is ``blocked_autorange`` with a guaranteed number of blocks for the spread.
    """
    est = _warmup(fn, "cpu", warmup, warmup_time)
    block_target = min(max(1e-3, min_time / (4 * min_blocks)), 0.05)
    number = max(1, int(block_target / max(est, 1e-9)))
    timer = _block_timer(fn)
    samples, total = [], 0.0
    while (total < min_time or len(samples) < min_blocks) and total < max_time:
        per_call = timer.timeit(number) / number
        samples.append(per_call)
        total += per_call * number
    q25, med, q75 = quantiles(samples)
    return Timing(med, q25, q75, len(samples), len(samples) * number,
                  f"timeit.Timer(perf_counter), blocks of {number} call(s)", samples=samples)


def time_cpu_interleaved(fns: dict, *, min_time: float = 0.3, min_blocks: int = 7, max_time: float = 60.0,
                         warmup: int = 1, warmup_time: float = 0.05) -> dict:
    """Time several peers *interleaved*: round after round, one block of each peer (the order
    rotating every round), until every peer has ``min_blocks`` samples and ``min_time`` s.

    On a machine shared with other work, a burst of load then hits every peer alike instead of
    whichever peer happened to be running, so the ratios between peers stay meaningful.
    Block sizes as in :func:`time_cpu`. Returns ``{peer: Timing}``.
    """
    names = list(fns)
    if not names:
        return {}
    block_target = min(max(1e-3, min_time / (4 * min_blocks)), 0.05)
    number, timers = {}, {}
    for p in names:
        est = _warmup(fns[p], "cpu", warmup, warmup_time)
        number[p] = max(1, int(block_target / max(est, 1e-9)))
        timers[p] = _block_timer(fns[p])
    samples = {p: [] for p in names}
    spent = {p: 0.0 for p in names}
    t_start = time.perf_counter()
    r = 0
    while True:
        if all(len(samples[p]) >= min_blocks and spent[p] >= min_time for p in names):
            break
        if time.perf_counter() - t_start > max_time and all(len(samples[p]) >= 3 for p in names):
            break
        k = r % len(names)
        for p in names[k:] + names[:k]:
            per_call = timers[p].timeit(number[p]) / number[p]
            samples[p].append(per_call)
            spent[p] += per_call * number[p]
        r += 1
    out = {}
    for p in names:
        q25, med, q75 = quantiles(samples[p])
        out[p] = Timing(med, q25, q75, len(samples[p]), len(samples[p]) * number[p],
                        f"timeit.Timer(perf_counter), blocks of {number[p]} call(s), "
                        f"interleaved with {len(names) - 1} other peer(s)", samples=samples[p])
    return out


def time_cuda(fn, *, min_time: float = 0.3, min_reps: int = 20, max_reps: int = 2000, warmup: int = 5,
              warmup_time: float = 0.05, graph: bool = False, graph_calls: int = 0) -> Timing:
    est = _warmup(fn, "cuda", warmup, warmup_time)
    note = ""
    run, per = fn, 1
    if graph:
        try:
            run, per = _capture(fn, max(1, graph_calls))
        except Exception as exc:  # noqa: BLE001
            note = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); events"
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
            run, per = fn, 1
    if per > 1 or run is not fn:
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        est = (time.perf_counter() - t0) / per
    reps = int(min(max_reps, max(min_reps, min_time / max(est * per, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) / 1e3 / per for s, e in zip(starts, ends)]
    q25, med, q75 = quantiles(samples)
    method = "CUDA graph replay, CUDA events" if per > 1 or run is not fn else "CUDA events per call"
    return Timing(med, q25, q75, reps, reps * per, method, note, samples)


def _capture(fn, calls: int):
    """Capture ``calls`` calls of ``fn`` in one CUDA graph; returns (replay, calls)."""
    g, _ = cuda_graph.capture(fn, calls)
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    return g.replay, calls


def time_fn(fn, device: str, *, min_time: float = 0.3, min_blocks: int = 7, graph: bool = False,
            graph_calls: int = 1) -> Timing:
    if device == "cuda":
        return time_cuda(fn, min_time=min_time, min_reps=max(min_blocks, 10), graph=graph, graph_calls=graph_calls)
    return time_cpu(fn, min_time=min_time, min_blocks=min_blocks)


def copy_bandwidth(device: str, nbytes: int | None = None, *, min_time: float = 0.3, min_blocks: int = 7) -> dict:
    """Bandwidth of a large ``torch.Tensor.copy_`` (bytes read + bytes written per second)."""
    if nbytes is None:
        nbytes = max(4 * cache_bytes(device), 128 * 2**20)
        if device == "cuda":
            nbytes = max(nbytes, 512 * 2**20)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, min_time=min_time, min_blocks=min_blocks)
    bw = 2 * n * 4 / t.median
    return {"bytes_per_s": bw, "tensor_bytes": n * 4, "bytes_moved_per_copy": 2 * n * 4,
            "method": "torch.Tensor.copy_ of a float32 tensor, read + write counted",
            "timing": t.to_dict()}


def op_cost(device: str, *, min_time: float = 0.3, min_blocks: int = 7) -> dict:
    """Time of one minimal ATen op (``torch.add(a, b, out=c)`` on one-element tensors): the cost of
    a launch on a GPU, of a dispatch on the CPU. ATen ops × this = the launch floor of a step."""
    a = torch.ones(1, device=device)
    b = torch.ones(1, device=device)
    c = torch.empty(1, device=device)

    def ten_adds():
        for _ in range(10):
            torch.add(a, b, out=c)

    t = time_fn(ten_adds, device, min_time=min_time, min_blocks=min_blocks)
    return {"seconds": t.median / 10, "method": "torch.add(a, b, out=c) on one-element tensors, 10 per call, median",
            "timing": t.to_dict()}
