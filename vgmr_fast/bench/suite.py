"""``vgmr-fast bench``: the driver.

``add_bench_arguments(parser)`` declares the options; ``run_bench(args)`` measures the levels asked
for, prints the tables (progress bar on stderr while it runs), and writes
``<out>/<device>-<date>[-quick].json`` (every raw figure, device, versions, date, commit),
``.md`` (the tables) and ``.png`` (the sweep plot).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import e2e, layer, memory, ops, report, scale, timing
from .backends import probe_backends
from .common import Ctx, Skip
from .settings import settings_for, sweep_for

LEVELS = ("ops", "layer", "e2e", "sweep")
OPT_IN_LEVELS = ("scale",)  # measured only when named in --levels


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="short run (about a minute on a 2-core CPU): fewer repetitions, shorter sweep, "
                        "no torch.compile peers (launch counts and the fullgraph=True check still run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to benchmark (default: cuda when available, else cpu)")
    p.add_argument("--levels", default=",".join(LEVELS),
                   help=f"comma-separated subset of {','.join(LEVELS + OPT_IN_LEVELS)} (default: {','.join(LEVELS)}; "
                        "scale: backbone size, sequence length, feature width, vgmr_fast/bench/scale.py)")
    p.add_argument("--scale-grid", choices=("quick", "default", "large"), default=None,
                   help="grid of the scale level (default: quick with --quick, else default; large: for a GPU)")
    p.add_argument("--scale-parts", default="backbone,sequence,width",
                   help="comma-separated parts of the scale level: backbone, sequence, width (default: all)")
    p.add_argument("--backends", default=None,
                   help="comma-separated fused backends to measure (default: every one that runs here)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out the torch.compile peers and the fullgraph=True check of the training step")
    p.add_argument("--max-autotune", action="store_true",
                   help="GPU: also torch.compile(mode='max-autotune') of the reference at the large size "
                        "(default on a GPU unless --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before measuring")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of measurement per figure (default 0.5; 0.1 with --quick)")
    p.add_argument("--out", default="bench-results", help="directory for the JSON, markdown and PNG")
    p.add_argument("--name", default=None, help="file stem (default <device>-<date>[-quick])")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny sizes, seconds


def _configure_compile() -> None:
    """Room for one graph per (setting, mode, peer) on a shared code object; graph-break notes
    (e.g. the reference's ``.item()`` when drawing dropout seeds) logged at ERROR level only."""
    import logging

    try:
        import torch._dynamo.config as dc

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dc, name):
                setattr(dc, name, max(64, getattr(dc, name)))
        torch._logging.set_logs(dynamo=logging.ERROR)
    except Exception:  # noqa: BLE001
        pass


def _cpu_idle(seconds: float = 1.0):
    """Fraction of all CPUs idle over ``seconds`` (from /proc/stat), before this run starts working."""
    def read():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)

    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
        return round((i1 - i0) / max(1, t1 - t0), 3)
    except (OSError, ValueError, IndexError):
        return None


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_bench(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("vgmr-fast bench: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    bad = [x for x in levels if x not in LEVELS + OPT_IN_LEVELS]
    if bad:
        print(f"vgmr-fast bench: unknown level(s) {bad}; choose from {list(LEVELS + OPT_IN_LEVELS)}", file=sys.stderr)
        return 2
    quick, tiny = bool(args.quick), bool(getattr(args, "tiny", False))
    only = [b.strip() for b in args.backends.split(",")] if args.backends else None

    t_start = time.perf_counter()
    load_start = _loadavg()
    idle_start = None if getattr(args, "tiny", False) else _cpu_idle()
    probed = probe_backends(device, only=only)
    backends = [b for b, why in probed.items() if why is None]
    compile_on = not (args.no_compile or quick or tiny)
    if args.no_compile:
        compile_reason = "--no-compile"
    elif quick or tiny:
        compile_reason = (f"{'--tiny' if tiny and not quick else '--quick'}: torch.compile peers left out (each graph takes tens of seconds to "
                          "compile on a small CPU); run without --quick to include them")
    else:
        compile_reason = ""
    min_time = args.min_time if args.min_time is not None else (0.003 if tiny else 0.1 if quick else 0.5)
    min_blocks = 3 if tiny else 4 if quick else 9
    ctx = Ctx(device=device, backends=backends, compile=compile_on, compile_reason=compile_reason,
              min_time=min_time, min_blocks=min_blocks, quick=quick, tiny=tiny,
              max_autotune=(device == "cuda" and compile_on) or bool(args.max_autotune))
    for b, why in probed.items():
        if why is not None:
            ctx.skip(f"fused backend {b!r}", why)
    if not compile_on:
        ctx.skip("torch.compile peers", compile_reason)
    if device == "cpu":
        ctx.skip("fused backends 'cuda', 'triton'", "CPU run (they need a CUDA device)")

    if compile_on:
        _configure_compile()
    meta = report.collect_meta(device, getattr(args, "argv", None))
    settings = settings_for(device, tiny)
    sweep_base, Ts = sweep_for(device, quick, tiny)
    print(f"vgmr-fast bench on {meta['device_name']} ({device}, {torch.get_num_threads()} threads); "
          f"fused backends: {', '.join(backends) or 'none'}; levels: {', '.join(levels)}", flush=True)
    for sk in ctx.skipped:
        print(f"  skipping {sk['what']}: {sk['reason']}", flush=True)
    if idle_start is not None and idle_start < 0.9:
        print(f"  WARNING: only {100 * idle_start:.0f}% of the CPU time was idle in the second before this run: "
              "other processes will distort the figures", flush=True)

    bw = timing.copy_bandwidth(device, 8 * 2**20 if tiny else None, min_time=min_time, min_blocks=min_blocks)
    ctx.copy_bw = bw["bytes_per_s"]
    launch = timing.op_cost(device, min_time=min_time, min_blocks=min_blocks)
    ctx.op_cost = launch["seconds"]

    tasks = []
    if "ops" in levels:
        tasks += ops.tasks(ctx, settings)
    if "layer" in levels:
        tasks += layer.tasks(ctx, settings, fullgraph=not args.no_compile)
        if args.no_compile:
            ctx.skip("fullgraph=True check of the training step", "--no-compile")
    if "e2e" in levels:
        tasks += e2e.tasks(ctx, settings[0])
    if "sweep" in levels:
        tasks += layer.sweep_tasks(ctx, sweep_base, Ts)
        if ctx.compile:
            ctx.skip("sweep: torch.compile peers", "left out of the sweep (one compile per T)")
    if "scale" in levels:
        parts = [x.strip() for x in getattr(args, "scale_parts", ",".join(scale.PARTS)).split(",") if x.strip()]
        if not set(parts) <= set(scale.PARTS):
            print(f"vgmr-fast bench: --scale-parts: expected a subset of {list(scale.PARTS)}, got {parts}",
                  file=sys.stderr)
            return 2
        tasks += scale.tasks(ctx, getattr(args, "scale_grid", None), parts)

    from tqdm import tqdm

    bar = tqdm(tasks, desc="vgmr-fast bench", unit="figure", disable=args.no_progress, file=sys.stderr,
               dynamic_ncols=True)
    group = None
    task_times = []
    for task in bar:
        t_task = time.perf_counter()
        if task.group != group:
            ctx.clear()
            group = task.group
        bar.set_postfix_str(task.label[:60], refresh=False)
        try:
            task.run()
        except Skip as exc:
            ctx.skip(task.label, str(exc))
            bar.write(f"  skipped {task.label}: {exc}")
        task_times.append([task.label, round(time.perf_counter() - t_task, 3)])
    bar.close()
    ctx.clear()

    report.derive(ctx.records)
    ctx_info = {
        "backends": backends,
        "backends_probed": probed,
        "compile": compile_on,
        "compile_reason": compile_reason,
        "levels": levels,
        "quick": quick,
        "tiny": tiny,
        "min_time_s": min_time,
        "min_blocks": min_blocks,
        "copy_bandwidth": bw,
        "op_cost": launch,
        "count_method": report.COUNT_METHOD,
        "cache_bytes": timing.cache_bytes(device),
        "rotation": "input sets rotated so that together they exceed 2x the last-level cache",
        "timing_method": ("CUDA events (median, IQR over calls); CUDA graph replay for the MOSEI-size "
                          "inference figures" if device == "cuda" else
                          "timeit on perf_counter (as torch.utils.benchmark.Timer) in blocks of >= ~1 ms, peers of a "
                          "table interleaved block by block (median, IQR over blocks)"),
        "memory_method": memory.method(device),
        "sweep_T": Ts,
        "elapsed_s": None,
        "task_wall_s": task_times,
        "loadavg_start": load_start,
        "cpu_idle_before": idle_start,
        "loadavg_end": _loadavg(),
    }
    settings_d = [s.to_dict() for s in settings]
    text = report.render(meta, ctx_info, ctx.records, settings_d, ctx.skipped)
    if "scale" in levels:
        text += "\n\n" + scale.render(ctx.records, ctx.skipped)
    ctx_info["elapsed_s"] = time.perf_counter() - t_start
    text += f"\n\n(total {ctx_info['elapsed_s']:.0f} s)"
    print()
    print(text)

    os.makedirs(args.out, exist_ok=True)
    stem = args.name or (f"{report.device_slug(meta)}-{meta['date']}" + ("-tiny" if tiny else "-quick" if quick else ""))
    base = os.path.join(args.out, stem)
    report.write_json(base + ".json", meta, ctx_info, settings_d, ctx.records, ctx.skipped)
    report.write_markdown(base + ".md", text, meta)
    wrote = [base + ".json", base + ".md"]
    if report.plot_sweep(base + ".png", ctx.records):
        wrote.append(base + ".png")
    scale_png = base + ("-scale.png" if base + ".png" in wrote else ".png")
    if scale.plot(scale_png, ctx.records):
        wrote.append(scale_png)
    if report.plot_memory(base + "-memory.png", ctx.records):
        wrote.append(base + "-memory.png")
    print("\nwrote " + ", ".join(wrote))
    return 0
