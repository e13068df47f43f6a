"""vgmr-fast: fused CPU / Triton / CUDA kernels for the Value-Gated Modality Refiner.

``vgmr_fast.VGMR`` is the fused drop-in for ``vgmr_fast.reference.VGMR``: the same constructor
arguments and the same ``state_dict`` (keys and values); its parameters are stored stacked across
modalities (README, "Drop-in"). The ops live in ``vgmr_fast.ops``.

Importing the package registers the ``torch.ops.vgmr`` operators when the compiled extension
``vgmr_fast._C`` is built, as importing torchvision registers its ops. Without a build nothing is
loaded; a build that fails to load gives a warning, never an ImportError: ``vgmr_fast.reference``
is plain PyTorch and works either way.
"""
__version__ = "0.1.0"

from . import reference  # noqa: F401  (always importable: plain PyTorch)


def _register_ops() -> None:
    import importlib
    import importlib.util
    import warnings

    try:
        built = importlib.util.find_spec(f"{__name__}._C") is not None
    except (ImportError, ValueError):  # blocked (None in sys.modules): the same as not built
        built = False
    if not built:
        return
    try:
        # the op layer imports vgmr_fast._C (which registers the schemas and kernels) and adds the
        # fake kernels and autograd; it records a load failure instead of raising it
        error = importlib.import_module(f"{__name__}.ops").backend.cpp_error()
    except Exception as exc:  # noqa: BLE001  (whatever the op layer raised: the package stays importable)
        error = f"{type(exc).__name__}: {exc}"
    if error:
        warnings.warn(f"vgmr_fast: the compiled extension vgmr_fast._C did not load ({error}); torch.ops.vgmr "
                      "is not registered. vgmr_fast.reference and backend='reference' work without it; rebuild "
                      "it (python setup.py build_ext --inplace) for the fused kernels.", RuntimeWarning, stacklevel=2)


_register_ops()


def __getattr__(name):
    # VGMR on first use: the fused module needs the op layer, not the package import itself.
    if name == "VGMR":
        from .vgmr import VGMR

        return VGMR
    if name == "ops":
        import importlib

        return importlib.import_module(".ops", __name__)
    raise AttributeError(f"module 'vgmr_fast' has no attribute {name!r}")
