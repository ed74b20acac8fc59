"""``fit``: the epoch loop, handing each finished epoch to a list of sinks."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine.loop import GradNormMeter, evaluate, train_one_epoch
from maskrcnn_coco.engine.sinks import EpochResult, FitState, Sink, call_sinks, default_sinks
from maskrcnn_coco.solver.param_groups import group_lrs
from maskrcnn_coco.tracking.backends import ExperimentTracker
from maskrcnn_coco.tracking.scalars import epoch_scalars
from maskrcnn_coco.utils.logs import ensure_console_logging


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    *,
    epochs: int,
    device: torch.device | str,
    mapping: CategoryMapping,
    sinks: Sequence[Sink] | None = None,
    run_dir: str | Path | None = None,
    tracker: ExperimentTracker | None = None,
    loss_weights: Mapping[str, float] | None = None,
    lr_scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    start_epoch: int = 1,
    eval_every: int = 1,
    compute_val_loss: bool = True,
    mask_threshold: float = 0.5,
    print_freq: int = 20,
    progress: bool = True,
    history: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train epochs ``start_epoch..epochs``; after each, evaluate (every ``eval_every`` epochs and at
    the last) and hand the epoch to ``sinks``.

    ``sinks`` default to ``default_sinks(run_dir, tracker)``: checkpoints under
    ``<run_dir>/checkpoints/``, the console block, the tracker, ``<run_dir>/metrics.jsonl``.
    Returns the history: one ``{"epoch": e, <tag>: value, ...}`` per epoch (tags of
    ``maskrcnn_coco.tracking.scalars``), after ``history`` (a resumed run's). A KeyboardInterrupt
    is passed to every sink's ``on_interrupt`` (the checkpointer writes ``interrupted.pth``), then re-raised.
    """
    if sinks is None:
        if run_dir is None:
            raise ValueError("fit needs run_dir (for the default sinks) or an explicit list of sinks")
        sinks = default_sinks(run_dir, tracker)
    ensure_console_logging()
    device = torch.device(device)
    state = FitState(model, optimizer, lr_scheduler, scaler, mapping, epochs, history=[dict(r) for r in history or []])
    grad_norms = GradNormMeter.from_optimizer(optimizer)
    call_sinks(sinks, "before_fit", state)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, epochs + 1):
            grad_norms.reset()
            t0 = time.perf_counter()
            train_loss = train_one_epoch(
                model, optimizer, train_loader, device, epoch,
                loss_weights=loss_weights, lr_scheduler=lr_scheduler, scaler=scaler,
                clip_grad_norm=clip_grad_norm, grad_norms=grad_norms,
                print_freq=print_freq, progress=progress,
            )
            t1 = time.perf_counter()
            val_loss: dict[str, float] | None = None
            metrics: dict[str, dict[str, float]] | None = None
            if val_loader is not None and (epoch % eval_every == 0 or epoch == epochs):
                val_loss, metrics = evaluate(
                    model, val_loader, device, mapping=mapping, compute_losses=compute_val_loss,
                    mask_threshold=mask_threshold, progress=progress,
                )
            record = {
                "train_loss": train_loss,
                "val_loss": val_loss or None,
                "metrics": metrics,
                "loss_weights": dict(loss_weights or {}),
                "lr": group_lrs(optimizer),
                "grad_norm": grad_norms.compute(),
                "time": {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1},
            }
            result = EpochResult(epoch=epoch, record=record, scalars=epoch_scalars(record))
            state.history.append({"epoch": epoch, **result.scalars})
            call_sinks(sinks, "after_epoch", state, result)
    except KeyboardInterrupt:
        call_sinks(sinks, "on_interrupt", state, epoch)
        raise
    call_sinks(sinks, "after_fit", state)
    return state.history
