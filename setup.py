"""Build vgmr_fast._C: the C++ CPU kernels always, the CUDA kernels when a CUDA torch and nvcc are present.

Build without isolation so the extension compiles against the torch already installed:
    pip install --no-build-isolation -e .
Set VGMR_FAST_NO_CUDA=1 to skip the CUDA kernels on a CUDA machine.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    import torch

    cpu_sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    # No -std here: torch's BuildExtension adds the standard its headers need
    # (C++17 on older torch, C++20 on torch >= 2.10). -fopenmp is required: ATen's
    # at::parallel_for is inlined into our code and is serial without it.
    # -ffp-contract=off: no implicit FMA contraction, so a value the backward recomputes
    # (gate, v = Geff * x, v - mean) rounds exactly as in the forward; with contraction the
    # recomputed v - mean can differ by an ulp, which LayerNorm's rstd amplifies.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("VGMR_FAST_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        return cpp_extension.CUDAExtension(
            "vgmr_fast._C",
            cpu_sources + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
            include_dirs=include_dirs,
            define_macros=[("VGMR_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "vgmr_fast._C",
        cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["vgmr_fast", "vgmr_fast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
