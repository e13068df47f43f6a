"""An in-memory multimodal dataset: one tensor per modality, masks, labels.

Every data source of the package (the synthetic benchmark and the feature-file
loaders) returns :class:`MultimodalDataset`, so training and analysis code sees
one shape convention:

* ``xs[m]``: float32 ``[N, T_m, D_m]`` (``T_m`` and ``D_m`` may differ per
  modality; docs/math.md "Inputs"),
* ``masks[m]``: bool ``[N, T_m]``, ``True`` = valid step (docs/math.md extension), or
  ``None`` when every step is valid,
* ``y``: int64 ``[N]`` class labels,
* ``names``: one name per modality.

Batches are produced by indexing all tensors with one index tensor
(:meth:`MultimodalDataset.batches`), which is much faster than a
``torch.utils.data.DataLoader`` with a per-sample ``__getitem__`` for data that
already sits in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

Batch = Tuple[List[torch.Tensor], Optional[List[torch.Tensor]], torch.Tensor]


@dataclass
class MultimodalDataset:
    """Per-modality sequences ``xs``, optional ``masks``, labels ``y``.

    Args:
        xs: one float tensor ``[N, T_m, D_m]`` per modality.
        y: int64 labels ``[N]``.
        names: modality names (default ``m0, m1, ...``).
        masks: ``None`` or one bool tensor ``[N, T_m]`` (or ``None``) per modality.
        num_classes: number of classes (default ``max(y) + 1``).
        meta: free-form provenance (generator config, source file, ...).
    """

    xs: List[torch.Tensor]
    y: torch.Tensor
    names: Optional[List[str]] = None
    masks: Optional[List[Optional[torch.Tensor]]] = None
    num_classes: Optional[int] = None
    meta: Dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.xs, (list, tuple)) or len(self.xs) == 0:
            raise TypeError("xs must be a non-empty list of [N, T_m, D_m] tensors")
        self.xs = [torch.as_tensor(x) for x in self.xs]
        if not isinstance(self.y, torch.Tensor):
            self.y = torch.as_tensor(self.y)
        if self.y.dim() != 1:
            raise ValueError(f"y must be 1-D [N], got shape {tuple(self.y.shape)}")
        if self.y.is_floating_point():
            raise TypeError("y must hold integer class labels")
        self.y = self.y.long()
        n = self.y.shape[0]
        for m, x in enumerate(self.xs):
            if x.dim() != 3:
                raise ValueError(f"xs[{m}] must be [N, T, D], got shape {tuple(x.shape)}")
            if x.shape[0] != n:
                raise ValueError(f"xs[{m}] has {x.shape[0]} samples but y has {n}")
            if not x.is_floating_point():
                raise TypeError(f"xs[{m}] must be a floating tensor, got {x.dtype}")
        if self.names is None:
            self.names = [f"m{m}" for m in range(len(self.xs))]
        self.names = list(self.names)
        if len(self.names) != len(self.xs):
            raise ValueError(f"names has {len(self.names)} entries for {len(self.xs)} modalities")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be unique, got {self.names}")
        if self.masks is not None:
            if len(self.masks) != len(self.xs):
                raise ValueError(f"masks has {len(self.masks)} entries for {len(self.xs)} modalities")
            masks = []
            for m, (x, mk) in enumerate(zip(self.xs, self.masks)):
                if mk is not None:
                    mk = torch.as_tensor(mk).bool()
                    if tuple(mk.shape) != tuple(x.shape[:2]):
                        raise ValueError(
                            f"masks[{m}] must be [N, T] = {tuple(x.shape[:2])}, got {tuple(mk.shape)}")
                masks.append(mk)
            self.masks = None if all(mk is None for mk in masks) else masks
        if self.num_classes is None:
            self.num_classes = int(self.y.max().item()) + 1 if n else 0
        elif n and int(self.y.max()) >= self.num_classes:
            raise ValueError(f"labels reach {int(self.y.max())} but num_classes={self.num_classes}")
        if n and int(self.y.min()) < 0:
            raise ValueError("labels must be >= 0")

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_modalities(self) -> int:
        return len(self.xs)

    @property
    def widths(self) -> Dict[str, int]:
        """``{name: D_m}``, the form ``VGMR`` and the backbones accept."""
        return {n: int(x.shape[-1]) for n, x in zip(self.names, self.xs)}

    @property
    def lengths(self) -> Dict[str, int]:
        """``{name: T_m}``."""
        return {n: int(x.shape[1]) for n, x in zip(self.names, self.xs)}

    def subset(self, index) -> "MultimodalDataset":
        """The samples at ``index`` (an index tensor, list, slice or bool mask)."""
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        masks = None if self.masks is None else [None if mk is None else mk[index] for mk in self.masks]
        n = len(self)
        meta = {k: (v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
                for k, v in self.meta.items()}  # per-sample tensors follow the subset
        return MultimodalDataset([x[index] for x in self.xs], self.y[index], list(self.names), masks,
                                 self.num_classes, meta)

    def batch(self, index: torch.Tensor, device=None) -> Batch:
        """``(xs, masks, y)`` for the samples at ``index``, moved to ``device``."""
        xs = [x[index].to(device) for x in self.xs]
        masks = None
        if self.masks is not None:
            masks = [None if mk is None else mk[index].to(device) for mk in self.masks]
            if any(mk is None for mk in masks):  # backbones expect all or nothing
                masks = [torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mk is None else mk
                         for x, mk in zip(xs, masks)]
        return xs, masks, self.y[index].to(device)

    def batches(self, batch_size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None,
                device=None, drop_last: bool = False) -> Iterator[Batch]:
        """Iterate over ``(xs, masks, y)`` batches (one gather per tensor per batch)."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self.batch(order[start:start + batch_size], device)

    def full(self, device=None) -> Batch:
        """The whole split as one batch."""
        return self.batch(torch.arange(len(self)), device)

    def feature_stats(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per-feature mean and std of each modality over valid steps (``[D_m]`` each).

        Used by the noise-robustness analysis (docs/math.md §7: noise "with the per-feature
        mean and std of the training split"). Padded steps are excluded when masks exist.
        """
        means, stds = [], []
        for m, x in enumerate(self.xs):
            flat = x.reshape(-1, x.shape[-1]).double()
            if self.masks is not None and self.masks[m] is not None:
                flat = flat[self.masks[m].reshape(-1)]
            if flat.shape[0] == 0:
                means.append(torch.zeros(x.shape[-1]))
                stds.append(torch.ones(x.shape[-1]))
                continue
            means.append(flat.mean(0).float())
            stds.append(flat.std(0, unbiased=flat.shape[0] > 1).float() if flat.shape[0] > 1
                        else torch.zeros(x.shape[-1]))
        return means, stds

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.y, minlength=self.num_classes)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {tuple(x.shape[1:])}" for n, x in zip(self.names, self.xs))
        return (f"MultimodalDataset(N={len(self)}, classes={self.num_classes}, {shapes}, "
                f"masks={'yes' if self.masks is not None else 'no'})")


def stratified_split(y: torch.Tensor, fractions: Sequence[float], seed: int = 0) -> List[torch.Tensor]:
    """Split indices ``0..N-1`` into parts with the given fractions, stratified by class.

    Each class is shuffled with a seeded generator; sample ``i`` of a class of
    size ``n_c`` gets the key ``(i + 0.5) / n_c``, all samples are ordered by key
    and the order is cut at ``round(cumulative fraction · N)``. Part sizes are
    therefore exact globally and every part keeps the label distribution up to
    one sample per class. Returns one sorted index tensor per fraction.
    """
    y = torch.as_tensor(y).long().reshape(-1)
    fractions = [float(f) for f in fractions]
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    g = torch.Generator().manual_seed(int(seed))
    n = y.numel()
    perm = torch.randperm(n, generator=g)  # random order, also breaks key ties at random
    key = torch.empty(n, dtype=torch.float64)
    for c in torch.unique(y).tolist():
        idx = perm[y[perm] == c]
        key[idx] = (torch.arange(idx.numel(), dtype=torch.float64) + 0.5) / idx.numel()
    order = perm[torch.sort(key[perm], stable=True)[1]]
    cuts = [0]
    acc = 0.0
    for f in fractions[:-1]:
        acc += f
        cuts.append(int(round(acc * n)))
    cuts.append(n)
    return [torch.sort(order[cuts[p]:cuts[p + 1]])[0] for p in range(len(fractions))]
