"""What produced a run: code version, software versions, hardware, command line and start time.

``record_provenance`` (called once by ``experiment.run_training``; rank 0 only) writes
``<run_dir>/provenance.json``, hands the text entry ``provenance`` (step 0) to the caller's text sink
(the trackers' ``log_text``), and says it in one console / ``train.log`` line. Nothing here may stop
a run: a missing ``git``, a folder outside a checkout or an unreadable ``/proc/cpuinfo`` leave a
field out.
"""

from __future__ import annotations

import json
import logging
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from maskrcnn_coco.utils import dist

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
PACKAGE = "maskrcnn_coco"
# Where the running code lives: git is asked about this folder, not the working directory (a run
# started from elsewhere still records the commit of the code it ran).
SOURCE_DIR = Path(__file__).resolve().parents[1]
GIT_TIMEOUT_S = 5.0


def _git(args: list[str], cwd: Path) -> str | None:
    """``git <args>`` in ``cwd``: its stdout, or None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):  # no git binary, no such folder, timeout
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(path: Path) -> dict[str, Any]:
    """``{"git_commit": sha, "git_dirty": bool}`` when ``path`` holds files tracked by a git checkout,
    else ``{}``. Dirty: a tracked file differs from the commit (untracked files do not count, as in
    ``git describe --dirty``). A package installed into an untracked folder of some checkout (a venv
    inside a repository) is not that checkout's code, hence the tracked-files test."""
    if _git(["ls-files", "--error-unmatch", "."], path) is None:
        return {}
    commit = _git(["rev-parse", "HEAD"], path)
    status = _git(["status", "--porcelain", "--untracked-files=no"], path)
    if commit is None or status is None:
        return {}
    return {"git_commit": commit, "git_dirty": bool(status)}


def package_version() -> str | None:
    """The installed distribution's version; None when the package runs uninstalled (from a source tree)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, the CPU model otherwise."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_model()


def collect_provenance(device: torch.device | str, world_size: int) -> dict[str, Any]:
    """What produced this run, as a flat JSON-ready dict (the ``git_*`` fields only in a git checkout)."""
    import torchvision

    device = torch.device(device)
    return {
        "start_time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "hostname": socket.gethostname(),
        **git_state(SOURCE_DIR),
        "version": package_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,  # None: a CPU-only build of torch
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "world_size": int(world_size),
    }


def provenance_line(info: dict[str, Any]) -> str:
    """The one console line: commit, versions, device."""
    if "git_commit" in info:
        code = f"commit {info['git_commit'][:12]}{' (dirty)' if info['git_dirty'] else ''}"
    else:
        code = "no git checkout"
    return (f"Provenance: {PACKAGE} {info['version']}, {code} | python {info['python']}, torch {info['torch']}, "
            f"torchvision {info['torchvision']}, CUDA {info['cuda'] or 'none'} | {info['device']} "
            f"({info['device_name']}) x {info['world_size']} on {info['hostname']}")


def provenance_markdown(info: dict[str, Any]) -> str:
    """The text entry: a two-column markdown table (TensorBoard's TEXT tab renders it)."""
    rows = "\n".join(f"| {key} | `{value}` |" for key, value in info.items())
    return f"| field | value |\n|---|---|\n{rows}"


def record_provenance(run_dir: str | Path, device: torch.device | str, world_size: int,
                      log_text: Callable[[str, str, int], Any] | None = None) -> dict[str, Any] | None:
    """Rank 0: collect, write ``provenance.json``, pass ``("provenance", markdown, 0)`` to ``log_text``
    and log one line; returns what it wrote. Other ranks do nothing (None)."""
    if not dist.is_main_process():
        return None
    info = collect_provenance(device, world_size)
    path = Path(run_dir) / PROVENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")
    if log_text is not None:
        log_text("provenance", provenance_markdown(info), 0)
    log.info("%s", provenance_line(info))
    return info
