"""Iteration-level values: one host read per read-back point, shared by the progress line and the
``iter/`` scalars (``tracking.scalars.iteration_scalars``).

At every read-back (every ``print_freq`` iterations, and for the epoch's last partial window)
``IterationLog`` copies the epoch's loss sums (and the gradient-norm sums of a ``GradNormMeter``) to
the host in one ``tolist``, the only device read it makes. From it come the epoch's running means
and their weighted total (what the progress line shows, computed as it always was) and the means
over the window since the previous read-back (sums difference / iterations in the window; the first
window of an epoch continued after a stop or a resume starts where it continued). Both go to
``state.latest["losses"]`` (``LossReadBack``) for ``ProgressBar``; the window means, with every
group's lr, the timer's window (``IterationTimer``), the memory (``MemoryReader``) and the gradient
norms measured in the window, go to ``state.put_scalar``, which ``TrackerWriter`` writes at
``step=global_step``. Rank 0 only: the progress line and the trackers are rank 0's.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from maskrcnn_coco.engine.hooks import MEASURE, Hook
from maskrcnn_coco.engine.monitors import GradNormMeter
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.solver.param_groups import group_lrs
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS, iteration_scalars

log = logging.getLogger(__name__)

LATEST_KEY = "losses"  # state.latest[LATEST_KEY]: the latest LossReadBack
MIB = float(2**20)
WORKER_NAME = "pt_data_worker"  # what torch (>= 2.5) names a DataLoader worker process


@dataclass(frozen=True)
class LossReadBack:
    """The losses read back at one read-back point (raw components, ``LOSS_COMPONENTS`` order)."""

    step: int  # state.global_step at the read-back
    running: dict[str, float]  # the epoch's means so far
    running_total: float  # their weighted total
    window: dict[str, float]  # the means over the window since the previous read-back
    window_iterations: int


# ------------------------------------------------------------------------------------------- memory
def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main_rss_mb() -> float | None:
    """This process's resident memory in MiB (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        return int(_read("/proc/self/statm").split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):
        return None


def loader_workers() -> list[int]:
    """The DataLoader worker processes among this process's children (``/proc/self/task/*/children``):
    those named ``pt_data_worker``, else (a torch that names none) those running this interpreter."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    children: list[int] = []
    for tid in tids:
        try:
            children += [int(p) for p in _read(f"/proc/self/task/{tid}/children").split()]
        except OSError:
            continue
    names, exes = {}, {}
    for pid in children:
        try:
            names[pid] = _read(f"/proc/{pid}/comm").decode().strip()
            exes[pid] = os.readlink(f"/proc/{pid}/exe")
        except OSError:  # it just ended
            continue
    named = [pid for pid, name in names.items() if name == WORKER_NAME]
    if named:
        return named
    try:
        ours = os.readlink("/proc/self/exe")
    except OSError:
        return []
    return [pid for pid, exe in exes.items() if exe == ours]


def uss_pss_kib(pid: int) -> tuple[int, int] | None:
    """(USS, PSS) of a process in KiB from ``/proc/<pid>/smaps_rollup``, or None (gone, or no access)."""
    try:
        text = _read(f"/proc/{pid}/smaps_rollup")
    except OSError:
        return None
    uss = pss = 0
    for line in text.splitlines():
        if line.startswith(b"Private_"):  # Private_Clean + Private_Dirty (+ Private_Hugetlb)
            uss += int(line.split()[1])
        elif line.startswith(b"Pss:"):
            pss += int(line.split()[1])
    return uss, pss


class MemoryReader:
    """Memory at a read-back point, ``{name: MiB}`` (the ``iter/memory/<name>`` tags), host queries only.

    Every read: ``main_rss_mb`` (``/proc/self/statm``, tens of microseconds) and, on CUDA,
    ``cuda_max_allocated_mb`` (the peak since the previous read: the peak is reset at each read) and
    ``cuda_reserved_mb``. The loader workers' summed ``workers_uss_mb`` and ``workers_pss_mb`` come from
    ``/proc/<pid>/smaps_rollup``, for which the kernel walks the worker's page tables (about 6 ms of
    CPU per worker here): they are read when the time since their last read is at least their last
    cost over ``workers_share``, so they never take more than that share of the run (default 0.1%).
    """

    def __init__(self, workers_share: float = 1e-3):
        if not 0 < workers_share <= 1:
            raise ValueError(f"MemoryReader(workers_share={workers_share}): must be in (0, 1]")
        self.workers_share = workers_share
        self.device: torch.device | None = None
        self._workers_due = 0.0  # perf_counter time from which the workers are read again
        self.last_workers_cost_s: float | None = None

    def start(self, device: torch.device) -> None:
        """A window starts (an epoch): the CUDA peak is counted from here."""
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        rss = main_rss_mb()
        if rss is not None:
            out["main_rss_mb"] = rss
        if self.device is not None and self.device.type == "cuda":
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / MIB
            out["cuda_reserved_mb"] = torch.cuda.memory_reserved(self.device) / MIB
            torch.cuda.reset_peak_memory_stats(self.device)
        now = time.perf_counter()
        if now >= self._workers_due:
            out.update(self.read_workers())
            cost = time.perf_counter() - now
            self.last_workers_cost_s = cost
            self._workers_due = now + cost / self.workers_share
        return out

    @staticmethod
    def read_workers() -> dict[str, float]:
        """The loader workers' summed USS and PSS (empty without workers)."""
        found = [m for m in (uss_pss_kib(pid) for pid in loader_workers()) if m is not None]
        if not found:
            return {}
        return {"workers_uss_mb": sum(u for u, _ in found) / 1024, "workers_pss_mb": sum(p for _, p in found) / 1024}


# ------------------------------------------------------------------------------------------- the hook
class IterationLog(Hook):
    """The read-back's one host copy of the losses, for the progress line and the ``iter/`` scalars
    (module docstring). ``memory``: a ``MemoryReader`` (default: one with its defaults)."""

    priority = MEASURE + 1  # after the meters it reads (gradient norms, timer), before the monitors
    main_process_only = True

    def __init__(self, memory: MemoryReader | None = None):
        self.memory = memory if memory is not None else MemoryReader()
        self.epoch: int | None = None
        self._start: torch.Tensor | None = None  # the loss sums where the current piece of the epoch began (device)
        self._prev: list[float] | None = None  # the loss sums at the previous read-back (host)
        self._prev_n = 0
        self._weights: list[float] | None = None
        self._meter: GradNormMeter | None = None
        self._grad_start: torch.Tensor | None = None
        self._grad_prev: list[float] | None = None
        self._grad_prev_count = 0
        self._stopped_at: int | None = None  # where this epoch stopped at a step boundary in this process

    def before_epoch(self, state: TrainingState) -> None:
        stopped_at, self._stopped_at = self._stopped_at, None
        if self.epoch == state.epoch and stopped_at == state.n_batches > 0:
            return  # the epoch continues after a step-boundary stop in this process: the window goes on
        self.epoch, self._prev, self._grad_prev, self._weights = state.epoch, None, None, None
        # A device copy, no read: the first read-back of this piece reads it with the rest.
        self._start, self._prev_n = state.loss_sums.clone(), state.n_batches
        meter = state.hooks.find(GradNormMeter) if state.hooks is not None else None
        self._meter = meter if meter is not None and meter.groups else None
        # GradNormMeter replaces its sums at each update (never in place): holding the tensor keeps them.
        self._grad_start = meter.sums if self._meter is not None else None
        self._grad_prev_count = meter.count if self._meter is not None else 0
        self.memory.start(state.loss_sums.device)

    def at_boundary(self, state: TrainingState) -> None:
        self._stopped_at = state.n_batches

    def at_read_back(self, state: TrainingState) -> None:
        k, n = len(LOSS_COMPONENTS), state.n_batches
        means = state.loss_sums / n
        parts = [means, (means * state.weights).sum()[None], state.loss_sums]
        first = self._prev is None
        if first:
            parts += [self._start, state.weights]
        meter = self._meter
        grad_sums = meter.sums if meter is not None else None
        if grad_sums is not None:
            parts.append(grad_sums)
            if self._grad_prev is None and self._grad_start is not None:
                parts.append(self._grad_start)
        values = torch.cat([p.float() for p in parts]).tolist()  # the read-back point's one host copy

        running, running_total, sums = values[:k], values[k], values[k + 1: 2 * k + 1]
        at = 2 * k + 1
        if first:
            self._prev, self._weights = values[at: at + k], values[at + k: at + 2 * k]
            at += 2 * k
        iterations = n - self._prev_n
        window = [(s - p) / iterations for s, p in zip(sums, self._prev)]
        self._prev, self._prev_n = sums, n
        state.latest[LATEST_KEY] = LossReadBack(state.global_step, dict(zip(LOSS_COMPONENTS, running)), running_total,
                                                dict(zip(LOSS_COMPONENTS, window)), iterations)

        grads: dict[str, float] = {}
        if grad_sums is not None:
            g = len(meter.groups)
            now = values[at: at + g]
            if self._grad_prev is None:
                self._grad_prev = values[at + g: at + 2 * g] if self._grad_start is not None else [0.0] * g
            measured = meter.count - self._grad_prev_count
            if measured > 0:
                grads = {name: (s - p) / measured for name, s, p in zip(meter.groups, now, self._grad_prev)}
            self._grad_prev, self._grad_prev_count = now, meter.count

        times = dict(state.latest.get("time_window") or {})
        images_per_s = times.pop("images_per_s", None)
        record: dict[str, Any] = {
            "loss": dict(zip(LOSS_COMPONENTS, window)),
            "loss_weights": dict(zip(LOSS_COMPONENTS, self._weights)),
            "lr": group_lrs(state.optimizer),
            "grad_norm": grads,
            "time": times,
            "images_per_s": images_per_s,
            "memory": self.memory.read(),
        }
        for tag, value in iteration_scalars(record).items():
            state.put_scalar(tag, value)
