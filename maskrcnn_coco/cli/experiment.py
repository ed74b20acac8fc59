"""Compose a training run from a resolved config: data, model, optimizer, schedule, trackers.

``build_components`` is shared by training and the loss probe, so both see the same data pipeline,
model builder, weight loading and loss weights.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from maskrcnn_coco.analysis.history import objective_value
from maskrcnn_coco.data.coco import CategoryMapping, DataBundle, build_data
from maskrcnn_coco.engine.checkpoint import restore_training_state
from maskrcnn_coco.engine.fit import fit
from maskrcnn_coco.engine.sinks import default_sinks
from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.modeling.weights import WeightsError, is_local_path
from maskrcnn_coco.solver.param_groups import build_optimizer, check_head_multiplier
from maskrcnn_coco.solver.schedule import build_lr_scheduler
from maskrcnn_coco.tracking.backends import CompositeTracker, ExperimentTracker, NullTracker
from maskrcnn_coco.tracking.scalars import check_objective, loss_weights_from_config
from maskrcnn_coco.utils.dist import is_main_process
from maskrcnn_coco.utils.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here: use device=cpu or device=auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def config_to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def build_tracker(cfg: Any, run_dir: Path) -> ExperimentTracker:
    """One tracker per ``cfg.backends`` entry (each a Hydra partial taking ``log_dir``), fanned out.

    Only rank 0 tracks: other ranks get the null tracker and never create a tracker run.
    """
    if not is_main_process():
        return NullTracker()
    trackers = [instantiate(spec)(log_dir=run_dir) for spec in cfg.backends.values() if spec is not None]
    if not trackers:
        return NullTracker()
    return trackers[0] if len(trackers) == 1 else CompositeTracker(trackers)


@dataclass
class Components:
    data: DataBundle
    model: nn.Module
    device: torch.device
    loss_weights: dict[str, float]

    @property
    def mapping(self) -> CategoryMapping:
        return self.data.mapping


def build_components(cfg: DictConfig, progress: bool = True) -> Components:
    """Seed, then build data loaders and the model (weights loaded) on the configured device."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = build_data(cfg.data, seed=cfg.seed, progress=progress, pin_memory=device.type == "cuda")
    model = build_model(cfg.model, data.mapping.num_classes).to(device)
    return Components(data=data, model=model, device=device, loss_weights=loss_weights_from_config(cfg.loss.weights))


def _missing_keys(node: DictConfig, prefix: str = ""):
    """Keys left at ``???``, found without resolving interpolations (which would raise first)."""
    for key in node:
        if OmegaConf.is_missing(node, key):
            yield f"{prefix}{key}"
        elif not OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            yield from _missing_keys(node[key], f"{prefix}{key}.")


def check_config(cfg: DictConfig) -> None:
    """Fail before any work on values only known at run time: missing keys, bad choices."""
    missing = list(_missing_keys(cfg))
    if missing:
        hint = " (e.g. data.root=/data/coco)" if "data.root" in missing else ""
        raise ConfigError(f"Missing required config value: {', '.join(missing)}{hint}")
    check_objective(cfg.objective.metric, cfg.objective.mode)
    check_head_multiplier(cfg.optimizer)
    for key in ("model.weights", "model.backbone_weights", "resume"):
        value = OmegaConf.select(cfg, key)
        if value and is_local_path(value) and not Path(value).expanduser().is_file():
            raise WeightsError(f"Weights file not found: {value} ({key})")


def run_training(cfg: DictConfig, run_dir: str | Path) -> float:
    """Train as configured, writing into ``run_dir``; return the objective for sweepers."""
    run_dir = Path(run_dir)
    check_config(cfg)
    parts = build_components(cfg, progress=cfg.progress)
    model, data, device = parts.model, parts.data, parts.device
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_lr_scheduler(cfg.scheduler, optimizer, len(data.train_loader), cfg.epochs)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None

    start_epoch, history = 1, []
    if cfg.resume:
        start_epoch, history = restore_training_state(
            cfg.resume, model=model, optimizer=optimizer, lr_scheduler=scheduler, scaler=scaler, mapping=data.mapping
        )

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "Run folder: %s\nDevice: %s | data: %s (%d train / %d val images, %d classes) | model: %s (%.1fM parameters)",
        run_dir, device, cfg.data.name, len(data.train_loader.dataset), len(data.val_loader.dataset),
        data.mapping.num_classes - 1, cfg.model.arch, n_params / 1e6,
    )
    tracker = build_tracker(cfg.tracker, run_dir)
    resolved = config_to_dict(cfg)
    sinks = default_sinks(run_dir, tracker, checkpoint_every=cfg.checkpoint.every_n_epochs, checkpoint_extra={"config": resolved})
    try:
        tracker.log_hyperparams(resolved)
        history = fit(
            model, optimizer, data.train_loader, data.val_loader,
            epochs=cfg.epochs, device=device, mapping=data.mapping, sinks=sinks,
            loss_weights=parts.loss_weights, lr_scheduler=scheduler, scaler=scaler,
            clip_grad_norm=cfg.optimizer.clip_grad_norm, start_epoch=start_epoch,
            eval_every=cfg.eval.every_n_epochs, compute_val_loss=cfg.eval.val_loss,
            mask_threshold=cfg.eval.mask_threshold, print_freq=cfg.print_freq, progress=cfg.progress,
            history=history,
        )
    finally:
        tracker.close()
    return objective_value(history, cfg.objective.metric, cfg.objective.mode)

