"""The one loop state that ``fit``, ``train_one_epoch`` and every hook read.

``TrainingState`` holds what a run trains and keeps (model, optimizer, schedule, scaler, category
mapping, history, step count: what a checkpoint holds, see ``engine.checkpoint``) and, while the loop
runs, where it is (epoch, iteration) and the current step's values as device tensors. Hooks read it
and publish into it (``record`` for the epoch's record, ``scalars`` for read-back scalars); nothing
in it is read back from the device except at the read-back points.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS

if TYPE_CHECKING:
    from maskrcnn_coco.engine.hooks import HookList
    from maskrcnn_coco.engine.signals import GracefulStop


@dataclass
class EpochProgress:
    """How far an interrupted epoch got: batches trained and the sums of their loss components, so
    a resumed epoch continues from there with exact epoch means."""

    iterations: int = 0
    loss_sums: list[float] = field(default_factory=lambda: [0.0] * len(LOSS_COMPONENTS))
    samples_done: int = 0  # positions of the epoch's global order trained, over all ranks

    def state_dict(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "loss_sums": list(self.loss_sums), "samples_done": self.samples_done}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> EpochProgress:
        return cls(int(state["iterations"]), [float(v) for v in state["loss_sums"]], int(state.get("samples_done", 0)))


@dataclass
class TrainingState:
    """Everything a run trains and keeps, plus where the loop is (the fields after ``fit``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any | None
    scaler: Any | None
    mapping: CategoryMapping | None
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    sampler: Any | None = None  # the training loader's sampler (set_epoch / state_dict / skip_next)
    global_step: int = 0  # optimizer steps so far
    # The best objective so far (``best_value``, ``best_epoch``, ``best_metric``), kept by the checkpointer.
    fit: dict[str, Any] = field(default_factory=dict)
    # Last finished epoch, and how far the next one got (a run resumed inside an epoch).
    epoch: int = 0
    progress: EpochProgress | None = None
    # Hook states from a checkpoint, loaded into the hooks by ``fit`` (``HookList.load_state_dicts``).
    hook_states: dict[str, Any] = field(default_factory=dict)

    # ---- set while the loop runs (never checkpointed)
    hooks: HookList | None = None
    signal: GracefulStop | None = None  # SIGTERM/SIGINT as a stop request (fit's)
    evaluating: bool = False  # the current epoch is evaluated after its training
    iteration: int = 0  # iterations of the current epoch finished (the current one's 0-based index while it runs)
    epoch_length: int | None = None  # batches per epoch on this rank, when the loader has a length
    epoch_end: bool = False  # the read-back at the end of an epoch (no progress line)
    # The current step, as device tensors: weighted total, raw components, weights, the iteration
    # index on the device; ``step_grad_norms`` is set by a GradNormMeter at the iterations it measures.
    step_total: torch.Tensor | None = None
    step_components: torch.Tensor | None = None
    step_grad_norms: torch.Tensor | None = None
    step_image_ids: list[Any] = field(default_factory=list)
    data_time: float = 0.0  # host seconds the current step waited for its batch
    weights: torch.Tensor | None = None
    it_device: torch.Tensor | None = None
    loss_sums: torch.Tensor | None = None  # the epoch's raw component sums so far (device)
    n_batches: int = 0
    grad_norm_sets: list[str] = field(default_factory=list)  # names of the sets step_grad_norms holds
    # Published by hooks: values at the latest read-back for later hooks (e.g. ``time``), the epoch's
    # record parts (``lr``, ``grad_norm``, ``time``, ``spike``), and scalars for the trackers at the
    # next read-back (``{tag: value}``, written at ``step=global_step``).
    latest: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    boundary: str | None = None  # a step-boundary stop asked by a hook ("checkpoint") or a signal ("signal")
    last_checkpoint: Path | None = None  # the newest checkpoint written (rank 0)

    def request_boundary(self, reason: str = "checkpoint") -> None:
        """Ask the loop to stop at the end of this iteration (agreed across ranks at a read-back):
        the hooks' ``at_boundary`` then runs with the epoch's progress in ``self.progress``."""
        if self.boundary != "signal":
            self.boundary = reason

    def put_scalar(self, tag: str, value: float) -> None:
        """A scalar for the trackers, written at the next read-back at ``step=global_step`` (a host
        value: call it at a read-back point)."""
        self.scalars[tag] = float(value)
