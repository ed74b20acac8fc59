"""The training state and its checkpoint format: the one module that writes and reads a checkpoint.

A checkpoint is a dict of tensors and plain Python data (loadable with ``weights_only=True``):

* ``format_version``, ``epoch`` (the last finished epoch), ``global_step`` (optimizer steps so far)
* ``model``, ``optimizer``, ``lr_scheduler``, ``scaler``
* ``rng``: Python, NumPy, torch CPU and CUDA generator states; ``sampler``: the training order's state
* ``epoch_progress``: for a checkpoint written inside an epoch, the batches trained and their loss sums
* ``num_classes``, ``categories`` (the category mapping), ``model_config`` (the run's ``model`` config
  section as a plain dict, so the architecture can be rebuilt without the run folder or a dataset:
  ``model_config_of``), ``history`` (epoch records by scalar tag),
  ``fit`` (the best objective value so far), ``hooks`` (``{state_key: state}`` of the stateful hooks:
  the divergence reference, spike references, partial-epoch gradient norms, ...), plus what the
  caller adds (``config``)

Files are written atomically (temp file + rename). Restoring everything, RNG and order included,
makes a resumed CPU run bit-identical to an uninterrupted one.

The file names (``last.pth``, ``best.pth``, ``interrupted.pth``, ``epoch_NNN.pth`` under a run's
``checkpoints/``) and ``resume=auto``'s lookup are defined here and nowhere else; ``Checkpointer`` is
the hook that writes them.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskrcnn_coco.engine.hooks import CHECKPOINT, EpochResult, Hook
from maskrcnn_coco.engine.state import EpochProgress, TrainingState
from maskrcnn_coco.modeling.weights import WeightsError, load_weights_file
from maskrcnn_coco.tracking.scalars import lower_is_better, on_full_val_set
from maskrcnn_coco.utils.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
MODEL_CONFIG = "model_config"  # the checkpoint entry holding the model section of the run's config

CHECKPOINT_DIR = "checkpoints"  # under a run folder
LAST, BEST, INTERRUPTED = "last.pth", "best.pth", "interrupted.pth"
RESUMABLE = (LAST, INTERRUPTED)  # what resume=auto looks for
EPOCH_GLOB = "epoch_*.pth"


def epoch_checkpoint_name(epoch: int) -> str:
    """``epoch_NNN.pth``: the numbered checkpoint of a finished epoch."""
    return f"epoch_{epoch:03d}.pth"


def find_auto_resume(runs_root: Path, exclude: Path | None = None) -> Path | None:
    """``resume=auto``: the newest ``last.pth``/``interrupted.pth`` under ``runs_root`` (not in ``exclude``), or None."""
    if not runs_root.is_dir():
        return None
    candidates = [
        p for name in RESUMABLE for p in runs_root.rglob(f"{CHECKPOINT_DIR}/{name}")
        if exclude is None or exclude.resolve() not in p.resolve().parents
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def rng_state() -> dict[str, Any]:
    """All random generators a training step may draw from, as plain data and tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_config_of(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``model`` config section (plain dict) a checkpoint was trained with: its ``model_config``
    entry, else the ``model`` part of the run config it carries (``config``, checkpoints written before
    ``model_config`` existed); None when it holds neither (the caller may look for the run's
    ``.hydra/config.yaml``)."""
    found = ckpt.get(MODEL_CONFIG)
    if not isinstance(found, Mapping):
        config = ckpt.get("config")
        found = config.get("model") if isinstance(config, Mapping) else None
    return dict(found) if isinstance(found, Mapping) else None


def training_state(
    state: TrainingState, epoch: int, *, progress: EpochProgress | None = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint dict after ``epoch`` finished epochs (plus ``progress`` into the next one)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.lr_scheduler.state_dict() if state.lr_scheduler is not None else None,
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "epoch": epoch,
        "global_step": state.global_step,
        "epoch_progress": progress.state_dict() if progress is not None else None,
        "rng": rng_state(),
        "sampler": state.sampler.state_dict() if hasattr(state.sampler, "state_dict") else None,
        "num_classes": state.mapping.num_classes,
        "categories": state.mapping.state_dict(),
        # From the resolved run config the checkpointer carries (``extra["config"]``), when it does.
        MODEL_CONFIG: model_config_of(extra or {}),
        "history": [dict(r) for r in state.history],
        "fit": dict(state.fit),
        "hooks": state.hooks.state_dicts() if state.hooks is not None else dict(state.hook_states),
        **(extra or {}),
    }


def save_checkpoint(path: str | Path, state: Mapping[str, Any], copies: Sequence[str | Path] = ()) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a truncated checkpoint.

    ``copies`` get the same bytes by file copy: the state is serialised once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)
    for copy in map(Path, copies):
        tmp = copy.with_name(copy.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, copy)
    return path


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``fit``; a file that is not one is a ``WeightsError`` naming it."""
    ckpt = load_weights_file(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise WeightsError(
            f"resume={path} is not a training checkpoint (no 'model' entry); use model.weights=... to start from its weights"
        )
    if ckpt.get("interrupted_mid_iteration"):
        raise WeightsError(
            f"resume={path} was written after an interrupt inside an iteration, so its weights are not at a step "
            "boundary; resume from last.pth in the same folder (the last finished epoch) instead"
        )
    return ckpt


def _restore_schedule(lr_scheduler: Any, saved: Mapping[str, Any], path: str | Path) -> None:
    """Keep the schedule built from the current config (its horizon may be longer than the saved
    one's) and restore only the position in it; say so when the horizon changed."""
    saved_lambdas = saved.get("lr_lambdas") or []
    current = [getattr(f, "__dict__", None) for f in getattr(lr_scheduler, "lr_lambdas", [])]
    state = {k: v for k, v in saved.items() if k != "lr_lambdas"}
    lr_scheduler.__dict__.update({k: v for k, v in state.items() if k in ("last_epoch", "_step_count", "base_lrs")})
    old = next((d for d in saved_lambdas if d), None)
    new = next((d for d in current if d), None)
    if old and new and old.get("kwargs") != new.get("kwargs"):
        before, after = old["kwargs"], new["kwargs"]
        changed = ", ".join(f"{k} {before.get(k)} -> {after.get(k)}" for k in after if before.get(k) != after.get(k))
        log.info("Schedule rebuilt for this run's config (%s); resuming at iteration %d of it.", changed, lr_scheduler.last_epoch)
    # The optimizer's saved lrs belong to the old schedule: set them from the current one.
    for group, base_lr, factor in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [g["lr"] for g in lr_scheduler.optimizer.param_groups]


def restore_training_state(path: str | Path, state: TrainingState, ckpt: Mapping[str, Any] | None = None) -> None:
    """Load a ``fit`` checkpoint into ``state``'s objects and the RNGs; ``state.epoch`` (the last
    finished epoch) and ``state.progress`` (a partial epoch) say where ``fit`` continues."""
    ckpt = ckpt if ckpt is not None else load_training_checkpoint(path)
    if ckpt.get("num_classes") not in (None, state.mapping.num_classes):
        raise ConfigError(f"resume={path} was trained for {ckpt['num_classes']} classes, the data has {state.mapping.num_classes}")
    state.model.load_state_dict(ckpt["model"])
    if ckpt.get("optimizer") is not None:
        state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scaler is not None and ckpt.get("scaler") is not None:
        state.scaler.load_state_dict(ckpt["scaler"])
    if state.lr_scheduler is not None and ckpt.get("lr_scheduler") is not None:
        _restore_schedule(state.lr_scheduler, ckpt["lr_scheduler"], path)
    if ckpt.get("rng") is not None:
        set_rng_state(ckpt["rng"])
    epoch = int(ckpt.get("epoch", 0))
    state.global_step = int(ckpt.get("global_step", 0))
    progress = EpochProgress.from_state_dict(ckpt["epoch_progress"]) if ckpt.get("epoch_progress") else None
    where = f"epoch {epoch}" if progress is None else f"epoch {epoch + 1}, iteration {progress.iterations}"
    log.info("Resumed from %s (%s)", path, where)
    state.epoch, state.progress = epoch, progress
    state.history = [dict(r) for r in ckpt.get("history") or []]
    state.fit = dict(ckpt.get("fit") or {})
    state.hook_states = dict(ckpt.get("hooks") or {})



def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Checkpointer(Hook):
    """Checkpoints of the training state, under ``directory`` (a run's ``checkpoints/``):

    * ``last.pth`` after every epoch, written before evaluation too (``after_train_epoch`` of an
      evaluated epoch), so a failing evaluation never loses the trained epoch; ``epoch_NNN.pth`` every
      ``every_n_epochs`` epochs, the newest ``keep_last`` of them kept (None: all);
    * ``best.pth`` when the epoch's ``best_metric`` tag (e.g. ``mAP/segm_AP``) improves;
    * inside an epoch, at a step boundary: ``last.pth`` (periodic, ``checkpoint.every_n_iters``), or
      ``interrupted.pth`` at a stop signal (resumable from that iteration); after a raw
      KeyboardInterrupt, ``interrupted.pth`` marked as not at a step boundary (refused for resuming).
    """

    priority = CHECKPOINT
    critical = True  # a run that cannot save its work should stop and say so

    def __init__(
        self,
        directory: str | Path,
        every_n_epochs: int = 1,
        extra: Mapping[str, Any] | None = None,
        *,
        keep_last: int | None = None,
        best_metric: str | None = None,
    ):
        self.directory = Path(directory)
        self.every_n_epochs = every_n_epochs
        self.extra = dict(extra or {})
        self.keep_last = keep_last
        self.best_metric = best_metric

    def _write(self, state: TrainingState, epoch: int) -> Path:
        snapshot = training_state(state, epoch, extra=self.extra)
        last = self.directory / LAST
        if self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0:
            path = save_checkpoint(self.directory / epoch_checkpoint_name(epoch), snapshot, copies=[last])
            self._prune()
        else:
            path = save_checkpoint(last, snapshot)
        state.last_checkpoint = last
        return path

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        numbered = sorted(self.directory.glob(EPOCH_GLOB))
        for old in numbered[: max(len(numbered) - self.keep_last, 0)]:
            old.unlink(missing_ok=True)

    def after_train_epoch(self, state: TrainingState) -> None:
        if state.evaluating:
            self._write(state, state.epoch)

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        improved = False
        value = result.scalars.get(self.best_metric) if self.best_metric else None
        if value is not None and math.isfinite(value) and on_full_val_set(result.scalars):  # a subset's AP is another measure
            best = state.fit.get("best_value")
            if best is None or (value < best if lower_is_better(self.best_metric) else value > best):
                state.fit.update(best_value=value, best_epoch=result.epoch, best_metric=self.best_metric)
                improved = True
        path = self._write(state, result.epoch)
        if improved:
            tmp = self.directory / (BEST + ".tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, self.directory / BEST)
        result.checkpoint = path

    def at_boundary(self, state: TrainingState) -> None:
        name = INTERRUPTED if state.signal is not None and state.signal.requested else LAST
        path = save_checkpoint(self.directory / name, training_state(state, state.epoch - 1, progress=state.progress, extra=self.extra))
        state.last_checkpoint = path

    def on_interrupt(self, state: TrainingState) -> None:
        snapshot = {**training_state(state, state.epoch - 1, extra=self.extra), "interrupted_mid_iteration": True}
        path = save_checkpoint(self.directory / INTERRUPTED, snapshot)
        log.info("Interrupted during epoch %d: saved %s (weights mid-epoch %d; resume from %s).", state.epoch,
                 display_path(path), state.epoch, LAST)
