"""Learning-rate schedules: per-iteration linear warmup times constant, multistep or cosine decay."""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from maskrcnn_coco.utils.errors import ConfigError

log = logging.getLogger(__name__)


def lr_factor(
    iteration: int,
    *,
    name: str,
    total_iters: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr_factor: float = 0.0,
) -> float:
    """The multiplier of every group's base lr at ``iteration`` (0-based).

    ``warmup(i) * schedule(i)`` where ``warmup(i) = warmup_factor + (1 - warmup_factor) * i / warmup_iters``
    for ``i < warmup_iters`` (else 1) and ``schedule`` is ``1`` (constant),
    ``gamma ** (number of milestones <= i)`` (multistep) or
    ``min_lr_factor + (1 - min_lr_factor) * (1 + cos(pi * i / total_iters)) / 2`` (cosine).
    """
    warm = 1.0
    if iteration < warmup_iters:
        warm = warmup_factor + (1.0 - warmup_factor) * iteration / warmup_iters
    if name == "constant":
        main = 1.0
    elif name == "multistep":
        main = gamma ** bisect.bisect_right(list(milestones), iteration)
    elif name == "cosine":
        progress = min(iteration, total_iters) / max(total_iters, 1)
        main = min_lr_factor + (1.0 - min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ConfigError(f"scheduler.name={name!r}: use constant, multistep or cosine")
    return warm * main


class _Factor:
    """Picklable lr lambda (LambdaLR saves callable objects' state in its state dict)."""

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs

    def __call__(self, iteration: int) -> float:
        return lr_factor(iteration, **self.kwargs)


def build_lr_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, iters_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration warmup + multistep/cosine; milestones in ``cfg`` are in epochs (fractions allowed).

    One factor multiplies every group's own base lr, so each group keeps its multiplier throughout.
    """
    if cfg.name not in ("constant", "multistep", "cosine"):
        raise ConfigError(f"scheduler.name={cfg.name!r}: use constant, multistep or cosine")
    factor = _Factor(
        name=cfg.name,
        total_iters=iters_per_epoch * epochs,
        warmup_iters=cfg.warmup_iters,
        warmup_factor=cfg.warmup_factor,
        milestones=sorted(round(m * iters_per_epoch) for m in cfg.milestones),
        gamma=cfg.gamma,
        min_lr_factor=cfg.min_lr_factor,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def schedule_problems(cfg: Any, iters_per_epoch: int, epochs: int) -> list[str]:
    """Schedules that cannot do what they say in a run this short, each with the keys, the numbers and a fix.

    A warmup of ``scheduler.warmup_iters >= epochs * iters_per_epoch`` never reaches ``optimizer.lr``;
    a multistep milestone at or after the last epoch never decays it. Both leave a short run
    training at a fraction of the configured lr without any error.
    """
    problems = []
    total = iters_per_epoch * epochs
    if cfg.warmup_iters >= total > 0:
        reached = lr_factor(total - 1, name="constant", total_iters=total, warmup_iters=cfg.warmup_iters,
                            warmup_factor=cfg.warmup_factor)
        problems.append(
            f"scheduler.warmup_iters={cfg.warmup_iters} but the run has {total} iterations "
            f"(epochs={epochs} x {iters_per_epoch} per epoch): lr never reaches optimizer.lr (it ends at "
            f"{reached:.0%} of it); "
            f"lower it, e.g. scheduler.warmup_iters={max(1, total // 4)}"
        )
    if cfg.name == "multistep":
        late = [m for m in cfg.milestones if round(m * iters_per_epoch) >= total]
        if late:
            suggestion = ",".join(f"{f * epochs:g}" for f in (0.75, 0.9))
            which = " lie" if len(late) == len(cfg.milestones) else f": {late} lie"
            problems.append(
                f"scheduler.milestones={list(cfg.milestones)}{which} at or beyond epochs={epochs}: the lr is "
                f"never decayed there; e.g. scheduler.milestones=[{suggestion}] (75% and 90% of the run)"
            )
    return problems


def check_schedule(cfg: Any, iters_per_epoch: int, epochs: int) -> list[str]:
    """Log a WARNING per ``schedule_problems`` entry (at start, before any iteration); return them."""
    problems = schedule_problems(cfg, iters_per_epoch, epochs)
    for problem in problems:
        log.warning(problem)
    return problems
