"""The method × seed grid: data, every run's training and analyses, the first seed's analyses,
the summaries, the plots, and the written results."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..analysis import diagnostics as A
from ..balance.decision import decision_diagnostics, plot_decision_diagnostics, summarize_diagnostics
from ..data import MultimodalDataset, load_cremad, load_mosei, load_mosi, make_benchmark
from .distributed import init_distributed, rank_and_size
from .loop import build_model, core_of, is_vgmr, train_one
from .methods import BACKBONES, parse_method
from .probes import probe_reference, probe_run, probe_summary, probing, unimodal_models
from .report import markdown
from .stats import aggregate


def load_data(args, setting: str) -> Dict[str, MultimodalDataset]:
    if args.data == "synthetic":
        return make_benchmark(setting, seed=args.data_seed, n_train=args.n_train, n_val=args.n_val,
                              n_test=args.n_test, num_classes=args.num_classes)
    kind, _, path = args.data.partition(":")
    loaders = {"mosi": load_mosi, "mosei": load_mosei, "cremad": load_cremad}
    if kind not in loaders or not path:
        raise ValueError(f"--data must be 'synthetic' or one of mosi:PATH, mosei:PATH, cremad:PATH; got {args.data!r}")
    return loaders[kind](path)


def _apply_quick(args):
    if getattr(args, "quick", False):
        args.n_train, args.n_val, args.n_test = 96, 48, 48
        args.epochs = min(args.epochs, 2)
        args.batch_size = 32
        args.noise_ratios = [0.0, 0.5]
        args.noise_weights = [0.0, 2.0]
        args.noise_seeds = 1
        args.cosine_points = 1
    return args


def _check_objective_arguments(args) -> None:
    from ..objective import value_rows

    try:
        value_rows(1, getattr(args, "value_fraction", 1.0))
    except ValueError as exc:
        raise ValueError(f"--value-fraction: {exc}") from None
    every = getattr(args, "value_every", 1)
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"--value-every: expected an int >= 1, got {every!r}")


def train_grid(args) -> Dict:
    """Run the whole grid described by ``args`` (see :func:`add_train_arguments`), write
    ``results.md``, ``results.json`` and the plots to ``args.out``, and return the results dict."""
    args = _apply_quick(args)
    for m in args.methods:
        parse_method(m)
    for b in args.backbones:
        if b not in BACKBONES:
            raise ValueError(f"--backbones: unknown backbone {b!r} (choose from {BACKBONES})")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if not args.seeds:
        raise ValueError("--seeds must name at least one seed")
    _check_objective_arguments(args)
    init_distributed(args)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _train_grid(args)
    finally:
        torch.set_num_threads(threads_before)  # leave the caller's process as it was


def _train_grid(args) -> Dict:
    from tqdm.auto import tqdm

    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    settings = args.settings if args.data == "synthetic" else [args.data.split(":")[0]]
    datasets = {s: load_data(args, s) for s in settings}
    n_runs = len(settings) * len(args.backbones) * len(args.methods) * len(args.seeds)
    total_steps = sum(math.ceil(len(datasets[s]["train"]) / args.batch_size) * args.epochs
                      for s in settings) * len(args.backbones) * len(args.methods) * len(args.seeds)
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=args.no_progress, dynamic_ncols=True)
    runs: List[Dict] = []
    plots: List[str] = []
    budget_cache: Dict = {}
    first_models: Dict[Tuple[str, str, str], nn.Module] = {}
    unimodal: Dict = {}  # models trained on one modality alone, shared by the probes and the analyses
    for setting in settings:
        data = datasets[setting]
        stats = data["train"].feature_stats()
        noise_seeds = list(range(max(1, args.noise_seeds)))
        for backbone in args.backbones:
            for method in args.methods:
                for seed in args.seeds:
                    bar.set_description(f"{setting}/{backbone}/{method}/s{seed}")
                    t0 = time.time()
                    model, info = build_model(backbone, method, data["train"], data["val"], args, seed, budget_cache)
                    hist = train_one(model, method, data, args, seed, bar)
                    t_train = time.time() - t0
                    test = A.evaluate(model, data["test"])
                    removal = A.modality_removal(model, data["test"])
                    sweep_r = A.noise_sweep(model, data["test"], stats, args.noise_ratios, "ratio",
                                            args.noise_weight, noise_seeds)
                    sweep_w = A.noise_sweep(model, data["test"], stats, args.noise_weights, "weight",
                                            args.noise_ratio, noise_seeds)
                    run = {"setting": setting, "backbone": backbone, "method": method, "seed": seed,
                           "test": test, "removal": removal, "noise_ratio": sweep_r, "noise_weight": sweep_w,
                           "history": hist, "train_seconds": t_train, **info}
                    if seed == args.seeds[0]:
                        first_models[(setting, backbone, method)] = model
                    if is_vgmr(model):  # every seed: cheap, and comparisons of methods need the spread
                        run["value_gate"] = A.value_gate_shift(model, data["test"], target=0, ratio=0.3,
                                                               weight=args.gate_noise_weight, stats=stats,
                                                               seed=seed)
                    runs.append(run)
                    if probing(args, setting):
                        run["probe"] = probe_run(model, data, probe_reference(unimodal, setting, data, backbone,
                                                                               args, seed))
    bar.close()
    analyses = _first_seed_analyses(args, datasets, first_models, unimodal, plots)
    summary = _summarize(args, runs)
    _plots(args, runs, summary, plots)
    elapsed = time.time() - t_start
    result = {"config": {k: v for k, v in vars(args).items() if not callable(v) and not k.startswith("_")},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": torch.get_num_threads(), "machine": platform.machine(),
                              "world_size": rank_and_size()[1]},
              "elapsed_seconds": elapsed, "n_runs": n_runs, "summary": summary, "analyses": analyses,
              "probes": probe_summary(runs), "runs": runs, "plots": [os.path.basename(p) for p in plots]}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(args, summary, analyses, runs, elapsed, plots))
    if not args.no_progress:
        print(f"wrote {os.path.join(args.out, 'results.md')} ({elapsed:.0f} s)")
    return result


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _first_seed_analyses(args, datasets, models, unimodal, plots) -> Dict:
    """Decision-layer diagnostics and refinement heatmaps on the first seed's models."""
    out: Dict = {"decision": {}, "refinement": {}}
    seed = args.seeds[0]
    for setting, data in datasets.items():
        test = data["test"]
        xs, masks, y = test.full()
        # decision layer: every concat model, and unimodal concat models for comparison
        concat_models = {meth: mdl for (s, b, meth), mdl in models.items() if s == setting and b == "concat"}
        if concat_models:
            uni_diags = {}
            uni_rows = []
            for name, (umodel, usplits) in zip(test.names, unimodal_models(unimodal, setting, data, "concat", args,
                                                                           seed)):
                uxs, umasks, uy = usplits["test"].full()
                with torch.no_grad():
                    ud = decision_diagnostics(umodel, umodel.encode(uxs, umasks), uy, [name])
                uni_diags[name] = ud
                uni_rows.append({"modality": name, "accuracy": float(ud["accuracy"][0]),
                                 "weight_norm": float(ud["weight_norm"][0]),
                                 "feature_norm": float(ud["feature_norm"][0].mean())})
            out["decision"][setting] = {"unimodal": uni_rows, "multimodal": {}}
            for meth, mdl in concat_models.items():
                mdl.eval()
                with torch.no_grad():
                    diag = decision_diagnostics(mdl, mdl.encode(xs, masks), y, test.names)
                out["decision"][setting]["multimodal"][meth] = {"mode": diag["mode"],
                                                                "rows": summarize_diagnostics(diag)}
                p = os.path.join(args.out, f"decision_{_safe(setting)}_concat_{_safe(meth)}.png")
                plots.append(plot_decision_diagnostics(
                    diag, p, uni_diags if diag["mode"] == "linear" else None,
                    title=f"decision layer: {setting}, concat, {meth}"))
        # refinement difference for VGMR models
        for (s, b, meth), mdl in models.items():
            if s != setting or not is_vgmr(mdl):
                continue
            ref = core_of(mdl).refiner
            # show a sample whose inputs were corrupted, when the data records one
            corrupted = test.meta.get("corrupted")
            idx = 0
            if isinstance(corrupted, torch.Tensor) and corrupted.any():
                idx = int(corrupted.any(1).nonzero()[0])
            one = test.batch(torch.tensor([idx]))
            res = A.refinement_difference(ref, one[0], one[1])
            split_supp = A.refinement_over_split(core_of(mdl), test)
            out["refinement"][f"{s}/{b}/{meth}"] = {
                "names": test.names, "sample_index": idx, "sample": res["suppression"][0].tolist(),
                "mean": split_supp.mean(0).tolist()}
            p = os.path.join(args.out, f"refinement_{_safe(s)}_{_safe(b)}_{_safe(meth)}.png")
            plots.append(A.plot_refinement([d[0] for d in res["diff"]], test.names, p, res["suppression"][0],
                                           split_supp.mean(0), title=f"VGMR refinement: {s}, {b}, {meth}, test sample {idx}"))
    return out


def _summarize(args, runs: List[Dict]) -> List[Dict]:
    groups: Dict[Tuple[str, str, str], List[Dict]] = {}
    for r in runs:
        groups.setdefault((r["setting"], r["backbone"], r["method"]), []).append(r)
    rows = []
    for (setting, backbone, method), rs in groups.items():
        row = {"setting": setting, "backbone": backbone, "method": method, "seeds": [r["seed"] for r in rs],
               "accuracy": aggregate([r["test"]["accuracy"] for r in rs]),
               "macro_f1": aggregate([r["test"]["macro_f1"] for r in rs]),
               "train_seconds": aggregate([r["train_seconds"] for r in rs]),
               "step_seconds": aggregate([r["history"]["step_seconds"] for r in rs]),
               "best_epoch": [r["history"]["best_epoch"] for r in rs]}
        row["removal"] = {}
        for j, cond in enumerate(rs[0]["removal"]):
            if cond["removed"] is None:
                continue
            row["removal"][cond["removed"]] = {
                "accuracy": aggregate([r["removal"][j]["accuracy"] for r in rs]),
                "delta": aggregate([r["removal"][j]["delta"] for r in rs])}
        for key in ("noise_ratio", "noise_weight"):
            vals = rs[0][key]["values"]
            per_point = [[a for r in rs for a in r[key]["accuracy"][k]] for k in range(len(vals))]
            aggs = [aggregate(p) for p in per_point]
            row[key] = {"values": vals, "vary": rs[0][key]["vary"], "fixed": rs[0][key]["fixed"],
                        "mean": [a["mean"] for a in aggs], "std": [a["std"] if a["n"] > 1 else 0.0 for a in aggs]}
        cos = [c for r in rs for c in r["history"]["cosine"] if c == c]
        row["cosine"] = {"mean": aggregate(cos)["mean"], "std": aggregate(cos)["std"],
                         "mean_abs": aggregate([abs(c) for c in cos])["mean"],
                         "step_std": aggregate([abs(b - a) for r in rs for a, b in
                                           zip(r["history"]["cosine"], r["history"]["cosine"][1:])])["mean"]}
        rows.append(row)
    return rows


def _plots(args, runs, summary, plots):
    keys = sorted({(r["setting"], r["backbone"]) for r in summary})
    for setting, backbone in keys:
        rows = [r for r in summary if r["setting"] == setting and r["backbone"] == backbone]
        tag = f"{_safe(setting)}_{_safe(backbone)}"
        for key in ("noise_ratio", "noise_weight"):
            curves = {r["method"]: r[key] for r in rows}
            fixed = rows[0][key]["fixed"]
            other = "weight" if key == "noise_ratio" else "ratio"
            plots.append(A.plot_noise_sweep(curves, os.path.join(args.out, f"{key}_{tag}.png"),
                                            title=f"{setting}, {backbone} ({other} {fixed:g})"))
        seed0 = args.seeds[0]
        curves = {r["method"]: (r["history"]["cos_step"], r["history"]["cosine"]) for r in runs
                  if r["setting"] == setting and r["backbone"] == backbone and r["seed"] == seed0
                  and r["history"]["cosine"]}
        if curves:
            plots.append(A.plot_curves(curves, os.path.join(args.out, f"grad_cosine_{tag}.png"), "epoch",
                                       "cos(∇L_all, ∇L_first-modality)", f"gradient cosine: {setting}, {backbone}",
                                       hline=0.0))
        curves = {}
        for r in runs:
            if r["setting"] == setting and r["backbone"] == backbone and r["seed"] == seed0:
                ep = list(range(1, len(r["history"]["val_loss"]) + 1))
                curves[f"{r['method']} val"] = (ep, r["history"]["val_loss"])
        plots.append(A.plot_curves(curves, os.path.join(args.out, f"val_loss_{tag}.png"), "epoch",
                                   "validation loss", f"validation loss: {setting}, {backbone}"))


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s)
