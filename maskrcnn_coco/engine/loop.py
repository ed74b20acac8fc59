"""``train_one_epoch``: one pass over the training data, as a plain function (``fit`` composes it).

The step itself (forward, weighted total, backward, clip, optimizer and schedule step, the loss sums)
is here; everything else (gradient norms, spikes, the divergence guard, timers, progress, periodic
checkpoints, outputs) is a hook (``engine.hooks``). Losses are accumulated on the device and read back
only at the read-back points (every ``print_freq`` iterations) and at the end of an epoch, so a GPU is
never synchronised per iteration.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from maskrcnn_coco.engine.hooks import Hook, HookList, as_hook_list
from maskrcnn_coco.engine.monitors import DivergenceGuard
from maskrcnn_coco.engine.settings import FitSettings, amp_dtype
from maskrcnn_coco.engine.state import EpochProgress, TrainingState
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS
from maskrcnn_coco.utils.dist import all_reduce_sum, world_size


def move_to_device(
    images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [
        {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


def weight_vector(loss_weights: Mapping[str, float] | None, device: torch.device) -> torch.Tensor:
    weights = loss_weights or {}
    return torch.tensor([float(weights.get(k, 1.0)) for k in LOSS_COMPONENTS], device=device)


def stack_losses(loss_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The five components in ``LOSS_COMPONENTS`` order; a clear error when the model returned others."""
    missing = [k for k in LOSS_COMPONENTS if k not in loss_dict]
    if missing:
        raise KeyError(f"The model returned no {missing}; got {sorted(loss_dict)} (is it a Mask R-CNN in train mode?)")
    return torch.stack([loss_dict[k] for k in LOSS_COMPONENTS])


class TrainingStopped(Exception):
    """The epoch stopped at a step boundary (``state.request_boundary``); ``state.progress`` says where
    and ``reason`` why (``"signal"`` or a hook's reason, e.g. ``"checkpoint"``)."""

    def __init__(self, epoch: int, progress: EpochProgress, reason: str):
        super().__init__(f"training stopped in epoch {epoch} after {progress.iterations} iterations ({reason})")
        self.epoch, self.progress, self.reason = epoch, progress, reason


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Iterable,
    device: torch.device | str,
    epoch: int,
    hooks: HookList | Sequence[Hook] | None = None,
    *,
    settings: FitSettings | None = None,
    lr_scheduler: Any | None = None,
    state: TrainingState | None = None,
) -> dict[str, float]:
    """Train for one pass over ``data_loader``; return the epoch mean of each loss component.

    The optimised loss is ``sum(settings.loss_weights[k] * loss_k)``; the returned dict holds the raw
    (unweighted) components under torchvision's names and no total. ``lr_scheduler`` is stepped every
    iteration. ``hooks`` see every step (``engine.hooks``); without a ``DivergenceGuard`` among them a
    NaN-only one is added, so a non-finite loss always raises ``FloatingPointError`` naming the
    iteration, the components and the image ids (at the next read-back, at most ``print_freq``
    iterations later).

    ``state``: the loop state of a ``fit`` (its ``progress`` continues an interrupted epoch, whose
    loader must already skip the trained batches; its ``signal`` asks for a stop). A step-boundary stop
    (a hook's ``state.request_boundary`` or a signal) runs the hooks' ``at_boundary`` and raises
    ``TrainingStopped``. No step reads a value back from the device except at the read-back points.
    """
    settings = settings if settings is not None else FitSettings()
    device = torch.device(device)
    hooks = as_hook_list(hooks)
    if hooks.find(DivergenceGuard) is None:
        hooks.add(DivergenceGuard(factor=None))
    if state is None:
        state = TrainingState(model, optimizer, lr_scheduler, settings.scaler, None, epoch)
    state.hooks, state.epoch = hooks, epoch
    lr_scheduler, scaler, print_freq = state.lr_scheduler, settings.scaler, settings.print_freq
    dtype = amp_dtype(settings.amp)
    autocast = dtype is not None
    clip = settings.clip_grad_norm
    model.train()

    start = state.progress or EpochProgress()
    state.progress = None
    state.weights = weights = weight_vector(settings.loss_weights, device)
    state.loss_sums = sums = torch.tensor(start.loss_sums, dtype=torch.float32, device=device)
    state.n_batches = start.iterations
    # Iteration index kept on the device: torch.tensor(it, device=...) would copy from the host
    # every iteration, which stalls the host behind the GPU stream.
    state.it_device = torch.full((), start.iterations, dtype=torch.long, device=device)
    state.iteration, state.epoch_end, state.boundary = start.iterations, False, None
    state.epoch_length = len(data_loader) if hasattr(data_loader, "__len__") else None  # type: ignore[arg-type]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    distributed = world_size() > 1
    stop = state.signal
    hooks.call("before_epoch", state)

    batches = iter(data_loader)
    while True:
        t0 = time.perf_counter()
        try:
            images, targets = next(batches)
        except StopIteration:
            break
        state.data_time = time.perf_counter() - t0
        state.iteration, state.step_grad_norms = state.n_batches, None
        images, targets = move_to_device(images, targets, device)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss_dict = model(images, targets)
        components = stack_losses(loss_dict)
        total = (components * weights).sum()

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        hooks.after_backward(state)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()

        state.step_components = detached = components.detach()
        state.step_total = total.detach()
        state.step_image_ids = [t.get("image_id") for t in targets]
        sums += detached
        state.n_batches += 1
        state.global_step += 1
        hooks.after_step(state)
        state.it_device += 1

        read_back = state.n_batches % print_freq == 0
        if read_back:
            hooks.call("at_read_back", state)
            state.scalars.clear()
        if stop is not None and stop.requested:
            state.boundary = "signal"
        # Several processes must agree on where to stop: they ask at the read-back points only (a
        # collective); one process stops right after the iteration that asked.
        if distributed and read_back:
            _agree_on_boundary(state, device)
        if state.boundary is not None and (read_back or not distributed):
            state.progress = EpochProgress(state.n_batches, sums.tolist(), state.n_batches * _batch_size(data_loader) * world_size())
            reason, state.boundary = state.boundary, None
            hooks.call("at_boundary", state)
            raise TrainingStopped(epoch, state.progress, reason)
    if state.n_batches == 0:
        raise ValueError("train_one_epoch got an empty data loader")
    state.epoch_end = True
    if state.n_batches % print_freq != 0:  # the epoch's last, partial window (no progress line)
        hooks.call("at_read_back", state)
        state.scalars.clear()
    n_batches: Any = state.n_batches
    if distributed:  # one collective: every rank's loss sums and batch count
        totals = all_reduce_sum(torch.cat([sums, torch.full((1,), float(n_batches), device=device)]))
        sums, n_batches = totals[:-1], totals[-1]
    means = dict(zip(LOSS_COMPONENTS, (sums / n_batches).tolist()))
    state.iteration = state.n_batches
    hooks.call("after_train_epoch", state)
    return means


def _batch_size(data_loader: Iterable) -> int:
    return getattr(data_loader, "batch_size", None) or 1


def _agree_on_boundary(state: TrainingState, device: torch.device) -> None:
    """Every rank stops at the same iteration: one ``all_reduce`` of [signalled, asked by a hook]."""
    flag = torch.tensor([float(state.boundary == "signal"), float(state.boundary is not None)], device=device)
    all_reduce_sum(flag)
    if flag[0] > 0:
        if state.signal is not None and state.signal.signum is None:
            state.signal.signum = signal.SIGTERM  # another rank was signalled
        state.boundary = "signal"
    elif flag[1] > 0:
        state.boundary = state.boundary or "checkpoint"
