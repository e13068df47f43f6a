"""Build vgmr_fast._C: the C++ CPU kernels always, the CUDA kernels when a CUDA torch and a CUDA
toolkit (nvcc and its headers) are present.

Build without isolation so the extension compiles against the torch already installed:
    pip install --no-build-isolation -e .
Set VGMR_FAST_NO_CUDA=1 to skip the CUDA kernels on a CUDA machine.

No GPU is needed to build the CUDA kernels (a Docker build, a cluster login node):
- the toolkit is torch's guess (CUDA_HOME / CUDA_PATH, else the directory above nvcc on PATH)
  when that has include/cuda_runtime.h; otherwise the toolkit nvcc itself reports (an nvcc on
  PATH may be a wrapper script outside its toolkit, e.g. /usr/local/bin/nvcc);
- the GPU architectures: TORCH_CUDA_ARCH_LIST when set (torch's syntax, e.g. "9.0;8.0+PTX");
  else VGMR_FAST_CUDA_ARCHS when set ("80;90", one -gencode per architecture and PTX for the
  newest); else the visible GPUs; else, with no GPU visible, DEFAULT_CUDA_ARCHS (those this
  nvcc supports).
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

#: Architectures built when no GPU is visible and none is given: Ampere (A100), Hopper
#: (H100/H200), Blackwell data-centre (B200) and consumer (RTX 50xx); PTX for the newest runs
#: on later GPUs through the driver's JIT.
DEFAULT_CUDA_ARCHS = "80;90;100;120"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _has_cuda_headers(home):
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _nvcc_toolkit(nvcc):
    """The toolkit directory ``nvcc`` belongs to, as nvcc reports it (``TOP`` in ``--dryrun``)."""
    try:
        run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", run.stdout + run.stderr, re.M)
    return os.path.realpath(m.group(1).strip()) if m else None


def find_cuda_home(torch_guess, environ=os.environ, which=shutil.which):
    """The CUDA toolkit to build with, or None when there is none with headers."""
    given = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if given:
        if not _has_cuda_headers(given):
            raise SystemExit(f"setup.py: CUDA_HOME/CUDA_PATH={given!r} has no include/cuda_runtime.h; "
                             "point it at a CUDA toolkit, unset it, or set VGMR_FAST_NO_CUDA=1")
        return given
    if _has_cuda_headers(torch_guess):
        return torch_guess
    nvcc = which("nvcc")
    home = _nvcc_toolkit(nvcc) if nvcc else None
    return home if _has_cuda_headers(home) else None


def _nvcc_archs(nvcc):
    """Real architectures this nvcc can compile for (``--list-gpu-arch``), e.g. {75, 80, 90}."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {int(a) for a in re.findall(r"compute_(\d+)", out)}


def parse_archs(text, source):
    """``"80;90"`` (or ``"8.0 9.0"``) -> [80, 90]; an error names ``source`` otherwise."""
    out = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        if not re.fullmatch(r"\d+(\.\d)?", item):
            raise SystemExit(f"setup.py: {source}={text!r}: expected compute capabilities such as "
                             f"'80;90' or '8.0;9.0', got {item!r}")
        out.append(int(item.replace(".", "")) if "." in item else int(item))
    if not out:
        raise SystemExit(f"setup.py: {source} is empty; expected compute capabilities such as '80;90'")
    return sorted(set(out))


def gencode_flags(archs):
    """One ``-gencode`` per architecture (SASS), and PTX for the newest."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def cuda_arch_flags(environ, visible_gpus, nvcc_archs):
    """The nvcc architecture flags we pass, or [] when torch chooses them (TORCH_CUDA_ARCH_LIST
    given, or GPUs visible to build for). ``nvcc_archs``: a callable giving the set nvcc supports."""
    if environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    if environ.get("VGMR_FAST_CUDA_ARCHS"):
        return gencode_flags(parse_archs(environ["VGMR_FAST_CUDA_ARCHS"], "VGMR_FAST_CUDA_ARCHS"))
    if visible_gpus:
        return []
    archs = parse_archs(DEFAULT_CUDA_ARCHS, "DEFAULT_CUDA_ARCHS")
    supported = nvcc_archs()
    kept = [a for a in archs if a in supported] if supported else archs
    if not kept:
        raise SystemExit(f"setup.py: this nvcc supports none of {DEFAULT_CUDA_ARCHS} "
                         f"(it lists {sorted(supported)}); set VGMR_FAST_CUDA_ARCHS")
    return gencode_flags(kept)


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
    want_cuda = torch.version.cuda is not None and os.environ.get("VGMR_FAST_NO_CUDA", "0") != "1"
    cuda_home = find_cuda_home(cpp_extension.CUDA_HOME) if want_cuda else None
    if want_cuda and cuda_home is None:
        print("setup.py: torch has CUDA but no CUDA toolkit with headers was found (CUDA_HOME, nvcc on PATH): "
              "building the CPU kernels only")
    if cuda_home is not None:
        # torch's BuildExtension reads the module-level CUDA_HOME for nvcc, headers and libraries
        cpp_extension.CUDA_HOME = cuda_home
        os.environ["CUDA_HOME"] = cuda_home
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        arch = cuda_arch_flags(os.environ, torch.cuda.device_count() > 0, lambda: _nvcc_archs(nvcc))
        print(f"setup.py: CUDA kernels with the toolkit at {cuda_home}; architectures: "
              f"{' '.join(arch) if arch else 'TORCH_CUDA_ARCH_LIST / the visible GPUs (torch)'}")
        return cpp_extension.CUDAExtension(
            "vgmr_fast._C",
            cpu_sources + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
            include_dirs=include_dirs,
            define_macros=[("VGMR_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"] + arch},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "vgmr_fast._C",
        cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


if __name__ == "__main__":  # pip and `python setup.py` run it as __main__; tests import the helpers
    setup(
        packages=find_packages(include=["vgmr_fast", "vgmr_fast.*"]),
        ext_modules=[_extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension},
    )
