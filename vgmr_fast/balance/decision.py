"""Decision-layer imbalance: diagnostics and an adaptive decision-layer allocation head.

Following "Revisit Modality Imbalance at the Decision Layer" (Ma & Chen, 2025;
seed 000), for a concat-fusion classifier ``logits = W [h_1; …; h_M] + b`` the
decision layer splits as ``W = [W_1 | … | W_M]`` and

* per-modality logits ``z_m = W_m h_m + b / M`` (the bias shared equally, as
  OGM-GE does) and their accuracy,
* decision-weight norms ``‖W_m‖_F`` and per class ``‖W_m[c, :]‖_2``,
* feature norms ``‖h_m‖_2`` per sample,
* contribution share ``‖W_m h_m‖ / Σ_k ‖W_k h_k‖`` per sample,
* modality Shapley values on accuracy over all modality subsets,
* histograms per modality (:func:`plot_decision_diagnostics`).

Heads that are not linear (``Transformer.classify``, an MLP) have no ``W_m``:
``mode="zero_others"`` evaluates ``f`` with every other modality's feature set
to 0, ``z_m = f(0, …, h_m, …, 0)``, and measures the contribution as
``‖f(…h_m…) − f(0, …, 0)‖``; for a linear head the two modes coincide except
for the bias (``b`` vs ``b/M``), which does not enter the contribution. All
variants are one batched call (the ``M`` or ``2^M`` variants stacked along the
batch), never a per-sample loop.

:class:`AdaptiveDecisionHead` is the "adaptive weight allocation at the
decision layer" the paper calls for (it proposes no concrete form; this one is
ours): each modality gets its own linear head, its output is *calibrated* before
aggregation (temperature-scaled log-probabilities, so feature-norm and
weight-norm disparities no longer decide a modality's say), and the calibrated
outputs are pooled with *capability-relative* weights
``ω = softmax_m(a_m + log ĉ_m)``: ``ĉ_m`` is a running estimate of the modality's
capability (mean probability its calibrated head gives the true class on
training batches) and ``a_m`` a learned correction.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..figures import figure
from ..figures import save as save_figure

__all__ = ["split_decision_layer", "linear_modality_logits", "zero_others_logits", "modality_logits",
           "subset_logits", "shapley_values", "decision_diagnostics", "plot_decision_diagnostics",
           "AdaptiveDecisionHead", "AllocatedModel"]


def _check_hs(hs) -> List[torch.Tensor]:
    if isinstance(hs, torch.Tensor) or not isinstance(hs, (list, tuple)) or len(hs) == 0:
        raise TypeError("hs must be a non-empty list of per-modality [B, H_m] tensors")
    b = None
    for m, h in enumerate(hs):
        if not isinstance(h, torch.Tensor) or h.dim() != 2:
            raise ValueError(f"hs[{m}] must be a [B, H_m] tensor")
        if b is None:
            b = h.shape[0]
        elif h.shape[0] != b:
            raise ValueError(f"hs[{m}] has batch {h.shape[0]}, hs[0] has {b}")
    return list(hs)


def split_decision_layer(layer: nn.Linear, sizes: Sequence[int]) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """``W = [W_1 | … | W_M]``: the column blocks of ``layer.weight`` (``[C, H_m]`` each) and the bias."""
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"layer must be an nn.Linear, got {type(layer).__name__}")
    sizes = [int(s) for s in sizes]
    if sum(sizes) != layer.in_features:
        raise ValueError(f"sizes sum to {sum(sizes)} but layer.in_features is {layer.in_features}")
    return list(torch.split(layer.weight, sizes, dim=1)), layer.bias


def linear_modality_logits(layer: nn.Linear, hs) -> torch.Tensor:
    """``z_m = W_m h_m + b/M`` stacked to ``[M, B, C]``."""
    hs = _check_hs(hs)
    ws, b = split_decision_layer(layer, [h.shape[1] for h in hs])
    z = torch.stack([h @ w.t() for h, w in zip(hs, ws)])
    if b is not None:
        z = z + b / len(hs)
    return z


def subset_logits(classify: Callable, hs, subsets: torch.Tensor) -> torch.Tensor:
    """``classify`` on every subset at once: modalities outside a subset are zeroed.

    Args:
        classify: ``hs -> logits [B, C]``.
        hs: per-modality features ``[B, H_m]``.
        subsets: bool ``[S, M]``, True = modality kept.

    Returns ``[S, B, C]`` from one call on ``S·B`` rows.
    """
    hs = _check_hs(hs)
    subsets = torch.as_tensor(subsets, dtype=torch.bool, device=hs[0].device)
    if subsets.dim() != 2 or subsets.shape[1] != len(hs):
        raise ValueError(f"subsets must be [S, M={len(hs)}], got {tuple(subsets.shape)}")
    s, b = subsets.shape[0], hs[0].shape[0]
    big = [(h.unsqueeze(0) * subsets[:, m, None, None].to(h.dtype)).reshape(s * b, -1) for m, h in enumerate(hs)]
    out = classify(big)
    return out.reshape(s, b, -1)


def zero_others_logits(classify: Callable, hs) -> torch.Tensor:
    """``z_m = f(0, …, h_m, …, 0)`` for every ``m`` → ``[M, B, C]`` (one batched call)."""
    hs = _check_hs(hs)
    return subset_logits(classify, hs, torch.eye(len(hs), dtype=torch.bool))


def _resolve_head(model) -> Tuple[Optional[nn.Linear], Optional[Callable]]:
    """``(linear decision layer or None, classify callable or None)`` for a model / head / callable."""
    if isinstance(model, nn.Linear):
        return model, lambda hs: model(torch.cat(hs, dim=-1))
    layer = getattr(model, "classifier", None)
    classify = getattr(model, "classify", None)
    if classify is None and callable(model):
        classify = model
    linear = layer if isinstance(layer, nn.Linear) else None
    # only use the split when classify really is "classifier on the concatenation":
    # vgmr_fast.models.Concat, or a model that declares ``linear_decision = True``
    if linear is not None and not getattr(model, "linear_decision", False):
        try:
            from ..models import Concat
        except ImportError:  # pragma: no cover - models not built
            Concat = ()
        if not isinstance(model, Concat):
            linear = None
    return linear, classify


def modality_logits(model, hs, mode: str = "auto") -> torch.Tensor:
    """Per-modality logits ``[M, B, C]``.

    Args:
        model: an ``nn.Linear`` decision layer on the concatenation, a ``Concat``
            backbone (its ``classifier``), or anything with ``classify(hs)`` /
            a callable ``hs -> logits``.
        hs: per-modality features.
        mode: ``"linear"`` (split ``W``; ``z_m = W_m h_m + b/M``), ``"zero_others"``
            or ``"auto"`` (linear when available).
    """
    if mode not in ("auto", "linear", "zero_others"):
        raise ValueError(f"mode must be 'auto', 'linear' or 'zero_others', got {mode!r}")
    linear, classify = _resolve_head(model)
    if mode == "linear" or (mode == "auto" and linear is not None):
        if linear is None:
            raise TypeError("mode='linear' needs an nn.Linear decision layer on the concatenated features")
        return linear_modality_logits(linear, hs)
    if classify is None:
        raise TypeError(f"model must be an nn.Linear, have classify(hs), or be callable; got {type(model).__name__}")
    return zero_others_logits(classify, hs)


def _all_subsets(m: int, device=None) -> torch.Tensor:
    """Bool ``[2^M, M]``: row ``s`` keeps modality ``j`` iff bit ``j`` of ``s`` is set."""
    s = torch.arange(2 ** m, device=device)
    return (s[:, None] >> torch.arange(m, device=device)[None, :]) & 1 == 1


def shapley_values(values: torch.Tensor) -> torch.Tensor:
    """Exact Shapley values from a set function given on all ``2^M`` subsets.

    ``values[s]`` is ``v(S)`` for the subset whose bit ``j`` says whether modality
    ``j`` is in ``S``. ``φ_m = Σ_{S ∌ m} |S|!(M−|S|−1)!/M! · (v(S ∪ {m}) − v(S))``;
    they sum to ``v(all) − v(∅)`` (efficiency).
    """
    values = torch.as_tensor(values, dtype=torch.float64)
    n = values.numel()
    m = int(round(math.log2(n))) if n > 0 else -1
    if m < 1 or 2 ** m != n:
        raise ValueError(f"values must have 2^M entries (M >= 1), got {n}")
    subsets = _all_subsets(m)
    size = subsets.sum(1)
    fact = [math.factorial(k) for k in range(m + 1)]
    weight = torch.tensor([fact[k] * fact[m - k - 1] / fact[m] if k < m else 0.0 for k in range(m + 1)],
                          dtype=torch.float64)
    idx = torch.arange(n)
    phi = torch.empty(m, dtype=torch.float64)
    for j in range(m):
        without = idx[~subsets[:, j]]
        phi[j] = (weight[size[without]] * (values[without + (1 << j)] - values[without])).sum()
    return phi


@torch.no_grad()
def decision_diagnostics(model, hs, y: torch.Tensor, names: Optional[Sequence[str]] = None,
                         mode: str = "auto", max_modalities: int = 10) -> Dict:
    """Decision-layer imbalance statistics (see the module docstring).

    Args:
        model: decision layer / backbone / head (see :func:`modality_logits`).
        hs: per-modality features ``[B, H_m]`` (e.g. ``backbone.encode(xs, masks)``).
        y: labels ``[B]``.
        names: modality names (default ``m0..``).
        mode: ``"auto"``, ``"linear"`` or ``"zero_others"``.
        max_modalities: Shapley enumerates ``2^M`` subsets; refuse beyond this.

    Returns a dict of tensors (``[M]`` summaries, ``[M, B]`` per-sample values,
    ``weights``: flattened ``W_m`` entries per modality for the histograms; the
    weight entries are ``None`` for non-linear heads).
    """
    hs = _check_hs([h.detach() for h in hs])
    m = len(hs)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != hs[0].shape[0]:
        raise ValueError(f"y must be a [B] label tensor with B={hs[0].shape[0]}")
    if m > max_modalities:
        raise ValueError(f"max_modalities={max_modalities}: Shapley over 2^{m} subsets refused")
    names = list(names) if names is not None else [f"m{j}" for j in range(m)]
    if len(names) != m:
        raise ValueError(f"names has {len(names)} entries for {m} modalities")
    linear, classify = _resolve_head(model)
    if mode not in ("auto", "linear", "zero_others"):
        raise ValueError(f"mode must be 'auto', 'linear' or 'zero_others', got {mode!r}")
    use_linear = mode == "linear" or (mode == "auto" and linear is not None)
    if use_linear and linear is None:
        raise TypeError("mode='linear' needs an nn.Linear decision layer on the concatenated features")
    y = y.to(hs[0].device)
    subsets = _all_subsets(m, hs[0].device)
    out: Dict = {"names": names, "mode": "linear" if use_linear else "zero_others"}
    if use_linear:
        ws, b = split_decision_layer(linear, [h.shape[1] for h in hs])
        contrib_vec = torch.stack([h @ w.t() for h, w in zip(hs, ws)])  # [M, B, C] = W_m h_m
        bias = b if b is not None else torch.zeros(contrib_vec.shape[-1], device=contrib_vec.device)
        z = contrib_vec + bias / m
        all_logits = torch.einsum("sm,mbc->sbc", subsets.to(contrib_vec.dtype), contrib_vec) + bias
        out["weight_norm"] = torch.stack([w.norm() for w in ws])
        out["weight_norm_per_class"] = torch.stack([w.norm(dim=1) for w in ws])  # [M, C]
        out["weights"] = [w.detach().flatten().cpu() for w in ws]
    else:
        if classify is None:
            raise TypeError(f"model must have classify(hs) or be callable, got {type(model).__name__}")
        all_logits = subset_logits(classify, hs, subsets)  # [2^M, B, C]
        single = (1 << torch.arange(m)).tolist()
        z = all_logits[single]
        contrib_vec = z - all_logits[0:1]
        out["weight_norm"] = None
        out["weight_norm_per_class"] = None
        out["weights"] = None
    contribution = contrib_vec.norm(dim=-1)  # [M, B]
    share = contribution / contribution.sum(0, keepdim=True).clamp_min(1e-12)
    acc_subsets = (all_logits.argmax(-1) == y[None]).float().mean(1)  # [2^M]
    out.update(
        modality_logits=z,
        accuracy=(z.argmax(-1) == y[None]).float().mean(1),
        fused_accuracy=acc_subsets[-1],
        feature_norm=torch.stack([h.norm(dim=1) for h in hs]),
        contribution=contribution,
        share=share,
        share_mean=share.mean(1),
        subset_accuracy={tuple(names[j] for j in range(m) if subsets[s, j]): float(acc_subsets[s])
                         for s in range(2 ** m)},
        shapley=shapley_values(acc_subsets.cpu()).float(),
    )
    return out


def summarize_diagnostics(diag: Dict) -> List[Dict]:
    """One JSON-ready row per modality from :func:`decision_diagnostics`."""
    rows = []
    for j, name in enumerate(diag["names"]):
        rows.append({
            "modality": name,
            "accuracy": float(diag["accuracy"][j]),
            "weight_norm": None if diag["weight_norm"] is None else float(diag["weight_norm"][j]),
            "feature_norm": float(diag["feature_norm"][j].mean()),
            "share": float(diag["share_mean"][j]),
            "shapley": float(diag["shapley"][j]),
        })
    return rows


def plot_decision_diagnostics(diag: Dict, path: str, unimodal: Optional[Dict[str, Dict]] = None,
                              title: Optional[str] = None) -> str:
    """Histograms per modality: decision weights, feature norms, contribution shares.

    ``unimodal`` (optional): ``{name: diagnostics of a model trained on that
    modality alone}``; its decision weights are drawn dashed beside the
    multimodal ones (the paper's multimodal-vs-unimodal comparison).
    Writes a PNG to ``path`` and returns it.
    """
    import matplotlib

    names = diag["names"]
    panels = 3 if diag.get("weights") is not None else 2
    fig = figure(figsize=(4.2 * panels, 3.4))
    axes = fig.subplots(1, panels)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    ax_i = 0
    if panels == 3:
        ax = axes[ax_i]
        ax_i += 1
        for j, n in enumerate(names):
            w = diag["weights"][j].numpy()
            ax.hist(w, bins=40, alpha=0.45, density=True, color=colors[j % len(colors)],
                    label=f"{n} (‖W‖={float(diag['weight_norm'][j]):.2f})")
            if unimodal and n in unimodal and unimodal[n].get("weights") is not None:
                ax.hist(unimodal[n]["weights"][0].numpy(), bins=40, density=True, histtype="step",
                        linestyle="--", color=colors[j % len(colors)], label=f"{n}, unimodal training")
        ax.set_title("decision weights W_m")
        ax.set_xlabel("weight")
        ax.legend(fontsize=7)
    ax = axes[ax_i]
    for j, n in enumerate(names):
        ax.hist(diag["feature_norm"][j].cpu().numpy(), bins=30, alpha=0.45, density=True,
                color=colors[j % len(colors)], label=n)
    ax.set_title("feature norms ‖h_m‖")
    ax.legend(fontsize=7)
    ax = axes[ax_i + 1]
    for j, n in enumerate(names):
        ax.hist(diag["share"][j].cpu().numpy(), bins=30, range=(0, 1), alpha=0.45, density=True,
                color=colors[j % len(colors)],
                label=f"{n} (acc {float(diag['accuracy'][j]):.2f}, φ {float(diag['shapley'][j]):+.2f})")
    ax.set_title("contribution share ‖W_m h_m‖ / Σ_k ‖W_k h_k‖" if diag["mode"] == "linear"
                 else "contribution share (zero others)")
    ax.legend(fontsize=7)
    return save_figure(fig, path, title)


# ------------------------------------------------------------------ allocation
class AdaptiveDecisionHead(nn.Module):
    """Calibrate each modality's output, then pool with capability-relative weights.

    ``z_m = W_m h_m + b_m`` (one linear head per modality);
    calibrated ``ẑ_m = log_softmax(z_m / T_m)`` with ``T_m = softplus(t_m) + 0.05``;
    weights ``ω = softmax_m(a_m + log ĉ_m)`` (``[M]``, sum to one);
    output logits ``Σ_m ω_m ẑ_m`` (log-linear pooling of calibrated predictions).

    Training (:meth:`loss`): ``CE(output) + aux_weight · Σ_m CE(z_m)`` (every
    head learns its modality's full capability, so a strong modality cannot
    starve the others' decision weights) ``+ Σ_m CE(z_m.detach() / T_m)`` (the
    temperatures only calibrate: they see detached logits, as temperature
    scaling does). ``ĉ_m`` is an exponential moving average (``momentum``) of
    the batch-mean probability of the true class under ``ẑ_m``; ``a_m`` (zero at
    init) lets the fused loss correct the capability prior.

    Args:
        sizes: ``[H_1, …, H_M]`` feature widths.
        num_classes: ``C``.
        aux_weight: weight of the unimodal CE terms.
        momentum: EMA momentum of ``ĉ``.
    """

    linear_decision = False

    def __init__(self, sizes: Sequence[int], num_classes: int, aux_weight: float = 1.0, momentum: float = 0.9):
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 1 or any(s < 1 for s in sizes):
            raise ValueError(f"sizes must be positive widths, got {sizes}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.sizes, self.num_classes = sizes, num_classes
        self.aux_weight, self.momentum = float(aux_weight), float(momentum)
        self.heads = nn.ModuleList(nn.Linear(s, num_classes) for s in sizes)
        # softplus(t) + 0.05 = 1 at init
        self.temp_param = nn.Parameter(torch.full((len(sizes),), math.log(math.expm1(0.95))))
        self.alloc = nn.Parameter(torch.zeros(len(sizes)))
        self.register_buffer("capability", torch.full((len(sizes),), 1.0 / num_classes))

    @property
    def temperature(self) -> torch.Tensor:
        return F.softplus(self.temp_param) + 0.05

    def modality_logits(self, hs) -> torch.Tensor:
        hs = _check_hs(hs)
        if len(hs) != len(self.heads):
            raise ValueError(f"hs has {len(hs)} modalities, the head {len(self.heads)}")
        return torch.stack([head(h) for head, h in zip(self.heads, hs)])

    def weights(self) -> torch.Tensor:
        """``ω`` (``[M]``, sums to one)."""
        return F.softmax(self.alloc + self.capability.clamp_min(1e-6).log(), dim=0)

    def fuse(self, z: torch.Tensor) -> torch.Tensor:
        """``Σ_m ω_m log_softmax(z_m / T_m)`` (``T`` detached: it is fitted by the calibration term only)."""
        calibrated = F.log_softmax(z / self.temperature.detach()[:, None, None], dim=-1)
        return torch.einsum("m,mbc->bc", self.weights(), calibrated)

    def forward(self, hs) -> torch.Tensor:
        return self.fuse(self.modality_logits(hs))

    def classify(self, hs) -> torch.Tensor:
        return self.forward(hs)

    def loss(self, hs, y: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        z = self.modality_logits(hs)
        fused = self.fuse(z)
        m = z.shape[0]
        flat_y = y.repeat(m)
        aux = F.cross_entropy(z.reshape(-1, z.shape[-1]), flat_y, reduction="none").view(m, -1).mean(1)
        cal = F.cross_entropy((z.detach() / self.temperature[:, None, None]).reshape(-1, z.shape[-1]), flat_y)
        loss = F.cross_entropy(fused, y) + self.aux_weight * aux.sum() + cal * m
        if self.training:
            with torch.no_grad():
                p = F.softmax(z / self.temperature[:, None, None], dim=-1)
                cap = p.gather(2, y.view(1, -1, 1).expand(m, -1, 1)).squeeze(2).mean(1)
                self.capability.mul_(self.momentum).add_((1 - self.momentum) * cap)
        return loss, {"fused": fused.detach(), "modality_logits": z.detach(), "unimodal_ce": aux.detach()}


class AllocatedModel(nn.Module):
    """A backbone's ``encode`` followed by an :class:`AdaptiveDecisionHead` (its own head unused).

    ``forward(xs, masks)`` → logits; ``loss(xs, masks, y)`` → ``(loss, parts)``;
    ``classify(hs)`` → logits (so decision diagnostics and OGM-GE work on it).
    """

    def __init__(self, backbone: nn.Module, sizes: Sequence[int], num_classes: int, **head_kwargs):
        super().__init__()
        if not hasattr(backbone, "encode"):
            raise TypeError(f"backbone must expose encode(xs, masks), got {type(backbone).__name__}")
        self.backbone = backbone
        self.head = AdaptiveDecisionHead(sizes, num_classes, **head_kwargs)

    @property
    def refiner(self):
        return getattr(self.backbone, "refiner", None)

    def encode(self, xs, masks=None):
        return self.backbone.encode(xs, masks)

    def classify(self, hs):
        return self.head(hs)

    def forward(self, xs, masks=None):
        return self.head(self.encode(xs, masks))

    def loss(self, xs, masks, y):
        return self.head.loss(self.encode(xs, masks), y)
