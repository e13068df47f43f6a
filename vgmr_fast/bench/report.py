"""Bench output: derived ratios, terminal tables, JSON with every raw figure, markdown, sweep plot."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys

import torch

from .e2e import PAPER, paper_ratios


COUNT_METHOD = (
    "launches per step: eager and fused = ATen ops dispatched (a TorchDispatchMode below autograd counts "
    "every op of one call, views and metadata ops left out; about one kernel launch each on a GPU); "
    "torch.compile = launches in the code Inductor generates (in each graph's call(): Inductor kernels "
    "cpp_fused_*/triton_*, library calls extern_kernels.*, fallback ops torch.ops.*/aten.*; forward and "
    "backward graphs summed), captured while the first call compiles, shown as 'N gen'")

# ---------------------------------------------------------------------------------------------
# Machine and software description
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(pkg)
    except Exception:  # noqa: BLE001
        return None


def git_commit() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"commit": head or None, "dirty": dirty if head else None}
    except Exception:  # noqa: BLE001
        return {"commit": None, "dirty": None}


def collect_meta(device: str, argv=None) -> dict:
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = {
        "date": now.strftime("%Y-%m-%d"),
        "datetime_utc": now.isoformat(timespec="seconds"),
        "device": device,
        "device_name": cpu_model() if device == "cpu" else torch.cuda.get_device_name(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "vgmr_fast": _version("vgmr-fast"),
        "argv": list(argv) if argv is not None else sys.argv[1:],
    }
    meta.update(git_commit())
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta["gpu_memory_bytes"] = int(props.total_memory)
        meta["gpu_capability"] = f"{props.major}.{props.minor}"
    return meta


def device_slug(meta: dict) -> str:
    if meta["device"] == "cpu":
        return f"cpu-{meta['cpu_count']}core"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", meta["device_name"].lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Derived ratios (stored in each record, so the JSON has them too)
# ---------------------------------------------------------------------------------------------
def _index(records, level, keyf, peer):
    return {keyf(r): r for r in records if r["level"] == level and r.get("peer") == peer and "median_s" in r}


def derive(records: list) -> None:
    ops_key = lambda r: (r["setting"], r["op"], r["mode"])  # noqa: E731
    lay_key = lambda r: (r["level"], r["setting"], r["mode"])  # noqa: E731
    e2e_key = lambda r: (r["backbone"], r["mode"])  # noqa: E731
    eager_ops = _index(records, "ops", ops_key, "eager")
    compile_ops = _index(records, "ops", ops_key, "compile")
    for r in records:
        if r["level"] == "ops" and "median_s" in r:
            e, c = eager_ops.get(ops_key(r)), compile_ops.get(ops_key(r))
            r["vs_eager"] = e["median_s"] / r["median_s"] if e else None
            r["vs_compile"] = c["median_s"] / r["median_s"] if c else None
    for level in ("layer", "sweep"):
        eager = _index(records, level, lay_key, "eager")
        comp = _index(records, level, lay_key, "compile")
        gemm = _index(records, level, lay_key, "gemm-only")
        gemm_onednn = _index(records, level, lay_key, "gemm-only-onednn")
        for r in records:
            if r["level"] != level or "median_s" not in r:
                continue
            e, c, g = eager.get(lay_key(r)), comp.get(lay_key(r)), gemm.get(lay_key(r))
            gd = gemm_onednn.get(lay_key(r))
            r["x_gemm_only_onednn"] = r["median_s"] / gd["median_s"] if gd else None
            r["vs_eager"] = e["median_s"] / r["median_s"] if e else None
            r["vs_compile"] = c["median_s"] / r["median_s"] if c else None
            r["x_gemm_only"] = r["median_s"] / g["median_s"] if g else None
            if "peak_bytes" in r and e and e.get("peak_bytes"):
                r["mem_vs_eager"] = r["peak_bytes"] / e["peak_bytes"]
            if r.get("floor_s"):
                r["x_floor"] = r["median_s"] / r["floor_s"]
            if r.get("launch_floor_s"):
                r["x_launch_floor"] = r["median_s"] / r["launch_floor_s"]
            if r.get("saved_bytes") is not None and e and e.get("saved_bytes"):
                r["saved_vs_eager"] = r["saved_bytes"] / e["saved_bytes"]
    bare = {(r["backbone"], r["mode"]): r for r in records
            if r["level"] == "e2e" and r.get("row") == "bare" and "median_s" in r}
    veager = {(r["backbone"], r["mode"]): r for r in records
              if r["level"] == "e2e" and r.get("row") == "vgmr-eager" and "median_s" in r}
    for r in records:
        if r["level"] != "e2e" or "median_s" not in r:
            continue
        b, e = bare.get(e2e_key(r)), veager.get(e2e_key(r))
        r["x_bare"] = r["median_s"] / b["median_s"] if b else None
        r["params_x_bare"] = r["params"] / b["params"] if b else None
        r["vs_vgmr_eager"] = e["median_s"] / r["median_s"] if (e and r["row"].startswith("vgmr")) else None
        pk = r.get("paper_kind")
        r["paper_x_bare"] = paper_ratios(pk)[r["mode"]] if pk else None


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def ms(x) -> str:
    if x is None:
        return "-"
    v = x * 1e3
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def ratio(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}x"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def mb(x) -> str:
    if x is None:
        return "-"
    v = x / 2**20
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def table(headers, rows, align=None) -> str:
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    align = align or ["l"] + ["r"] * (len(headers) - 1)

    def line(cells):
        out = []
        for c, w, a in zip(cells, widths, align):
            out.append(c.ljust(w) if a == "l" else c.rjust(w))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line([str(h) for h in headers]), sep] + [line(r) for r in rows])


def _per_setting(records, settings, level: str, row, title, headers, align) -> list:
    """One (title, table) per setting with records of ``level``: ``row(record)`` a table row,
    ``title(setting)`` the heading."""
    out = []
    for s in settings:
        rows = [row(r) for r in records if r["level"] == level and r["setting"] == s["name"]]
        if rows:
            out.append((title(s), table(headers, rows, align)))
    return out


def _spread(r) -> str:
    return f"{ms(r['q25_s'])}-{ms(r['q75_s'])}"


def ops_tables(records, settings) -> list:
    return _per_setting(
        records, settings, "ops",
        lambda r: [r["op"], r["mode"], r["peer"], ms(r["median_s"]), _spread(r), ratio(r.get("vs_eager")),
                   ms(r.get("floor_s")), pct(r.get("floor_frac")), f"{r['achieved_bytes_per_s'] / 1e9:.1f}"],
        lambda s: f"ops, {s['name']} ({describe(s)}); each op over all {len(s['widths'])} modalities",
        ["op", "mode", "peer", "median ms", "IQR ms", "vs eager", "floor ms", "% of floor", "eff GB/s"],
        ["l", "l", "l"] + ["r"] * 6)


def describe(s: dict) -> str:
    return f"B={s['B']} T={s['T']} widths={'/'.join(map(str, s['widths']))} d={s['d']} {s['dtype']}"


def layer_tables(records, settings) -> list:
    # settings derived in the run (the inference batch sweep, <name>-B<B>) carry their shape
    known = {s["name"] for s in settings}
    derived = {r["setting"]: {"name": r["setting"], "shape": r["shape"]} for r in records
               if r["level"] == "layer" and r["setting"] not in known}
    return _per_setting(
        records, list(settings) + list(derived.values()), "layer",
        lambda r: [r["mode"], r["peer"], ms(r["median_s"]), _spread(r), ratio(r.get("vs_eager")),
                   ratio(r.get("vs_compile")), ratio(r.get("x_gemm_only")), ratio(r.get("x_gemm_only_onednn")),
                   launches(r),
                   ratio(r.get("x_floor"), 0), ratio(r.get("x_launch_floor"), 1), mb(r.get("peak_bytes")),
                   pct(r.get("mem_vs_eager")), mb(r.get("saved_bytes"))],
        lambda s: f"VGMR layer, {s['name']} ({s['shape'] if 'shape' in s else describe(s)})",
        ["mode", "peer", "median ms", "IQR ms", "vs eager", "vs compile", "x GEMM-only", "x oneDNN GEMMs",
         "launches", "x bytes floor", "x launch floor", "peak MiB", "mem % eager", "saved MiB"],
        ["l", "l"] + ["r"] * 12)


def launches(r) -> str:
    """Launch count of a record: ATen ops, or 'N gen' for kernels in torch.compile's generated code."""
    if r is None:
        return "-"
    if r.get("aten_ops") is not None:
        return str(r["aten_ops"])
    k = r.get("compiled_kernels")
    return f"{k['total']} gen" if k else "-"


def layer_summary(records, settings, ctx_info) -> list:
    """The layer summary table, from this run's records (first setting: the paper's MOSEI-like size)."""
    from .graphcheck import describe as describe_fullgraph

    if not settings:
        return []
    s = settings[0]
    lay = {(r["mode"], r["peer"]): r for r in records
           if r["level"] == "layer" and r["setting"] == s["name"] and "median_s" in r}
    if not lay:
        return []
    full = {r["peer"]: r for r in records if r["level"] == "fullgraph" and r["setting"] == s["name"]}
    fused = sorted({p for _, p in lay if p.startswith("fused-") and "+" not in p})
    no_compile = "-" if ctx_info.get("compile") else "- (not run)"
    cols = ["eager"] + fused + ["compile"]

    def vs_compile(mode, peer, field):
        r, c = lay.get((mode, peer)), lay.get((mode, "compile"))
        if peer == "compile" or not r or not c or not r.get(field) or not c.get(field):
            return "-" if (peer == "compile" or r) else no_compile
        return ratio(c[field] / r[field]) if field == "median_s" else f"{r[field] / c[field]:.0%}"

    def cell(key, peer):
        tr, inf = lay.get(("train", peer)), lay.get(("infer", peer))
        if key.startswith("vs_compile:"):
            _, mode, field = key.split(":")
            return vs_compile(mode, peer, field)
        if key == "ops_train_bf16":
            r = lay.get(("train-bf16", peer))
            return launches(r) if r else "-"
        if key == "ops_infer":
            return launches(inf) if inf else ("-" if peer != "compile" else no_compile)
        if key == "ops_train":
            return launches(tr) if tr else ("-" if peer != "compile" else no_compile)
        if key in ("train_vs_compile", "infer_vs_compile"):
            r = tr if key == "train_vs_compile" else inf
            if peer in ("eager", "compile"):
                return ratio(r.get("vs_compile")) if (r and peer == "eager" and r.get("vs_compile")) else "-"
            return ratio(r.get("vs_compile")) if (r and r.get("vs_compile")) else no_compile
        if key == "saved":
            if not tr or tr.get("saved_bytes") is None:
                return "-"
            x = tr.get("saved_vs_eager")
            return f"{mb(tr['saved_bytes'])} MiB" + (f" ({x:.2f}x)" if x is not None and peer != "eager" else "")
        if key == "memory":
            return pct(tr.get("mem_vs_eager")) if tr else ("-" if peer != "compile" else no_compile)
        if key == "fullgraph":
            return describe_fullgraph(full.get(peer)) if peer in full else "-"
        return "-"

    names = [("ops_infer", "ATen ops, inference forward"), ("ops_train", "ATen ops, training forward+backward"),
             ("ops_train_bf16", "ATen ops, bf16-autocast training step"),
             ("train_vs_compile", "training step vs torch.compile(reference)"),
             ("vs_compile:train-xgrad:median_s", "training step, features that need grad, vs torch.compile(reference)"),
             ("vs_compile:train-bf16:median_s", "bf16-autocast training step vs torch.compile(reference)"),
             ("vs_compile:train-frozen:median_s", "frozen layer, features that need grad, vs torch.compile(reference)"),
             ("infer_vs_compile", "inference vs torch.compile(reference)"),
             ("saved", "activations saved for backward (no inputs, no parameters)"),
             ("memory", "training-step peak memory vs eager"),
             ("vs_compile:train:peak_bytes", "training-step peak memory vs torch.compile(reference)"),
             ("vs_compile:train-xgrad:peak_bytes", "the same, features that need grad"),
             ("fullgraph", "torch.compile(fullgraph=True) training with dropout")]
    rows = [[label] + [cell(key, p) for p in cols] for key, label in names]
    headers = ["", "reference"] + fused + ["torch.compile(reference)"]
    text = table(headers, rows, ["l"] * len(headers))
    notes = []
    bw, op = ctx_info.get("copy_bandwidth"), ctx_info.get("op_cost")
    for mode, what in (("train", "training step"), ("infer", "inference forward")):
        any_r = next((r for (m, _), r in lay.items() if m == mode and r.get("floor_bytes")), None)
        if not any_r:
            continue
        parts = []
        for p in cols:
            r = lay.get((mode, p))
            if r and r.get("x_floor"):
                parts.append(f"{'reference' if p == 'eager' else p} {ms(r['median_s'])} ms = {ratio(r['x_floor'], 0)}")
        line = (f"floor, {what}: {any_r['floor_bytes'] / 2**20:.2f} MiB moved once"
                + (f" / {bw['bytes_per_s'] / 1e9:.1f} GB/s copy = {ms(any_r['floor_s'])} ms" if bw else "")
                + ("; measured/floor: " + ", ".join(parts) if parts else ""))
        notes.append(line)
        if op:
            lparts = []
            for p in cols:
                r = lay.get((mode, p))
                if r and r.get("launch_floor_s"):
                    lparts.append(f"{'reference' if p == 'eager' else p} {launches(r)} launches = "
                                  f"{ms(r['launch_floor_s'])} ms (measured {ratio(r.get('x_launch_floor'), 1)})")
            if lparts:
                notes.append(f"launch floor, {what}: launches x {op['seconds'] * 1e6:.2f} us per minimal op: "
                             + ", ".join(lparts))
    for mode, what in (("train", "training step"), ("train-xgrad", "the same, features that need grad"),
                       ("infer", "inference forward")):
        g, gd = lay.get((mode, "gemm-only")), lay.get((mode, "gemm-only-onednn"))
        if g and gd:
            notes.append(f"GEMM-only floor, {what}: {ms(g['median_s'])} ms on ATen's GEMM (what eager and "
                         f"torch.compile call), {ms(gd['median_s'])} ms on oneDNN's (the fused layer's float32 "
                         f"CPU GEMMs)")
    if full:
        notes.append("fullgraph row: torch.compile(fullgraph=True) of a copy of each module in train mode (dropout "
                     "0.1), backend aot_eager wrapped to count graphs (Dynamo + AOT autograd, no Inductor codegen), "
                     "3 forward+backward steps on the same input")
    title = f"VGMR layer summary, {s['name']} ({describe(s)})"
    return [(title, text + ("\n" + "\n".join(notes) if notes else ""))]


def e2e_tables(records) -> list:
    out = []
    for backbone in ("transformer", "concat"):
        by_row = {}
        for r in records:
            if r["level"] == "e2e" and r["backbone"] == backbone:
                by_row.setdefault(r["row"], {})[r["mode"]] = r
        if not by_row:
            continue
        rows, unavailable = [], []
        for row, modes in by_row.items():
            if "unavailable" in modes:
                u = modes["unavailable"]
                unavailable.append(f"{u['label']}: UNAVAILABLE ({u['unavailable']})")
                continue
            tr, inf = modes.get("train"), modes.get("infer")
            any_r = tr or inf
            pr = paper_ratios(any_r.get("paper_kind")) if any_r.get("paper_kind") else None
            rows.append([
                any_r["label"], f"{any_r['params'] / 1e6:.2f}M", ratio(any_r.get("params_x_bare")),
                ms(tr["median_s"]) if tr else "-", _spread(tr) if tr else "-", ratio(tr.get("x_bare")) if tr else "-",
                ratio(pr["train"]) if pr else "", launches(tr),
                ms(inf["median_s"]) if inf else "-", _spread(inf) if inf else "-",
                ratio(inf.get("x_bare")) if inf else "-", ratio(pr["infer"]) if pr else "", launches(inf),
            ])
        first = next((r for modes in by_row.values() for m, r in modes.items() if m != "unavailable"), None)
        if first is None:
            out.append((f"{backbone} backbone", "\n".join(unavailable)))
            continue
        size = first["shape"]
        if backbone == "transformer":
            name = (f"Transformer backbone (d_model {first.get('backbone_width')}, 2 layers): the paper's Table 7 "
                    f"on this machine, {size}; train = optimizer step incl. VGMR's value-supervision pass")
        else:
            name = f"Concat backbone (hidden {first.get('backbone_width')}), {size}"
        name += ("; launches = ATen ops per step ('N gen': kernels in the generated code of the compiled "
                 "refiner alone, the rest of the step not counted)")
        text = table(["model", "params", "x bare", "train ms", "IQR", "x bare", "paper x", "launches",
                      "infer ms", "IQR", "x bare", "paper x", "launches"], rows, ["l"] + ["r"] * 12)
        out.append((name, "\n".join([text] + unavailable)))
    return out


def sweep_table(records) -> list:
    recs = [r for r in records if r["level"] == "sweep"]
    if not recs:
        return []
    peers = list(dict.fromkeys(r["peer"] for r in recs))
    Ts = sorted({r["T"] for r in recs})
    fused = [p for p in peers if p.startswith("fused-")]
    rows = []
    for T in Ts:
        by = {r["peer"]: r for r in recs if r["T"] == T}
        row = [str(T)] + [ms(by[p]["median_s"]) if p in by else "-" for p in peers]
        for f in fused:
            row.append(ratio(by[f].get("vs_eager")) if f in by else "-")
            row.append(ratio(by[f].get("x_gemm_only")) if f in by else "-")
        row.append(ratio(by["eager"].get("x_gemm_only")) if "eager" in by else "-")
        rows.append(row)
    headers = ["T"] + [f"{p} ms" for p in peers]
    for f in fused:
        headers += [f"{f} vs eager", f"{f} x GEMM"]
    headers.append("eager x GEMM")
    s = re.sub(r"T=\d+ ", "", recs[0]["shape"])
    return [(f"sweep over T, train step (fwd+bwd), {s}", table(headers, rows))]


def headline(records) -> list:
    """The ratios that answer "how much faster and leaner", one line each."""
    lines = []
    fused = sorted({r["peer"] for r in records if r.get("peer", "").startswith("fused-") and "+" not in r["peer"]})
    for f in fused:
        for r in records:
            if r["level"] == "layer" and r["peer"] == f:
                parts = [f"{ratio(r.get('vs_eager'))} vs eager"]
                if r.get("vs_compile"):
                    parts.append(f"{ratio(r['vs_compile'])} vs torch.compile(reference)")
                if r.get("x_gemm_only"):
                    parts.append(f"{ratio(r['x_gemm_only'])} GEMM-only time")
                if r.get("mem_vs_eager") is not None:
                    parts.append(f"peak memory {pct(r['mem_vs_eager'])} of eager")
                if r.get("aten_ops") is not None:
                    parts.append(f"{r['aten_ops']} ATen ops per step")
                lines.append(f"layer {r['setting']} {r['mode']}, {f}: " + ", ".join(parts))
        for r in records:
            if r["level"] == "ops" and r["peer"] == f and r["op"] == "gate_norm" and r["mode"] == "fwd+bwd":
                lines.append(f"gate_norm fwd+bwd {r['setting']}, {f}: {ratio(r.get('vs_eager'))} vs eager, "
                             f"{pct(r.get('floor_frac'))} of the bandwidth floor")
    e2e = {(r["row"], r["mode"]): r for r in records if r["level"] == "e2e" and r["backbone"] == "transformer"}
    for row in ["vgmr-eager"] + [f"vgmr-{f}" for f in fused]:
        tr, inf = e2e.get((row, "train")), e2e.get((row, "infer"))
        if tr and inf:
            lines.append(f"Transformer + {row}: train {ratio(tr.get('x_bare'))}, inference {ratio(inf.get('x_bare'))} "
                         f"the bare backbone (paper's VGMR: {ratio(tr.get('paper_x_bare'))} / "
                         f"{ratio(inf.get('paper_x_bare'))})")
    for f in fused:
        tr = e2e.get((f"vgmr-{f}-vf0.25", "train"))
        if tr:
            lines.append(f"Transformer + vgmr-{f}, value_fraction 0.25: train {ratio(tr.get('x_bare'))} the bare "
                         f"backbone, {ratio(tr.get('vs_vgmr_eager'))} vs the reference VGMR's training step")
    for row in ("gate", "mlp"):
        inf = e2e.get((row, "infer"))
        if inf:
            lines.append(f"Transformer + {row}: inference {ratio(inf.get('x_bare'))} the bare backbone "
                         f"(paper: {ratio(inf.get('paper_x_bare'))})")
    return lines


def header_lines(meta, ctx_info) -> list:
    lines = [
        f"vgmr-fast bench  {meta['datetime_utc']}  commit {str(meta.get('commit'))[:10]}"
        + (" (dirty tree)" if meta.get("dirty") else ""),
        f"device: {meta['device']} -- {meta['device_name']}; {meta['torch_threads']} torch threads "
        f"({meta['cpu_count']} CPUs); torch {meta['torch']}, triton {meta['triton'] or '-'}, python {meta['python']}",
    ]
    bw = ctx_info.get("copy_bandwidth")
    if bw:
        lines.append(f"copy bandwidth (floor unit): {bw['bytes_per_s'] / 1e9:.2f} GB/s "
                     f"({bw['tensor_bytes'] / 2**20:.0f} MiB torch.Tensor.copy_, read+write, median)")
    op = ctx_info.get("op_cost")
    if op:
        lines.append(f"minimal op (launch floor unit): {op['seconds'] * 1e6:.2f} us ({op['method']})")
    if ctx_info.get("count_method"):
        lines.append(ctx_info["count_method"])
    lines.append(f"fused backends measured: {', '.join(ctx_info['backends']) or 'none'}; "
                 f"torch.compile peers: {'yes' if ctx_info['compile'] else 'no (' + ctx_info['compile_reason'] + ')'}")
    lines.append(f"timing: {ctx_info['timing_method']}; memory: {ctx_info['memory_method']}")
    if ctx_info.get("loadavg_start"):
        idle = ctx_info.get("cpu_idle_before")
        idle_s = f"; CPUs idle in the second before the run: {100 * idle:.0f}%" if idle is not None else ""
        lines.append(f"machine load at start: load average {ctx_info['loadavg_start']}{idle_s} "
                     "(other processes inflate medians and spreads)")
        if idle is not None and idle < 0.9:
            lines.append("WARNING: other processes were using the CPUs when this run started; on a small machine "
                         "that makes absolute times unreliable (ratios between interleaved peers less so). "
                         "Rerun on an idle machine before quoting figures.")
    lines.append("ratios: 'vs eager' = eager time / this time (>1 is faster); 'x GEMM-only' and 'x bare' = "
                 "this time / that time; spread = interquartile range; 'x bytes floor' = time / (bytes moved "
                 "once / copy bandwidth); 'x launch floor' = time / (launches x minimal-op time); 'saved MiB' = "
                 "activations saved for backward (inputs and parameters left out)")
    return lines


def render(meta, ctx_info, records, settings, skipped) -> str:
    parts = ["\n".join(header_lines(meta, ctx_info))]
    for title, t in (ops_tables(records, settings) + layer_tables(records, settings)
                     + layer_summary(records, settings, ctx_info) + e2e_tables(records) + sweep_table(records)):
        parts.append(f"== {title} ==\n{t}")
    head = headline(records)
    if head:
        parts.append("== headline ratios (same run) ==\n" + "\n".join(f"- {x}" for x in head))
    if skipped:
        parts.append("== skipped ==\n" + "\n".join(f"- {s['what']}: {s['reason']}" for s in skipped))
    return "\n\n".join(parts)


def write_json(path, meta, ctx_info, settings, records, skipped) -> None:
    doc = {
        "meta": meta,
        "run": ctx_info,
        "settings": settings,
        "paper_table7": {k: {"params_M": v[0], "train_epoch_s": v[1], "infer_batch_ms": v[2]}
                         for k, v in PAPER.items()},
        "records": records,
        "skipped": skipped,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


def write_markdown(path, text: str, meta) -> None:
    with open(path, "w") as f:
        f.write(f"# vgmr-fast bench, {meta['device_name']} ({meta['device']}), {meta['date']}\n\n")
        f.write("Produced by `vgmr-fast " + " ".join(meta.get("argv") or ["bench"]) + "`; "
                "the JSON beside this file has every raw figure.\n\n")
        f.write("```\n" + text + "\n```\n")


def plot_memory(path, records) -> bool:
    """One training step's memory over time per peer (stacked by category), one panel per mode;
    the legend gives each category's MiB at the peak."""
    recs = [r for r in records if r["level"] == "memory-timeline" and r.get("t_us")]
    if not recs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["mode"], r["peer"]) for r in recs))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, (mode, peer) in zip(axes[0], panels):
        r = next(x for x in recs if (x["mode"], x["peer"]) == (mode, peer))
        cats = [c for c, v in r["bytes"].items() if any(v)]
        t_ms = [t / 1e3 for t in r["t_us"]]
        ax.stackplot(t_ms, *[[b / 2**20 for b in r["bytes"][c]] for c in cats],
                     labels=[f"{c} {r['peak'][c] / 2**20:.1f}" for c in cats], step="post")
        total = sum(r["peak"].values()) / 2**20
        ax.set_title(f"{mode}, {'reference' if peer == 'eager' else peer}: peak {total:.1f} MiB", fontsize=9)
        ax.set_xlabel("ms into the step")
        ax.legend(fontsize=7, loc="upper left", title="MiB at the peak", title_fontsize=7)
    axes[0][0].set_ylabel("MiB held (inputs and parameters included)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sweep(path, records) -> bool:
    recs = [r for r in records if r["level"] == "sweep" and "median_s" in r]
    if not recs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = list(dict.fromkeys(r["peer"] for r in recs))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in peers:
        rs = sorted((r for r in recs if r["peer"] == p), key=lambda r: r["T"])
        T = [r["T"] for r in rs]
        med = [r["median_s"] * 1e3 for r in rs]
        lo = [(r["median_s"] - r["q25_s"]) * 1e3 for r in rs]
        hi = [(r["q75_s"] - r["median_s"]) * 1e3 for r in rs]
        a1.errorbar(T, med, yerr=[lo, hi], marker="o", capsize=3, label=p,
                    linestyle="--" if p == "gemm-only" else "-")
        if p != "gemm-only":
            a2.plot(T, [r.get("x_gemm_only") or float("nan") for r in rs], marker="o", label=f"{p} x GEMM-only")
        if p.startswith("fused-"):
            a2.plot(T, [r.get("vs_eager") or float("nan") for r in rs], marker="s", linestyle=":",
                    label=f"{p} speedup vs eager")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    Ts = sorted({r["T"] for r in recs})
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xticks(Ts)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%d"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    a1.set_yscale("log")
    a1.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    a1.yaxis.set_minor_formatter(NullFormatter())
    a1.set_xlabel("T (steps per modality)")
    a1.set_ylabel("train step (fwd+bwd), ms (median, IQR bars)")
    a1.legend(fontsize=8)
    a1.grid(True, which="both", alpha=0.3)
    a2.axhline(1.0, color="gray", lw=0.8)
    a2.set_xlabel("T")
    a2.set_ylabel("ratio")
    a2.legend(fontsize=8)
    a2.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"VGMR layer sweep over T: {re.sub(r'T=[0-9]+ ', '', recs[0]['shape'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
