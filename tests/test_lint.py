"""The dev extra's linter, run as part of the suite so CI enforces it (rules pinned in pyproject.toml)."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # ruff in a subprocess


def test_ruff_passes():
    if importlib.util.find_spec("ruff") is None:
        pytest.fail(f"ruff is not installed in {sys.prefix}: it is a dev dependency, install it with pip install -e '.[dev]'")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "maskrcnn_coco", "scripts", "tests"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
