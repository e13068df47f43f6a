"""vgmr-fast: fused CPU / Triton / CUDA kernels for the Value-Gated Modality Refiner.

``vgmr_fast.VGMR`` is the fused drop-in for ``vgmr_fast.reference.VGMR`` (same
constructor arguments and state_dict; its parameters are stored stacked across modalities).
The ops live in ``vgmr_fast.ops``. Importing the package or ``vgmr_fast.reference`` never
loads the compiled extension.
"""
__version__ = "0.1.0"

from . import reference  # noqa: F401  (always importable: plain PyTorch)


def __getattr__(name):
    # Lazy: importing the package must not require the compiled extension.
    if name == "VGMR":
        from .vgmr import VGMR

        return VGMR
    if name == "ops":
        import importlib

        return importlib.import_module(".ops", __name__)
    raise AttributeError(f"module 'vgmr_fast' has no attribute {name!r}")
