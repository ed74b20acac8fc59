"""``fit``: the epoch loop (train, evaluate, hand the epoch to the hooks), as a plain function."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine.checkpoint import CHECKPOINT_DIR, LAST
from maskrcnn_coco.engine.evaluate import evaluate, subset_loader
from maskrcnn_coco.engine.hooks import EpochResult, Hook, HookList
from maskrcnn_coco.engine.loop import TrainingStopped, train_one_epoch
from maskrcnn_coco.engine.settings import FitSettings
from maskrcnn_coco.engine.signals import GracefulStop, StopRequested
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.engine.writers import default_hooks
from maskrcnn_coco.solver.param_groups import group_lrs
from maskrcnn_coco.tracking.scalars import epoch_scalars
from maskrcnn_coco.utils.dist import broadcast_buffers, is_main_process
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
    settings: FitSettings,
    hooks: Sequence[Hook] | None = None,
    *,
    mapping: CategoryMapping,
    lr_scheduler: Any | None = None,
    state: TrainingState | None = None,
    run_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Train epochs ``state.epoch + 1 .. settings.epochs``; after each, evaluate (every
    ``settings.eval_every`` epochs and at the last) and hand the epoch to the hooks' ``after_epoch``.

    With ``settings.eval_subset`` (N), epochs before the last are evaluated on the same N val images
    (``engine.evaluate.subset_loader``) and the last on the full set; each evaluated epoch's record
    says how many images it was measured on (``eval/images``, of ``eval/val_images``).

    ``hooks`` default to ``default_hooks(run_dir, settings)``: gradient norms, timer, spikes,
    divergence guard, progress, checkpoints under ``<run_dir>/checkpoints/``, the console block,
    diagnostics, ``<run_dir>/metrics.jsonl``. Returns the history: one ``{"epoch": e, <tag>: value, ...}``
    per epoch (tags of ``maskrcnn_coco.tracking.scalars``), after a resumed run's.

    ``state`` (restored by ``engine.checkpoint.restore_training_state``) continues a resumed run, inside
    an epoch if it was interrupted there; its hook states are loaded into ``hooks``. SIGTERM/SIGINT stop
    after the current iteration: the hooks' ``at_boundary`` runs (the checkpointer writes
    ``interrupted.pth``) and ``RunInterrupted`` is raised. A non-finite or diverged loss raises
    ``FloatingPointError`` before any checkpoint of it.
    """
    if hooks is None:
        if run_dir is None:
            raise ValueError("fit needs run_dir (for the default hooks) or an explicit list of hooks")
        hooks = default_hooks(run_dir, settings)
    ensure_console_logging()
    device = torch.device(settings.device)
    # ``model`` may be wrapped in DistributedDataParallel: train through the wrapper; evaluate and
    # checkpoint the module itself (no "module." prefix in checkpoints).
    module = getattr(model, "module", model)
    if state is None:
        state = TrainingState(module, optimizer, lr_scheduler, settings.scaler, mapping, settings.epochs)
    state.epochs, state.sampler = settings.epochs, getattr(train_loader, "sampler", None)
    runner = state.hooks = HookList(hooks)
    runner.load_state_dicts(state.hook_states)
    runner.call("before_fit", state)

    subset = _subset(val_loader, settings)
    epoch = state.epoch + 1
    with GracefulStop() as stop:
        state.signal = stop
        try:
            for epoch in range(state.epoch + 1, settings.epochs + 1):
                if hasattr(state.sampler, "set_epoch"):
                    state.sampler.set_epoch(epoch)
                state.evaluating = val_loader is not None and (epoch % settings.eval_every == 0 or epoch == settings.epochs)
                state.record = {"lr": {}, "time": {}}
                t0 = time.perf_counter()
                train_loss = _train_epoch(model, state, train_loader, settings, epoch)
                t1 = time.perf_counter()
                val_loss: dict[str, float] | None = None
                metrics: dict[str, dict[str, float]] | None = None
                evaluated: dict[str, int] = {}
                if state.evaluating:
                    # Every rank evaluates rank 0's model, the one that is checkpointed. The last epoch
                    # is measured on the full set: what the run ends with is never a subset's number.
                    loader = subset if subset is not None and epoch < settings.epochs else val_loader
                    broadcast_buffers(module)
                    val_loss, metrics = _evaluate(module, loader, device, state, mapping=mapping, settings=settings,
                                                  coco_gt=_full_ground_truth(loader, val_loader))
                    evaluated = _image_counts(loader, val_loader)
                parts = state.record  # what the hooks put in after training (module lrs, grad norms, times, spikes)
                record = {
                    "train_loss": train_loss,
                    "val_loss": val_loss or None,
                    "metrics": metrics,
                    "loss_weights": dict(settings.loss_weights),
                    "lr": {**group_lrs(optimizer), **parts["lr"]},
                    "grad_norm": parts.get("grad_norm", {}),
                    "time": {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1, **parts["time"]},
                    "spike": parts.get("spike", {}),
                    "eval": evaluated,
                }
                result = EpochResult(epoch=epoch, record=record, scalars=epoch_scalars(record))
                state.history.append({"epoch": epoch, **result.scalars})
                state.epoch = epoch
                runner.call("after_epoch", state, result)
        except StopRequested as err:
            # Outside the iterations: the epoch's training is already checkpointed (after_train_epoch).
            raise RunInterrupted(err.signum, epoch, None, state.last_checkpoint) from None
        except KeyboardInterrupt:
            state.epoch = epoch
            runner.call("on_interrupt", state)
            raise
        finally:
            state.signal = None
    runner.call("after_fit", state)
    return state.history


def _train_epoch(model: nn.Module, state: TrainingState, train_loader: DataLoader, settings: FitSettings, epoch: int) -> dict[str, float]:
    """One epoch, possibly in several pieces: at each step-boundary stop the hooks saw the progress (a
    checkpoint); the epoch then continues from there with a fresh loader iterator, or ends on a signal."""
    stop = state.signal
    while True:
        if state.progress is not None and hasattr(state.sampler, "skip_next"):
            state.sampler.skip_next(state.progress.samples_done)
        try:
            stop.deferring = True
            return train_one_epoch(model, state.optimizer, train_loader, settings.device, epoch, state.hooks,
                                   settings=settings, state=state)
        except TrainingStopped as stopped:
            if stopped.reason == "signal":
                raise RunInterrupted(stop.signum, epoch, stopped.progress.iterations, state.last_checkpoint) from None  # type: ignore[arg-type]
        finally:
            stop.deferring = False


def _subset(val_loader: DataLoader | None, settings: FitSettings) -> DataLoader | None:
    """The loader of ``settings.eval_subset``'s fixed val images (said once), or None: no subset asked,
    or one at least as large as the val set (then every evaluation is on the full set, said once)."""
    if val_loader is None or settings.eval_subset is None:
        return None
    subset = subset_loader(val_loader, settings.eval_subset, settings.seed)
    total = len(val_loader.dataset)
    if subset is None:
        log.info("eval.subset=%d: the val set has %d images, so every evaluation uses the full set",
                 settings.eval_subset, total)
    else:
        log.info("eval.subset=%d: epochs before the last are evaluated on a fixed subset of %d of the %d val "
                 "images (drawn once from seed %d); epoch %d on the full set",
                 settings.eval_subset, settings.eval_subset, total, settings.seed, settings.epochs)
    return subset


def _full_ground_truth(loader: Any, val_loader: Any) -> Any:
    """The full val set's ground truth for a subset's evaluation, on rank 0 (the one that scores; the
    other ranks never load it); None: ``evaluate`` takes the loader's own."""
    if loader is val_loader or not is_main_process():
        return None
    return getattr(getattr(val_loader, "dataset", None), "coco", None)


def _image_counts(loader: Any, val_loader: Any) -> dict[str, int]:
    """``{"images": evaluated, "val_images": the full set}`` (over all ranks); ``{}`` for a loader
    without a sized dataset (a list of batches)."""
    try:
        return {"images": len(loader.dataset), "val_images": len(val_loader.dataset)}
    except (AttributeError, TypeError):
        return {}


def _evaluate(model: nn.Module, val_loader: DataLoader, device: torch.device, state: TrainingState, *,
              mapping: CategoryMapping, settings: FitSettings,
              coco_gt: Any = None) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    try:
        return evaluate(model, val_loader, device, mapping=mapping, coco_gt=coco_gt,
                        compute_losses=settings.compute_val_loss, mask_threshold=settings.mask_threshold,
                        progress=settings.progress, backend=settings.eval_backend)
    except (StopRequested, KeyboardInterrupt):
        raise
    except Exception as err:
        saved = state.last_checkpoint or f"<run>/{CHECKPOINT_DIR}/{LAST}"
        raise EvaluationFailed(
            f"Evaluation after epoch {state.epoch} failed ({type(err).__name__}: {err}). The trained epoch is saved "
            f"({saved}): fix the cause, then continue with resume={saved}"
        ) from err

