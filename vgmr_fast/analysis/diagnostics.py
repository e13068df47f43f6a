"""VGMR's own analyses (docs/math.md §7): numbers, and PNG figures where the paper shows one.

* :func:`value_gate_statistics` / :func:`value_gate_shift` — Table 4.4: per
  modality, global value, mean channel value, std of the channel value across
  channels, and mean initial gate ``G``; mean ± sample std over samples; clean
  vs. a corrupted copy of one modality.
* :func:`modality_removal` — Table 4.7: accuracy with each modality zeroed at
  the input (``X_m := 0``, its mask kept; docs/math.md choice).
* :func:`corrupt_inputs`, :func:`noise_sweep`, :func:`plot_noise_sweep` — §4.8:
  a fraction ``ratio`` of the entries (``granularity="entry"``) or of the
  time steps (``"step"``) of every modality is replaced by Gaussian noise with
  the per-feature mean and std of the training split; the noise *weight* ``w``
  scales that std, ``x ← μ_f + w·σ_f·ε`` (our reading of "noise weight": ``w =
  1`` is noise distributed like the training features). Sweep the ratio at a
  fixed weight, or the weight at a fixed ratio; repeated over noise seeds;
  mean with a band.
* :func:`gradient_cosine` — §4.9 Eq. 14: cosine between the gradient of the
  all-modality loss and the one-modality loss (the others zeroed at the input),
  over the *shared* parameters only (:func:`shared_parameters`: backbone and
  prediction head; per-modality input layers and the refiner excluded), on
  held-out data, in eval mode (no dropout noise in a diagnostic).
* :func:`refinement_difference`, :func:`plot_refinement` — §4.10:
  ``X̃ − LN(X)`` per modality, with ``LN`` the refiner's own LayerNorm (weight and
  bias) so that a gate that is constant over a row gives exactly zero (LayerNorm
  is scale invariant) and the difference shows only what the gate reshaped;
  negative = suppressed. Suppression magnitude ``mean(relu(LN(X) − X̃))`` over
  valid steps and features, per sample and averaged over a split.

Also the metrics used everywhere: :func:`accuracy`, :func:`macro_f1`,
:func:`evaluate`, :func:`predict`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..figures import figure as _figure
from ..figures import save as _save_figure

__all__ = ["accuracy", "macro_f1", "predict", "evaluate", "modality_removal", "corrupt_inputs", "noise_sweep",
           "plot_noise_sweep", "value_gate_statistics", "value_gate_shift", "shared_parameters",
           "gradient_cosine", "plot_curves", "refinement_difference", "plot_refinement"]




# ------------------------------------------------------------------ metrics
def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``pred == y`` (``pred``: labels ``[N]`` or logits ``[N, C]``)."""
    if pred.dim() == 2:
        pred = pred.argmax(-1)
    if pred.shape != y.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and y {tuple(y.shape)} differ")
    return float((pred == y).float().mean()) if y.numel() else float("nan")


def macro_f1(pred: torch.Tensor, y: torch.Tensor, num_classes: Optional[int] = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y`` or ``pred``.

    One ``bincount`` builds the confusion matrix. A class with no true and no
    predicted sample is left out (scikit-learn would warn and count it as 0).
    """
    if pred.dim() == 2:
        pred = pred.argmax(-1)
    if pred.shape != y.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and y {tuple(y.shape)} differ")
    c = num_classes or int(max(int(pred.max()) if pred.numel() else 0, int(y.max()) if y.numel() else 0)) + 1
    cm = torch.bincount(y.long() * c + pred.long(), minlength=c * c).view(c, c).double()
    tp = cm.diag()
    support = cm.sum(1) + cm.sum(0)
    f1 = torch.where(support > 0, 2 * tp / support.clamp_min(1), torch.zeros_like(tp))
    present = support > 0
    return float(f1[present].mean()) if present.any() else float("nan")


def _iter(ds, batch_size: int, device=None):
    return ds.batches(batch_size, shuffle=False, device=device)


@torch.no_grad()
def predict(model: nn.Module, ds, batch_size: int = 512, transform: Optional[Callable] = None,
            device=None) -> torch.Tensor:
    """Logits ``[N, C]`` of ``model(xs, masks)`` over ``ds`` in eval mode.

    ``transform(xs, masks, start)`` may rewrite each batch first (corruption,
    removal); ``start`` is the batch's first sample index.
    """
    was = model.training
    model.eval()
    out, start = [], 0
    try:
        for xs, masks, _ in _iter(ds, batch_size, device):
            if transform is not None:
                xs = transform(xs, masks, start)
            out.append(model(xs, masks).float().cpu())
            start += xs[0].shape[0]
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0, ds.num_classes)


def evaluate(model: nn.Module, ds, batch_size: int = 512, transform: Optional[Callable] = None,
             device=None) -> Dict[str, float]:
    """``{"accuracy", "macro_f1", "loss"}`` of ``model`` on ``ds``."""
    logits = predict(model, ds, batch_size, transform, device)
    return {"accuracy": accuracy(logits, ds.y), "macro_f1": macro_f1(logits, ds.y, ds.num_classes),
            "loss": float(F.cross_entropy(logits, ds.y)) if len(ds) else float("nan")}


# -------------------------------------------------------------- removal
def modality_removal(model: nn.Module, ds, batch_size: int = 512, device=None) -> List[Dict]:
    """Rows ``{"condition", "removed", "accuracy", "macro_f1", "delta"}``: full, then w/o each modality."""
    full = evaluate(model, ds, batch_size, device=device)
    rows = [{"condition": "full", "removed": None, **full, "delta": 0.0}]
    for m, name in enumerate(ds.names):
        def zero(xs, masks, start, m=m):
            return [torch.zeros_like(x) if j == m else x for j, x in enumerate(xs)]
        r = evaluate(model, ds, batch_size, zero, device)
        rows.append({"condition": f"w/o {name}", "removed": name, **r, "delta": r["accuracy"] - full["accuracy"]})
    return rows


# ----------------------------------------------------------------- noise
def corrupt_inputs(xs: Sequence[torch.Tensor], ratio: float, weight: float = 1.0,
                   means: Optional[Sequence[torch.Tensor]] = None, stds: Optional[Sequence[torch.Tensor]] = None,
                   modalities: Optional[Sequence[int]] = None, granularity: str = "entry",
                   generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """Replace a fraction ``ratio`` of entries/steps by ``μ_f + weight·σ_f·ε`` (a new list).

    Args:
        xs: per-modality ``[B, T_m, D_m]``.
        ratio: fraction in ``[0, 1]``; each entry (or step) is replaced
            independently with this probability.
        weight: noise weight ``w >= 0`` (scales the std).
        means, stds: per-feature ``[D_m]`` statistics of the training split
            (default 0 and 1).
        modalities: indices to corrupt (default all; docs/math.md §7 corrupts all).
        granularity: ``"entry"`` or ``"step"`` (whole ``D_m``-vectors).
        generator: CPU ``torch.Generator`` (determinism).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    if granularity not in ("entry", "step"):
        raise ValueError(f"granularity must be 'entry' or 'step', got {granularity!r}")
    idx = range(len(xs)) if modalities is None else list(modalities)
    for m in idx:
        if not 0 <= m < len(xs):
            raise ValueError(f"modalities: index {m} out of range for {len(xs)} modalities")
    out = list(xs)
    for m in idx:
        x = xs[m]
        b, t, d = x.shape
        mu = torch.zeros(d) if means is None else torch.as_tensor(means[m]).float()
        sd = torch.ones(d) if stds is None else torch.as_tensor(stds[m]).float()
        shape = (b, t, d) if granularity == "entry" else (b, t, 1)
        sel = torch.rand(shape, generator=generator) < ratio
        noise = mu + weight * sd * torch.randn(b, t, d, generator=generator)
        out[m] = torch.where(sel.to(x.device), noise.to(x.device, x.dtype), x)
    return out


def noise_sweep(model: nn.Module, ds, stats: Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
                values: Sequence[float], vary: str = "ratio", fixed: float = 1.0, seeds: Sequence[int] = (0, 1, 2),
                modalities: Optional[Sequence[int]] = None, granularity: str = "entry",
                batch_size: int = 512, device=None) -> Dict:
    """Accuracy while the noise ratio (``vary="ratio"``, weight = ``fixed``) or weight
    (``vary="weight"``, ratio = ``fixed``) takes each of ``values``.

    Returns ``{"vary", "values", "fixed", "accuracy": [K][S], "mean": [K], "std": [K]}``
    (``std``: sample std over the noise seeds; 0 for one seed).
    """
    if vary not in ("ratio", "weight"):
        raise ValueError(f"vary must be 'ratio' or 'weight', got {vary!r}")
    if not seeds:
        raise ValueError("seeds must not be empty")
    means, stds = stats
    acc = []
    for v in values:
        ratio, weight = (v, fixed) if vary == "ratio" else (fixed, v)
        row = []
        for s in seeds:
            gen = torch.Generator().manual_seed(int(s))

            def tf(xs, masks, start, ratio=ratio, weight=weight, gen=gen):
                return corrupt_inputs(xs, ratio, weight, means, stds, modalities, granularity, gen)
            row.append(evaluate(model, ds, batch_size, tf, device)["accuracy"])
        acc.append(row)
    a = torch.tensor(acc, dtype=torch.float64)
    std = a.std(1) if a.shape[1] > 1 else torch.zeros(a.shape[0], dtype=torch.float64)
    return {"vary": vary, "values": [float(v) for v in values], "fixed": float(fixed), "accuracy": acc,
            "mean": a.mean(1).tolist(), "std": std.tolist()}


def plot_noise_sweep(curves: Dict[str, Dict], path: str, title: Optional[str] = None) -> str:
    """Accuracy vs. noise ratio/weight, one line with a ±std band per entry of ``curves``.

    ``curves[label]`` is a :func:`noise_sweep` result (or any dict with
    ``values``, ``mean``, ``std`` and ``vary``).
    """
    fig = _figure(figsize=(5, 3.6))
    ax = fig.subplots()
    vary = "noise"
    for label, c in curves.items():
        x = torch.tensor(c["values"]).numpy()
        mu = torch.tensor(c["mean"]).numpy()
        sd = torch.tensor(c["std"]).numpy()
        ax.plot(x, mu, marker="o", label=label)
        ax.fill_between(x, mu - sd, mu + sd, alpha=0.2)
        vary = c.get("vary", vary)
    ax.set_xlabel(f"noise {vary}")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save_figure(fig, path, title, ax)


# ---------------------------------------------------------- value / gate
def _refiner_of(model: nn.Module) -> nn.Module:
    ref = getattr(model, "refiner", None)
    if ref is None and getattr(model, "has_aux", False):
        ref = model
    if ref is None or not getattr(ref, "has_aux", False):
        raise TypeError("model: needs a VGMR refiner (model.refiner with return_aux support) or to be one")
    return ref


def _ms(x: torch.Tensor) -> Dict[str, float]:
    x = x.double()
    return {"mean": float(x.mean()), "std": float(x.std()) if x.numel() > 1 else 0.0}


@torch.no_grad()
def value_gate_statistics(model: nn.Module, ds, batch_size: int = 512, transform: Optional[Callable] = None,
                          device=None) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Table 4.4 statistics per modality, mean ± sample std over the samples of ``ds``.

    ``{name: {"global_value", "channel_value", "channel_std", "gate"}: {"mean", "std"}}``;
    ``channel_value`` is the per-sample mean over channels, ``channel_std`` the
    per-sample (sample) std over channels; entries of ablated signals are absent.
    ``model`` is a VGMR or a backbone whose ``refiner`` is one.
    """
    ref = _refiner_of(model)
    was = ref.training
    ref.eval()
    g_all, v_mean, v_std, gate = [], [], [], []
    start = 0
    try:
        for xs, masks, _ in _iter(ds, batch_size, device):
            if transform is not None:
                xs = transform(xs, masks, start)
            start += xs[0].shape[0]
            _, aux = ref(xs, masks, return_aux=True)
            if aux.get("global_value") is not None:
                g_all.append(aux["global_value"].float().cpu())
            if aux.get("channel_value") is not None:
                cv = aux["channel_value"].float().cpu()
                v_mean.append(cv.mean(-1))
                v_std.append(cv.std(-1) if cv.shape[-1] > 1 else torch.zeros(cv.shape[:2]))
            gate.append(aux["gate_mean"].float().cpu())
    finally:
        ref.train(was)
    out = {}
    for m, name in enumerate(ds.names):
        row = {}
        if g_all:
            row["global_value"] = _ms(torch.cat(g_all)[:, m])
        if v_mean:
            row["channel_value"] = _ms(torch.cat(v_mean)[:, m])
            row["channel_std"] = _ms(torch.cat(v_std)[:, m])
        row["gate"] = _ms(torch.cat(gate)[:, m])
        out[name] = row
    return out


def value_gate_shift(model: nn.Module, ds, target: Union[int, str] = 0, ratio: float = 0.3, weight: float = 1.0,
                     stats=None, seed: int = 0, batch_size: int = 512, device=None) -> Dict:
    """Table 4.4: statistics on ``ds`` clean and with ``ratio`` of the *steps* of
    modality ``target`` replaced by Gaussian noise (training mean/std ``stats``,
    default 0/1). Returns ``{"target", "clean", "noisy", "delta"}``; ``delta`` is
    noisy − clean of the means.
    """
    if isinstance(target, str):
        if target not in ds.names:
            raise ValueError(f"target {target!r} is not one of {ds.names}")
        target = ds.names.index(target)
    if not 0 <= target < ds.num_modalities:
        raise ValueError(f"target index {target} out of range")
    means, stds = stats if stats is not None else (None, None)
    gen = torch.Generator().manual_seed(seed)

    def tf(xs, masks, start):
        return corrupt_inputs(xs, ratio, weight, means, stds, [target], "step", gen)
    clean = value_gate_statistics(model, ds, batch_size, None, device)
    noisy = value_gate_statistics(model, ds, batch_size, tf, device)
    delta = {n: {k: noisy[n][k]["mean"] - clean[n][k]["mean"] for k in clean[n]} for n in clean}
    return {"target": ds.names[target], "ratio": ratio, "clean": clean, "noisy": noisy, "delta": delta}


# ------------------------------------------------------- gradient cosine
_PER_MODALITY = ("encoders.", "proj.", "modality_embedding", "heads.", "align.", "gate.")


def shared_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Parameters shared by all modalities: everything except the refiner, the
    per-modality input layers (``encoders``/``proj``/``modality_embedding``) and
    per-modality heads (``heads``). Frozen parameters are skipped."""
    out = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "refiner" in parts or not p.requires_grad:
            continue
        if any((part + ".") in _PER_MODALITY or part in _PER_MODALITY for part in parts):
            continue
        out.append((name, p))
    return out


def gradient_cosine(model: nn.Module, xs: Sequence[torch.Tensor], masks, y: torch.Tensor,
                    keep: Union[int, Sequence[int]] = 0,
                    params: Optional[Sequence[nn.Parameter]] = None,
                    loss_fn: Callable = F.cross_entropy) -> float:
    """``cos(∇_θ L_all, ∇_θ L_keep)`` over the shared parameters (docs/math.md §7, Eq. 14).

    ``L_keep``: the modalities not in ``keep`` are zeroed at the input. Runs in
    eval mode; the model's mode is restored. Returns NaN when either gradient is
    zero (e.g. no shared parameter receives gradient).
    """
    keep = [keep] if isinstance(keep, int) else list(keep)
    for k in keep:
        if not 0 <= k < len(xs):
            raise ValueError(f"keep: index {k} out of range for {len(xs)} modalities")
    if params is None:
        params = [p for _, p in shared_parameters(model)]
    params = list(params)
    if not params:
        raise ValueError("params: no shared parameters to compare gradients on")
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            g_all = torch.autograd.grad(loss_fn(model(list(xs), masks), y), params, allow_unused=True)
            xs_k = [x if j in keep else torch.zeros_like(x) for j, x in enumerate(xs)]
            g_k = torch.autograd.grad(loss_fn(model(xs_k, masks), y), params, allow_unused=True)
    finally:
        model.train(was)

    def flat(gs):
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double() for g, p in zip(gs, params)])
    a, b = flat(g_all), flat(g_k)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float((a @ b) / (na * nb))


def plot_curves(curves: Dict[str, Tuple[Sequence[float], Sequence[float]]], path: str, xlabel: str = "epoch",
                ylabel: str = "", title: Optional[str] = None, hline: Optional[float] = None) -> str:
    """Generic line plot ``{label: (x, y)}`` → PNG (gradient cosine, loss curves)."""
    fig = _figure(figsize=(5, 3.6))
    ax = fig.subplots()
    for label, (x, yv) in curves.items():
        ax.plot(list(x), list(yv), marker=".", label=label)
    if hline is not None:
        ax.axhline(hline, color="gray", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save_figure(fig, path, title, ax)


# -------------------------------------------------- refinement difference
@torch.no_grad()
def refinement_difference(refiner: nn.Module, xs: Sequence[torch.Tensor], masks=None) -> Dict:
    """``X̃ − LN(X)`` per modality and the suppression magnitude (docs/math.md §7, §4.10).

    Args:
        refiner: a VGMR (reference or fused; its ``blocks[m].norm`` supplies the
            LayerNorm weight and bias of the baseline; without it, a plain
            LayerNorm is used).
        xs, masks: one batch.

    Returns ``{"diff": [B, T_m, D_m] per modality, "suppression": [B, M]}``
    (suppression averaged over valid steps and features; 0 for a sample with
    no valid step).
    """
    was = refiner.training
    refiner.eval()
    try:
        refined = refiner(list(xs), masks)
    finally:
        refiner.train(was)
    refined = list(refined.values()) if isinstance(refined, dict) else list(refined)
    blocks = getattr(refiner, "blocks", None)
    diffs, supp = [], []
    for m, (x, xt) in enumerate(zip(xs, refined)):
        norm = blocks[m].norm if blocks is not None and hasattr(blocks[m], "norm") else None
        if norm is not None:
            base = F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
        else:
            base = F.layer_norm(x, (x.shape[-1],))
        diff = (xt - base).float()
        diffs.append(diff)
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if masks is not None and masks[m] is not None:
            valid = masks[m]
        s = F.relu(-diff).mean(-1)  # relu(LN(X) - X~), mean over D
        n = valid.sum(1).clamp_min(1)
        supp.append((s * valid).sum(1) / n)
    return {"diff": diffs, "suppression": torch.stack(supp, dim=1).cpu()}


def refinement_over_split(model: nn.Module, ds, batch_size: int = 512, device=None) -> torch.Tensor:
    """Suppression magnitude ``[N, M]`` over a whole split (per-sample rows)."""
    ref = _refiner_of(model)
    out = [refinement_difference(ref, xs, masks)["suppression"] for xs, masks, _ in _iter(ds, batch_size, device)]
    return torch.cat(out)


def plot_refinement(diff_sample: Sequence[torch.Tensor], names: Sequence[str], path: str,
                    suppression_sample: Optional[torch.Tensor] = None,
                    suppression_mean: Optional[torch.Tensor] = None, title: Optional[str] = None) -> str:
    """Heatmaps of ``X̃ − LN(X)`` (``[T_m, D_m]`` of one sample per modality; blue =
    suppressed) and a bar plot of the suppression magnitude (that sample and the
    split average)."""
    m = len(diff_sample)
    bars = suppression_sample is not None or suppression_mean is not None
    fig = _figure(figsize=(3.4 * (m + int(bars)), 3.4), constrained_layout=True)
    axes = fig.subplots(1, m + int(bars), squeeze=False)
    axes = axes[0]
    vmax = max(float(d.abs().max()) for d in diff_sample) or 1.0
    for j in range(m):
        ax = axes[j]
        im = ax.imshow(diff_sample[j].cpu().numpy().T, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"{names[j]}: X̃ − LN(X)")
        ax.set_xlabel("time step")
        ax.set_ylabel("feature")
    fig.colorbar(im, ax=list(axes[:m]), fraction=0.03, label="blue: suppressed, red: enhanced")
    if bars:
        ax = axes[m]
        x = torch.arange(m).numpy()
        w = 0.38
        if suppression_sample is not None:
            ax.bar(x - w / 2, torch.as_tensor(suppression_sample).numpy(), w, label="this sample")
        if suppression_mean is not None:
            ax.bar(x + w / 2, torch.as_tensor(suppression_mean).numpy(), w, label="split mean")
        ax.set_xticks(x)
        ax.set_xticklabels(list(names), rotation=20)
        ax.set_title("mean relu(LN(X) − X̃)")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path
