"""``vgmr-fast check``: is the fused path right on this machine?

For every fused backend that runs here (``cpu`` always; ``cuda`` and ``triton`` when a GPU is
present), each op (and the whole fused module) is compared with the reference over a fixed grid
of shapes (odd widths, T = 1, B = 1, rows with some and with all steps masked, non-contiguous
inputs) and dtypes, forward and backward.

Rule: :mod:`vgmr_fast.testing` (the one the tests apply): truth is the reference in float64
on the same (dtype-rounded) inputs, computed on the CPU; eager is the reference run in the fused
dtype on the same device. The table shows, per backend, op and dtype, the worst relative error
(max abs error / max |truth|) forward and backward and the worst error/tolerance
ratio. Exit status 1 on any failure (or when nothing could be checked), else 0.
"""
from __future__ import annotations

import argparse
import math
import sys
import traceback
from dataclasses import dataclass

import torch

from . import reference as ref
from . import testing
from .bench import backends as _backends

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = ("summary_pool", "interaction", "gate_norm", "module")


def fused_op(name: str):
    """The fused op under test (indirection so tests can break it on purpose)."""
    return _backends.fused_op(name)


def probe_backends(device=None, only=None) -> dict:
    return _backends.probe_backends(device, only=only)


def fused_module(widths, d, backend, **kwargs):
    return _backends.fused_module(widths, d, backend, **kwargs)


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------
# summary_pool: (B, T, D, mask kind, non-contiguous)
SP_CASES = [
    (2, 8, 64, "none", False), (3, 7, 256, "partial", False), (1, 1, 1023, "none", False),
    (1, 1, 1500, "partial", False), (4, 50, 128, "partial", False), (2, 5, 35, "partial", True),
    (3, 512, 128, "partial", False), (2, 9, 3, "none", True), (3, 4, 1, "partial", False),
    (1, 6, 74, "all", False),
]
# interaction: (B, M, d, non-contiguous)
IT_CASES = [(2, 2, 64, False), (3, 3, 128, False), (1, 4, 35, False), (5, 3, 1, False), (2, 3, 256, True),
            (4, 5, 3, False), (1, 2, 1023, False)]
# gate_norm: (B, T, D, p, alpha, beta, non-contiguous)
GN_CASES = [
    (2, 8, 64, 0.0, 0.5, 0.2, False), (1, 1, 1023, 0.0, 0.5, 0.2, False), (3, 7, 256, 0.1, 0.5, 0.2, False),
    (1, 1, 1500, 0.0, 0.5, 0.2, False), (3, 512, 128, 0.0, 0.5, 0.2, False), (2, 5, 35, 0.1, 1.0, 0.0, False),
    (2, 3, 1, 0.0, 0.5, 0.2, False), (4, 50, 74, 0.5, 0.3, 0.7, False), (2, 9, 3, 0.1, 0.5, 0.2, True),
    (2, 6, 768, 0.0, 0.5, 1.0, True),
]
QUICK = {"summary_pool": [0, 1, 5, 9], "interaction": [0, 1, 4], "gate_norm": [0, 2, 5, 8]}


@dataclass
class Result:
    backend: str
    op: str
    dtype: str
    case: str
    direction: str  # "fwd" / "bwd"
    err: float
    rel: float
    tol: float
    ok: bool
    note: str = ""


def _rand(shape, gen, noncontig=False):
    """float64 CPU tensor of ``shape``; a transposed view (non-contiguous) when asked."""
    if noncontig and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64)
        return t.transpose(-1, -2)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _to(t, dtype, device, noncontig=False):
    """``t`` cast to dtype on device, keeping a non-contiguous layout when ``noncontig``."""
    if noncontig and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().to(device=device, dtype=dtype).transpose(-1, -2)
    return t.to(device=device, dtype=dtype)


def compare(fused, eager, truth, dtype):
    """(max abs err, relative err, tolerance, ok, note) of ``fused`` against ``truth``: the
    pass rule of :mod:`vgmr_fast.testing`, the one the tests apply."""
    c = testing.compare(fused, eager, truth, dtype)
    return c.err, c.rel, c.tol, c.ok, c.note


def _grads(outs, leaves, gouts):
    gs = torch.autograd.grad(outs, leaves, gouts, allow_unused=True)
    return list(gs)


# ---------------------------------------------------------------------------------------------
# Per-op cases: each yields Results
# ---------------------------------------------------------------------------------------------
NAMES = {
    ("summary_pool", "fwd"): ["mean", "max"], ("summary_pool", "bwd"): ["dh"],
    ("interaction", "fwd"): ["u"], ("interaction", "bwd"): ["ds"],
    ("gate_norm", "fwd"): ["y"], ("gate_norm", "bwd"): ["dzpre", "dbias_row", "dx", "dln_weight", "dln_bias"],
}


def _dtype_of(t, default):
    return t.dtype if isinstance(t, torch.Tensor) and t.dtype in testing.ATOL else default


def _check_outputs(res, backend, op, dname, case, direction, fused, eager, truth, dtype):
    names = NAMES.get((op, direction), [])
    for i, (f, e, t) in enumerate(zip(fused, eager, truth)):
        err, rel, tol, ok, note = compare(f, e, t, _dtype_of(f, dtype))
        name = names[i] if i < len(names) else f"output {i}"
        res.append(Result(backend, op, dname, case, direction, err, rel, tol, ok,
                          f"{name}: {note}" if note else name))


def case_summary_pool(backend, device, dname, c, gen, res):
    dtype = DTYPES[dname]
    B, T, D, mkind, nc = c
    case = f"B={B} T={T} D={D} mask={mkind}{' non-contig' if nc else ''}"
    h64 = _rand((B, T, D), gen, nc).to(dtype).double()  # values representable in dtype
    mask = None
    if mkind != "none":
        mask = torch.rand(B, T, generator=gen) > 0.35
        mask[:, 0] |= mkind == "partial"  # partial: at least one valid step per row ...
        if mkind == "partial" and B > 1:
            mask[-1] = False  # ... except one row with none (absent modality)
        if mkind == "all":
            mask[:] = False
    g64 = [torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype).double() for _ in range(2)]

    h_t = h64.clone().requires_grad_(True)
    truth = list(ref.summary_pool(h_t, mask))
    dtruth = _grads(truth, [h_t], g64)
    mk_dev = mask.to(device) if mask is not None else None
    h_e = _to(h64, dtype, device, nc).detach().requires_grad_(True)
    eager = list(ref.summary_pool(h_e, mk_dev))
    deager = _grads(eager, [h_e], [g.to(device, dtype) for g in g64])
    h_f = _to(h64, dtype, device, nc).detach().requires_grad_(True)
    fused = list(fused_op("summary_pool")(h_f, mk_dev, backend=backend))
    dfused = _grads(fused, [h_f], [g.to(device, dtype) for g in g64])
    _check_outputs(res, backend, "summary_pool", dname, case, "fwd", fused, eager, truth, dtype)
    _check_outputs(res, backend, "summary_pool", dname, case, "bwd", dfused, deager, dtruth, dtype)


def case_interaction(backend, device, dname, c, gen, res):
    dtype = DTYPES[dname]
    B, M, d, nc = c
    case = f"B={B} M={M} d={d}{' non-contig' if nc else ''}"
    s64 = _rand((B, M, d), gen, nc).to(dtype).double()
    if d > 1:
        s64[0, 1, 0] = s64[0, 0, 0]  # a zero discrepancy: d|x|/dx = 0 there
    g64 = torch.randn(B, M, (3 * M - 1) * d, generator=gen, dtype=torch.float64).to(dtype).double()
    s_t = s64.clone().requires_grad_(True)
    truth = [ref.interaction(s_t)]
    dtruth = _grads(truth, [s_t], [g64])
    s_e = _to(s64, dtype, device, nc).detach().requires_grad_(True)
    eager = [ref.interaction(s_e)]
    deager = _grads(eager, [s_e], [g64.to(device, dtype)])
    s_f = _to(s64, dtype, device, nc).detach().requires_grad_(True)
    fused = [fused_op("interaction")(s_f, backend=backend)]
    dfused = _grads(fused, [s_f], [g64.to(device, dtype)])
    _check_outputs(res, backend, "interaction", dname, case, "fwd", fused, eager, truth, dtype)
    _check_outputs(res, backend, "interaction", dname, case, "bwd", dfused, deager, dtruth, dtype)


def case_gate_norm(backend, device, dname, c, gen, res):
    dtype = DTYPES[dname]
    B, T, D, p, alpha, beta, nc = c
    seed = int(torch.randint(0, 2**40, (1,), generator=gen).item())
    case = f"B={B} T={T} D={D} p={p} a={alpha} b={beta}{' non-contig' if nc else ''}"
    z64 = (2 * _rand((B, T, D), gen, nc)).to(dtype).double()
    x64 = _rand((B, T, D), gen, nc).to(dtype).double()
    br64 = torch.randn(B, D, generator=gen, dtype=torch.float64).float().double()
    w64 = (1 + 0.2 * torch.randn(D, generator=gen, dtype=torch.float64)).float().double()
    b64 = (0.2 * torch.randn(D, generator=gen, dtype=torch.float64)).float().double()
    g64 = torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(dtype).double()
    kw = dict(alpha=alpha, beta=beta, p=p, seed=seed)

    leaves_t = [t.clone().requires_grad_(True) for t in (z64, br64, x64, w64, b64)]
    truth = [ref.gate_norm(*leaves_t, **kw)]
    dtruth = _grads(truth, leaves_t, [g64])

    def dev_leaves():
        z = _to(z64, dtype, device, nc).detach().requires_grad_(True)
        x = _to(x64, dtype, device, nc).detach().requires_grad_(True)
        br, w, b = (t.to(device, torch.float32).detach().requires_grad_(True) for t in (br64, w64, b64))
        return [z, br, x, w, b]

    le = dev_leaves()
    eager = [ref.gate_norm(*le, **kw)]
    deager = _grads(eager, le, [g64.to(device, dtype)])
    lf = dev_leaves()
    fused = [fused_op("gate_norm")(*lf, backend=backend, **kw)]
    dfused = _grads(fused, lf, [g64.to(device, dtype)])
    _check_outputs(res, backend, "gate_norm", dname, case, "fwd", fused, eager, truth, dtype)
    _check_outputs(res, backend, "gate_norm", dname, case, "bwd", dfused, deager, dtruth, dtype)


MODULE_CASES = [((35, 74, 20), 32, (7, 5, 9), 3), ((12, 5), 8, (1, 4), 2)]


def _reference_keyed_grads(mod, reference) -> list:
    """Parameter gradients in the reference's parameter order (the fused module stores its
    parameters stacked and maps their gradients with ``reference_grads()``)."""
    names = [n for n, _ in reference.named_parameters()]
    by_name = mod.reference_grads() if hasattr(mod, "reference_grads") else dict(
        (n, p.grad) for n, p in mod.named_parameters())
    return [by_name.get(n) for n in names]


def case_module(backend, device, dname, c, gen, res):
    """The fused module vs the reference module (same state_dict): eval and train (dropout) modes."""
    dtype = DTYPES[dname]
    widths, d, Ts, B = c
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen).item()))
    truth_mod = ref.VGMR(list(widths), d, dropout=0.1).double()
    eager_mod = ref.VGMR(list(widths), d, dropout=0.1).to(device, dtype)
    eager_mod.load_state_dict(truth_mod.state_dict())
    fused_mod = fused_module(list(widths), d, backend, dropout=0.1).to(device, dtype)
    fused_mod.load_state_dict(truth_mod.state_dict())
    xs64 = [torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(dtype).double() for T, D in zip(Ts, widths)]
    masks = [torch.rand(B, T, generator=gen) > 0.3 for T in Ts]
    for mk in masks:
        mk[:, 0] = True
    masks[0][-1] = False  # one sample without modality 0
    g64 = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype).double() for x in xs64]
    for mode in ("eval", "train"):
        case = f"widths={'/'.join(map(str, widths))} d={d} T={'/'.join(map(str, Ts))} B={B} {mode}"
        seed = int(torch.randint(0, 2**31, (1,), generator=gen).item())
        outs, grads = [], []
        for mod, dev, dt in ((truth_mod, "cpu", torch.float64), (eager_mod, device, dtype),
                             (fused_mod, device, dtype)):
            mod.train(mode == "train")
            mod.zero_grad(set_to_none=True)
            xs = [x.to(dev, dt) for x in xs64]
            mk = [m.to(dev) for m in masks]
            torch.manual_seed(seed)  # the dropout seeds come from torch's CPU generator
            y = mod(xs, mk)
            torch.autograd.backward(list(y), [g.to(dev, dt) for g in g64])
            outs.append(list(y))
            grads.append(_reference_keyed_grads(mod, truth_mod))
        _check_outputs(res, backend, "module", dname, case, "fwd", outs[2], outs[1], outs[0], dtype)
        names = [n for n, _ in truth_mod.named_parameters()]
        for n, gf, ge, gt in zip(names, grads[2], grads[1], grads[0]):
            if gt is None:
                continue
            err, rel, tol, ok, note = compare(gf, ge, gt, _dtype_of(gf, dtype))
            res.append(Result(backend, "module", dname, case, "bwd", err, rel, tol, ok,
                              f"grad {n}: {note}" if note else f"grad {n}"))


CASES = {"summary_pool": (case_summary_pool, SP_CASES), "interaction": (case_interaction, IT_CASES),
         "gate_norm": (case_gate_norm, GN_CASES), "module": (case_module, MODULE_CASES)}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def add_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", default=None,
                   help="comma-separated fused backends to check (default: every one that runs here)")
    p.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated dtypes")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--quick", action="store_true", help="a smaller grid")
    p.add_argument("--seed", type=int, default=20261123, help="seed of the random inputs")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case")


def _fmt(x: float) -> str:
    if x == math.inf:
        return "inf"
    return f"{x:.1e}"


def run_check(args) -> int:
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    dnames = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [o for o in ops if o not in OPS] + [d for d in dnames if d not in DTYPES]
    if bad:
        print(f"vgmr-fast check: unknown op(s)/dtype(s) {bad}", file=sys.stderr)
        return 2
    only = [b.strip() for b in args.backends.split(",")] if args.backends else None
    probed = probe_backends(None, only=only)
    runnable = [b for b, why in probed.items() if why is None]
    print(f"vgmr-fast check: torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    for b, why in probed.items():
        if why is not None:
            print(f"  skipping backend {b!r}: {why}")
    if not runnable:
        print("vgmr-fast check: FAIL -- no fused backend runs on this machine, nothing was checked "
              "(build the extension: pip install --no-build-isolation -e .)")
        return 1

    results: list[Result] = []
    errors: list[str] = []
    skipped: list[str] = []
    for backend in runnable:
        device = _backends.backend_device(backend)
        for op in ops:
            fn, cases = CASES[op]
            if args.quick and op in QUICK:
                cases = [cases[i] for i in QUICK[op]]
            op_dtypes = ["float32"] if op == "module" else dnames
            for dname in op_dtypes:
                gen = torch.Generator().manual_seed(args.seed)
                for c in cases:
                    try:
                        fn(backend, device, dname, c, gen, results)
                    except RuntimeError as exc:
                        if op == "module" and "not importable" in str(exc):
                            skipped.append(f"module/{backend}: {exc}")
                            break
                        errors.append(f"{backend} {op} {dname} {c}: {type(exc).__name__}: {exc}")
                        results.append(Result(backend, op, dname, str(c), "fwd", math.inf, math.inf, 0.0, False,
                                              f"raised {type(exc).__name__}"))
                        if args.verbose:
                            traceback.print_exc()
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"{backend} {op} {dname} {c}: {type(exc).__name__}: {exc}")
                        results.append(Result(backend, op, dname, str(c), "fwd", math.inf, math.inf, 0.0, False,
                                              f"raised {type(exc).__name__}"))
                        if args.verbose:
                            traceback.print_exc()
                else:
                    continue
                break  # module not importable: no other dtype either

    if args.verbose:
        for r in results:
            print(f"  {'ok  ' if r.ok else 'FAIL'} {r.backend} {r.op} {r.dtype} {r.direction} {r.case}: "
                  f"err {r.err:.2e} tol {r.tol:.2e} rel {r.rel:.2e} {r.note}")

    # table: worst figures per (backend, op, dtype)
    groups: dict = {}
    for r in results:
        groups.setdefault((r.backend, r.op, r.dtype), []).append(r)
    rows = []
    for (backend, op, dname), rs in groups.items():
        fwd = [r.rel for r in rs if r.direction == "fwd"]
        bwd = [r.rel for r in rs if r.direction == "bwd"]
        worst = max((r.err / r.tol if r.tol > 0 else (0.0 if r.err == 0 else math.inf)) for r in rs)
        ok = all(r.ok for r in rs)
        cases = len({r.case for r in rs})
        rows.append([backend, op, dname, str(cases), _fmt(max(fwd)) if fwd else "-", _fmt(max(bwd)) if bwd else "-",
                     f"{worst:.2f}" if worst != math.inf else "inf", "pass" if ok else "FAIL"])
    from .bench.report import table

    print()
    print(table(["backend", "op", "dtype", "cases", "worst rel err fwd", "worst rel err bwd", "err/tol", "result"],
                rows, ["l", "l", "l", "r", "r", "r", "r", "l"]))
    print("\nrel err = max |fused - truth| / max(max |truth|, 1e-3), truth = reference in float64; "
          f"err/tol <= 1 passes: {testing.RULE} (vgmr_fast/testing.py, the rule the tests apply)")
    for s in skipped:
        print(f"  skipped: {s}")
    failures = [r for r in results if not r.ok]
    if failures:
        print(f"\nFAIL: {len(failures)} of {len(results)} comparisons")
        for r in failures[:20]:
            print(f"  {r.backend} {r.op} {r.dtype} {r.direction} {r.case}: err {r.err:.2e} > tol {r.tol:.2e} {r.note}")
        for e in errors[:10]:
            print(f"  error: {e}")
        return 1
    print(f"\nPASS: {len(results)} comparisons, backends {', '.join(runnable)}")
    return 0
