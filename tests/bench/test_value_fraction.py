"""The value-fraction benchmark is a module of the package: it runs with ``python -m`` from any
directory, with no path set up by hand."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_value_fraction_runs_as_a_module(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "vgmr_fast.bench.value_fraction", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "value_fraction 0.25 against 1" in text and "--results" in text, text
