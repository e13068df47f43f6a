"""Statistics over training seeds: the mean ± std of a metric and the one rule that says whether a
paired difference between two methods is larger than the seeds' noise."""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch


def aggregate(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "std", "n"}`` of the non-NaN ``values`` (sample std; 0 for one value, NaN for none)."""
    t = torch.tensor([v for v in values if v == v], dtype=torch.float64)
    if t.numel() == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(t.mean()), "std": float(t.std()) if t.numel() > 1 else 0.0, "n": int(t.numel())}


def fmt(a: Dict[str, float], nd: int = 4, signed: bool = False) -> str:
    """``mean ± std`` of an :func:`aggregate` (``mean`` alone for one value, ``–`` for none)."""
    if a["n"] == 0:
        return "–"
    return f"{a['mean']:{'+' if signed else ''}.{nd}f}" + (f" ± {a['std']:.{nd}f}" if a["n"] > 1 else "")


def verdict(delta: Dict[str, float]) -> str:
    """How method A compares with method B, from the :func:`aggregate` of the paired differences
    A − B over seeds; the phrase reads between the two names ("A beats B").

    "beats" / "is worse than" need at least two seeds and a mean beyond two standard errors
    (std / sqrt(n)); a smaller mean "is within seed noise of"; one seed has no standard error, so
    its sign alone is reported as not conclusive; a zero mean "ties"; no pairs give "–".
    """
    n, mean = delta["n"], delta["mean"]
    if n == 0:
        return "–"
    if mean == 0:
        return "ties"
    if n == 1:
        return ("is ahead on one seed (not conclusive) of" if mean > 0
                else "is behind on one seed (not conclusive) of")
    if abs(mean) > 2 * delta["std"] / math.sqrt(n):
        return "beats" if mean > 0 else "is worse than"
    return "is within seed noise of"
