"""Compose a training run from a resolved config: data, model, optimizer, schedule, trackers.

``build_components`` is shared by training and the loss probe, so both see the same data pipeline,
model builder, weight loading and loss weights.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from maskrcnn_coco.analysis.audit import audit_run
from maskrcnn_coco.analysis.diagnostics import Diagnosis, muted
from maskrcnn_coco.analysis.history import objective_value
from maskrcnn_coco.analysis.split_stats import audit_data
from maskrcnn_coco.analysis.sweep import task_swept_keys
from maskrcnn_coco.config import validate_config
from maskrcnn_coco.data.coco import CategoryMapping, DataBundle, build_data
from maskrcnn_coco.data.split import RECORD_FILE
from maskrcnn_coco.engine.checkpoint import (
    CHECKPOINT_DIR,
    Checkpointer,
    find_auto_resume,
    load_training_checkpoint,
    restore_training_state,
)
from maskrcnn_coco.engine.fit import fit
from maskrcnn_coco.engine.hooks import Hook
from maskrcnn_coco.engine.monitors import DivergenceGuard
from maskrcnn_coco.engine.settings import FitSettings
from maskrcnn_coco.engine.signals import StopRequested
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.engine.writers import default_hooks
from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.modeling.weights import WeightsError, is_local_path
from maskrcnn_coco.solver.param_groups import build_optimizer, check_head_multiplier
from maskrcnn_coco.solver.schedule import build_lr_scheduler, check_schedule
from maskrcnn_coco.tracking.backends import CompositeTracker, ExperimentTracker, GuardedTracker, NullTracker, log_text
from maskrcnn_coco.tracking.hparams import Hyperparams, task_overrides
from maskrcnn_coco.tracking.scalars import check_objective, loss_weights_from_config, write_class_names
from maskrcnn_coco.utils import dist
from maskrcnn_coco.utils.dist import is_main_process
from maskrcnn_coco.utils.errors import ConfigError
from maskrcnn_coco.utils.provenance import record_provenance

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an explicit cuda without a GPU is an error. In a
    distributed run each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        # An indexed device: torch.cuda.set_device refuses a bare "cuda" (torch 2.11, seen on an H100).
        name = f"cuda:{dist.local_rank() if dist.launched_distributed() else torch.cuda.current_device()}"
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

    Only rank 0 tracks: other ranks get the null tracker and never create a tracker run. Each
    backend is guarded: its first failure is one warning and switches it off; training goes on.
    A backend whose library is missing fails here, at start (``ConfigError``).
    """
    if not is_main_process():
        return NullTracker()
    trackers = [
        GuardedTracker(instantiate(spec)(log_dir=run_dir), name=name, propagate=(StopRequested,))
        for name, spec in cfg.backends.items() if spec is not None
    ]
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
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Rank 0 first: it may generate the shapes set, which the others then read.
    if not dist.is_main_process():
        dist.synchronize()
    data = build_data(cfg.data, seed=cfg.seed, progress=progress and dist.is_main_process(), pin_memory=device.type == "cuda")
    if dist.is_main_process():
        dist.synchronize()
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
    """Fail before any work on values only known at run time: missing keys, bad choices, bad ranges
    (the rules beside the typed config's fields, ``maskrcnn_coco.config.validate_config``)."""
    missing = list(_missing_keys(cfg))
    if missing:
        hint = " (e.g. data.root=/data/coco)" if "data.root" in missing else ""
        raise ConfigError(f"Missing required config value: {', '.join(missing)}{hint}")
    validate_config(cfg)
    check_objective(cfg.objective.metric, cfg.objective.mode)
    check_head_multiplier(cfg.optimizer)
    for key in ("model.weights", "model.backbone_weights", "resume"):
        value = OmegaConf.select(cfg, key)
        if key == "resume" and value == "auto":
            continue
        if value and is_local_path(value) and not Path(value).expanduser().is_file():
            raise WeightsError(f"Weights file not found: {value} ({key})")


def resolve_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    """``resume`` as a path: ``auto`` picks the newest checkpoint of an earlier run."""
    if cfg.resume != "auto":
        return cfg.resume
    found = find_auto_resume(Path(cfg.runs_dir) / "maskrcnn", exclude=run_dir)
    if found is None:
        log.info("resume=auto: no checkpoint under %s; starting from scratch.", Path(cfg.runs_dir) / "maskrcnn")
        return None
    return str(found)


def scaled_optimizer_config(cfg: DictConfig) -> DictConfig:
    """``cfg.optimizer`` with ``lr`` scaled by ``optimizer.scale_lr`` for the total batch, said at start."""
    opt = cfg.optimizer
    total = cfg.data.batch_size * dist.world_size()
    if opt.scale_lr == "linear":
        lr = opt.lr * total / opt.reference_batch_size
        log.info(
            "World size %d, total batch %d (%d per process); optimizer.scale_lr=linear: lr %g x %d/%d = %g",
            dist.world_size(), total, cfg.data.batch_size, opt.lr, total, opt.reference_batch_size, lr,
        )
        opt = OmegaConf.merge(opt, {"lr": lr})
    elif dist.world_size() > 1:
        log.info("World size %d, total batch %d (%d per process); lr %g as given (optimizer.scale_lr=none)",
                 dist.world_size(), total, cfg.data.batch_size, opt.lr)
    return opt


def agree_across_ranks(cfg: DictConfig, run_dir: Path) -> Path:
    """All processes use rank 0's run folder, and must have composed the same config."""
    configs = dist.all_gather_objects(json.dumps(config_to_dict(cfg), sort_keys=True, default=str))
    if any(c != configs[0] for c in configs):
        differing = [r for r, c in enumerate(configs) if c != configs[0]]
        raise ConfigError(f"Ranks {differing} composed a different config from rank 0: launch every process with the same overrides")
    return Path(dist.broadcast_object(str(run_dir)))


def wrap_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` when several processes train; the model itself otherwise."""
    if dist.world_size() == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def audit_start(cfg: DictConfig, model: nn.Module, optimizer: torch.optim.Optimizer, parts: Components) -> list[Diagnosis]:
    """The start-of-run audit (``analysis.audit``: what trains each loss, anchor fit; ``analysis.split_stats``:
    masks off their boxes, validation unlike training), logged under the parameter-group table;
    returns its warnings for ``diagnostics.jsonl``."""
    if not cfg.diagnostics.enabled:
        return []
    report = audit_run(model, optimizer, parts.loss_weights, train_dataset=parts.data.train_loader.dataset,
                       config=cfg.diagnostics, arch=cfg.model.arch, has_anchor_key="anchor_sizes" in cfg.model,
                       batch_size=cfg.data.batch_size, world_size=dist.world_size(), warmup_iters=cfg.scheduler.warmup_iters)
    log.info("%s", report.format())
    # The annotation file's path where the config names one (data=coco); else the dataset's file name.
    data = audit_data(parts.data.train_loader.dataset, parts.data.val_loader.dataset,
                      train_source=OmegaConf.select(cfg, "data.train_annotations", default=None))
    log.info("%s", data.format())
    found = [d for d in [*report.warnings, *data.findings] if not muted(d, cfg.diagnostics.ignore)]
    for finding in found:
        # A healthy run prints no warning: an out-of-range setting that is no fault is an info line.
        log.log(logging.WARNING if finding.severity == "warning" else logging.INFO, "%s", finding.text())
    return found


def build_hooks(cfg: DictConfig, run_dir: Path, settings: FitSettings, tracker: ExperimentTracker,
                audit: list[Diagnosis], resolved: dict[str, Any], train_dataset: Any = None,
                val_dataset: Any = None) -> list[Hook]:
    """The run's hooks: the default instruments as configured (``train.*``, ``checkpoint.*``,
    ``diagnostics.*``), then one hook per ``hooks.<name>`` entry (a Hydra ``_target_`` spec of a
    ``engine.hooks.Hook``), in the order of the entries. ``train_dataset``: for the per-class
    diagnoses (its instances per class), the per-image losses and the label check (with
    ``val_dataset``)."""
    hooks = default_hooks(
        run_dir, settings, tracker, grad_norm_every=cfg.train.grad_norm_every,
        divergence=DivergenceGuard(max_loss=cfg.train.max_loss, factor=cfg.train.max_loss_factor),
        checkpoint=Checkpointer(run_dir / CHECKPOINT_DIR, every_n_epochs=cfg.checkpoint.every_n_epochs,
                                extra={"config": resolved}, keep_last=cfg.checkpoint.keep_last,
                                best_metric=cfg.objective.metric),
        checkpoint_every_n_iters=cfg.checkpoint.every_n_iters, diagnostics=cfg.diagnostics, audit=audit,
        train_dataset=train_dataset, seed=cfg.seed, val_dataset=val_dataset, vis=cfg.vis,
    )
    for name, spec in (cfg.hooks or {}).items():
        if spec is None:
            continue
        hook = instantiate(spec)
        if not isinstance(hook, Hook):
            raise ConfigError(f"hooks.{name}: {spec.get('_target_')} made a {type(hook).__name__}, not a maskrcnn_coco.engine.hooks.Hook")
        hooks.append(hook)
    return hooks


# Why ``auto`` chose what it did: a run that takes several times the README's time says why at start.
AMP_AUTO_REASONS = {
    "bf16": "bf16 (this CPU computes in bf16 natively)",
    "cpu": "off, fp32 (this CPU has no native bf16, AVX512-BF16 or AMX, and emulated bf16 measured ~10x slower; "
          "the default run took 3.5 min on a 2-core CPU with native bf16, 12-17 min in fp32 on one without)",
    "accelerator": "off, fp32 (no mode is chosen automatically on this device: set train.amp=bf16 or fp16)",
}


def resolve_amp(cfg: DictConfig, device: torch.device) -> str:
    """``train.amp`` as a mode (``off``, ``bf16``, ``fp16``). ``auto``: ``bf16`` on a CPU with native bf16
    arithmetic (AVX512-BF16 or AMX; measured 1.4x faster at the same accuracy), else ``off`` (also on
    CUDA, where no mode was measured here: choose ``bf16`` or ``fp16`` explicitly)."""
    mode = cfg.train.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cpu" and cpu_has_bf16() else "off"
        log.info("train.amp=auto: %s", AMP_AUTO_REASONS["bf16" if mode == "bf16" else "cpu" if device.type == "cpu" else "accelerator"])
    return mode


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX): without it bf16 autocast is emulated and slower."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def record_data(run_dir: Path, data: DataBundle) -> None:
    """What the run trained on, beside its metrics: ``classes.json`` (each class's COCO id, name as
    written and tag key) and, when ``data.val_fraction`` split one export, ``split.json`` (the image
    ids of each side; the split files themselves stay in the cache)."""
    write_class_names(run_dir, data.mapping.coco_ids, data.mapping.names)
    if data.split is not None:
        shutil.copyfile(data.split.out_dir / RECORD_FILE, run_dir / RECORD_FILE)


def run_training(cfg: DictConfig, run_dir: str | Path) -> float:
    """Train as configured, writing into ``run_dir``; return the objective for sweepers."""
    run_dir = Path(run_dir)
    check_config(cfg)
    if dist.init_distributed(resolve_device(cfg.device).type):
        run_dir = agree_across_ranks(cfg, run_dir)
    if cfg.train.sync_bn and dist.world_size() > 1 and resolve_device(cfg.device).type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA (SyncBatchNorm has no CPU implementation); use train.sync_bn=false on CPU")
    resume = resolve_resume(cfg, run_dir) if dist.is_main_process() else None
    resume = dist.broadcast_object(resume)
    ckpt = load_training_checkpoint(resume) if resume else None
    parts = build_components(cfg, progress=cfg.progress)
    model, data, device = parts.model, parts.data, parts.device
    if cfg.train.sync_bn and dist.world_size() > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(scaled_optimizer_config(cfg), model)
    audit = audit_start(cfg, model, optimizer, parts)
    scheduler = build_lr_scheduler(cfg.scheduler, optimizer, len(data.train_loader), cfg.epochs)
    check_schedule(cfg.scheduler, len(data.train_loader), cfg.epochs)
    settings = FitSettings.from_config(cfg, device, resolve_amp(cfg, device), parts.loss_weights)
    state = TrainingState(model, optimizer, scheduler, settings.scaler, data.mapping, cfg.epochs)
    if ckpt is not None:
        restore_training_state(resume, state, ckpt)
        if state.epoch >= cfg.epochs and state.progress is None:
            raise ConfigError(f"resume={resume} already finished epoch {state.epoch}; set epochs above {state.epoch} to train more")

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "Run folder: %s\nDevice: %s | data: %s (%d train / %d val images, %d classes) | model: %s (%.1fM parameters)",
        run_dir, device, cfg.data.name, len(data.train_loader.dataset), len(data.val_loader.dataset),
        data.mapping.num_classes - 1, cfg.model.arch, n_params / 1e6,
    )
    tracker = build_tracker(cfg.tracker, run_dir)
    resolved = config_to_dict(cfg)
    hooks = build_hooks(cfg, run_dir, settings, tracker, audit, resolved, data.train_loader.dataset,
                        data.val_loader.dataset)
    try:
        tracker.log_hyperparams(Hyperparams(resolved, overrides=task_overrides(), swept=task_swept_keys()))
        record_provenance(run_dir, device, dist.world_size(), lambda tag, text, step: log_text(tracker, tag, text, step))
        if dist.is_main_process():
            record_data(run_dir, data)
        history = fit(wrap_distributed(model, device), optimizer, data.train_loader, data.val_loader, settings, hooks,
                      mapping=data.mapping, lr_scheduler=scheduler, state=state)
    finally:
        tracker.close()
    return objective_value(history, cfg.objective.metric, cfg.objective.mode)

