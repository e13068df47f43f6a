"""Loaders for the paper's datasets' pre-extracted feature files.

The files themselves are not shipped (licences, size); these loaders work when
the user has them and turn them into :class:`~vgmr_fast.data.MultimodalDataset`
splits (``{"train", "val", "test"}``). Accepted formats:

**MOSI / MOSEI aligned pickles** (:func:`load_mosi`, :func:`load_mosei`): the
CMU-MultimodalSDK-derived pickles used by MulT (``aligned_50.pkl``,
``mosei_senti_data.pkl``) and MMSA. A dict ``{split: {key: array}}`` with

* split names ``train``, ``valid`` / ``val`` / ``dev``, ``test``
  (a missing validation split is cut from train, stratified, ``val_frac``);
* ``text`` ``[N, T, D_t]`` (GloVe/BERT vectors), ``audio`` ``[N, T, D_a]``
  (COVAREP), ``vision`` ``[N, T, D_v]`` (FACET); any float dtype;
* labels in ``labels`` (MulT: ``[N, 1, 1]`` or ``[N, 1]``) or
  ``regression_labels`` (MMSA, ``[N]``): sentiment scores in ``[-3, 3]``;
* optional ``audio_lengths`` / ``vision_lengths`` / ``text_lengths`` ``[N]``
  (MMSA's unaligned variant): valid steps are the first ``length`` ones.

Choices: ``task="binary"`` maps score > 0 to class 1, else 0 (docs/math.md §6: "label
> 0 is positive"; ``drop_neutral=True`` removes score == 0 samples, the other
common protocol); ``task="7class"`` rounds the clipped score to
``{-3..3}`` → ``{0..6}``. Non-finite entries (MOSEI's COVAREP has ``-inf``)
become 0, and their count is kept in ``meta["nonfinite"]``. Without explicit
lengths, masks come from the data (``mask="nonzero"``): a step is valid when
any feature of any modality is non-zero there (aligned data shares one time
axis and is zero-padded); ``mask="none"`` keeps every step. The raw scores are
in ``meta["score"]``.

**CREMA-D features** (:func:`load_cremad`): ``.npz``, ``.pkl``/``.pickle`` or
``.pt`` files, or a directory holding ``train``/``val``/``test`` files of one
of these types. A file holds either a flat dict of arrays (one split, or all
samples with an optional ``split`` array of strings) or ``{split: dict}``.
Keys (first match wins):

* audio: ``audio``, ``a``, ``audio_features`` — ``[N, D_a]`` (one vector per
  clip, read as ``T = 1``) or ``[N, T_a, D_a]``;
* visual: ``visual``, ``video``, ``vision``, ``v``, ``visual_features`` —
  ``[N, D_v]`` or ``[N, T_v, D_v]`` (per-frame features);
* labels: ``labels``, ``label``, ``y``, ``emotion`` — integers ``0..5`` or
  emotion codes/words; or, without labels, clip names in ``names`` / ``ids`` /
  ``files`` in CREMA-D's ``ActorID_Sentence_Emotion_Level`` form
  (``1001_DFA_ANG_XX``), the emotion read from the third field.

Class order: ``NEU, HAP, SAD, FEA, DIS, ANG`` → ``0..5`` (the order of the
OGM-GE code base that most CREMA-D balancing work reuses; a choice). Without
split information the samples are split stratified and seeded
(``fractions``, default 0.8/0.1/0.1).

Pickles run code when loaded: only load files you trust.
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .dataset import MultimodalDataset, stratified_split

__all__ = ["CREMAD_CLASSES", "load_mosi", "load_mosei", "load_aligned_pickle", "load_cremad",
           "sentiment_to_class"]

CREMAD_CLASSES: Tuple[str, ...] = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
_CREMAD_WORDS = {"neutral": "NEU", "happy": "HAP", "happiness": "HAP", "sad": "SAD", "sadness": "SAD",
                 "fear": "FEA", "fearful": "FEA", "disgust": "DIS", "anger": "ANG", "angry": "ANG"}
_SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "val", "val": "val", "dev": "val",
                  "validation": "val", "test": "test", "testing": "test"}


# ----------------------------------------------------------------- helpers
def _read_file(path: str):
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if ext in (".pkl", ".pickle"):
        with open(path, "rb") as f:
            try:
                return pickle.load(f)
            except UnicodeDecodeError:  # python-2 era pickles (some MOSEI releases)
                f.seek(0)
                return pickle.load(f, encoding="latin1")
    if ext == ".pt":
        return torch.load(path, map_location="cpu", weights_only=False)
    raise ValueError(f"path: unsupported feature file extension {ext!r} (use .npz, .pkl, .pickle or .pt)")


def _to_numpy(v, what: str) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    try:
        return np.asarray(v)
    except Exception as e:  # pragma: no cover - defensive
        raise TypeError(f"{what} cannot be converted to an array: {e}") from e


def _as_sequence(arr: np.ndarray, what: str) -> Tuple[torch.Tensor, int]:
    """Float32 ``[N, T, D]`` tensor with non-finite entries set to 0 (and their count)."""
    if arr.ndim == 2:
        arr = arr[:, None, :]
    if arr.ndim != 3:
        raise ValueError(f"{what} must be [N, D] or [N, T, D], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{what} must be numeric, got dtype {arr.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    bad = ~torch.isfinite(x)
    n_bad = int(bad.sum())
    if n_bad:
        x = x.masked_fill(bad, 0.0)
    return x, n_bad


def _first_key(d: Mapping, keys: Sequence[str]):
    for k in keys:
        if k in d:
            return k
    return None


def _normalise_splits(obj, what: str) -> Optional[Dict[str, Mapping]]:
    """``{train/val/test: dict}`` when ``obj`` is a dict of split dicts, else None."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"{what} must hold a dict, got {type(obj).__name__}")
    found = {}
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() in _SPLIT_ALIASES and isinstance(v, Mapping):
            found[_SPLIT_ALIASES[k.lower()]] = v
    return found or None


def _fill_val(splits: Dict[str, MultimodalDataset], val_frac: float, seed: int) -> Dict[str, MultimodalDataset]:
    """Cut a stratified validation split from train when the file has none."""
    if "train" not in splits:
        raise ValueError(f"the file has no train split (found {sorted(splits)})")
    if "val" not in splits:
        if not 0.0 < val_frac < 1.0:
            raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
        tr, va = stratified_split(splits["train"].y, [1.0 - val_frac, val_frac], seed)
        full = splits["train"]
        splits["train"], splits["val"] = full.subset(tr), full.subset(va)
        splits["val"].meta["split"] = "val (cut from train)"
    return splits


def sentiment_to_class(score, task: str = "binary") -> torch.Tensor:
    """Map sentiment scores in ``[-3, 3]`` to class labels.

    ``binary``: ``score > 0`` → 1, else 0 (docs/math.md §6). ``7class``: ``round(clip(score, -3, 3)) + 3``.
    """
    s = torch.as_tensor(np.asarray(score, dtype=np.float64)).reshape(-1)
    if task == "binary":
        return (s > 0).long()
    if task == "7class":
        return (torch.round(s.clamp(-3, 3)) + 3).long()
    raise ValueError(f"task must be 'binary' or '7class', got {task!r}")


# ----------------------------------------------------------- MOSI / MOSEI
def load_aligned_pickle(path: str, task: str = "binary", drop_neutral: bool = False,
                        modalities: Sequence[str] = ("text", "audio", "vision"), mask: str = "nonzero",
                        val_frac: float = 0.1, seed: int = 0) -> Dict[str, MultimodalDataset]:
    """Load a MOSI/MOSEI-style aligned pickle (format in the module docstring).

    Args:
        path: the ``.pkl`` file (``.pt`` and ``.npz`` of the same dict also work).
        task: ``"binary"`` or ``"7class"`` (see :func:`sentiment_to_class`).
        drop_neutral: drop samples whose score is exactly 0 (binary task only).
        modalities: keys to load, in this order (the dataset's ``names``).
        mask: ``"nonzero"`` (derive masks from zero padding, or use ``*_lengths``
            keys when present) or ``"none"``.
        val_frac, seed: used only when the file has no validation split.
    """
    if mask not in ("nonzero", "none"):
        raise ValueError(f"mask must be 'nonzero' or 'none', got {mask!r}")
    if task not in ("binary", "7class"):
        raise ValueError(f"task must be 'binary' or '7class', got {task!r}")
    if not modalities:
        raise ValueError("modalities must name at least one key")
    obj = _read_file(path)
    raw = _normalise_splits(obj, "path")
    if raw is None:
        raise ValueError(f"path: expected a dict of splits (train/valid/test), got keys {sorted(map(str, obj))}")
    out: Dict[str, MultimodalDataset] = {}
    for split, d in raw.items():
        label_key = _first_key(d, ("labels", "regression_labels", "label"))
        if label_key is None:
            raise ValueError(f"split {split!r} has no 'labels' or 'regression_labels' key (keys: {sorted(d)})")
        score = _to_numpy(d[label_key], f"{split}/{label_key}").astype(np.float64)
        n = score.shape[0] if score.ndim else 0
        score = score.reshape(n, -1)[:, 0]
        xs, n_bad = [], 0
        for name in modalities:
            if name not in d:
                raise ValueError(f"split {split!r} has no {name!r} key (keys: {sorted(d)})")
            x, bad = _as_sequence(_to_numpy(d[name], f"{split}/{name}"), f"{split}/{name}")
            if x.shape[0] != n:
                raise ValueError(f"split {split!r}: {name!r} has {x.shape[0]} samples, labels have {n}")
            xs.append(x)
            n_bad += bad
        masks = None
        if mask == "nonzero":
            masks = []
            for name, x in zip(modalities, xs):
                lk = f"{name}_lengths"
                if lk in d:
                    length = torch.as_tensor(_to_numpy(d[lk], f"{split}/{lk}").astype(np.int64)).reshape(-1)
                    masks.append(torch.arange(x.shape[1])[None, :] < length[:, None])
                else:
                    masks.append(None)
            lengths_t = {x.shape[1] for x in xs}
            if len(lengths_t) == 1:  # aligned: one time axis shared by every modality
                shared = torch.stack([(x != 0).any(-1) for x in xs]).any(0)
                masks = [shared if mk is None else mk for mk in masks]
            else:
                masks = [(x != 0).any(-1) if mk is None else mk for x, mk in zip(xs, masks)]
        y = sentiment_to_class(score, task)
        s = torch.from_numpy(score)
        ds = MultimodalDataset(xs, y, list(modalities), masks, 2 if task == "binary" else 7,
                               {"score": s, "source": os.path.abspath(path), "split": split, "nonfinite": n_bad})
        if drop_neutral:
            if task != "binary":
                raise ValueError("drop_neutral applies to task='binary' only")
            ds = ds.subset(s != 0)
        out[split] = ds
    return _fill_val(out, val_frac, seed)


def load_mosi(path: str, **kwargs) -> Dict[str, MultimodalDataset]:
    """CMU-MOSI aligned pickle (e.g. MulT's ``aligned_50.pkl``); see :func:`load_aligned_pickle`."""
    return load_aligned_pickle(path, **kwargs)


def load_mosei(path: str, **kwargs) -> Dict[str, MultimodalDataset]:
    """CMU-MOSEI aligned pickle (e.g. ``mosei_senti_data.pkl``); see :func:`load_aligned_pickle`."""
    return load_aligned_pickle(path, **kwargs)


# ------------------------------------------------------------------ CREMA-D
def _cremad_labels(d: Mapping, what: str) -> torch.Tensor:
    key = _first_key(d, ("labels", "label", "y", "emotion"))
    if key is not None:
        lab = _to_numpy(d[key], f"{what}/{key}").reshape(-1)
        if np.issubdtype(lab.dtype, np.integer):
            if lab.size and (lab.min() < 0 or lab.max() >= len(CREMAD_CLASSES)):
                raise ValueError(f"{what}/{key}: integer labels must be in 0..5, got range "
                                 f"[{lab.min()}, {lab.max()}]")
            return torch.from_numpy(lab.astype(np.int64))
        if np.issubdtype(lab.dtype, np.floating):
            if not np.all(np.mod(lab, 1) == 0):
                raise ValueError(f"{what}/{key}: float labels must be whole numbers")
            return _cremad_labels({"labels": lab.astype(np.int64)}, what)
        codes = [str(v) for v in lab.tolist()]
    else:
        nk = _first_key(d, ("names", "ids", "files", "id"))
        if nk is None:
            raise ValueError(f"{what}: no labels (labels/label/y/emotion) and no clip names (names/ids/files)")
        codes = []
        for v in _to_numpy(d[nk], f"{what}/{nk}").reshape(-1).tolist():
            base = os.path.basename(str(v))
            parts = base.split("_")
            if len(parts) < 3:
                raise ValueError(f"{what}/{nk}: clip name {v!r} is not ActorID_Sentence_Emotion_Level")
            codes.append(parts[2])
    out = []
    for c in codes:
        k = c.strip()
        k = _CREMAD_WORDS.get(k.lower(), k.upper()[:3])
        if k not in CREMAD_CLASSES:
            raise ValueError(f"{what}: unknown CREMA-D emotion {c!r} (expected one of {CREMAD_CLASSES})")
        out.append(CREMAD_CLASSES.index(k))
    return torch.tensor(out, dtype=torch.long)


def _cremad_dataset(d: Mapping, what: str, source: str) -> Tuple[MultimodalDataset, Optional[np.ndarray]]:
    if not isinstance(d, Mapping):
        raise TypeError(f"{what} must be a dict of arrays, got {type(d).__name__}")
    ak = _first_key(d, ("audio", "a", "audio_features"))
    vk = _first_key(d, ("visual", "video", "vision", "v", "visual_features"))
    if ak is None or vk is None:
        raise ValueError(f"{what}: need an audio key (audio/a/audio_features) and a visual key "
                         f"(visual/video/vision/v/visual_features); keys: {sorted(map(str, d))}")
    xa, bad_a = _as_sequence(_to_numpy(d[ak], f"{what}/{ak}"), f"{what}/{ak}")
    xv, bad_v = _as_sequence(_to_numpy(d[vk], f"{what}/{vk}"), f"{what}/{vk}")
    y = _cremad_labels(d, what)
    if not xa.shape[0] == xv.shape[0] == y.shape[0]:
        raise ValueError(f"{what}: audio has {xa.shape[0]} samples, visual {xv.shape[0]}, labels {y.shape[0]}")
    split = None
    if "split" in d:
        split = np.array([str(s).lower() for s in _to_numpy(d["split"], f"{what}/split").reshape(-1).tolist()])
        if split.shape[0] != y.shape[0]:
            raise ValueError(f"{what}/split has {split.shape[0]} entries for {y.shape[0]} samples")
    ds = MultimodalDataset([xa, xv], y, ["audio", "visual"], None, len(CREMAD_CLASSES),
                           {"source": source, "nonfinite": bad_a + bad_v, "classes": CREMAD_CLASSES})
    return ds, split


def load_cremad(path: str, fractions: Sequence[float] = (0.8, 0.1, 0.1), val_frac: float = 0.1,
                seed: int = 0) -> Dict[str, MultimodalDataset]:
    """Load CREMA-D audio/visual features (formats in the module docstring).

    Args:
        path: a feature file, or a directory with ``train``/``val``/``test`` files.
        fractions: train/val/test fractions when the data carries no split at all.
        val_frac: fraction of train cut as validation when only train/test exist.
        seed: seed of those stratified splits.
    """
    if os.path.isdir(path):
        parts = {}
        for f in sorted(os.listdir(path)):
            stem, ext = os.path.splitext(f)
            if ext.lower() in (".npz", ".pkl", ".pickle", ".pt") and stem.lower() in _SPLIT_ALIASES:
                parts[_SPLIT_ALIASES[stem.lower()]] = _read_file(os.path.join(path, f))
        if not parts:
            raise ValueError(f"path: directory {path!r} has no train/val/test .npz/.pkl/.pt files")
        obj = parts
    else:
        obj = _read_file(path)
    raw = _normalise_splits(obj, "path")
    src = os.path.abspath(path)
    if raw is not None:
        out = {s: _cremad_dataset(d, s, src)[0] for s, d in raw.items()}
        return _fill_val(out, val_frac, seed)
    ds, split = _cremad_dataset(obj, "path", src)
    if split is not None:
        named = np.array([_SPLIT_ALIASES.get(s, s) for s in split])
        unknown = sorted(set(named.tolist()) - {"train", "val", "test"})
        if unknown:
            raise ValueError(f"path: unknown split names {unknown} in 'split'")
        out = {s: ds.subset(torch.from_numpy(named == s)) for s in ("train", "val", "test") if (named == s).any()}
        return _fill_val(out, val_frac, seed)
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, val, test), got {fractions}")
    idx = stratified_split(ds.y, fractions, seed)
    return {s: ds.subset(i) for s, i in zip(("train", "val", "test"), idx)}
