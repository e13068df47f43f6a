"""Every Triton kernel variant the launchers can choose compiles ahead of time for sm_90 and
sm_80, without a GPU and without spilling to local memory (vgmr_fast/triton/aot.py).

The interpreter accepts programs the compiler rejects and says nothing about registers,
spills or vector width: this compiles for real. The variants come from the launchers' own
configuration tables (recorded launches, not a hand list), so a new table entry is compiled
here automatically. CI compiles one variant per kernel configuration for sm_90 (dtypes and
alignment rotating across entries) and every third of those for sm_80; the full product
(every dtype x aligned/unaligned) is ``python -m vgmr_fast.triton.aot --check`` and the
resource table benchmarks/results/triton-sm90-*.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")
from triton.compiler import ASTSource  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_NEW_API = "attrs" in ASTSource.__init__.__code__.co_varnames and "constexprs" in ASTSource.__init__.__code__.co_varnames


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not _NEW_API:
        pytest.skip("this Triton's ASTSource predates (signature, constexprs, attrs)")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    # Compile, not interpret: the interpreter decides at import, so a process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-m", "vgmr_fast.triton.aot", "--check", "--subset", "ci",
                        "--arch", "90,80", "--other-archs-every", "3", "--jobs", "2", "--json", str(out)],
                       cwd=_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), r.stdout + r.stderr
    data = json.loads(out.read_text())
    data["returncode"], data["log"] = r.returncode, r.stdout + r.stderr[-4000:]
    return data


def test_no_compile_error_no_spill_every_configuration_reached(report):
    assert report["problems"] == [], "\n".join(report["problems"])
    assert report["returncode"] == 0, report["log"]


def test_enough_variants_both_archs_every_dtype(report):
    results = report["results"]
    assert len(results) >= 20
    assert {r["arch"] for r in results} == {90, 80}
    assert {r["dtype"] for r in results} >= {"fp32", "bf16", "fp16"}
    assert {r["aligned"] for r in results} == {True, False}
    kernels = {r["kernel"] for r in results}
    assert {"_gn_fwd_kernel", "_gn_bwd_kernel", "_gn_fwd_stats_kernel", "_gn_bwd_stats_kernel",
            "_sp_fwd_kernel", "_sp_bwd_kernel", "_ia_fwd_kernel", "_ia_bwd_kernel"} <= kernels


def test_specialisation_checked_against_tritons_own(report):
    # problems() compares our reading of the launcher's specialisation (divisibility by 16,
    # ints equal to 1, do_not_specialize, annotated types) with native_specialize_impl for
    # every variant, where this Triton has that function (3.4+).
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    assert report["checked_against_triton_specialisation"] > 0
