"""The loop as plain functions: ``train_one_epoch``, ``evaluate`` and ``fit``.

Losses are accumulated on the device and read back only every ``print_freq`` iterations and at
the end of an epoch, so a GPU is never synchronised per iteration.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from maskrcnn_coco.coco_data import CategoryMapping
from maskrcnn_coco.coco_eval import coco_metrics, predictions_to_coco
from maskrcnn_coco.config import LOSS_COMPONENTS
from maskrcnn_coco.losses import weighted_total
from maskrcnn_coco.tracking import ExperimentTracker, NullTracker, log_training_metrics

SHORT_NAMES = {
    "loss_classifier": "cls",
    "loss_box_reg": "box",
    "loss_mask": "mask",
    "loss_objectness": "obj",
    "loss_rpn_box_reg": "rpn",
}


def move_to_device(
    images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [
        {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


def _weight_vector(loss_weights: Mapping[str, float] | None, device: torch.device) -> torch.Tensor:
    weights = loss_weights or {}
    return torch.tensor([float(weights.get(k, 1.0)) for k in LOSS_COMPONENTS], device=device)


def _stack_losses(loss_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    missing = [k for k in LOSS_COMPONENTS if k not in loss_dict]
    if missing:
        raise KeyError(f"The model returned no {missing}; got {sorted(loss_dict)} (is it a Mask R-CNN in train mode?)")
    return torch.stack([loss_dict[k] for k in LOSS_COMPONENTS])


def group_name(param_group: Mapping[str, Any], index: int) -> str:
    """The logical group of an optimizer param group: ``group`` (set by get_parameter_groups,
    shared by ``heads`` and ``heads_no_wd``), else ``name``, else its index."""
    return str(param_group.get("group", param_group.get("name", index)))


class GradNormMeter:
    """Epoch mean of the gradient L2 norm of each named parameter group, kept on the device."""

    def __init__(self, groups: Mapping[str, Sequence[torch.nn.Parameter]]):
        self.groups = {name: list(params) for name, params in groups.items() if params}
        self.sums: torch.Tensor | None = None
        self.count = 0

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> GradNormMeter:
        """Groups by the ``group`` (else ``name``) key of each param group, e.g. from ``get_parameter_groups``."""
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for i, pg in enumerate(optimizer.param_groups):
            groups.setdefault(group_name(pg, i), []).extend(pg["params"])
        return cls(groups)

    def update(self) -> None:
        norms = []
        for params in self.groups.values():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
            else:
                norms.append(torch.zeros((), device=params[0].device))
        vec = torch.stack(norms).float()
        self.sums = vec if self.sums is None else self.sums + vec
        self.count += 1

    def compute(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        means = (self.sums / self.count).tolist()  # the only device sync
        return dict(zip(self.groups, means))

    def reset(self) -> None:
        self.sums, self.count = None, 0


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Iterable,
    device: torch.device | str,
    epoch: int,
    *,
    loss_weights: Mapping[str, float] | None = None,
    lr_scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    grad_norms: GradNormMeter | None = None,
    print_freq: int = 20,
    progress: bool = True,
) -> dict[str, float]:
    """Train for one pass over ``data_loader``; return the epoch mean of each loss component.

    The optimised loss is ``sum(loss_weights[k] * loss_k)``; the returned dict holds the raw
    (unweighted) components under torchvision's names and no total. ``lr_scheduler`` is stepped
    every iteration. A non-finite total raises ``FloatingPointError`` naming the iteration, the
    components and the image ids, at the next read-back (at most ``print_freq`` iterations later).
    """
    device = torch.device(device)
    model.train()
    weights = _weight_vector(loss_weights, device)
    sums = torch.zeros(len(LOSS_COMPONENTS), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    # Iteration index kept on the device: torch.tensor(it, device=...) would copy from the host
    # every iteration, which stalls the host behind the GPU stream.
    it_device = torch.zeros((), dtype=torch.long, device=device)
    bad_losses = torch.zeros(len(LOSS_COMPONENTS), device=device)
    recent_ids: dict[int, list[Any]] = {}
    n_batches = 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(data_loader, desc=f"Epoch {epoch}", disable=not progress, dynamic_ncols=True, leave=False)
    for it, (images, targets) in enumerate(bar):
        images, targets = move_to_device(images, targets, device)
        with torch.autocast(device.type, enabled=scaler is not None):
            loss_dict = model(images, targets)
        components = _stack_losses(loss_dict)
        total = (components * weights).sum()

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        if grad_norms is not None:
            grad_norms.update()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()

        detached = components.detach()
        sums += detached
        n_batches += 1
        # Remember the first non-finite iteration without a host sync.
        bad = ~torch.isfinite(total.detach()) & (first_bad < 0)
        first_bad = torch.where(bad, it_device, first_bad)
        bad_losses = torch.where(bad, detached, bad_losses)
        it_device += 1
        recent_ids[it] = [t.get("image_id") for t in targets]

        if (it + 1) % print_freq == 0:
            _check_finite(first_bad, bad_losses, recent_ids, epoch)  # host sync point
            recent_ids.clear()
            if progress:
                means = sums / n_batches
                *values, total_mean = torch.cat([means, (means * weights).sum()[None]]).tolist()
                postfix = {SHORT_NAMES[k]: f"{v:.3f}" for k, v in zip(LOSS_COMPONENTS, values)}
                bar.set_postfix({**postfix, "total": f"{total_mean:.3f}"}, refresh=False)
    bar.close()
    if n_batches == 0:
        raise ValueError("train_one_epoch got an empty data loader")
    _check_finite(first_bad, bad_losses, recent_ids, epoch)
    return dict(zip(LOSS_COMPONENTS, (sums / n_batches).tolist()))


def _check_finite(first_bad: torch.Tensor, bad_losses: torch.Tensor, ids: Mapping[int, list[Any]], epoch: int) -> None:
    it = int(first_bad)
    if it >= 0:
        values = dict(zip(LOSS_COMPONENTS, bad_losses.tolist()))
        culprits = [k for k, v in values.items() if not math.isfinite(v)]
        raise FloatingPointError(
            f"Non-finite loss at epoch {epoch}, iteration {it}: {', '.join(culprits) or 'total'} "
            f"(components {values}); image ids {ids.get(it, '?')}. Check those images' annotations "
            "(e.g. `python scripts/probe_losses.py`), lower optimizer.lr or set optimizer.clip_grad_norm."
        )


# ------------------------------------------------------------------------------ evaluation
@contextlib.contextmanager
def loss_mode(model: nn.Module):
    """Train mode (torchvision returns losses only then) with every BatchNorm in eval mode, so
    running statistics do not move; the model's previous modes are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def evaluate(
    model: nn.Module,
    data_loader: DataLoader,
    device: torch.device | str,
    *,
    mapping: CategoryMapping,
    coco_gt: COCO | None = None,
    compute_losses: bool = True,
    compute_metrics: bool = True,
    mask_threshold: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Validation losses (per component) and COCO metrics for ``bbox`` and ``segm``.

    For the losses the model runs in training mode under ``torch.no_grad()`` with every BatchNorm
    in eval mode; the RPN and RoI samplers draw from a forked RNG seeded with ``seed``, so the
    value is reproducible and the caller's RNG stream is untouched. The model's parameters,
    buffers and train/eval modes are the same afterwards. The components are raw (unweighted).
    """
    device = torch.device(device)
    coco_gt = coco_gt if coco_gt is not None else getattr(data_loader.dataset, "coco", None)
    sums = torch.zeros(len(LOSS_COMPONENTS), device=device)
    n_batches = 0
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    was_training = {m: m.training for m in model.modules()}
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            for images, targets in tqdm(data_loader, desc="Evaluating", disable=not progress, leave=False, dynamic_ncols=True):
                images, targets = move_to_device(images, targets, device)
                if compute_losses:
                    with loss_mode(model), torch.no_grad():
                        sums += _stack_losses(model(images, targets))
                    n_batches += 1
                if compute_metrics:
                    model.eval()
                    with torch.inference_mode():
                        outputs = model(images)
                    ids = [int(t["image_id"]) for t in targets]
                    image_ids.extend(ids)
                    results.extend(predictions_to_coco(outputs, ids, mapping, mask_threshold))
        finally:
            for m, mode in was_training.items():
                m.training = mode
    val_losses = dict(zip(LOSS_COMPONENTS, (sums / max(n_batches, 1)).tolist())) if compute_losses else {}
    metrics: dict[str, dict[str, float]] = {}
    if compute_metrics:
        if coco_gt is None:
            raise ValueError("evaluate needs coco_gt (or a data_loader.dataset with .coco) for COCO metrics")
        metrics = coco_metrics(coco_gt, results, image_ids)
    return val_losses, metrics


# ------------------------------------------------------------------------------------- fit
def format_epoch_summary(
    epoch: int,
    epochs: int,
    train_loss: Mapping[str, float],
    val_loss: Mapping[str, float] | None,
    metrics: Mapping[str, Mapping[str, float]] | None,
    checkpoint: str | Path | None,
    loss_weights: Mapping[str, float] | None = None,
) -> str:
    """The console block ``fit`` prints after each epoch (components sorted by name)."""
    lines = [f"Epoch {epoch}/{epochs}", "📊 Training Losses:", f"   Total: {weighted_total(train_loss, loss_weights):.4f}"]
    lines += [f"   {name}: {train_loss[name]:.4f}" for name in sorted(train_loss)]
    if val_loss:
        lines.append(f"📈 Validation Loss: {weighted_total(val_loss, loss_weights):.4f}")
    if metrics:
        if "bbox" in metrics:
            lines.append(f"📦 Box mAP: {metrics['bbox']['AP']:.4f} (AP50: {metrics['bbox']['AP50']:.4f})")
        if "segm" in metrics:
            lines.append(f"🎭 Mask mAP: {metrics['segm']['AP']:.4f} (AP50: {metrics['segm']['AP50']:.4f})")
    if checkpoint is not None:
        lines.append(f"💾 Saved checkpoint: {checkpoint}")
    return "\n".join(lines)


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


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current lr per named group (``group``/``name`` keys; else the group index)."""
    lrs: dict[str, float] = {}
    for i, pg in enumerate(optimizer.param_groups):
        lrs.setdefault(group_name(pg, i), float(pg["lr"]))
    return lrs


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    *,
    epochs: int,
    device: torch.device | str,
    run_dir: str | Path,
    mapping: CategoryMapping,
    tracker: ExperimentTracker | None = None,
    loss_weights: Mapping[str, float] | None = None,
    lr_scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    start_epoch: int = 1,
    eval_every: int = 1,
    compute_val_loss: bool = True,
    checkpoint_every: int = 1,
    mask_threshold: float = 0.5,
    print_freq: int = 20,
    progress: bool = True,
    checkpoint_extra: Mapping[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train ``epochs`` epochs; after each, evaluate, checkpoint, print the summary block and log.

    Checkpoints go to ``<run_dir>/checkpoints/epoch_NNN.pth`` (every ``checkpoint_every`` epochs)
    and ``last.pth`` (every epoch); ``<run_dir>/metrics.json`` holds the history so far. Returns
    the history: one dict per epoch with ``train_loss``, ``val_loss``, ``metrics``, ``lr``,
    ``grad_norm``. A KeyboardInterrupt saves ``checkpoints/interrupted.pth`` before re-raising.
    """
    tracker = tracker or NullTracker()
    device = torch.device(device)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    history = list(history or [])
    grad_norms = GradNormMeter.from_optimizer(optimizer)
    epoch = start_epoch

    def state(epoch_done: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch_done,
            "num_classes": mapping.num_classes,
            "categories": mapping.state_dict(),
            "history": history,
            **(checkpoint_extra or {}),
        }

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
                val_loss = val_loss or None
            lrs = group_lrs(optimizer)
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_total": weighted_total(train_loss, loss_weights),
                "val_loss": val_loss,
                "val_total": weighted_total(val_loss, loss_weights) if val_loss else None,
                "metrics": metrics,
                "lr": lrs,
                "grad_norm": grad_norms.compute(),
                "time": {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1},
            }
            history.append(record)

            last = ckpt_dir / "last.pth"
            if checkpoint_every > 0 and epoch % checkpoint_every == 0:
                saved = save_checkpoint(ckpt_dir / f"epoch_{epoch:03d}.pth", state(epoch), copies=[last])
            else:
                saved = save_checkpoint(last, state(epoch))
            print(format_epoch_summary(epoch, epochs, train_loss, val_loss, metrics, _display_path(saved), loss_weights), flush=True)
            log_training_metrics(
                tracker, epoch, train_loss, val_loss, metrics, lrs, loss_weights=loss_weights,
                extra={
                    **{f"grad_norm/{k}": v for k, v in record["grad_norm"].items()},
                    **{f"time/{k}": v for k, v in record["time"].items()},
                },
            )
            (run_dir / "metrics.json").write_text(json.dumps(_finite_or_none(history), indent=2))
    except KeyboardInterrupt:
        path = save_checkpoint(ckpt_dir / "interrupted.pth", state(epoch - 1))
        print(f"\nInterrupted during epoch {epoch}: saved {_display_path(path)} (weights mid-epoch {epoch}).")
        raise
    return history


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN: undefined metrics become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj
