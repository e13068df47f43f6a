"""The README's commands pay set-up once: a second `make install` with nothing changed rebuilds nothing."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_is_a_no_op_when_nothing_changed():
    # The first call installs if this checkout has never been installed; the second must not.
    for _ in range(2):
        run = subprocess.run(["make", "--no-print-directory", "install"], cwd=ROOT, capture_output=True,
                             text=True, timeout=1800)
        assert run.returncode == 0, run.stdout + run.stderr
    assert "installed build is up to date" in run.stdout, run.stdout
    assert "pip install" not in run.stdout, run.stdout
