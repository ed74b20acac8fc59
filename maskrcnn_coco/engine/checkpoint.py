"""The checkpoint format: the one module that writes and reads a training checkpoint.

A checkpoint is a dict of tensors and plain Python data (loadable with ``weights_only=True``):
``format_version``, ``model``, ``optimizer``, ``lr_scheduler``, ``scaler``, ``epoch`` (the last
finished epoch), ``num_classes``, ``categories`` (the category mapping), ``history`` (the epoch
records by scalar tag) and whatever the caller adds (``config``). Files are written atomically.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.modeling.weights import WeightsError, load_weights_file
from maskrcnn_coco.tracking.scalars import tag_record
from maskrcnn_coco.utils.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2


def training_state(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any | None,
    scaler: Any | None,
    mapping: CategoryMapping,
    epoch: int,
    history: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to continue training after ``epoch``."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "num_classes": mapping.num_classes,
        "categories": mapping.state_dict(),
        "history": [dict(r) for r in history],
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
    return ckpt


def restore_training_state(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any | None,
    scaler: Any | None,
    mapping: CategoryMapping,
) -> tuple[int, list[dict[str, Any]]]:
    """Load a ``fit`` checkpoint into the run's objects; return (next epoch, history so far)."""
    ckpt = load_training_checkpoint(path)
    if ckpt.get("num_classes") not in (None, mapping.num_classes):
        raise ConfigError(f"resume={path} was trained for {ckpt['num_classes']} classes, the data has {mapping.num_classes}")
    model.load_state_dict(ckpt["model"])
    for obj, key in ((optimizer, "optimizer"), (lr_scheduler, "lr_scheduler"), (scaler, "scaler")):
        if obj is not None and ckpt.get(key) is not None:
            obj.load_state_dict(ckpt[key])
    epoch = int(ckpt.get("epoch", 0))
    log.info("Resumed from %s (epoch %d)", path, epoch)
    return epoch + 1, [tag_record(r) for r in ckpt.get("history") or []]
