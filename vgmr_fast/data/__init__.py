"""Data: the controlled benchmark task and loaders for the paper's feature files.

* :func:`make_benchmark` / :class:`BenchmarkConfig` — the seeded synthetic task
  (dominant, weak-complementary and optional noisy/conflicting modality).
* :func:`load_mosi`, :func:`load_mosei`, :func:`load_cremad` — feature files the
  user already has (formats documented in :mod:`vgmr_fast.data.features`).
* :class:`MultimodalDataset` — the one container every source returns.
"""
from .dataset import MultimodalDataset, stratified_split
from .features import (CREMAD_CLASSES, load_aligned_pickle, load_cremad, load_mosei, load_mosi,
                       sentiment_to_class)
from .synthetic import PRESETS, BenchmarkConfig, make_benchmark

__all__ = ["MultimodalDataset", "stratified_split", "BenchmarkConfig", "PRESETS", "make_benchmark",
           "load_mosi", "load_mosei", "load_aligned_pickle", "load_cremad", "CREMAD_CLASSES",
           "sentiment_to_class"]
