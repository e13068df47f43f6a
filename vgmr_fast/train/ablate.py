"""Ablations of the balancing methods on the ``imbalanced`` preset (docs/balance.md).

``python -m vgmr_fast.train.ablate BACKBONE SEEDS 'METHOD|TRAIN FLAGS' ...``, e.g.::

    python -m vgmr_fast.train.ablate concat 0,1,2 'none|' 'ogm|--ogm-alpha 0.8 --ogm-modulation step'

Each variant is trained with the ``train`` command's own :func:`~vgmr_fast.train.loop.build_model` and
:func:`~vgmr_fast.train.loop.train_one` (its flags, defaults otherwise) on ``make_benchmark("imbalanced",
seed=0)``, for every seed; one markdown row per variant: test accuracy and the weak modality's
linear-probe accuracy (mean ± std over seeds), and for iibalance the fraction of training steps on
which the weak modality's alignment term was active, per seed. No analyses, no unimodal references:
the probe reference of the weak modality is in the committed results table.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import List, Optional, Sequence

import torch

from .cli import add_train_arguments
from .loop import build_model, train_one

__all__ = ["ablate", "main"]


def ablate(backbone: str, seeds: Sequence[int], variants: Sequence[str], setting: str = "imbalanced",
           **data_overrides) -> List[str]:
    """Markdown rows ``| backbone | method | flags | acc | weak probe | alignment active |``.

    ``data_overrides``: fields of the benchmark config (e.g. smaller splits in tests).
    """
    from ..analysis.diagnostics import evaluate
    from ..analysis.probe import probe_accuracy
    from ..data import make_benchmark

    parser = add_train_arguments(argparse.ArgumentParser())
    data = make_benchmark(setting, seed=0, **data_overrides)
    rows = []
    budget_cache: dict = {}  # IIBalance's budgets depend on the data and the seed only
    for variant in variants:
        method, _, flags = variant.partition("|")
        accs, weak, active = [], [], []
        for seed in seeds:
            args = parser.parse_args(["--no-progress", "--cosine-points", "0", *shlex.split(flags)])
            model, _ = build_model(backbone, method, data["train"], data["val"], args, seed,
                                   budget_cache=budget_cache)
            train_one(model, method, data, args, seed)
            accs.append(evaluate(model, data["test"])["accuracy"])
            weak.append(probe_accuracy(model, data["train"], data["test"], data["train"].num_modalities - 1))
            align = getattr(model, "align", None)
            if align is not None:
                active.append(f"{float(align.trigger_rate()[-1]):.2f}")
        a, w = torch.tensor(accs), torch.tensor(weak)
        rows.append(f"| {backbone} | {method} | `{flags.strip() or '(defaults)'}` | {a.mean():.3f} ± {a.std():.3f} | "
                    f"{w.mean():.3f} ± {w.std():.3f} | {', '.join(active) or '–'} |")
        print(rows[-1], flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3:
        print(__doc__)
        return 2
    torch.set_num_threads(1)
    print("| backbone | method | flags | test acc | weak probe | alignment active (weak, per seed) |")
    print("|---|---|---|---|---|---|")
    ablate(argv[0], [int(s) for s in argv[1].split(",")], argv[2:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
