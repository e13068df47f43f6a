"""The markdown report of a training grid (``results.md``)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from .probes import probe_summary
from .stats import aggregate, fmt, verdict


def markdown(args, summary, analyses, runs, elapsed, plots) -> str:
    L: List[str] = []
    L.append("# vgmr-fast train: results\n")
    command = _command_line()
    if command:
        L.append(f"Produced by: `{command}`\n")
    seeds = ",".join(map(str, args.seeds))
    L.append(f"Data: `{args.data}`; settings {', '.join(args.settings) if args.data == 'synthetic' else '-'}; "
             f"seeds {seeds}; {args.epochs} epochs, batch {args.batch_size}, "
             f"{getattr(args, 'optimizer', 'adamw')} lr {args.lr}; n_train/val/test {args.n_train}/{args.n_val}/"
             f"{args.n_test}; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; wall time {elapsed:.0f} s. "
             "Test metrics of the best-validation checkpoint; mean ± std over seeds where there are several.\n")
    names = None
    for r in runs:
        names = [c["removed"] for c in r["removal"] if c["removed"]]
        break
    names = names or []
    L.append("## Accuracy, macro-F1, modality removal, noise robustness\n")
    rr = args.noise_ratios
    hi_r = max(rr) if rr else None
    hi_w = max(args.noise_weights) if args.noise_weights else None
    head = ["setting", "backbone", "method", "acc", "macro-F1"] + [f"w/o {n} (Δ)" for n in names]
    head += [f"acc @ noise ratio {hi_r:g}", f"acc @ noise weight {hi_w:g}", "train s"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for r in summary:
        cells = [r["setting"], r["backbone"], r["method"], fmt(r["accuracy"]), fmt(r["macro_f1"])]
        for n in names:
            rm = r["removal"].get(n)
            cells.append("–" if rm is None else f"{rm['accuracy']['mean']:.4f} ({rm['delta']['mean']:+.4f})")
        nr, nw = r["noise_ratio"], r["noise_weight"]
        cells.append(f"{nr['mean'][nr['values'].index(hi_r)]:.4f}" if hi_r is not None else "–")
        cells.append(f"{nw['mean'][nw['values'].index(hi_w)]:.4f}" if hi_w is not None else "–")
        cells.append(f"{r['train_seconds']['mean']:.1f}")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.extend(_probe_markdown(runs))
    L.append("## VGMR vs. the bare backbone (\"Concat\" in the paper's tables)\n")
    L.append("Paired by training seed (same data, same seed): Δ = VGMR − bare backbone.\n")
    for setting in dict.fromkeys(r["setting"] for r in summary):
        for backbone in dict.fromkeys(r["backbone"] for r in summary):
            def per_seed(method):
                return {r["seed"]: r for r in runs if r["setting"] == setting and r["backbone"] == backbone
                        and r["method"] == method}
            base, vg = per_seed("none"), per_seed("vgmr")
            seeds = sorted(set(base) & set(vg))
            if not seeds:
                continue
            d_acc = [vg[s]["test"]["accuracy"] - base[s]["test"]["accuracy"] for s in seeds]
            d_f1 = [vg[s]["test"]["macro_f1"] - base[s]["test"]["macro_f1"] for s in seeds]
            d_noise = [sum(v - b for v, b in zip(sum(vg[s]["noise_ratio"]["accuracy"], []),
                                                 sum(base[s]["noise_ratio"]["accuracy"], [])))
                       / max(1, len(sum(base[s]["noise_ratio"]["accuracy"], []))) for s in seeds]
            a, f, nz = aggregate(d_acc), aggregate(d_f1), aggregate(d_noise)
            wins = sum(d > 0 for d in d_acc)
            L.append(f"- {setting}, {backbone}: VGMR {verdict(a)} the bare backbone: Δacc {fmt(a, signed=True)}, "
                     f"ΔF1 {fmt(f, signed=True)}, better on {wins}/{len(seeds)} seeds; "
                     f"mean Δacc over the noise-ratio sweep {fmt(nz, signed=True)}.")
    L.append("")
    L.append("## Noise-robustness sweeps (test accuracy, mean over training seeds × noise draws)\n")
    for key, label in (("noise_ratio", "ratio"), ("noise_weight", "weight")):
        vals = summary[0][key]["values"] if summary else []
        fixed = summary[0][key]["fixed"] if summary else 0
        other = "weight" if label == "ratio" else "ratio"
        L.append(f"Noise {label} sweep ({other} {fixed:g}, all modalities, per-feature train mean/std):\n")
        L.append("| setting | backbone | method | " + " | ".join(f"{v:g}" for v in vals) + " |")
        L.append("|" + "---|" * (3 + len(vals)))
        for r in summary:
            L.append(f"| {r['setting']} | {r['backbone']} | {r['method']} | "
                     + " | ".join(f"{m:.4f}" for m in r[key]["mean"]) + " |")
        L.append("")
    vg_runs = [r for r in runs if "value_gate" in r and r["seed"] == args.seeds[0]]
    if vg_runs:
        L.append("## VGMR value and gate statistics (Table 4.4 analogue)\n")
        L.append("Test split, clean vs. 30 % of the first (dominant) modality's steps replaced by Gaussian "
                 f"noise (train mean, {args.gate_noise_weight:g} × train std); mean ± sample std over test samples; "
                 "first seed.\n")
        L.append("| setting | backbone | method | modality | condition | global value | channel value | "
                 "channel std | gate |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in vg_runs:
            vgs = r["value_gate"]
            for name in vgs["clean"]:
                for cond in ("clean", "noisy"):
                    st = vgs[cond][name]
                    cells = [f"{st[k]['mean']:.3f} ± {st[k]['std']:.3f}" if k in st else "–"
                             for k in ("global_value", "channel_value", "channel_std", "gate")]
                    L.append(f"| {r['setting']} | {r['backbone']} | {r['method']} | {name} | "
                             f"{cond}{' (corrupted)' if cond == 'noisy' and name == vgs['target'] else ''} | "
                             + " | ".join(cells) + " |")
        L.append("")
    L.extend(_step_time_lines(args, summary))
    if analyses.get("decision"):
        L.append("## Decision-layer diagnostics (concat backbone, test split, first seed)\n")
        L.append("Per-modality logits `z_m = W_m h_m + b/M` (linear head) or the head with the other modalities "
                 "zeroed (non-linear heads); share = mean ‖W_m h_m‖ / Σ_k ‖W_k h_k‖; φ = Shapley value on "
                 "accuracy over modality subsets.\n")
        L.append("| setting | model | modality | acc(z_m) | ‖W_m‖_F | mean ‖h_m‖ | share | Shapley φ |")
        L.append("|---|---|---|---|---|---|---|---|")
        for setting, d in analyses["decision"].items():
            for meth, md in d["multimodal"].items():
                for row in md["rows"]:
                    wn = "–" if row["weight_norm"] is None else f"{row['weight_norm']:.3f}"
                    L.append(f"| {setting} | {meth} ({md['mode']}) | {row['modality']} | {row['accuracy']:.4f} | "
                             f"{wn} | {row['feature_norm']:.3f} | {row['share']:.3f} | {row['shapley']:+.4f} |")
            for row in d["unimodal"]:
                L.append(f"| {setting} | unimodal training | {row['modality']} | {row['accuracy']:.4f} | "
                         f"{row['weight_norm']:.3f} | {row['feature_norm']:.3f} | 1.000 | – |")
        L.append("")
    budget_rows = [r for r in runs if "budgets" in r]
    if budget_rows:
        L.append("## IIBalance budgets (unimodal probes, validation split)\n")
        L.append("| setting | backbone | seed | " + " | ".join(f"b/π {n}" for n in budget_rows[0]["budgets"]["names"])
                 + " | anchor | gate κ |")
        L.append("|" + "---|" * (5 + len(budget_rows[0]["budgets"]["names"])))
        for r in budget_rows:
            b = r["budgets"]
            cal = r["history"].get("gate_calibration", {})
            L.append(f"| {r['setting']} | {r['backbone']} | {r['seed']} | "
                     + " | ".join(f"{x:.3f}/{p:.3f}" for x, p in zip(b["budgets"], b["prior"]))
                     + f" | {b['anchor']} | {cal.get('kappa', '–')} |")
        L.append("")
    L.append("## Gradient cosine (first modality alone vs. all, shared parameters, validation batch)\n")
    L.append("| setting | backbone | method | mean cos | std | mean |cos| | mean |Δcos| between checkpoints |")
    L.append("|---|---|---|---|---|---|---|")
    for r in summary:
        c = r["cosine"]
        if not c["mean"] == c["mean"]:  # NaN: own heads (iibalance/decision), not computed
            continue
        L.append(f"| {r['setting']} | {r['backbone']} | {r['method']} | {c['mean']:.3f} | {c['std']:.3f} | "
                 f"{c['mean_abs']:.3f} | {c['step_std']:.3f} |")
    L.append("")
    if analyses.get("refinement"):
        L.append("## VGMR refinement difference (suppression mean(relu(LN(X) − X̃)), test)\n")
        L.append("| run | " + " | ".join(f"{n} (sample / mean)" for n in
                                          next(iter(analyses['refinement'].values()))["names"]) + " |")
        L.append("|" + "---|" * (1 + len(next(iter(analyses['refinement'].values()))["names"])))
        for k, v in analyses["refinement"].items():
            L.append(f"| {k} | " + " | ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(v["sample"], v["mean"])) + " |")
        L.append("")
    L.append("## Plots\n")
    for p in plots:
        L.append(f"- `{os.path.basename(p)}`")
    L.append("")
    return "\n".join(L)


def _probe_markdown(runs: List[Dict]) -> List[str]:
    rows = probe_summary(runs)
    if not rows:
        return []
    names = rows[0]["names"]
    L = ["## Linear probes on the frozen modality encoders (the imbalance gap)\n",
         "Per modality, a multinomial logistic-regression probe is fitted on the frozen encoder's pooled train "
         "features and scored on test (vgmr_fast/analysis/probe.py). *uni* = the same probe on an encoder of the "
         "same backbone trained on that modality alone (same seed, epochs, data); gap = uni − joint (points of "
         "accuracy the joint training left on the table). Δ vs. bare: paired by seed; Δgap > 0 = gap shrunk. "
         "'beats' = paired mean Δ above two standard errors.\n"]
    head = ["setting", "backbone", "method", "acc", "macro-F1"]
    head += [f"probe {n} (uni → joint)" for n in names] + [f"gap {n}" for n in names]
    head += ["Δacc vs bare", "ΔF1 vs bare", f"Δgap {names[-1]}", "verdict (acc)"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for r in rows:
        cells = [r["setting"], r["backbone"], r["method"], fmt(r["accuracy"], 3), fmt(r["macro_f1"], 3)]
        cells += [f"{u['mean']:.3f} → {fmt(j, 3)}" for u, j in zip(r["unimodal"], r["joint"])]
        cells += [fmt(g, 3, signed=True) for g in r["gap"]]
        bare = r["method"] == "none"
        cells += ["–" if bare else fmt(r["delta_accuracy"], 3, signed=True),
                  "–" if bare else fmt(r["delta_macro_f1"], 3, signed=True),
                  "–" if bare else fmt(r["delta_gap"][-1], 3, signed=True),
                  "–" if bare else f"{verdict(r['delta_accuracy'])} bare ({r['wins']}/{r['paired']} seeds)"]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    first = {}
    for r in runs:
        if "probe" in r:
            first.setdefault((r["setting"], r["backbone"], r["method"]), r)
    L.append("Decision-layer block norms of the first seed (‖W_m‖_F of each modality's block of the first layer "
             "that reads the features: the concat classifier, the Transformer head's first layer, or the "
             "per-modality heads of iibalance/decision); unimodal test accuracy of the reference encoders; "
             "iibalance: fraction of training steps on which the alignment loss was active per modality.\n")
    L.append("| setting | backbone | method | seed | layer | " + " | ".join(f"‖W_{n}‖" for n in names)
             + " | " + " | ".join(f"uni acc {n}" for n in names) + " | alignment active |")
    L.append("|" + "---|" * (6 + 2 * len(names)))
    for (setting, backbone, method), r in first.items():
        p = r["probe"]
        bn = p["block_norms"]
        rate = p.get("align_trigger_rate")
        L.append(f"| {setting} | {backbone} | {method} | {r['seed']} | {bn['layer'] or '–'} | "
                 + " | ".join(f"{x:.3f}" for x in bn["norms"]) + " | "
                 + " | ".join(f"{x:.3f}" for x in p["unimodal_accuracy"]) + " | "
                 + ("–" if rate is None else ", ".join(f"{x:.2f}" for x in rate)) + " |")
    L.append("")
    return L


def _step_time_lines(args, summary) -> List[str]:
    """Training-step time per method and its ratio to the bare backbone (same setting and backbone)."""
    base = {(r["setting"], r["backbone"]): r["step_seconds"]["mean"] for r in summary if r["method"] == "none"}
    L = ["## Training-step time\n",
         f"Mean wall time of one optimisation step (forward, objective, backward, optimiser; no evaluation), "
         f"batch {args.batch_size}, VGMR backend `{getattr(args, 'backend', 'auto')}`, value fraction "
         f"{getattr(args, 'value_fraction', 1.0):g} unless the method says `vgmr@RHO`, value every "
         f"{getattr(args, 'value_every', 1)} step(s); ratio to the bare backbone's step.\n",
         "| setting | backbone | method | step ms | × bare backbone |", "|---|---|---|---|---|"]
    for r in summary:
        b = base.get((r["setting"], r["backbone"]))
        ratio = f"{r['step_seconds']['mean'] / b:.2f}" if b else "–"
        L.append(f"| {r['setting']} | {r['backbone']} | {r['method']} | {1e3 * r['step_seconds']['mean']:.2f} | "
                 f"{ratio} |")
    L.append("")
    return L


def _command_line() -> Optional[str]:
    """The command that runs this process, when it is the package's CLI (not a test or a library call)."""
    import sys

    path = sys.argv[0] if sys.argv else ""
    prog, folder = os.path.basename(path), os.path.basename(os.path.dirname(path))
    if prog == "__main__.py" and folder in ("vgmr_fast", "train"):
        module = "vgmr_fast" if folder == "vgmr_fast" else "vgmr_fast.train"
        return " ".join([f"python -m {module}", *sys.argv[1:]])
    if prog == "vgmr-fast":
        return " ".join(["vgmr-fast", *sys.argv[1:]])
    return None
