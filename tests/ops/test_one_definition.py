"""One fact in one place for the C++ sources: the Philox constants and round are
defined once (csrc/vgmr_math.h) and the SIMD stream is built on them; the argument checks of
the CPU kernels and the CUDA binding come from one header (csrc/op_checks.h)."""
from __future__ import annotations

from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu"))


def _count(needle: str) -> dict[str, int]:
    out = {}
    for p in SOURCES:
        n = p.read_text().lower().count(needle.lower())
        if n:
            out[str(p.relative_to(CSRC))] = n
    return out


def test_philox_constants_defined_once():
    for constant in ("0xD2511F53", "0xCD9E8D57", "0x9E3779B9", "0xBB67AE85"):
        assert _count(constant) == {"vgmr_math.h": 1}, constant


def test_simd_stream_uses_the_shared_round():
    text = (CSRC / "cpu" / "simd.h").read_text()
    assert "vgmr::philox10(" in text


def test_cpu_files_do_one_job():
    # the vector helpers and the ISA dispatch live in simd.h, not in a kernel file
    for kernel in sorted((CSRC / "cpu").glob("*.cpp")):
        text = kernel.read_text()
        assert "__builtin_cpu_supports" not in text and "struct V {" not in text, kernel.name
        assert len(text.splitlines()) <= 600, kernel.name


def test_argument_checks_come_from_one_header():
    assert (CSRC / "op_checks.h").is_file()
    for user in ("cpu/cpu_common.h", "cuda/binding.cpp"):
        assert '#include "op_checks.h"' in (CSRC / user).read_text(), user
    # gate_norm's input checks are op_checks.h's, called by both backends
    for user in ("cpu/gate_norm.cpp", "cuda/binding.cpp"):
        assert "checks::gate_inputs(" in (CSRC / user).read_text(), user
    assert "void check_param(" not in (CSRC / "cpu" / "gate_norm.cpp").read_text()
    # no second definition of the shared checks in the binding
    binding = (CSRC / "cuda" / "binding.cpp").read_text()
    for local in ("void check_same_device(", "void check_dtype(", "void check_shape(", "void check_dim("):
        assert local not in binding, local
