"""Benchmark sizes, per device, and the inputs built for them.

- ``mosei``: the paper's MOSEI-like setting: B=32, T=50, widths 768/74/35 (text/audio/vision), d=128, fp32.
- ``large``: a large backbone, chosen per device: CPU B=16, T=256, widths 1024/512/256, d=256, fp32;
  GPU B=16, T=512, widths 1024/768/512, d=256, bf16.
- sweep over T at the MOSEI widths (B=32, fp32).
- ``--tiny`` (hidden; for the tests): a few steps and widths, so a whole run takes seconds.

Masks: every input has a ``[B, T]`` bool mask; sample b's valid length is drawn uniformly from
``[ceil(T/2), T]`` (a fixed generator), as padded real-data batches look.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class Setting:
    name: str
    B: int
    T: int
    widths: tuple
    d: int
    dtype: str  # "float32" / "bfloat16" / "float16"
    doc: str = ""

    @property
    def M(self) -> int:
        return len(self.widths)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        w = "/".join(str(x) for x in self.widths)
        return f"B={self.B} T={self.T} widths={w} d={self.d} {self.dtype}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


def settings_for(device: str, tiny: bool = False) -> list[Setting]:
    if tiny:
        return [
            Setting("mosei", 2, 6, (16, 8, 4), 8, "float32", "tiny stand-in for the MOSEI-like setting (tests)"),
            Setting("large", 2, 10, (24, 12, 6), 8, "float32", "tiny stand-in for the large setting (tests)"),
        ]
    mosei = Setting("mosei", 32, 50, (768, 74, 35), 128, "float32",
                    "paper's MOSEI-like setting (text/audio/vision feature widths of CMU-MOSEI)")
    if device == "cuda":
        large = Setting("large", 16, 512, (1024, 768, 512), 256, "bfloat16", "large backbone, GPU choice")
    else:
        large = Setting("large", 16, 256, (1024, 512, 256), 256, "float32", "large backbone, CPU choice")
    return [mosei, large]


def sweep_for(device: str, quick: bool, tiny: bool) -> tuple[Setting, list[int]]:
    if tiny:
        return Setting("sweep", 2, 0, (16, 8, 4), 8, "float32", "tiny sweep (tests)"), [4, 8]
    base = Setting("sweep", 32, 0, (768, 74, 35), 128, "float32", "MOSEI widths, B=32, sweep over T")
    if device == "cuda":
        return base, ([50, 200, 800] if quick else [25, 50, 100, 200, 400, 800, 1600])
    return base, ([25, 50, 100] if quick else [25, 50, 100, 200, 400])


def with_T(s: Setting, T: int) -> Setting:
    return Setting(f"{s.name}-T{T}", s.B, T, s.widths, s.d, s.dtype, s.doc)


def with_B(s: Setting, B: int) -> Setting:
    return Setting(f"{s.name}-B{B}", B, s.T, s.widths, s.d, s.dtype, s.doc)


def make_masks(B: int, T: int, M: int, device: str, generator: torch.Generator) -> list:
    masks = []
    lo = math.ceil(T / 2)
    for _ in range(M):
        lengths = torch.randint(lo, T + 1, (B,), generator=generator)
        mk = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
        masks.append(mk.to(device))
    return masks


def make_batch(s: Setting, device: str, generator: torch.Generator, requires_grad: bool = False):
    """One input set ``(xs, masks)`` for a setting (features in the setting's dtype)."""
    xs = [torch.randn(s.B, s.T, D, generator=generator).to(device=device, dtype=s.torch_dtype)
          .requires_grad_(requires_grad) for D in s.widths]
    return xs, make_masks(s.B, s.T, s.M, device, generator)


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
