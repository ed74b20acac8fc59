"""The dev extra's linter, run as part of the suite so CI enforces it (rules pinned in pyproject.toml)."""

import shutil
import subprocess

import pytest
from conftest import REPO


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff comes with the dev extra")
def test_ruff_passes():
    proc = subprocess.run(["ruff", "check", "maskrcnn_coco", "scripts", "tests"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
