"""``fit``: the epoch loop, handing each finished epoch to a list of sinks."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine.checkpoint import TrainingState
from maskrcnn_coco.engine.loop import (
    DivergenceGuard,
    EpochProgress,
    GradNormMeter,
    IterationTimer,
    SpikeMonitor,
    TrainingStopped,
    evaluate,
    module_lrs,
    train_one_epoch,
)
from maskrcnn_coco.engine.signals import GracefulStop, StopRequested
from maskrcnn_coco.engine.sinks import EpochResult, Sink, call_sinks, default_sinks
from maskrcnn_coco.solver.param_groups import group_lrs
from maskrcnn_coco.tracking.backends import ExperimentTracker
from maskrcnn_coco.tracking.scalars import epoch_scalars
from maskrcnn_coco.utils.dist import all_reduce_sum, broadcast_buffers, is_main_process, world_size
from maskrcnn_coco.utils.errors import UserError
from maskrcnn_coco.utils.logs import ensure_console_logging

log = logging.getLogger(__name__)


class RunInterrupted(Exception):
    """Training stopped on a signal after writing a resumable checkpoint (``path``)."""

    def __init__(self, signum: int, epoch: int, iteration: int | None, path: Path | None):
        name = signal.Signals(signum).name
        where = f"epoch {epoch}" + (f", iteration {iteration}" if iteration is not None else " (after its training)")
        saved = f"saved {path}; continue with resume={path} (or resume=auto)" if path else "no checkpoint written"
        super().__init__(f"Stopped by {name} in {where}: {saved}")
        self.signum, self.exit_code = signum, 128 + signum


class EvaluationFailed(UserError):
    """Evaluation raised after an epoch was trained; the epoch's checkpoint is already on disk."""


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
    state: TrainingState | None = None,
    start_progress: EpochProgress | None = None,
    divergence: DivergenceGuard | None = None,
    checkpoint_every_n_iters: int | None = None,
    amp: str | None = None,
    grad_norm_every: int = 1,
    eval_backend: str = "auto",
    spikes: SpikeMonitor | None = None,
) -> list[dict[str, Any]]:
    """Train epochs ``start_epoch..epochs``; after each, evaluate (every ``eval_every`` epochs and at
    the last) and hand the epoch to ``sinks``.

    ``sinks`` default to ``default_sinks(run_dir, tracker)``: checkpoints under
    ``<run_dir>/checkpoints/``, the console block, the tracker, ``<run_dir>/metrics.jsonl``.
    Returns the history: one ``{"epoch": e, <tag>: value, ...}`` per epoch (tags of
    ``maskrcnn_coco.tracking.scalars``), after ``history`` (a resumed run's).

    ``state`` (from ``restore_training_state``) and ``start_progress`` continue a resumed run,
    inside an epoch if it was interrupted there. SIGTERM/SIGINT stop after the current iteration:
    sinks get ``on_progress(final=True)`` (the checkpointer writes ``interrupted.pth``) and
    ``RunInterrupted`` is raised. ``checkpoint_every_n_iters`` adds step-boundary checkpoints
    inside epochs. A non-finite or diverged loss (``divergence``) raises before any checkpoint of it.
    ``amp`` (``off|bf16|fp16``) and ``scaler`` go to ``train_one_epoch``; gradient norms (of the
    parameter groups and the loss-producing modules) are measured every ``grad_norm_every``
    iterations; ``eval_backend`` is COCOeval's implementation. ``spikes`` watches every iteration's
    loss and gradient norms; its findings go to the sinks' ``on_finding`` as soon as they are seen.
    """
    if sinks is None:
        if run_dir is None:
            raise ValueError("fit needs run_dir (for the default sinks) or an explicit list of sinks")
        sinks = default_sinks(run_dir, tracker)
    ensure_console_logging()
    device = torch.device(device)
    # ``model`` may be wrapped in DistributedDataParallel: train through the wrapper; evaluate and
    # checkpoint the module itself (no "module." prefix in checkpoints).
    module = getattr(model, "module", model)
    if state is None:
        state = TrainingState(module, optimizer, lr_scheduler, scaler, mapping, epochs, history=[dict(r) for r in history or []])
    state.epochs, state.sampler = epochs, getattr(train_loader, "sampler", None)
    guard = divergence or DivergenceGuard(factor=None)
    if guard.reference is None:
        guard.reference = state.fit.get("reference_loss")
    grad_norms = GradNormMeter.from_optimizer(optimizer, model=module, every=grad_norm_every)
    # Data/iteration seconds of a DataLoader (tags time/data, time/iter); a plain list of batches has no loading to time.
    timer = IterationTimer() if isinstance(train_loader, DataLoader) else None
    if spikes is not None:
        spikes.on_spike = lambda finding: call_sinks(sinks, "on_finding", state, finding)
        spikes.load_state_dict(state.fit.get("spikes") or {})
    call_sinks(sinks, "before_fit", state)

    def after_step(_: int) -> None:
        state.global_step += 1

    epoch, pending = start_epoch, start_progress
    saved_at = {"step": state.global_step}
    with GracefulStop() as stop:

        def should_stop() -> bool:
            periodic = bool(checkpoint_every_n_iters) and state.global_step - saved_at["step"] >= checkpoint_every_n_iters
            wanted = stop.requested or periodic
            if world_size() > 1:  # every rank stops at the same iteration: agree (read-back points only)
                flag = torch.tensor([float(stop.requested), float(periodic)], device=device)
                all_reduce_sum(flag)
                if flag[0] > 0 and stop.signum is None:
                    stop.signum = signal.SIGTERM  # another rank was signalled
                wanted = bool(flag.sum() > 0)
            if wanted:
                saved_at["step"] = state.global_step
            return wanted

        try:
            for epoch in range(start_epoch, epochs + 1):
                if hasattr(state.sampler, "set_epoch"):
                    state.sampler.set_epoch(epoch)
                grad_norms.reset()
                if timer is not None:
                    timer.reset()
                t0 = time.perf_counter()
                train_loss = _train_epoch(
                    model, state, stop, sinks, grad_norms, guard, spikes, train_loader, device, epoch, pending,
                    loss_weights=loss_weights, lr_scheduler=lr_scheduler, scaler=scaler, clip_grad_norm=clip_grad_norm,
                    print_freq=print_freq, progress=progress, should_stop=should_stop, after_step=after_step,
                    amp=amp, timer=timer,
                )
                pending = None
                state.fit["reference_loss"] = guard.reference
                t1 = time.perf_counter()
                val_loss: dict[str, float] | None = None
                metrics: dict[str, dict[str, float]] | None = None
                if val_loader is not None and (epoch % eval_every == 0 or epoch == epochs):
                    # The trained epoch is on disk before evaluation can fail.
                    call_sinks(sinks, "after_train", state, epoch)
                    # Every rank evaluates rank 0's model, the one that is checkpointed.
                    broadcast_buffers(module)
                    val_loss, metrics = _evaluate(
                        module, val_loader, device, epoch, mapping=mapping, compute_losses=compute_val_loss,
                        mask_threshold=mask_threshold, progress=progress, backend=eval_backend,
                    )
                record = {
                    "train_loss": train_loss,
                    "val_loss": val_loss or None,
                    "metrics": metrics,
                    "loss_weights": dict(loss_weights or {}),
                    "lr": {**group_lrs(optimizer), **module_lrs(optimizer, grad_norms.modules)},
                    "grad_norm": grad_norms.compute(),
                    "time": {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1, **(timer.compute() if timer else {})},
                    "spike": spikes.pop_peaks() if spikes is not None else {},
                }
                if spikes is not None:
                    state.fit["spikes"] = spikes.state_dict()  # after pop_peaks: the next epoch starts afresh
                result = EpochResult(epoch=epoch, record=record, scalars=epoch_scalars(record))
                state.history.append({"epoch": epoch, **result.scalars})
                call_sinks(sinks, "after_epoch", state, result)
        except StopRequested as err:
            # Outside the iterations: the epoch's training is already checkpointed (after_train).
            raise RunInterrupted(err.signum, epoch, None, _checkpoint_dir(sinks)) from None
        except KeyboardInterrupt:
            call_sinks(sinks, "on_interrupt", state, epoch)
            raise
    call_sinks(sinks, "after_fit", state)
    return state.history


def _train_epoch(
    model: nn.Module,
    state: TrainingState,
    stop: GracefulStop,
    sinks: Sequence[Sink],
    grad_norms: GradNormMeter,
    guard: DivergenceGuard,
    spikes: SpikeMonitor | None,
    train_loader: DataLoader,
    device: torch.device,
    epoch: int,
    pending: EpochProgress | None,
    **kwargs: Any,
) -> dict[str, float]:
    """One epoch, possibly in several pieces: at each step-boundary stop the progress is handed to
    the sinks (a checkpoint), then the epoch continues from there, or ends on a signal."""
    while True:
        if pending is not None:
            if hasattr(state.sampler, "skip_next"):
                state.sampler.skip_next(pending.samples_done)
            if pending.grad_norms is not None:
                grad_norms.load_state_dict(pending.grad_norms)
        try:
            stop.deferring = True
            return train_one_epoch(
                model, state.optimizer, train_loader, device, epoch,
                grad_norms=grad_norms, divergence=guard, spikes=spikes, start=pending, **kwargs,
            )
        except TrainingStopped as stopped:
            pending = stopped.progress
            pending.grad_norms = grad_norms.state_dict()
            # Every rank trained the same number of full batches (the sampler pads the shards).
            pending.samples_done = pending.iterations * (train_loader.batch_size or 1) * world_size()
            state.fit["reference_loss"] = guard.reference
            if spikes is not None:
                state.fit["spikes"] = spikes.state_dict()
            paths = [p for s in sinks if (p := _call_progress(s, state, epoch, pending, stop.requested)) is not None]
            if stop.requested:
                raise RunInterrupted(stop.signum, epoch, pending.iterations, paths[0] if paths else None) from None  # type: ignore[arg-type]
        finally:
            stop.deferring = False


def _call_progress(sink: Sink, state: TrainingState, epoch: int, progress: EpochProgress, final: bool) -> Path | None:
    if sink.main_process_only and not is_main_process():
        return None
    return sink.on_progress(state, epoch, progress, final)


def _checkpoint_dir(sinks: Sequence[Sink]) -> Path | None:
    for sink in sinks:
        directory = getattr(sink, "directory", None)
        if directory is not None and (Path(directory) / "last.pth").is_file():
            return Path(directory) / "last.pth"
    return None


def _evaluate(model: nn.Module, val_loader: DataLoader, device: torch.device, epoch: int, **kwargs: Any):
    try:
        return evaluate(model, val_loader, device, **kwargs)
    except (StopRequested, KeyboardInterrupt):
        raise
    except Exception as err:
        raise EvaluationFailed(
            f"Evaluation after epoch {epoch} failed ({type(err).__name__}: {err}). The trained epoch is saved "
            "(checkpoints/last.pth): fix the cause, then continue with resume=<run>/checkpoints/last.pth"
        ) from err
