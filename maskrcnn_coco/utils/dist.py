"""The rank seam: every part of the project asks here which process it is.

One-process defaults (rank 0 of 1) when ``torch.distributed`` is not initialised; otherwise the
process group's answer; before initialisation, the launcher's environment (``RANK``/``WORLD_SIZE``
from torchrun, ``SLURM_PROCID``/``SLURM_NTASKS`` from SLURM), so that nothing a non-zero rank does
before the process group exists writes a file or a line.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
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


# ------------------------------------------------------------------------------ process group
def launched_distributed() -> bool:
    """Whether the launcher asked for more than one process (torchrun, or SLURM tasks without torchrun)."""
    return world_size() > 1


def _slurm_master_addr() -> str | None:
    """The first host of SLURM's node list (``node[01-04],other`` -> ``node01``), without scontrol."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    first = nodes.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first


def init_distributed(device_type: str, timeout_s: float = 1800.0) -> bool:
    """Join the process group the launcher set up (``nccl`` on CUDA, ``gloo`` on CPU); True when
    distributed. Under SLURM without torchrun, rank and world size come from SLURM's variables and
    the master address from its node list."""
    if _initialized():
        return True
    if not launched_distributed():
        return False
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr() or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    import datetime

    backend = "nccl" if device_type == "cuda" else "gloo"
    torch_dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def destroy_distributed() -> None:
    if _initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (one collective); unchanged in a single process."""
    if _initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not (_initialized() and torch_dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def gather_objects_to_main(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank ``dst``, None on the others (``[obj]`` in a single
    process). Unlike ``all_gather_objects``, only ``dst`` receives and unpickles the shards: what
    every rank would otherwise hold is the whole set's results."""
    if not (_initialized() and torch_dist.get_world_size() > 1):
        return [obj]
    main = torch_dist.get_rank() == dst
    out: list[Any] | None = [None] * torch_dist.get_world_size() if main else None
    torch_dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (_initialized() and torch_dist.get_world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm running statistics) on every rank: DDP syncs gradients, but
    each rank's last forward updated its own running statistics."""
    if _initialized() and torch_dist.get_world_size() > 1:
        for buffer in module.buffers():
            torch_dist.broadcast(buffer, src=src)
