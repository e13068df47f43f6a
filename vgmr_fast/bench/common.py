"""Shared pieces of the bench levels: the run context, tasks, skips and records."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from . import memory, timing


class Skip(Exception):
    """Raised by a task that cannot run here; the message is the reason printed and saved."""


@dataclass
class Ctx:
    device: str
    backends: list  # fused backends that run here (probed)
    compile: bool  # measure torch.compile peers
    compile_reason: str  # why not, when compile is False
    min_time: float
    min_blocks: int
    quick: bool
    tiny: bool
    copy_bw: float | None = None  # bytes/s of a large copy, measured in this run
    op_cost: float | None = None  # seconds per minimal ATen op (launch/dispatch cost), measured in this run
    max_autotune: bool = False  # GPU: also torch.compile(mode="max-autotune") at the layer level
    records: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"what": what, "reason": reason})

    def time(self, fn, *, graph: bool = False, graph_calls: int = 1) -> timing.Timing:
        return timing.time_fn(fn, self.device, min_time=self.min_time, min_blocks=self.min_blocks,
                              graph=graph and self.device == "cuda", graph_calls=graph_calls)

    def peak(self, fn) -> dict:
        return memory.peak_memory(fn, self.device)

    def floor(self, nbytes: float) -> float | None:
        return nbytes / self.copy_bw if self.copy_bw else None

    def launch_floor(self, launches) -> float | None:
        return launches * self.op_cost if (self.op_cost and launches) else None

    def clear(self) -> None:
        self.cache.clear()
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


@dataclass
class Task:
    label: str
    run: object  # callable() -> None; appends records to ctx.records, or raises Skip
    group: str = ""  # tasks of one group share cached inputs; the cache is cleared between groups


def fused_peers(ctx: Ctx) -> list:
    return [f"fused-{b}" for b in ctx.backends]


def record(ctx: Ctx, **fields) -> dict:
    t = fields.pop("timing", None)
    rec = dict(fields)
    if t is not None:
        rec.update(median_s=t.median, q25_s=t.q25, q75_s=t.q75, iqr_s=t.iqr, n=t.n, calls=t.calls,
                   method=t.method, samples_s=t.samples)
        if t.note:
            rec["note"] = t.note
    ctx.records.append(rec)
    return rec


def short_exc(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:200]}"


def compiled(fn, **kwargs):
    """``torch.compile`` with static shapes (each setting is compiled for its own shapes)."""
    return torch.compile(fn, dynamic=False, **kwargs)


def is_compiled_peer(peer: str) -> bool:
    return "compile" in peer


def _first_call(step, peer: str, counts: bool, info: dict) -> None:
    """The first (warm-up) call; for a torch.compile peer with ``counts``, the launches in the code
    Inductor generates during it (``compiled_kernels``)."""
    if not (counts and is_compiled_peer(peer)):
        step()
        return
    from .opcount import capture_inductor_code, count_generated_kernels

    with capture_inductor_code() as codes:
        step()
    kernels = count_generated_kernels(codes)
    if not kernels["graphs"]:
        # Dynamo reused a graph compiled earlier for the same code, shapes and guards (another
        # instance of the same module class): compile afresh once to see this peer's code.
        # Peers compiled before are recompiled at their next call (outside any timing: warm-up).
        torch._dynamo.reset()
        with capture_inductor_code() as codes:
            step()
        kernels = count_generated_kernels(codes)
    if kernels["graphs"]:
        info["compiled_kernels"] = kernels
    else:
        info["compiled_kernels_note"] = "no Inductor output code captured during the first calls"


def count_step(step, device: str) -> dict:
    """ATen ops one call of ``step`` dispatches (views left out): ``{"aten_ops", "aten_ops_by_name"}``."""
    from .opcount import count_aten_ops

    def synced():
        step()
        timing.sync(device)

    _, counter = count_aten_ops(synced)
    return {"aten_ops": counter.total, "aten_ops_by_name": dict(counter.by_name.most_common())}


def run_group(ctx: Ctx, label: str, builders: dict, *, graph: bool = False, memory: bool = False,
              counts: bool = False) -> dict:
    """Build, warm and time a group of peers that are compared with each other.

    ``builders``: ``{peer: () -> (step, info)}`` (``info`` a dict saved in the record; its
    ``rotation_sets`` is the number of calls captured per CUDA graph). A peer that cannot be built
    or fails its first call is skipped with the reason. On the CPU the peers are timed interleaved
    (``timing.time_cpu_interleaved``); on a GPU one after the other with CUDA events (or graph
    replay when ``graph``). Returns ``{peer: info + first_call_s, timing[, peak_bytes, memory_method]}``.

    ``counts``: also the ATen ops of one call (``aten_ops``; after timing, outside it) of every peer
    but the torch.compile ones, and for those the launches in Inductor's generated code
    (``compiled_kernels``, captured during the first call, which compiles).
    """
    steps, out = {}, {}
    for peer, build in builders.items():
        try:
            t0 = time.perf_counter()
            step, info = build()
            _first_call(step, peer, counts, info)
            timing.sync(ctx.device)
            first = time.perf_counter() - t0
        except Skip as exc:
            ctx.skip(f"{label} {peer}", str(exc))
            continue
        except Exception as exc:  # noqa: BLE001
            ctx.skip(f"{label} {peer}", short_exc(exc))
            continue
        steps[peer] = step
        out[peer] = dict(info, first_call_s=first)
    timings = {}
    if ctx.device == "cpu":
        try:
            timings = timing.time_cpu_interleaved(steps, min_time=ctx.min_time, min_blocks=ctx.min_blocks)
        except Exception:  # noqa: BLE001  (fall back to one peer at a time, so one failure skips one peer)
            timings = {}
    for peer, step in steps.items():
        if peer in timings:
            continue
        try:
            timings[peer] = ctx.time(step, graph=graph, graph_calls=out[peer].get("rotation_sets", 1))
        except Exception as exc:  # noqa: BLE001
            ctx.skip(f"{label} {peer}", short_exc(exc))
    for peer in list(out):
        if peer not in timings:
            del out[peer]
            continue
        out[peer]["timing"] = timings[peer]
        if counts and not is_compiled_peer(peer):
            try:
                out[peer].update(count_step(steps[peer], ctx.device))
            except Exception as exc:  # noqa: BLE001
                out[peer]["count_error"] = short_exc(exc)
        if memory:
            try:
                m = ctx.peak(steps[peer])
                out[peer].update(peak_bytes=m["peak_bytes"], memory_method=m["method"])
            except Exception as exc:  # noqa: BLE001
                out[peer]["memory_error"] = short_exc(exc)
    return out
