"""Fidelity and cost of the cheaper value supervision: value_fraction 0.25 against 1.

One command (from the repository root):

    python -m vgmr_fast.bench.value_fraction [--seeds 0,1,2] [--epochs 10] [--n-train 1600] [--out DIR]

1. ``vgmr-fast train`` on the controlled benchmark, noisy setting, both backbones, methods
   ``none`` (bare backbone), ``vgmr`` (value fraction 1, the paper), ``vgmr@0.25`` (value
   fraction 0.25) and ``vgmr%4`` (value supervision every 4th step, same mean removal rows), the
   given seeds; its own ``results.md``/``results.json`` go to ``--out``.
2. A step-time comparison on one fixed batch, the methods' steps interleaved
   (``rounds`` rounds, median per method), so a busy shared machine slows all three alike.
3. ``benchmarks/results/<machine>-<date>-value-fraction.md`` (and ``.json``): accuracy and
   macro-F1 (mean ± std over seeds), the paired difference 0.25 − 1 per seed and its verdict
   (``vgmr_fast.train.stats.verdict``, the rule of ``vgmr-fast train``'s tables), the Table 4.4
   value/gate shifts under noise on the first modality (mean ± std over seeds), step times.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from .. import train as T
from ..train.grid import load_data
from ..train.loop import train_step
from ..train.stats import aggregate, fmt, verdict

METHODS = ["none", "vgmr", "vgmr@0.25", "vgmr%4"]


def _fmt(xs, nd=4, signed=False):
    return fmt(aggregate([float(x) for x in xs]), nd, signed)


def step_times(args, backbone: str, rounds: int):
    """Median seconds of one training step per method, on one batch, steps interleaved."""
    data = load_data(args, "noisy")
    batch = data["train"].batch(torch.arange(args.batch_size))
    models = {}
    for method in METHODS:
        model, _ = T.build_model(backbone, method, data["train"], data["val"], args, seed=0)
        models[method] = model
    return interleaved(models, batch, args, rounds)


def mosei_size_models(backbone: str):
    """The bench's MOSEI-like size (B 32, T 50, widths 768/74/35, VGMR d 128; Transformer d_model 176,
    2 layers, 4 heads: about the paper's 0.72M-parameter backbone), one model per method."""
    from .. import VGMR
    from ..models import Concat, Transformer

    widths = [768, 74, 35]
    models = {}
    for method in METHODS:
        torch.manual_seed(0)
        refiner = None if method == "none" else VGMR(widths, d=128, dropout=0.1)
        if backbone == "transformer":
            models[method] = Transformer(widths, 2, d_model=176, nhead=4, num_layers=2, refiner=refiner)
        else:
            models[method] = Concat(widths, 2, hidden=176, refiner=refiner)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 50, D, generator=g) for D in widths]
    masks = [torch.arange(50).unsqueeze(0) < torch.randint(25, 51, (32, 1), generator=g) for _ in widths]
    return models, (xs, masks, torch.randint(0, 2, (32,), generator=g))


def interleaved(models, batch, args, rounds: int):
    """Median over rounds of the mean step time of 4 consecutive steps, methods interleaved."""
    xs, masks, y = batch
    models = {m: (model.train(), torch.optim.AdamW(model.parameters(), lr=args.lr)) for m, model in models.items()}
    times = {m: [] for m in METHODS}
    for r in range(rounds + 1):
        for method, (model, opt) in models.items():
            t0 = time.perf_counter()
            for k in range(4):  # 4 steps: one period of vgmr%4
                train_step(model, method, xs, masks, y, opt, None, 0, args, step=4 * r + k)
            if r >= 1:  # the warm-up round is not timed
                times[method].append((time.perf_counter() - t0) / 4)
    return {m: statistics.median(v) for m, v in times.items()}


def _step_table(steps, digits: int) -> list:
    """Markdown rows: each backbone's step time per method, over the bare backbone and over vgmr."""
    L = ["| backbone | method | step ms | × bare backbone | × vgmr |", "|---|---|---|---|---|"]
    for b, st in steps.items():
        for m in METHODS:
            L.append(f"| {b} | {m} | {1e3 * st[m]:.{digits}f} | {st[m] / st['none']:.2f} | {st[m] / st['vgmr']:.2f} |")
    return L + [""]


def _machine() -> dict:
    """The machine the results come from: a file label and a phrase (never a fixed guess)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return {"label": name.lower().replace(" ", "-"), "text": name}
    cores = os.cpu_count() or 0
    return {"label": f"cpu-{cores}core", "text": f"{platform.processor() or platform.machine()} CPU, {cores} cores"}


# --------------------------------------------------------------- fidelity of named variants
#: name -> (``vgmr-fast train`` method, extra ``vgmr-fast train`` arguments)
VARIANTS = {
    "vgmr": ("vgmr", []),
    "vgmr@0.25": ("vgmr@0.25", []),
    "vgmr%4": ("vgmr%4", []),
    "vgmr@0.25%4": ("vgmr@0.25%4", []),
    "rank16": ("vgmr", ["--gate-rank", "16"]),
    "rank64": ("vgmr", ["--gate-rank", "64"]),
}


def _full_rank_everywhere(variant: str, setting: str) -> bool:
    """Whether a gate-rank variant leaves every modality of ``setting`` full rank (the same model as
    full rank, so it is not run again)."""
    from vgmr_fast.data.synthetic import PRESETS, BenchmarkConfig
    from vgmr_fast.inputs import parse_gate_rank

    extra = VARIANTS[variant][1]
    if "--gate-rank" not in extra:
        return False
    widths = BenchmarkConfig(**PRESETS[setting]).widths
    return all(r is None for r in parse_gate_rank(int(extra[extra.index("--gate-rank") + 1]), None, widths))


def fidelity(a) -> None:
    """``--fidelity SETTING:V1,V2,...`` (repeatable): test accuracy and macro-F1 of each named variant
    (``VARIANTS``) on the controlled task, both backbones, paired Δ per seed against ``--baseline``."""
    base_args = ["--backbones", "concat,transformer", "--seeds", a.seeds, "--epochs", str(a.epochs),
                 "--n-train", str(a.n_train), "--no-progress", "--noise-ratios", "0", "--noise-weights", "0",
                 "--noise-seeds", "1", "--cosine-points", "1"]
    plan = []  # (setting, [variant names], extra args): one train grid per setting and extra args
    for spec in a.fidelity:
        setting, _, names = spec.partition(":")
        names = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown or not names:
            raise SystemExit(f"--fidelity {spec!r}: expected SETTING:VARIANT,... with variants from {list(VARIANTS)}")
        groups: dict = {}
        for n in [a.baseline] + [n for n in names if n != a.baseline]:
            if not _full_rank_everywhere(n, setting):
                groups.setdefault(tuple(VARIANTS[n][1]), []).append(n)
        plan += [(setting, ns, list(extra)) for extra, ns in groups.items()]
    date = datetime.date.today().isoformat()
    machine = _machine()
    stem = os.path.join(a.results, f"{machine['label']}-{date}-fidelity")
    runs, walls = [], []
    for path in a.merge:  # runs of earlier invocations (e.g. one process per setting), shown together
        with open(path) as f:
            earlier = json.load(f)
        runs += earlier["runs"]
        walls += earlier["grids"]
    t_all = time.time()
    for setting, names, extra in ([] if a.only_merge else plan):
        t0 = time.time()
        out = os.path.join(a.out, f"{setting}-{'-'.join(extra[1::2]) or 'full'}")
        targs = T.add_train_arguments(argparse.ArgumentParser()).parse_args(
            base_args + ["--settings", setting, "--methods", ",".join(VARIANTS[n][0] for n in names), "--out", out]
            + extra)
        res = T.train_grid(targs)
        for n in names:
            runs += [dict(r, variant=n) for r in res["runs"] if r["method"] == VARIANTS[n][0]]
        walls.append({"setting": setting, "variants": names, "seconds": time.time() - t0})
        _write_fidelity(stem, a, runs, walls, targs, machine, date, time.time() - t_all)
    if a.only_merge:
        targs = T.add_train_arguments(argparse.ArgumentParser()).parse_args(base_args)
        _write_fidelity(stem, a, runs, walls, targs, machine, date, sum(w["seconds"] for w in walls))


def _write_fidelity(stem, a, runs, walls, targs, machine, date, wall_s) -> None:
    def per_seed(setting, backbone, variant):
        if _full_rank_everywhere(variant, setting):
            variant = a.baseline
        return {r["seed"]: r for r in runs
                if r["setting"] == setting and r["backbone"] == backbone and r["variant"] == variant}

    L = [f"# Fidelity of cheaper VGMR variants on the controlled task ({date})\n",
         f"Command: `python -m vgmr_fast.bench.value_fraction --seeds {a.seeds} --epochs {a.epochs} --n-train {a.n_train} "
         + " ".join(f"--fidelity {f}" for f in a.fidelity) + "`"
         + (f" (the grids ran as {len(a.merge)} separate invocations, merged with `--merge ... --only-merge`)"
            if a.merge else "") + f" ({machine['text']}; torch {torch.__version__}, "
         f"1 thread). `vgmr-fast train` per variant: n_train {a.n_train}, n_val {targs.n_val}, n_test {targs.n_test}, "
         f"{a.epochs} epochs, batch {targs.batch_size}, d_model {targs.d_model}, VGMR d {targs.vgmr_d}, seeds {a.seeds}; "
         f"best-validation checkpoint on test. Train grids took {wall_s:.0f} s of wall time together.\n",
         "Variants: " + "; ".join(f"`{n}` = method `{m}`" + (f" with `{' '.join(x)}`" if x else "")
                                  for n, (m, x) in VARIANTS.items()) + ". Full-rank variants run the fused "
         "`vgmr_fast.VGMR`, `--gate-rank` ones the reference `vgmr_fast.reference.VGMR` (same initial draws "
         "order, same Philox dropout stream). A rank variant that leaves every modality of a setting full rank "
         "(every D_m <= r) is the baseline model itself and is not run again (marked =).\n",
         "| setting | backbone | variant | accuracy | macro-F1 | paired Δacc vs " + a.baseline + " | paired ΔF1 |",
         "|---|---|---|---|---|---|---|"]
    rows = []
    for spec in a.fidelity:
        setting, _, names = spec.partition(":")
        names = [a.baseline] + [n.strip() for n in names.split(",") if n.strip() and n.strip() != a.baseline]
        for b in ("concat", "transformer"):
            full = per_seed(setting, b, a.baseline)
            for n in names:
                rs = per_seed(setting, b, n)
                seeds = sorted(set(rs) & set(full))
                if not seeds:
                    L.append(f"| {setting} | {b} | {n} | not run yet | | | |")
                    continue
                acc = [rs[s]["test"]["accuracy"] for s in seeds]
                f1 = [rs[s]["test"]["macro_f1"] for s in seeds]
                d_acc = [rs[s]["test"]["accuracy"] - full[s]["test"]["accuracy"] for s in seeds]
                d_f1 = [rs[s]["test"]["macro_f1"] - full[s]["test"]["macro_f1"] for s in seeds]
                same = _full_rank_everywhere(n, setting)
                paired = n != a.baseline and not same
                L.append(f"| {setting} | {b} | {n}{' (= ' + a.baseline + ')' if same else ''} | {_fmt(acc)} | "
                         f"{_fmt(f1)} | {_fmt(d_acc, signed=True) if paired else '–'} | "
                         f"{_fmt(d_f1, signed=True) if paired else '–'} |")
                rows.append({"setting": setting, "backbone": b, "variant": n, "seeds": seeds, "accuracy": acc,
                             "macro_f1": f1, "delta_accuracy": d_acc, "delta_macro_f1": d_f1,
                             "same_as_baseline": same,
                             "step_seconds": [rs[s]["history"]["step_seconds"] for s in seeds]})
    L += ["", "Mean optimisation-step time inside the grid (not interleaved; the machine is shared):\n",
          "| setting | backbone | variant | step ms |", "|---|---|---|---|"]
    L += [f"| {r['setting']} | {r['backbone']} | {r['variant']} | {1e3 * statistics.mean(r['step_seconds']):.1f} |"
          for r in rows if not r["same_as_baseline"]]
    L += ["", "Wall time per train grid: " + "; ".join(f"{w['setting']} {','.join(w['variants'])}: {w['seconds']:.0f} s"
                                                    for w in walls), ""]
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(L))
    keep = ("setting", "backbone", "method", "variant", "seed", "test", "history", "train_seconds")
    with open(stem + ".json", "w") as f:
        json.dump({"date": date, "machine": machine, "config": vars(a), "wall_seconds": wall_s, "grids": walls,
                   "rows": rows, "runs": [{k: r[k] for k in keep if k in r} for r in runs]}, f, indent=1)
    print("\n".join(L), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vgmr_fast.bench.value_fraction", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--n-train", type=int, default=1600)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the step-time comparison")
    p.add_argument("--mosei-rounds", type=int, default=6, help="rounds of the MOSEI-size step-time comparison")
    p.add_argument("--out", default="vgmr_value_fraction_out", help="vgmr-fast train's output directory")
    p.add_argument("--results", default=os.path.join("benchmarks", "results"),
                   help="folder of the written .md/.json (default: benchmarks/results of the current directory)")
    p.add_argument("--fidelity", action="append", default=[], metavar="SETTING:VARIANT,...",
                   help=f"instead of the value-fraction study: accuracy and macro-F1 of named variants "
                        f"({', '.join(VARIANTS).replace('%', '%%')}) on a setting, paired against --baseline (repeatable)")
    p.add_argument("--baseline", default="vgmr", choices=list(VARIANTS))
    p.add_argument("--merge", action="append", default=[], metavar="JSON",
                   help="with --fidelity: also show the runs of an earlier --fidelity JSON (its settings then "
                        "need no --fidelity grid of their own: name them with VARIANT lists run there)")
    p.add_argument("--only-merge", action="store_true", help="with --merge: run nothing, only write the tables")
    a = p.parse_args(argv)
    if a.fidelity:
        return fidelity(a)
    targs = T.add_train_arguments(argparse.ArgumentParser()).parse_args(
        ["--settings", "noisy", "--backbones", "concat,transformer", "--methods", ",".join(METHODS),
         "--seeds", a.seeds, "--epochs", str(a.epochs), "--n-train", str(a.n_train), "--out", a.out,
         "--no-progress"])
    t0 = time.time()
    res = T.train_grid(targs)
    grid_s = time.time() - t0
    torch.set_num_threads(1)
    steps = {b: step_times(targs, b, a.rounds) for b in ("concat", "transformer")}
    steps_mosei = {b: interleaved(*mosei_size_models(b), targs, a.mosei_rounds) for b in ("concat", "transformer")}
    runs = res["runs"]

    def per_seed(backbone, method):
        return {r["seed"]: r for r in runs if r["backbone"] == backbone and r["method"] == method}

    date = datetime.date.today().isoformat()
    machine = _machine()
    L = [f"# Value supervision on a fraction of the batch: fidelity and cost ({date})\n",
         f"Command: `python -m vgmr_fast.bench.value_fraction --seeds {a.seeds} --epochs {a.epochs} --n-train {a.n_train}` "
         f"({machine['text']}; torch {torch.__version__}, 1 thread). "
         f"`vgmr-fast train` grid: noisy setting, n_train {a.n_train}, n_val {targs.n_val}, n_test {targs.n_test}, "
         f"{a.epochs} epochs, batch {targs.batch_size}, fused VGMR (backend `{targs.backend}`, Philox dropout), "
         f"seeds {a.seeds}; best-validation checkpoint on test. Grid wall time {grid_s:.0f} s.\n",
         "`vgmr` = the paper's objective (exact removal targets for every sample); `vgmr@0.25` = exact "
         "targets and L_value for a random ⌈0.25 B⌉ samples per step (removal pass 4× fewer rows); "
         "`vgmr%4` = the paper's value supervision on every 4th step only (same mean removal rows).\n",
         "## Test accuracy and macro-F1 (mean ± std over seeds)\n",
         "| backbone | method | accuracy | macro-F1 | paired Δacc vs vgmr | paired ΔF1 vs vgmr | verdict (acc) |",
         "|---|---|---|---|---|---|---|"]
    out = {"date": date, "grid_seconds": grid_s, "config": vars(a), "step_seconds": steps,
           "step_seconds_mosei_size": steps_mosei, "rows": []}
    for b in ("concat", "transformer"):
        full = per_seed(b, "vgmr")
        for m in METHODS:
            rs = per_seed(b, m)
            acc = [rs[s]["test"]["accuracy"] for s in sorted(rs)]
            f1 = [rs[s]["test"]["macro_f1"] for s in sorted(rs)]
            d_acc = [rs[s]["test"]["accuracy"] - full[s]["test"]["accuracy"] for s in sorted(rs)]
            d_f1 = [rs[s]["test"]["macro_f1"] - full[s]["test"]["macro_f1"] for s in sorted(rs)]
            paired = m != "vgmr"
            says = f"{verdict(aggregate(d_acc))} vgmr" if paired else "–"
            L.append(f"| {b} | {m} | {_fmt(acc)} | {_fmt(f1)} | {_fmt(d_acc, signed=True) if paired else '–'} | "
                     f"{_fmt(d_f1, signed=True) if paired else '–'} | {says} |")
            out["rows"].append({"backbone": b, "method": m, "seeds": sorted(rs), "accuracy": acc, "macro_f1": f1})
    L.append("")
    L.append("## Table 4.4 statistics: shift under noise (noisy − clean test split), mean ± std over seeds\n")
    L.append(f"30 % of the first modality's steps replaced by noise ({targs.gate_noise_weight:g} × train std). "
             "Δ of the mean global value g, mean channel value v̄ and mean gate G per modality.\n")
    L.append("| backbone | method | modality | Δ global value | Δ channel value | Δ gate |")
    L.append("|---|---|---|---|---|---|")
    for b in ("concat", "transformer"):
        for m in METHODS[1:]:
            rs = per_seed(b, m)
            names = list(rs[min(rs)]["value_gate"]["delta"])
            target = rs[min(rs)]["value_gate"]["target"]
            for n in names:
                cells = []
                for k in ("global_value", "channel_value", "gate"):
                    vals = [rs[s]["value_gate"]["delta"][n].get(k) for s in sorted(rs)]
                    cells.append("–" if None in vals else _fmt(vals, 3, signed=True))
                L.append(f"| {b} | {m} | {n}{' (corrupted)' if n == target else ''} | " + " | ".join(cells) + " |")
    L.append("")
    L.append(f"## Training-step time (one batch of {targs.batch_size}, the methods' steps interleaved, median over "
             f"{a.rounds} rounds of 4 consecutive steps per method, so `vgmr%4` has its removal pass once a round)\n")
    L += _step_table(steps, 2)
    L.append("At the bench's MOSEI-like size (B 32, T 50, widths 768/74/35, masks, VGMR d 128, dropout 0.1; "
             "Transformer d_model 176, 2 layers, 4 heads; Concat hidden 176; 2 classes), same protocol, median "
             f"over {a.mosei_rounds} rounds:\n")
    L += _step_table(steps_mosei, 1)
    L.append("Mean step time inside the grid (every step of every seed, not interleaved: other jobs on the "
             "shared machine weigh on each method differently, so these ratios are noisier):\n")
    L.append("| backbone | method | step ms | × bare |")
    L.append("|---|---|---|---|")
    for row in res["summary"]:
        base = next(r for r in res["summary"] if r["backbone"] == row["backbone"] and r["method"] == "none")
        L.append(f"| {row['backbone']} | {row['method']} | {1e3 * row['step_seconds']['mean']:.2f} | "
                 f"{row['step_seconds']['mean'] / base['step_seconds']['mean']:.2f} |")
    L.append("")
    os.makedirs(a.results, exist_ok=True)
    stem = os.path.join(a.results, f"{machine['label']}-{date}-value-fraction")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(L))
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=1)
    print("\n".join(L))
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
