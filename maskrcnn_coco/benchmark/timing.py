"""Timing utilities: wall and process-CPU seconds of trials, their spread and A/B ratios, stage clocks."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Timing:
    """Wall and process-CPU seconds of repeated trials of one variant."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    def summary(self, images: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"wall_s": self.wall, "cpu_s": self.cpu, "wall": spread(self.wall), "cpu": spread(self.cpu)}
        if images:
            out["images_per_s"] = spread([images / w for w in self.wall if w > 0])
            out["images_per_cpu_s"] = spread([images / c for c in self.cpu if c > 0])
        return out


def spread(values: Sequence[float]) -> dict[str, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(a: Timing, b: Timing) -> dict[str, Any]:
    """Per interleaved pair: A / B of wall and of CPU time."""
    wall = [x / y for x, y in zip(a.wall, b.wall) if y > 0]
    cpu = [x / y for x, y in zip(a.cpu, b.cpu) if y > 0]
    return {"wall": {**spread(wall), "values": wall}, "cpu": {**spread(cpu), "values": cpu}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - w0, time.process_time() - c0


class StageClock:
    """Wall and CPU seconds between calls, summed per stage name (synchronised on CUDA): ``evaluate``'s ``mark``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, list[float]] = {}
        synchronize(device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def __call__(self, stage: str) -> None:
        synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        total = self.totals.setdefault(stage, [0.0, 0.0])
        total[0] += wall - self._wall
        total[1] += cpu - self._cpu
        self._wall, self._cpu = wall, cpu
