"""Linear probes on the frozen modality encoders against encoders trained on one modality alone
(the imbalance gap), and their per-method summary."""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

from torch import nn

from ..analysis import diagnostics as A
from ..balance.decision import AllocatedModel
from ..balance.iibalance import IIBalanceModel
from ..data import MultimodalDataset
from .loop import build_model, core_of, train_one
from .stats import aggregate


def probing(args, setting: str) -> bool:
    """Whether the runs of ``setting`` get linear probes (``--probes``, always for ``imbalanced``)."""
    return bool(getattr(args, "probes", False)) or setting == "imbalanced"


def single_modality(ds: MultimodalDataset, m: int) -> MultimodalDataset:
    """Modality ``m`` of ``ds`` alone, as a one-modality dataset."""
    masks = None if ds.masks is None else [ds.masks[m]]
    return MultimodalDataset([ds.xs[m]], ds.y, [ds.names[m]], masks, ds.num_classes)


def unimodal_models(cache: Dict, setting: str, data: Dict[str, MultimodalDataset], backbone: str, args,
                    seed: int) -> List[Tuple[nn.Module, Dict[str, MultimodalDataset]]]:
    """Per modality, a bare ``backbone`` trained on that modality alone (same seed and settings) and
    the one-modality splits it was trained on. Trained once per (setting, backbone, seed) and kept
    in ``cache``: the probes and the decision-layer diagnostics both read them."""
    key = ("model", setting, backbone, seed)
    if key not in cache:
        quiet = copy.copy(args)
        quiet.cosine_points = 0
        models = []
        for m in range(data["train"].num_modalities):
            sub = {k: single_modality(v, m) for k, v in data.items()}
            model, _ = build_model(backbone, "none", sub["train"], sub["val"], quiet, seed)
            train_one(model, "none", sub, quiet, seed)
            models.append((model, sub))
        cache[key] = models
    return cache[key]


def probe_reference(cache: Dict, setting: str, data: Dict[str, MultimodalDataset], backbone: str, args,
                    seed: int) -> List[Dict]:
    """Per modality, the linear-probe accuracy and the test accuracy of :func:`unimodal_models`."""
    from ..analysis.probe import probe_accuracy

    key = ("probe", setting, backbone, seed)
    if key not in cache:
        cache[key] = [{"probe": probe_accuracy(model, sub["train"], sub["test"], 0),
                       "accuracy": A.evaluate(model, sub["test"])["accuracy"]}
                      for model, sub in unimodal_models(cache, setting, data, backbone, args, seed)]
    return cache[key]


def _block_weight_norms(model: nn.Module) -> Dict:
    """Frobenius norm of each modality's block of the first layer that reads the modality features."""
    if isinstance(model, IIBalanceModel):
        return {"layer": "unimodal heads", "norms": [float(h.weight.detach().norm()) for h in model.heads]}
    if isinstance(model, AllocatedModel):
        return {"layer": "unimodal heads", "norms": [float(h.weight.detach().norm()) for h in model.head.heads]}
    core = core_of(model)
    layer = getattr(core, "classifier", None)
    name = "classifier W_m"
    if not isinstance(layer, nn.Linear):
        head = getattr(core, "head", None)
        layer = head[0] if isinstance(head, nn.Sequential) and isinstance(head[0], nn.Linear) else None
        name = "head[0] W_m"
    if layer is None:
        return {"layer": None, "norms": []}
    m = core.num_modalities
    return {"layer": name, "norms": [float(w.detach().norm()) for w in layer.weight.chunk(m, dim=1)]}


def probe_run(model: nn.Module, data: Dict[str, MultimodalDataset], reference: List[Dict]) -> Dict:
    from ..analysis.probe import probe_gap, probe_model

    joint = probe_model(model, data["train"], data["test"])
    uni = [r["probe"] for r in reference]
    out = {"names": list(data["train"].names), "joint": joint, "unimodal": uni, "gap": probe_gap(uni, joint),
           "unimodal_accuracy": [r["accuracy"] for r in reference], "block_norms": _block_weight_norms(model)}
    align = getattr(model, "align", None)
    if align is not None and hasattr(align, "trigger_rate"):
        out["align_trigger_rate"] = align.trigger_rate().tolist()
    return out


def probe_summary(runs: List[Dict]) -> List[Dict]:
    """Per (setting, backbone, method): probe accuracy, gap, and Δ vs. the bare model paired by seed."""
    groups: Dict[Tuple[str, str, str], List[Dict]] = {}
    for r in runs:
        if "probe" in r:
            groups.setdefault((r["setting"], r["backbone"], r["method"]), []).append(r)
    rows = []
    for (setting, backbone, method), rs in groups.items():
        names = rs[0]["probe"]["names"]
        bare = {r["seed"]: r for r in groups.get((setting, backbone, "none"), [])}
        paired = [(r, bare[r["seed"]]) for r in rs if r["seed"] in bare]
        rows.append({
            "setting": setting, "backbone": backbone, "method": method, "names": names,
            "seeds": [r["seed"] for r in rs],
            "accuracy": aggregate([r["test"]["accuracy"] for r in rs]),
            "macro_f1": aggregate([r["test"]["macro_f1"] for r in rs]),
            "joint": [aggregate([r["probe"]["joint"][m] for r in rs]) for m in range(len(names))],
            "unimodal": [aggregate([r["probe"]["unimodal"][m] for r in rs]) for m in range(len(names))],
            "gap": [aggregate([r["probe"]["gap"][m] for r in rs]) for m in range(len(names))],
            "delta_accuracy": aggregate([r["test"]["accuracy"] - b["test"]["accuracy"] for r, b in paired]),
            "delta_macro_f1": aggregate([r["test"]["macro_f1"] - b["test"]["macro_f1"] for r, b in paired]),
            "delta_gap": [aggregate([b["probe"]["gap"][m] - r["probe"]["gap"][m] for r, b in paired])
                          for m in range(len(names))],
            "wins": sum(r["test"]["accuracy"] > b["test"]["accuracy"] for r, b in paired), "paired": len(paired),
        })
    return rows
