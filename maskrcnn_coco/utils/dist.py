"""The rank seam: every part of the project asks here which process it is.

One-process defaults (rank 0 of 1) when ``torch.distributed`` is not initialised; otherwise the
process group's answer; before initialisation, the launcher's environment (``RANK``/``WORLD_SIZE``
from torchrun, ``SLURM_PROCID``/``SLURM_NTASKS`` from SLURM), so that nothing a non-zero rank does
before the process group exists writes a file or a line.
"""

from __future__ import annotations

import logging
import os

import torch.distributed as torch_dist


def _initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return default


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    if _initialized():
        return torch_dist.get_rank()
    return _env_int("RANK", "SLURM_PROCID", default=0)


def world_size() -> int:
    """Number of processes in the job (1 when not distributed)."""
    if _initialized():
        return torch_dist.get_world_size()
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def local_rank() -> int:
    """Rank within this machine: which local device this process uses."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)


def is_main_process() -> bool:
    """True on the one process that prints and writes (rank 0)."""
    return rank() == 0


def synchronize() -> None:
    """A barrier across ranks; a no-op in a single process."""
    if _initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


class RankZeroFilter(logging.Filter):
    """A logging filter that lets records through on rank 0 only (used by every console/file handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()
