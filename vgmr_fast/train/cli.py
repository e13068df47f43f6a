"""``vgmr-fast train``'s options and entry points: train backbones with VGMR and the balancing
methods, then run the analyses (the package docstring of ``vgmr_fast.train`` says what is run)."""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

from .grid import train_grid


def _csv(s: str) -> List[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def _floats(s: str) -> List[float]:
    return [float(t) for t in _csv(s)]


def _ints(s: str) -> List[int]:
    return [int(t) for t in _csv(s)]


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` options to ``parser`` (an argparse parser or subparser)."""
    g = parser.add_argument_group("grid")
    g.add_argument("--out", default="vgmr_train_out", help="output directory (created)")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (the controlled benchmark) or mosi:PATH, mosei:PATH, cremad:PATH")
    g.add_argument("--settings", type=_csv, default=["clean", "noisy"],
                   help="benchmark presets, comma-separated (clean, noisy, bimodal, imbalanced)")
    g.add_argument("--backbones", type=_csv, default=["concat", "transformer"], help="concat, transformer")
    g.add_argument("--methods", type=_csv, default=["none", "vgmr", "ogm", "iibalance", "decision"],
                   help="none, vgmr, ogm, iibalance, decision, mlp, gate, cross_attention, or X+Y combos")
    g.add_argument("--seeds", type=_ints, default=[0], help="training seeds, comma-separated")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    d = parser.add_argument_group("synthetic data")
    d.add_argument("--n-train", type=int, default=1600)
    d.add_argument("--n-val", type=int, default=400)
    d.add_argument("--n-test", type=int, default=800)
    d.add_argument("--num-classes", type=int, default=4)
    o = parser.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="adamw, or sgd (momentum 0.9: the OGM-GE paper's optimizer, under which its gradient "
                   "coefficients act; Adam's per-parameter normalisation cancels them)")
    o.add_argument("--batch-size", type=int, default=64)
    o.add_argument("--lr", type=float, default=2e-3)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--dropout", type=float, default=0.1)
    o.add_argument("--hidden", type=int, default=64, help="Concat hidden width")
    o.add_argument("--d-model", type=int, default=32, help="Transformer width")
    o.add_argument("--layers", type=int, default=1, help="Transformer layers")
    o.add_argument("--nhead", type=int, default=4)
    o.add_argument("--vgmr-d", type=int, default=32, help="VGMR latent width d")
    o.add_argument("--lambda-v", type=float, default=0.1)
    o.add_argument("--lambda-r", type=float, default=0.01)
    o.add_argument("--ogm-alpha", type=float, default=0.5)
    o.add_argument("--ogm-modulation", choices=("grad", "step"), default="grad",
                   help="OGM-GE: multiply the gradient (the paper; cancelled by Adam's normalisation) or the "
                   "modality's learning rate (acts under Adam too; docs/balance.md)")
    o.add_argument("--lambda-align", type=float, default=0.5, help="IIBalance: weight of the prototype alignment")
    o.add_argument("--lambda-uni", type=float, default=1.0,
                   help="IIBalance: weight of the unimodal heads' cross entropy (our choice, not the paper's)")
    o.add_argument("--threads", type=int, default=1,
                   help="torch threads (0 = torch default). 1 by default: these models are tiny and "
                   "dispatch-bound, and intra-op threads only add synchronisation (and thrash on a busy machine)")
    _add_objective_arguments(parser)
    a = parser.add_argument_group("analysis")
    a.add_argument("--noise-ratios", type=_floats, default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    a.add_argument("--noise-weight", type=float, default=1.0, help="weight of the ratio sweep")
    a.add_argument("--noise-weights", type=_floats, default=[0.0, 0.5, 1.0, 2.0, 3.0])
    a.add_argument("--noise-ratio", type=float, default=0.3, help="ratio of the weight sweep")
    a.add_argument("--noise-seeds", type=int, default=2, help="noise draws per sweep point")
    a.add_argument("--gate-noise-weight", type=float, default=3.0,
                   help="noise weight of the value/gate analysis (30 %% of the first modality's steps)")
    a.add_argument("--cosine-points", type=int, default=2, help="gradient-cosine checkpoints per epoch")
    a.add_argument("--probes", action="store_true",
                   help="linear probes on every frozen modality encoder vs. encoders trained on that modality "
                   "alone (the imbalance gap); always on for the 'imbalanced' setting")
    a.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bars")
    a.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test (overrides data sizes, epochs, sweeps)")
    return parser


def _add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    from ..vgmr import BACKENDS

    v = parser.add_argument_group("VGMR module and objective")
    v.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="VGMR backend: auto (best fused backend for the device), cpu, cuda, triton, or reference")
    v.add_argument("--value-fraction", type=float, default=1.0,
                   help="share of each batch with exact value targets, in (0, 1]; 1 = the paper")
    v.add_argument("--value-every", type=int, default=1,
                   help="value supervision every k-th step (1 = every step, the paper)")
    v.add_argument("--gate-rank", type=_gate_rank, default=None, metavar="R|NAME=R,...",
                   help="low-rank raw gate (docs/math.md §4a): an int r for every modality wider than r, or "
                        "name=r pairs; default full rank (the paper). Runs on the chosen --backend")


def _gate_rank(text: str):
    """``--gate-rank``: ``"16"`` -> 16, ``"text=64,audio=16"`` -> ``{"text": 64, "audio": 16}``."""
    if "=" not in text:
        return int(text)
    return {k.strip(): int(r) for k, _, r in (pair.partition("=") for pair in _csv(text))}


def run_train(args) -> int:
    """CLI entry (``vgmr-fast train``): run :func:`train_grid`; returns the exit status 0."""
    train_grid(args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Stand-alone entry point: ``python -m vgmr_fast.train [options]``."""
    parser = add_train_arguments(argparse.ArgumentParser(prog="vgmr-fast train", description=__doc__.split(":")[1].split("(")[0].strip()))
    return train_grid(parser.parse_args(argv))
