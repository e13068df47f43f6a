"""setup.py's choices for a build without a GPU: which CUDA toolkit, which architectures."""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("vgmr_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: setup() is not called
    return mod


def _toolkit(tmp_path, name):
    home = tmp_path / name
    (home / "include").mkdir(parents=True)
    (home / "include" / "cuda_runtime.h").write_text("")
    return str(home)


def test_torch_guess_with_headers_is_kept(setup_py, tmp_path):
    home = _toolkit(tmp_path, "cuda")
    assert setup_py.find_cuda_home(home, environ={}, which=lambda _: None) == home


def test_guess_without_headers_falls_back_to_the_toolkit_nvcc_reports(setup_py, tmp_path):
    # nvcc on PATH is a wrapper script outside its toolkit (as /usr/local/bin/nvcc can be):
    # torch guesses the directory above it, which has no headers; nvcc --dryrun names the real one.
    real = _toolkit(tmp_path, "cuda-13.0")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\necho '#$ TOP={real}/bin/..' >&2\n")
    wrapper.chmod(0o755)
    found = setup_py.find_cuda_home(str(tmp_path), environ={}, which=lambda _: str(wrapper))
    assert found == os.path.realpath(real)


def test_no_toolkit_means_no_cuda_build(setup_py, tmp_path):
    assert setup_py.find_cuda_home(str(tmp_path), environ={}, which=lambda _: None) is None


def test_an_explicit_cuda_home_without_headers_is_an_error(setup_py, tmp_path):
    with pytest.raises(SystemExit, match="CUDA_HOME"):
        setup_py.find_cuda_home(None, environ={"CUDA_HOME": str(tmp_path)}, which=lambda _: None)


def test_no_gpu_default_architectures_sass_each_ptx_newest(setup_py):
    flags = setup_py.cuda_arch_flags({}, visible_gpus=False, nvcc_archs=lambda: {75, 80, 86, 90, 100, 110, 120})
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_100,code=sm_100", "-gencode=arch=compute_120,code=sm_120",
                     "-gencode=arch=compute_120,code=compute_120"]


def test_default_architectures_this_nvcc_lacks_are_left_out(setup_py):
    flags = setup_py.cuda_arch_flags({}, visible_gpus=False, nvcc_archs=lambda: {70, 80, 90})
    assert flags[-1] == "-gencode=arch=compute_90,code=compute_90" and "sm_100" not in " ".join(flags)


def test_override_and_precedence(setup_py):
    nvcc = lambda: {80, 90}  # noqa: E731
    assert setup_py.cuda_arch_flags({"VGMR_FAST_CUDA_ARCHS": "9.0"}, False, nvcc) == [
        "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    # TORCH_CUDA_ARCH_LIST wins: torch then adds its own flags
    assert setup_py.cuda_arch_flags({"TORCH_CUDA_ARCH_LIST": "8.0", "VGMR_FAST_CUDA_ARCHS": "90"}, False, nvcc) == []
    # a visible GPU: torch builds for it
    assert setup_py.cuda_arch_flags({}, True, nvcc) == []
    with pytest.raises(SystemExit, match="VGMR_FAST_CUDA_ARCHS"):
        setup_py.cuda_arch_flags({"VGMR_FAST_CUDA_ARCHS": "sm_90"}, False, nvcc)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_the_toolkit_of_the_nvcc_on_path_has_headers(setup_py):
    home = setup_py._nvcc_toolkit(shutil.which("nvcc"))
    assert home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")), home
    assert setup_py._nvcc_archs(os.path.join(home, "bin", "nvcc")), "nvcc --list-gpu-arch listed nothing"

