"""benchmarks/gpu_proof.sh --dry-run: every step that runs without a GPU passes, the GPU tests are
skipped visibly, the results land in the folder given, nothing under benchmarks/results."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_dry_run_passes_and_writes_only_its_folder(tmp_path):
    before = sorted(os.listdir(RESULTS))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as on a GPU machine
    env.update(PYTHON=sys.executable, GPU_PROOF_OUT=str(tmp_path),
               # the bench step's command line and outputs, on tiny sizes and one level (seconds)
               GPU_PROOF_BENCH_ARGS="--tiny --levels ops")
    # bounded: the script's own deadline (its limits scaled for a small CPU), and this timeout
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_proof.sh"), "--dry-run"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=2700)
    log = run.stdout + run.stderr[-3000:]
    assert run.returncode == 0, log
    (out,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = (out / "summary.md").read_text()
    assert "Result: PASS" in summary, summary
    for step in ("install", "built_with_cuda", "check", "tests", "tests_beyond_2_31", "sanitizer_script_syntax",
                 "bench"):
        assert f"| {step} | pass |" in summary, summary
    assert "python" in (out / "env.txt").read_text()
    tests = ET.parse(out / "tests.xml").getroot()
    suite = tests if tests.tag == "testsuite" else tests[0]
    assert int(suite.get("skipped")) > 0 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    assert "needs a CUDA device" in (out / "tests.log").read_text()  # skipped, visibly, with the reason
    assert list(out.glob("bench-*.json")), sorted(p.name for p in out.iterdir())
    assert sorted(os.listdir(RESULTS)) == before
