"""Ahead-of-time compile of every Triton kernel variant the launchers can choose; no GPU needed.

The variants are not listed by hand: each launcher's named configuration table
(``gate_norm.fwd_configs`` / ``bwd_configs``, ``summary_pool.configs``,
``interaction.configs``) gives probe shapes, and the launchers themselves run on those
probes under :func:`vgmr_fast.triton.recording`, which records every launch (kernel,
arguments, constexprs, ``num_warps`` and ``maxnreg``) instead of launching.  Each probe runs for every
dtype, with aligned inputs (``D % 16 == 0``, 16-byte aligned pointers: the divisibility
specialisation Triton's launcher gives them) and unaligned ones (odd ``D``, pointers one
element off).  The signature and attributes are derived from the recorded arguments the
way Triton's launcher specialises them (checked against ``native_specialize_impl`` where
Triton has it), then ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.

Commands (Triton must compile, not interpret: ``TRITON_INTERPRET`` is dropped by re-running
this module without it)::

    python -m vgmr_fast.triton.aot --check [--arch 90,80] [--jobs 2]
        compile everything; exit 1 on a compile error, a local-memory spill, or a launcher
        configuration no probe reached
    python -m vgmr_fast.triton.aot --table benchmarks/results/triton-sm90-2026-12-02.md --arch 90
        the resource table: registers/thread, shared memory, local memory (spills), the widest
        global load and store in the PTX, per kernel, configuration and dtype
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
       torch.int32: "i32", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}


# ---------------------------------------------------------------------------
# Probes: launcher calls that reach every table entry
# ---------------------------------------------------------------------------
def _tensor(shape, dtype, aligned):
    """A CPU tensor of ``shape``; when not aligned, a view one element into a larger buffer."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.zeros(n + 1, dtype=dtype)
    t = buf[:n] if aligned else buf[1:]
    return t.view(shape)


def _probes():
    """(op, config name, dtype name, aligned, thunk) for every table entry x dtype x alignment."""
    from . import gate_norm as GN
    from . import interaction as IA
    from . import summary_pool as SP

    out = []
    for dname, dt in DTYPES.items():
        for aligned in (True, False):
            def widths(block_d, single, aligned=aligned):
                d = block_d if single else 2 * block_d + 16
                return d if aligned else d - 1

            for cfg in GN.fwd_configs():
                D = widths(cfg["BLOCK_D"], cfg["SINGLE"])
                for p in (0.0, 0.1):
                    out.append(("gate_norm", cfg["name"], dname, aligned,
                                lambda D=D, p=p, dt=dt, a=aligned: _gn_fwd(D, p, dt, a)))
            for cfg in GN.bwd_configs(aligned):
                D = widths(cfg["BLOCK_D"], cfg["SINGLE"])
                T = 1 if cfg["BLOCK_R"] == 1 else cfg["BLOCK_R"]
                for p in (0.0, 0.1):
                    out.append(("gate_norm_backward", cfg["name"], dname, aligned,
                                lambda D=D, T=T, p=p, dt=dt, a=aligned: _gn_bwd(D, T, p, dt, a)))
            for cfg in SP.configs():
                D = widths(cfg["BLOCK_D"], True)
                for masked in (False, True):
                    out.append(("summary_pool", cfg["name"], dname, aligned,
                                lambda D=D, m=masked, dt=dt, a=aligned: _sp(D, m, dt, a)))
            for cfg in IA.configs():
                D = widths(cfg["BLOCK_D"], True)
                out.append(("interaction", cfg["name"], dname, aligned,
                            lambda D=D, dt=dt, a=aligned: _ia(D, dt, a)))
    out.append(("philox", "test helpers", "-", True, _philox))
    return out


def _gn_inputs(B, T, D, dt, aligned):
    f32 = torch.float32
    return (_tensor((B, T, D), dt, aligned), _tensor((B, D), f32, True), _tensor((B, T, D), dt, aligned),
            _tensor((D,), f32, True), _tensor((D,), f32, True))


def _gn_fwd(D, p, dt, aligned):
    from .gate_norm import gate_norm

    _call(gate_norm, *_gn_inputs(2, 3, D, dt, aligned), 0.5, 0.2, p, torch.zeros(1, dtype=torch.int64))


def _gn_bwd(D, T, p, dt, aligned):
    from .gate_norm import gate_norm_backward

    z, br, x, w, _ = _gn_inputs(2, T, D, dt, aligned)
    dy = _tensor((2, T, D), dt, aligned)
    stats = torch.zeros(2, T)
    _call(gate_norm_backward, dy, z, br, x, w, stats, stats.clone(), 0.5, 0.2, p, torch.zeros(1, dtype=torch.int64))


def _sp(D, masked, dt, aligned):
    from .summary_pool import summary_pool, summary_pool_backward

    B, T = 4, 5
    mask = torch.ones(B, T, dtype=torch.bool) if masked else None
    _call(summary_pool, _tensor((B, T, D), dt, aligned), mask)
    _call(summary_pool_backward, _tensor((B, D), dt, aligned), _tensor((B, D), dt, aligned), mask,
          torch.zeros(B, D, dtype=torch.int32), T)


def _ia(D, dt, aligned):
    from .interaction import interaction, interaction_backward

    B, M = 2, 3
    _call(interaction, _tensor((B, M, D), dt, aligned))
    _call(interaction_backward, _tensor((B, M, (3 * M - 1) * D), dt, aligned), _tensor((B, M, D), dt, aligned))


def _philox():
    from .philox import keep_mask, philox_words

    philox_words(torch.zeros(1, dtype=torch.int64), torch.arange(64, dtype=torch.int64))
    keep_mask(0, 8, 35, 0.5, device="cpu")


def _call(op, *args):
    """Run the Python body of a ``vgmr_triton`` op (not the dispatcher, which wants CUDA)."""
    # torch.library.triton_op / custom_op objects keep the decorated function as _init_fn
    return getattr(op, "_init_fn", op)(*args)


# ---------------------------------------------------------------------------
# Specialisation (as Triton's launcher does it) and variants
# ---------------------------------------------------------------------------
def _int_type(v: int) -> str:
    return "i32" if -(2**31) <= v < 2**31 else ("u64" if v >= 2**63 else "i64")


def specialize(kernel, args, meta):
    """(signature, constexprs, attrs) for a launch of ``kernel`` with positional ``args`` and
    constexpr keyword ``meta``, as Triton's launcher specialises them: a pointer 16-byte
    aligned and an int divisible by 16 get ``tt.divisibility = 16``; an int equal to 1
    becomes a constant; arguments in ``do_not_specialize`` get neither."""
    names = kernel.arg_names
    dns = set()
    for p in kernel.params:
        if getattr(p, "do_not_specialize", False):
            dns.add(p.name)
    sig, constexprs, attrs = {}, {}, {}
    values = dict(zip(names, args))
    values.update({k: v for k, v in meta.items() if k in names})
    for i, name in enumerate(names):
        v = values[name]
        ann = kernel.params[i].annotation_type
        if kernel.params[i].is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = v
        elif ann and not isinstance(v, torch.Tensor):
            sig[name] = ann  # an annotated scalar keeps its type (Triton specialises it no further
            if name not in dns and isinstance(v, int) and v % 16 == 0:  # than divisibility)
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TY[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):
            if name not in dns and v == 1:
                sig[name] = "constexpr"
                constexprs[name] = 1
                continue
            sig[name] = _int_type(v)
            if name not in dns and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} of type {type(v).__name__}")
    return sig, constexprs, attrs


def native_signature(kernel, args, meta):
    """Triton's own specialisation of the same launch (``native_specialize_impl``, Triton >= 3.4),
    as (signature, attrs), or None when this Triton has no such function."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        return None
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in meta.items() if k in kernel.arg_names})
    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        ty, attr = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        if p.annotation_type and not isinstance(v, torch.Tensor):
            ty = p.annotation_type  # the launcher's binder replaces the type by the annotation
        sig[p.name] = ty
        if attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


@functools.lru_cache(maxsize=None)
def variants():
    """Every distinct compile the launchers can ask for, with the table entries that reach it."""
    from . import recording

    seen = {}
    for op, cfg, dname, aligned, thunk in _probes():
        with recording() as launches:
            thunk()
        for kernel, _grid, args, meta in launches:
            meta = dict(meta)
            # launch keywords that are no kernel argument are compile options (num_warps, maxnreg)
            options = {k: meta.pop(k) for k in list(meta) if k not in kernel.arg_names}
            options.setdefault("num_warps", 4)
            sig, constexprs, attrs = specialize(kernel, args, meta)
            key = (kernel.__name__, json.dumps(sig, sort_keys=True), json.dumps(constexprs, sort_keys=True),
                   json.dumps(sorted((k[0], v) for k, v in attrs.items())), json.dumps(options, sort_keys=True))
            v = seen.setdefault(key, {
                "kernel": kernel.__name__, "module": kernel.fn.__module__, "signature": sig,
                "constexprs": constexprs, "attrs": {str(k[0]): v for k, v in attrs.items()},
                "num_warps": options["num_warps"], "options": options,
                "aligned": aligned, "dtype": dname, "configs": set(), "ops": set(),
                "native": native_signature(kernel, args, meta), "ours": (sig, attrs),
            })
            v["configs"].add(cfg)
            v["ops"].add(op)
    out = []
    for v in seen.values():
        v["configs"] = sorted(v["configs"])
        v["ops"] = sorted(v["ops"])
        out.append(v)
    return out


def table_entries():
    """Every (op, config name) of the launchers' tables (what the probes must reach)."""
    from . import gate_norm as GN
    from . import interaction as IA
    from . import summary_pool as SP

    return ({("gate_norm", c["name"]) for c in GN.fwd_configs()}
            | {("gate_norm_backward", c["name"]) for c in GN.bwd_configs(True) + GN.bwd_configs(False)}
            | {("summary_pool", c["name"]) for c in SP.configs()}
            | {("interaction", c["name"]) for c in IA.configs()})


def jit_kernels():
    """Names of every top-level ``@triton.jit`` kernel (``*_kernel``) in vgmr_fast.triton."""
    import triton

    from . import gate_norm, interaction, philox, summary_pool

    names = set()
    for mod in (gate_norm, interaction, summary_pool, philox):
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                names.add(name)
    return names


# ---------------------------------------------------------------------------
# Compile and inspect
# ---------------------------------------------------------------------------
_ACCESS = re.compile(r"\b(ld|st)\.global[\w.:]*")


def _widest(kind: str, ptx: str) -> int:
    """Bits of the widest global load (``kind="ld"``) or store (``"st"``) in ``ptx``:
    ``ld.global.v4.b32`` is 128, ``ld.global.b16`` 16."""
    best = 0
    for m in _ACCESS.finditer(ptx):
        if m.group(1) != kind:
            continue
        parts = m.group(0).split(".")
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v[248]", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[busf](8|16|32|64)", p)), 0)
        best = max(best, lanes * bits)
    return best


def _resource_usage(cubin: bytes) -> dict:
    """REG / SHARED / LOCAL / STACK of the cubin, from cuobjdump (Triton ships one)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump gave no resource usage:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def _ptxas_log_on() -> bool:
    """Have Triton print ptxas's -v report (spill stores and loads) and compile afresh (a cached
    kernel runs no ptxas); False where this Triton has no such knobs."""
    try:
        from triton import knobs
    except ImportError:
        return False
    if not (hasattr(knobs, "nvidia") and hasattr(knobs.nvidia, "dump_ptxas_log")):
        return False
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    return True


def compile_variant(v: dict, arch: int) -> dict:
    """Compile one variant for sm_<arch>; returns its resource figures or the error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(v["module"]), v["kernel"])
    attrs = {(int(k),): val for k, val in v["attrs"].items()}
    src = ASTSource(fn=kernel, signature=v["signature"], constexprs=v["constexprs"], attrs=attrs)
    import contextlib
    import io

    log = io.StringIO()
    ptxas_log = _ptxas_log_on()
    t0 = time.perf_counter()
    res = {"kernel": v["kernel"], "arch": arch, "configs": v["configs"], "dtype": v["dtype"],
           "aligned": v["aligned"], "num_warps": v["num_warps"], "maxnreg": v["options"].get("maxnreg"),
           "constexprs": {k: c for k, c in v["constexprs"].items()}}
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(v["options"]))
    except Exception as exc:  # noqa: BLE001  (any compiler failure is a finding)
        res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return res
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if ptxas_log and m:  # ptxas's own report of this very compile
        res["spill_stores"], res["spill_loads"] = int(m.group(2)), int(m.group(3))
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res.update(_resource_usage(k.asm["cubin"]))
    res["shared"] = int(k.metadata.shared)
    res["widest_load_bits"] = _widest("ld", k.asm["ptx"])
    res["widest_store_bits"] = _widest("st", k.asm["ptx"])
    return res


def ci_subset(vs):
    """One variant per (kernel, table entry, constexprs), dtype and alignment rotating across
    entries, so every configuration and every dtype is compiled in a few dozen compiles (CI);
    the full product is the default."""
    groups = {}
    for v in vs:
        key = (v["kernel"], tuple(v["configs"]), json.dumps(v["constexprs"], sort_keys=True))
        groups.setdefault(key, []).append(v)
    out = []
    names = list(DTYPES)
    for i, key in enumerate(sorted(groups)):
        cands = groups[key]
        want_dtype, want_aligned = names[i % len(names)], (i // len(names)) % 2 == 0
        best = sorted(cands, key=lambda v: (v["dtype"] != want_dtype, v["aligned"] != want_aligned))[0]
        out.append(best)
    return out


def compile_all(archs, jobs: int = 1, subset: str = "all", other_every: int = 1):
    """Compile ``vs`` for every arch; for the archs after the first, every ``other_every``-th."""
    vs = variants()
    if subset == "ci":
        vs = ci_subset(vs)
    work = [(v, a) for i, a in enumerate(archs) for v in (vs if i == 0 else vs[::other_every])]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            results = list(ex.map(_compile_packed, work))
    else:
        results = [compile_variant(v, a) for v, a in work]
    return vs, results


def _compile_packed(va):
    return compile_variant(*va)


def problems(vs, results) -> list[str]:
    """Compile errors, spills, unreached table entries, kernels never compiled, and
    disagreements with Triton's own specialisation."""
    out = []
    for r in results:
        if "error" in r:
            out.append(f"compile error: {r['kernel']} sm_{r['arch']} {r['configs']} {r['dtype']}: {r['error']}")
        elif r["local"] or r.get("spill_stores", r["stack"]):
            # ptxas's spill report where Triton shows it, else any stack frame counts
            out.append(f"local memory (spill): {r['kernel']} sm_{r['arch']} {r['configs']} {r['dtype']}: "
                       f"LOCAL {r['local']} STACK {r['stack']} spill stores {r.get('spill_stores', '?')} bytes")
    reached = {(op, c) for v in variants() for op in v["ops"] for c in v["configs"]}
    for entry in sorted(table_entries() - reached):
        out.append(f"launcher configuration never reached by a probe: {entry}")
    for name in sorted(jit_kernels() - {v["kernel"] for v in vs}):
        out.append(f"@triton.jit kernel never compiled: {name}")
    for v in vs:
        if v["native"] is not None:
            sig, attrs = v["ours"]
            nsig, nattrs = v["native"]
            if {k: t for k, t in sig.items() if t != "constexpr"} != {k: t for k, t in nsig.items()
                                                                      if t != "constexpr" and k in sig
                                                                      and sig[k] != "constexpr"} \
                    or attrs != nattrs:
                out.append(f"specialisation differs from Triton's for {v['kernel']}: ours {sig} {attrs}, "
                           f"Triton's {nsig} {nattrs}")
    return out


# ---------------------------------------------------------------------------
# The resource table
# ---------------------------------------------------------------------------
def _cfg_text(r) -> str:
    keep = {k: c for k, c in r["constexprs"].items() if k.isupper()}
    if r.get("maxnreg"):
        keep["maxnreg"] = r["maxnreg"]
    return " ".join(f"{k}={c}" for k, c in keep.items())


def table(results, archs, command: str) -> str:
    rows = sorted((r for r in results if "error" not in r),
                  key=lambda r: (r["arch"], r["kernel"], _cfg_text(r), r["dtype"], not r["aligned"]))
    lines = [
        "# Triton kernels: resources per compiled variant (ahead of time, no GPU)",
        "",
        f"Regenerate: `{command}`",
        "",
        "Every variant the launchers can choose (their named configuration tables x dtypes x aligned /",
        "unaligned inputs), compiled by `triton.compile` for the target GPU without running it.",
        "registers: per thread; shared: bytes of shared memory per program (Triton's dynamic",
        "allocation); spills: bytes of spill stores in ptxas's report of this compile (must be 0);",
        "stack: the cubin's stack frame per thread (ptxas may keep a small frame without spilling);",
        "local: local memory per thread; load / store:",
        "the widest global access in the PTX, in bits (128 = one 16-byte vector per thread).",
        "aligned: D % 16 == 0 and 16-byte aligned pointers (Triton's divisibility specialisation);",
        "unaligned: odd D, inputs one element off.",
        f"Triton {__import__('triton').__version__}, torch {torch.__version__}.",
        "",
        "Narrow stores in the stats kernels and summary_pool's forward, and narrow loads in",
        "summary_pool's backward, are per-row or per-column vectors ([R] statistics, [B, D] pooled",
        "values) in a slice of the tile's layout; the row data itself moves in 128-bit vectors.",
        "",
        "| arch | kernel | configuration | warps | dtype | aligned | registers | shared | spills | stack "
        "| local | load | store |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| sm_{r['arch']} | {r['kernel']} | {_cfg_text(r)} | {r['num_warps']} | {r['dtype']} | "
                     f"{'yes' if r['aligned'] else 'no'} | {r['registers']} | {r['shared']} | "
                     f"{r.get('spill_stores', '?')} | {r['stack']} | {r['local']} | "
                     f"{r['widest_load_bits']} | {r['widest_store_bits']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # triton.jit decided to interpret at import: compiling needs a fresh process without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "vgmr_fast.triton.aot", *(argv or sys.argv[1:])], env=env)
    ap = argparse.ArgumentParser(prog="python -m vgmr_fast.triton.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compile everything; exit 1 on any problem")
    ap.add_argument("--table", metavar="PATH", help="write the resource table (markdown) to PATH")
    ap.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compiler processes")
    ap.add_argument("--json", metavar="PATH", help="write every result as JSON to PATH")
    ap.add_argument("--other-archs-every", type=int, default=1, metavar="N",
                    help="for the archs after the first, compile every N-th variant only")
    ap.add_argument("--subset", choices=("all", "ci"), default="all",
                    help="all: every variant (default); ci: one per kernel configuration, dtypes rotating")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    t0 = time.perf_counter()
    vs, results = compile_all(archs, args.jobs, args.subset, args.other_archs_every)
    found = problems(vs, results)
    print(f"vgmr_fast.triton.aot: {len(vs)} variants, {len(archs)} arch(s): {len(results)} compiles "
          f"in {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variants": len(vs), "results": results, "problems": found,
                       "checked_against_triton_specialisation": sum(v["native"] is not None for v in variants())},
                      f, indent=1, default=str)
    if args.table:
        cmd = "python -m vgmr_fast.triton.aot --table " + args.table + " --arch " + args.arch
        with open(args.table, "w") as f:
            f.write(table(results, archs, cmd))
        print(f"wrote {args.table}")
    for p in found:
        print("PROBLEM:", p)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
