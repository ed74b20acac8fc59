"""The wheel (a non-editable install): it ships every package and every conf/ YAML, and its console scripts
train from a folder that is not the checkout, with the conf/ packaged inside it.

The wheel is built offline from a copy of the sources (no build/ or egg-info in the shared checkout),
installed with ``pip install --no-deps --target`` and run by a bare temporary venv that sees this venv's
site-packages (torch and the rest) through a ``.pth`` line. Lines of a ``.pth`` file are not themselves
scanned for ``.pth`` files, so the editable install's finder stays out, and the target folder comes first
on PYTHONPATH anyway; the tests assert that the wheel's copy is the one imported.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TINY_OVERRIDES


def _can_build_wheels() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    # setuptools >= 70.1 has bdist_wheel built in; older ones need the wheel package.
    return importlib.util.find_spec("setuptools.command.bdist_wheel") is not None or importlib.util.find_spec("wheel") is not None


def wheel_test(test):
    """slow: builds and installs a wheel, trains in subprocesses."""
    needs_wheel = pytest.mark.skipif(not _can_build_wheels(), reason="building a wheel offline needs setuptools (and bdist_wheel)")
    return pytest.mark.slow(needs_wheel(test))

PIP_ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, **kwargs)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


class Installed:
    def __init__(self, wheel: Path, target: Path, python: Path, root: Path):
        self.wheel, self.target, self.python, self.root = wheel, target, python, root

    @property
    def env(self) -> dict:
        """The wheel's copy first on the path; one dataset cache for the module's runs."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        return {**env, "PYTHONPATH": str(self.target), "PYTHONUNBUFFERED": "1", "MASKRCNN_COCO_CACHE": str(self.root / "cache")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("maskrcnn_coco", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)

    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, src],
         env=PIP_ENV)
    (wheel,) = dist.glob("maskrcnn_coco-*.whl")

    target = root / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "-q", "--target", target, wheel],
         env=PIP_ENV)

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site_dir = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    Path(site_dir, "_maskrcnn_coco_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    return Installed(wheel, target, python, root)


@wheel_test
def test_wheel_ships_every_module_and_yaml(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    yamls = sorted(p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml"))
    assert "hydra/job_logging/maskrcnn.yaml" in yamls and "config.yaml" in yamls
    missing = [y for y in yamls if f"maskrcnn_coco/conf/{y}" not in names]
    assert not missing, f"conf/ YAMLs missing from the wheel (package list in pyproject.toml?): {missing}"
    modules = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "maskrcnn_coco").rglob("*.py") if "__pycache__" not in p.parts)
    missing = [m for m in modules if m not in names]
    assert not missing, f"modules missing from the wheel (add the sub-package to pyproject.toml's packages): {missing}"
    # conf/ lives inside the package: nothing else at the top level.
    assert {n.split("/")[0] for n in names} == {"maskrcnn_coco", "maskrcnn_coco-0.1.0.dist-info"}
    entry_points = zipfile.ZipFile(installed.wheel).read("maskrcnn_coco-0.1.0.dist-info/entry_points.txt").decode()
    assert "maskrcnn-train = maskrcnn_coco.cli.train:main" in entry_points
    assert "maskrcnn-probe = maskrcnn_coco.cli.probe:cli" in entry_points


@wheel_test
def test_wheel_copy_is_imported_finds_its_conf_and_runs_probe_script(installed, tmp_path):
    # One interpreter (one torch import) for both checks: which copy is imported, then the
    # maskrcnn-probe console script, run as the launcher would run it.
    script = installed.target / "bin" / "maskrcnn-probe"
    code = ("import runpy, sys; import maskrcnn_coco; from maskrcnn_coco.config import config_dir; "
            "print(maskrcnn_coco.__file__); print(config_dir()); "
            f"sys.argv = [{str(script)!r}, '--help']; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = _run([installed.python, "-c", code], cwd=tmp_path, env=installed.env)
    package_file, conf, *help_text = proc.stdout.splitlines()
    assert Path(package_file) == installed.target / "maskrcnn_coco" / "__init__.py", proc.stdout
    assert Path(conf) == installed.target / "maskrcnn_coco" / "conf", proc.stdout
    assert help_text[0].startswith("usage: maskrcnn-probe"), proc.stdout
    assert "--num-batches" in proc.stdout


def _train_overrides(runs: Path) -> list[str]:
    return ["epochs=1", *TINY_OVERRIDES, f"runs_dir={runs}"]


def _check_training(proc: subprocess.CompletedProcess, runs: Path) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Epoch 1/1" in proc.stdout, proc.stdout[-3000:]
    (run_dir,) = (runs / "maskrcnn").iterdir()
    assert (run_dir / "checkpoints" / "last.pth").is_file()
    assert (run_dir / "metrics.jsonl").is_file()


@wheel_test
def test_console_script_trains_outside_the_checkout(installed, tmp_path):
    script = installed.target / "bin" / "maskrcnn-train"
    assert script.is_file()
    runs = tmp_path / "runs"
    proc = subprocess.run([str(installed.python), str(script), *_train_overrides(runs)], cwd=tmp_path,
                          env=installed.env, capture_output=True, text=True, timeout=300, check=False)
    _check_training(proc, runs)


@wheel_test
def test_python_m_trains_outside_the_checkout(installed, tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run([str(installed.python), "-m", "maskrcnn_coco", *_train_overrides(runs)], cwd=tmp_path,
                          env=installed.env, capture_output=True, text=True, timeout=300, check=False)
    _check_training(proc, runs)


def test_the_mlflow_ui_has_an_extra_and_training_does_not_pull_it():
    """``mlflow ui`` needs the full mlflow package (its server and web app; mlflow-skinny has neither):
    the ``mlflow-ui`` extra brings it, the ``mlflow`` extra stays the client that training needs."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {key: {re.split(r"[<>=!~ \[;]", r)[0] for r in requirements} for key, requirements in extras.items()}
    assert "mlflow" in names["mlflow-ui"] and "maskrcnn_coco" in names["mlflow-ui"]
    assert "mlflow-skinny" in names["mlflow"] and "mlflow" not in names["mlflow"]
