"""A controlled multimodal classification benchmark, generated on the fly and seeded.

None of the paper's datasets (MOSI, MOSEI, UCF101, AVE, CREMA-D) can be
downloaded here, so the package ships a task whose modality structure is known
by construction and can be dialled:

* **dominant** modality: carries the class with a strong signal
  (``dominance`` × the weak modality's amplitude), but only on a fraction
  ``1 - complementarity`` of the samples; on the rest it carries no class
  signal at all (pure noise). Its strength makes it learn fast, the classic
  setting in which it overshadows the others (modality imbalance).
* **weak** (complementary) modality: carries the class on *every* sample, with
  a weaker per-entry amplitude ``weak_snr``. It is the only source of class
  information on the ``complementarity`` fraction, so a fused model must use it.
* **noisy** (optional, ``include_noisy``): a third modality with a weak class
  signal (``noisy_snr``) that, on a fraction ``conflict`` of the samples,
  carries the signal of a *different* class (conflicting evidence).

Signals are transient events: a class direction ``u_{m,y}`` (a random vector
with unit RMS entries, fixed per modality and class by the seed) is added with
amplitude ``a_m`` on a random fraction ``event_frac`` of the valid steps, on top
of i.i.d. ``N(0, 1)`` background, so both mean and max pooling matter:
``x_{m,t} = a_m · e_t · u_{m,y} + ε_t``, ``e_t ∈ {0, 1}``.

**Noisy setting** (``noise_ratio``, ``noise_weight``): on a fraction
``noise_sample_frac`` of the samples, for each modality in
``noise_modalities``, exactly ``round(noise_ratio · L)`` of the ``L`` valid
steps are *replaced* by ``noise_weight · N(0, I)``. With ``noise_weight > 1``
the replaced steps are high-energy junk that dominates pooling unless a model
suppresses it per sample and per step: the situation VGMR's pre-fusion gate is
designed for (docs/math.md §7, noise robustness). Which samples and modalities were
corrupted is recorded in ``dataset.meta``.

Optional variable lengths (``min_length_frac < 1``): each sample keeps a
random number of valid leading steps (uniform in
``[ceil(min_length_frac · T_m), T_m]``); the rest is zero padding and the
dataset carries boolean masks (True = valid).

Everything is drawn from one ``torch.Generator`` seeded with ``seed``; the
prototypes are shared by the three splits (train/val/test), which are cut from
one stream, so the same ``(config, seed)`` always gives the same tensors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from .dataset import MultimodalDataset

__all__ = ["BenchmarkConfig", "PRESETS", "make_benchmark", "generate"]


@dataclass
class BenchmarkConfig:
    """Knobs of the controlled benchmark (see the module docstring for the process).

    Attributes:
        num_classes: number of classes ``C`` (>= 2).
        n_train, n_val, n_test: split sizes.
        names: modality names; the first is the dominant modality, the second the
            weak complementary one, the third (used when ``include_noisy``) the
            noisy/conflicting one.
        lengths: sequence length ``T_m`` per modality.
        widths: feature width ``D_m`` per modality.
        weak_snr: per-entry amplitude of the weak modality's class events.
        dominance: dominant amplitude / weak amplitude (>= 0).
        complementarity: fraction of samples on which the dominant modality carries
            no class signal (so only the others can classify them), in [0, 1].
        include_noisy: whether to generate the third modality.
        noisy_snr: per-entry amplitude of the third modality's class events.
        conflict: fraction of samples on which the third modality shows another
            class's events, in [0, 1].
        event_frac: fraction of valid steps that carry a class event, in (0, 1].
        noise_ratio: fraction of valid steps replaced by noise, in [0, 1].
        noise_weight: std of the replacing noise (the background has std 1).
        noise_modalities: names (or indices) of the modalities that get corrupted.
        noise_sample_frac: fraction of samples that get corrupted, in [0, 1].
        min_length_frac: minimum fraction of valid steps per sample, in (0, 1];
            1.0 = fixed lengths and no masks.
        weak_nuisance: std of a per-sample, time-constant nuisance added to the
            weak modality inside a random ``weak_nuisance_rank``-dimensional
            subspace (fixed by the seed); the weak class directions are made
            orthogonal to it. Mean pooling does not average it away, so an
            encoder must *learn* to project it out: a random (untrained) encoder
            mixes it into every feature. 0 = off (no extra draws: the other
            presets' tensors are unchanged).
        weak_nuisance_rank: dimension of that subspace, in ``[0, widths[1])``.
    """

    num_classes: int = 4
    n_train: int = 1600
    n_val: int = 400
    n_test: int = 800
    names: Tuple[str, ...] = ("dominant", "weak", "noisy")
    lengths: Tuple[int, ...] = (16, 12, 12)
    widths: Tuple[int, ...] = (32, 24, 16)
    weak_snr: float = 0.15
    dominance: float = 3.0
    complementarity: float = 0.4
    include_noisy: bool = True
    noisy_snr: float = 0.12
    conflict: float = 0.0
    event_frac: float = 0.5
    noise_ratio: float = 0.0
    noise_weight: float = 0.0
    noise_modalities: Tuple[Union[str, int], ...] = ("noisy",)
    noise_sample_frac: float = 1.0
    min_length_frac: float = 1.0
    weak_nuisance: float = 0.0
    weak_nuisance_rank: int = 0

    def __post_init__(self):
        self.names = tuple(self.names)
        self.lengths = tuple(int(t) for t in self.lengths)
        self.widths = tuple(int(d) for d in self.widths)
        self.noise_modalities = tuple(self.noise_modalities)
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        for k in ("n_train", "n_val", "n_test"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be a non-negative int, got {v!r}")
        m = self.num_modalities
        if len(self.names) < m:
            raise ValueError(f"names needs {m} entries (include_noisy={self.include_noisy}), got {self.names}")
        if len(set(self.names[:m])) != m:
            raise ValueError(f"names must be unique, got {self.names}")
        for k in ("lengths", "widths"):
            v = getattr(self, k)
            if len(v) < m:
                raise ValueError(f"{k} needs {m} entries (include_noisy={self.include_noisy}), got {v}")
            if any(t < 1 for t in v[:m]):
                raise ValueError(f"{k} entries must be >= 1, got {v}")
        for k in ("complementarity", "conflict", "noise_ratio", "noise_sample_frac"):
            v = float(getattr(self, k))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {v}")
        for k in ("weak_snr", "dominance", "noisy_snr", "noise_weight"):
            if float(getattr(self, k)) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if not 0.0 < self.event_frac <= 1.0:
            raise ValueError(f"event_frac must be in (0, 1], got {self.event_frac}")
        if not 0.0 < self.min_length_frac <= 1.0:
            raise ValueError(f"min_length_frac must be in (0, 1], got {self.min_length_frac}")
        if float(self.weak_nuisance) < 0:
            raise ValueError(f"weak_nuisance must be >= 0, got {self.weak_nuisance}")
        if not isinstance(self.weak_nuisance_rank, int) or not 0 <= self.weak_nuisance_rank < self.widths[1]:
            raise ValueError(f"weak_nuisance_rank must be an int in [0, widths[1]={self.widths[1]}), "
                             f"got {self.weak_nuisance_rank!r}")
        self.noise_indices()  # validates noise_modalities

    @property
    def num_modalities(self) -> int:
        return 3 if self.include_noisy else 2

    def noise_indices(self) -> Tuple[int, ...]:
        """Indices of the corrupted modalities that exist in this configuration."""
        out = []
        active = self.names[: self.num_modalities]
        for v in self.noise_modalities:
            if isinstance(v, int) and not isinstance(v, bool):
                if not 0 <= v < len(self.names):
                    raise ValueError(f"noise_modalities index {v} out of range for names {self.names}")
                idx = v
            elif isinstance(v, str):
                if v not in self.names:
                    raise ValueError(f"noise_modalities entry {v!r} is not one of names {self.names}")
                idx = self.names.index(v)
            else:
                raise TypeError(f"noise_modalities entries must be str or int, got {type(v).__name__}")
            if idx < len(active) and idx not in out:
                out.append(idx)
        return tuple(out)

    def to_dict(self) -> Dict:
        return asdict(self)


#: Named settings. ``clean``: the three modalities, no corruption, no conflict.
#: ``noisy``: the third modality conflicts on 30 % of samples, and on half of the
#: samples 40 % of the steps of the dominant and the third modality are replaced
#: by noise with 3x the background std (instance-wise unreliability, the case the
#: paper's noise analysis probes). ``bimodal``: dominant + weak only.
#: ``imbalanced``: dominant + weak, where joint training under-trains the weak
#: modality's encoder (the modality-imbalance setting of OGM-GE and IIBalance).
#: The dominant modality is easy (strong, 32-dim) but silent on 15 % of the
#: samples; the weak one carries the class on every sample, with less
#: information (a lower IIBalance budget), and its 128 dims hold a 96-dim
#: per-sample nuisance (std 2) that its encoder must learn to project out. In
#: joint training the dominant modality fits the data first and the weak
#: encoder stays behind (linear-probe gap >= 10 points, docs/balance.md).
PRESETS: Dict[str, Dict] = {
    "clean": {},
    "noisy": dict(conflict=0.3, noise_ratio=0.4, noise_weight=3.0,
                  noise_modalities=("dominant", "noisy"), noise_sample_frac=0.5),
    "bimodal": dict(include_noisy=False),
    "imbalanced": dict(include_noisy=False, widths=(32, 128), dominance=3.5, complementarity=0.15, weak_snr=0.17,
                       weak_nuisance=2.0, weak_nuisance_rank=96),
}


def _class_directions(gen: torch.Generator, c: int, d: int) -> torch.Tensor:
    """``[C, D]`` random directions with unit RMS entries (``‖u‖ = sqrt(D)``)."""
    u = torch.randn(c, d, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(d)
    return u


def _nuisance_subspace(gen: torch.Generator, directions: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A random orthonormal ``[D, rank]`` basis ``Q`` and ``directions`` projected off it (unit RMS again)."""
    d = directions.shape[1]
    q, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
    u = directions - (directions @ q) @ q.t()
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(d)
    return q, u


def _pick_k(gen: torch.Generator, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool ``[N, T]``: exactly ``k[i]`` random valid steps of row ``i`` (vectorised).

    Random keys for valid steps, ``+inf`` for padding; a step is picked when its
    rank within its row is below ``k[i]``.
    """
    keys = torch.rand(valid.shape, generator=gen, dtype=torch.float64)
    keys = keys.masked_fill(~valid, float("inf"))
    ranks = keys.argsort(dim=1).argsort(dim=1)
    return (ranks < k[:, None]) & valid


def generate(config: BenchmarkConfig, n: int, gen: torch.Generator,
             directions: Sequence[torch.Tensor], nuisance: Optional[torch.Tensor] = None) -> MultimodalDataset:
    """Draw ``n`` samples of ``config`` from ``gen`` with fixed class ``directions``.

    ``nuisance``: orthonormal ``[D_weak, r]`` basis of the weak modality's
    nuisance subspace (:func:`make_benchmark` draws it when ``weak_nuisance > 0``).
    """
    cfg = config
    c = cfg.num_classes
    m_count = cfg.num_modalities
    y = torch.randint(0, c, (n,), generator=gen)
    informative = torch.rand(n, generator=gen, dtype=torch.float64) >= cfg.complementarity
    conflict = torch.zeros(n, dtype=torch.bool)
    if cfg.include_noisy:
        conflict = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.conflict
    # a conflicting sample shows one of the other C-1 classes, uniformly
    shift = torch.randint(1, c, (n,), generator=gen)
    y_conflict = torch.where(conflict, (y + shift) % c, y)
    corrupt_sample = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.noise_sample_frac
    noise_idx = cfg.noise_indices()

    amps = [cfg.weak_snr * cfg.dominance, cfg.weak_snr, cfg.noisy_snr]
    xs, masks = [], []
    corrupted = torch.zeros(n, m_count, dtype=torch.bool)
    for m in range(m_count):
        t, d = cfg.lengths[m], cfg.widths[m]
        steps = torch.arange(t)
        if cfg.min_length_frac < 1.0:
            lo = max(1, math.ceil(cfg.min_length_frac * t))
            length = torch.randint(lo, t + 1, (n,), generator=gen)
        else:
            length = torch.full((n,), t)
        valid = steps[None, :] < length[:, None]
        k_event = torch.clamp((cfg.event_frac * length.double()).round().long(), min=1)
        events = _pick_k(gen, valid, k_event)
        label = y_conflict if m == 2 else y
        amp = torch.full((n,), amps[m], dtype=torch.float64)
        if m == 0:
            amp = torch.where(informative, amp, torch.zeros_like(amp))
        signal = directions[m][label]  # [N, D]: one gather
        x = torch.randn(n, t, d, generator=gen, dtype=torch.float64)
        x = x + (amp[:, None, None] * events[..., None].double()) * signal[:, None, :]
        if m == 1 and nuisance is not None:
            coords = cfg.weak_nuisance * torch.randn(n, nuisance.shape[1], generator=gen, dtype=torch.float64)
            x = x + (coords @ nuisance.t())[:, None, :]
        if m in noise_idx and cfg.noise_ratio > 0:
            k_noise = (cfg.noise_ratio * length.double()).round().long()
            k_noise = torch.where(corrupt_sample, k_noise, torch.zeros_like(k_noise))
            replaced = _pick_k(gen, valid, k_noise)
            junk = cfg.noise_weight * torch.randn(n, t, d, generator=gen, dtype=torch.float64)
            x = torch.where(replaced[..., None], junk, x)
            corrupted[:, m] = replaced.any(1)
        x = x * valid[..., None]
        xs.append(x.float())
        masks.append(valid if cfg.min_length_frac < 1.0 else None)
    meta = {"dominant_informative": informative, "conflict": conflict, "corrupted": corrupted,
            "config": cfg.to_dict()}
    return MultimodalDataset(xs, y, list(cfg.names[:m_count]), masks, c, meta)


def make_benchmark(config: Optional[Union[BenchmarkConfig, str]] = None, seed: int = 0,
                   **overrides) -> Dict[str, MultimodalDataset]:
    """Train/val/test splits of the controlled benchmark.

    Args:
        config: a :class:`BenchmarkConfig`, the name of a preset in :data:`PRESETS`
            (``"clean"``, ``"noisy"``, ``"bimodal"``), or ``None`` for ``"clean"``.
        seed: seed of the one generator everything is drawn from.
        **overrides: fields replaced in the config (e.g. ``n_train=200``).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` of :class:`MultimodalDataset`.
    """
    if config is None:
        config = "clean"
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"config must be a BenchmarkConfig or one of {sorted(PRESETS)}, got {config!r}")
        config = BenchmarkConfig(**{**PRESETS[config], **overrides})
    elif isinstance(config, BenchmarkConfig):
        if overrides:
            config = replace(config, **overrides)
    else:
        raise TypeError(f"config must be a BenchmarkConfig, a preset name or None, got {type(config).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    gen = torch.Generator().manual_seed(seed)
    directions = [_class_directions(gen, config.num_classes, config.widths[m])
                  for m in range(config.num_modalities)]
    nuisance = None
    if config.weak_nuisance > 0 and config.weak_nuisance_rank > 0:
        nuisance, directions[1] = _nuisance_subspace(gen, directions[1], config.weak_nuisance_rank)
    out = {}
    for split, n in (("train", config.n_train), ("val", config.n_val), ("test", config.n_test)):
        ds = generate(config, n, gen, directions, nuisance)
        ds.meta.update(split=split, seed=seed)
        out[split] = ds
    return out
