"""The loop as plain functions: ``train_one_epoch`` and ``evaluate`` (``fit`` composes them, in ``fit.py``).

Losses are accumulated on the device and read back only every ``print_freq`` iterations and at
the end of an epoch, so a GPU is never synchronised per iteration.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader

from maskrcnn_coco.analysis.audit import LOSS_MODULES as AUDITED_MODULES
from maskrcnn_coco.analysis.diagnostics import Diagnosis, iteration_spikes
from maskrcnn_coco.config import DiagnosticsConfig
from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine.eval_step import evaluate_batch, loss_mode  # noqa: F401 - loss_mode: importable from here as before
from maskrcnn_coco.engine.progress import Progress
from maskrcnn_coco.evaluation.coco_eval import coco_metrics, predictions_to_coco
from maskrcnn_coco.evaluation.per_class import CONFUSION_KEY, confusion_matrix
from maskrcnn_coco.solver.param_groups import group_name
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS
from maskrcnn_coco.utils.dist import all_gather_objects, all_reduce_sum, broadcast_object, is_main_process, world_size

log = logging.getLogger(__name__)

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


# The modules that produce the five losses (the parameters each loss's gradient reaches first), by
# their torchvision names; their gradient norms and lrs are logged as ``grad_norm/module.<name>``
# and ``lr/module.<name>`` with ``.`` as ``_`` (``rpn.head`` -> ``module.rpn_head``).
LOSS_MODULES = tuple(AUDITED_MODULES)


def module_key(name: str) -> str:
    return "module." + name.replace(".", "_")


def loss_module_parameters(model: nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """``{module.<name>: trainable parameters}`` of the ``LOSS_MODULES`` the model has (DDP unwrapped)."""
    model = getattr(model, "module", model)
    out: dict[str, list[torch.nn.Parameter]] = {}
    for name in LOSS_MODULES:
        try:
            sub = model.get_submodule(name)
        except AttributeError:
            continue
        params = [p for p in sub.parameters() if p.requires_grad]
        if params:
            out[module_key(name)] = params
    return out


def module_lrs(optimizer: torch.optim.Optimizer, modules: Mapping[str, Sequence[torch.nn.Parameter]]) -> dict[str, float]:
    """The lr of each module: that of the optimizer group holding most of its parameter elements."""
    lr_of = {id(p): float(pg["lr"]) for pg in optimizer.param_groups for p in pg["params"]}
    out = {}
    for name, params in modules.items():
        weight: dict[float, int] = {}
        for p in params:
            if id(p) in lr_of:
                weight[lr_of[id(p)]] = weight.get(lr_of[id(p)], 0) + p.numel()
        if weight:
            out[name] = max(weight, key=weight.__getitem__)
    return out


class GradNormMeter:
    """Epoch mean of the gradient L2 norm of named parameter sets (the optimizer's groups, and the
    loss-producing modules), kept on the device and read back once, at ``compute``.

    ``every``: the norms are measured at iterations ``0, every, 2 * every, ...`` of the epoch (``due``)
    and the logged value is the mean over those iterations, an unbiased estimate of the epoch mean
    at ``1/every`` of the cost. One ``_foreach_norm`` over all gradients and one small matmul give
    every set's norm; no host sync.
    """

    def __init__(self, groups: Mapping[str, Sequence[torch.nn.Parameter]], every: int = 1,
                 modules: Mapping[str, Sequence[torch.nn.Parameter]] | None = None):
        if every < 1:
            raise ValueError(f"GradNormMeter(every={every}): must be at least 1 (train.grad_norm_every)")
        self.modules = {name: list(params) for name, params in (modules or {}).items() if params}
        self.groups = {name: list(params) for name, params in groups.items() if params}
        self.groups.update(self.modules)
        self.every = every
        self.sums: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.count = 0
        unique: dict[int, torch.nn.Parameter] = {}
        for params in self.groups.values():
            for p in params:
                unique.setdefault(id(p), p)
        self._params = list(unique.values())
        self._membership: torch.Tensor | None = None  # parameters x sets, 1 where a parameter belongs to a set

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, model: nn.Module | None = None, every: int = 1) -> GradNormMeter:
        """Groups by the ``group`` (else ``name``) key of each param group, e.g. from ``get_parameter_groups``;
        with ``model``, also the loss-producing modules it has (``LOSS_MODULES``)."""
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for i, pg in enumerate(optimizer.param_groups):
            groups.setdefault(group_name(pg, i), []).extend(pg["params"])
        return cls(groups, every=every, modules=loss_module_parameters(model) if model is not None else None)

    def due(self, iteration: int) -> bool:
        """Whether iteration ``iteration`` of the epoch (0-based) is measured."""
        return iteration % self.every == 0

    def _matrix(self, device: torch.device) -> torch.Tensor:
        if self._membership is None or self._membership.device != device:
            index = {id(p): i for i, p in enumerate(self._params)}
            m = torch.zeros(len(self._params), len(self.groups))
            for j, params in enumerate(self.groups.values()):
                m[[index[id(p)] for p in params], j] = 1.0
            self._membership = m.to(device)
        return self._membership

    def update(self) -> None:
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        if present:
            grads = [self._params[i].grad for i in present]
            squares = torch.stack(torch._foreach_norm(grads)).float().square()
            matrix = self._matrix(squares.device)
            if len(present) < len(self._params):
                matrix = matrix[present]
            vec = (squares @ matrix).sqrt()
        else:
            vec = torch.zeros(len(self.groups), device=self._params[0].device if self._params else "cpu")
        self.last = vec  # this iteration's norms, for the SpikeMonitor
        self.sums = vec if self.sums is None else self.sums + vec
        self.count += 1

    def compute(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        means = (self.sums / self.count).tolist()  # the only device sync
        return dict(zip(self.groups, means))

    def reset(self) -> None:
        self.sums, self.count = None, 0

    def state_dict(self) -> dict[str, Any]:
        """Partial-epoch sums, so a resumed epoch's means stay exact."""
        return {"sums": None if self.sums is None else self.sums.tolist(), "count": self.count, "names": list(self.groups)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = next((p.device for params in self.groups.values() for p in params), torch.device("cpu"))
        sums, names = state.get("sums"), state.get("names")
        if sums is not None and (len(sums) != len(self.groups) or (names is not None and list(names) != list(self.groups))):
            # Another set of groups (a checkpoint of an older version): the partial epoch's norms are dropped.
            sums, state = None, {}
        self.sums = None if sums is None else torch.tensor(sums, dtype=torch.float32, device=device)
        self.count = int(state.get("count", 0))


class SpikeMonitor:
    """Iteration-level spikes of the total loss and of the measured gradient norms, before they become
    a NaN or a divergence (``analysis.diagnostics.iteration_spikes``).

    On the device, per window between two read-back points: the largest finite weighted total, its
    iteration and components, the window's loss sums, and per gradient-norm set the largest measured
    norm and its iteration. ``read`` (at a read-back point, one host copy) compares the window with
    the references kept on the host (the lowest window-mean total so far, each set's median of its
    recent window means), hands each finding to ``on_spike`` (default: a logged warning) and starts the next window. The
    references live across epochs; ``state_dict`` keeps them in checkpoints.
    """

    # A gradient norm is judged against the median of its last GRAD_WINDOWS window means (norms drift
    # over training: in the default run they grow several-fold during the first epoch), once it has
    # MIN_GRAD_WINDOWS of them.
    GRAD_WINDOWS = 10
    MIN_GRAD_WINDOWS = 3

    def __init__(self, config: DiagnosticsConfig | None = None,
                 on_spike: Callable[[Diagnosis], None] | None = None):
        self.config = config if config is not None else DiagnosticsConfig()
        self.on_spike = on_spike or (lambda finding: log.warning("%s", finding.text()))
        self.loss_reference: tuple[float, dict[str, float]] | None = None  # lowest window mean, its component means
        self.grad_references: dict[str, list[float]] = {}  # set -> its latest window means (GRAD_WINDOWS)
        self.peaks: dict[str, float] = {}  # the epoch's largest ratios (tags spike/loss, spike/grad_norm)
        self._loss: torch.Tensor | None = None  # [max total, its iteration, its 5 components, sum total, finite count, 5 sums]
        self._grad: torch.Tensor | None = None  # per set: [max, iteration, sum, count]
        self._iterations = 0

    def update_loss(self, total: torch.Tensor, components: torch.Tensor, iteration: torch.Tensor) -> None:
        finite = torch.isfinite(total)
        value = torch.where(finite, total, torch.zeros_like(total))
        if self._loss is None:
            self._loss = torch.zeros(2 * len(LOSS_COMPONENTS) + 4, device=total.device)
            self._loss[0] = -math.inf
        elif self._loss.device != total.device:  # restored from a checkpoint
            self._loss = self._loss.to(total.device)
        k = len(LOSS_COMPONENTS)
        w = self._loss
        higher = finite & (value > w[0])
        w[: k + 2] = torch.where(higher, torch.cat([value[None], iteration.to(w.dtype)[None], components.float()]), w[: k + 2])
        w[k + 2] += value
        w[k + 3] += finite.to(w.dtype)
        w[k + 4:] += torch.where(finite, components.float(), torch.zeros_like(components, dtype=w.dtype))
        self._iterations += 1

    def update_grad(self, norms: torch.Tensor, iteration: torch.Tensor) -> None:
        norms = norms.float()
        if self._grad is None:
            self._grad = torch.zeros(4, norms.numel(), device=norms.device)
        elif self._grad.device != norms.device:
            self._grad = self._grad.to(norms.device)
        g = self._grad
        finite = torch.isfinite(norms)
        value = torch.where(finite, norms, torch.zeros_like(norms))
        higher = finite & (value > g[0])
        g[0] = torch.where(higher, value, g[0])
        g[1] = torch.where(higher, iteration.to(g.dtype).expand_as(value), g[1])
        g[2] += value
        g[3] += finite.to(g.dtype)

    def read(self, epoch: int, grad_names: Sequence[str] = ()) -> list[Diagnosis]:
        """Close the window: compare, report, update the references (a host sync: read-back points only)."""
        if self._iterations == 0:
            return []
        parts = [t.flatten() for t in (self._loss, self._grad) if t is not None]
        values = torch.cat(parts).tolist() if parts else []
        k = len(LOSS_COMPONENTS)
        loss_values, grad_values = (values[: 2 * k + 4], values[2 * k + 4:]) if self._loss is not None else ([], values)
        window, self._iterations, self._loss, self._grad = self._iterations, 0, None, None
        loss = loss_reference = None
        if loss_values and loss_values[k + 3] > 0:
            loss = (loss_values[0], int(loss_values[1]), dict(zip(LOSS_COMPONENTS, loss_values[2: k + 2])))
            loss_reference = self.loss_reference
            count = loss_values[k + 3]
            mean, means = loss_values[k + 2] / count, {c: v / count for c, v in zip(LOSS_COMPONENTS, loss_values[k + 4:])}
            if self.loss_reference is None or mean < self.loss_reference[0]:
                self.loss_reference = (mean, means)
            if loss_reference is not None and loss_reference[0] > 0:
                self.peaks["loss"] = max(self.peaks.get("loss", 0.0), loss[0] / loss_reference[0])
        grads, grad_refs, window_means = {}, {}, {}
        n = len(grad_values) // 4
        for j, name in enumerate(list(grad_names)[:n]):
            peak, at, total, count = (grad_values[r * n + j] for r in range(4))
            if count <= 0:
                continue
            window_means[name] = total / count
            recent = self.grad_references.get(name)
            if recent and len(recent) >= self.MIN_GRAD_WINDOWS:
                grads[name], grad_refs[name] = (peak, int(at)), statistics.median(recent)
                if grad_refs[name] > 0:
                    self.peaks["grad_norm"] = max(self.peaks.get("grad_norm", 0.0), peak / grad_refs[name])
        found = iteration_spikes(epoch, loss=loss, loss_reference=loss_reference, grad_norms=grads,
                                 grad_references=grad_refs, window=window, config=self.config)
        spiked = {f.subject for f in found if f.kind == "grad_norm_spike"}
        for name, mean in window_means.items():
            if name not in spiked:  # a spiking window would raise the reference it is judged by
                recent = self.grad_references.setdefault(name, [])
                recent.append(mean)
                del recent[: -self.GRAD_WINDOWS]
        for finding in found:
            self.on_spike(finding)
        return found

    def pop_peaks(self) -> dict[str, float]:
        """The epoch's largest spike ratios (``spike/loss``, ``spike/grad_norm``), then start afresh."""
        peaks, self.peaks = self.peaks, {}
        return peaks

    def state_dict(self) -> dict[str, Any]:
        """References, the epoch's peaks and the open window (a host copy: call it at a stop, not per
        iteration), so a run resumed mid-epoch judges and reports exactly as an uninterrupted one."""
        return {"loss_reference": self.loss_reference, "grad_references": self.grad_references, "peaks": dict(self.peaks),
                "window": {"loss": None if self._loss is None else self._loss.tolist(),
                           "grad": None if self._grad is None else self._grad.tolist(), "iterations": self._iterations}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ref = state.get("loss_reference")
        self.loss_reference = (float(ref[0]), {c: float(v) for c, v in ref[1].items()}) if ref else None
        self.grad_references = {k: [float(v) for v in means] for k, means in (state.get("grad_references") or {}).items()}
        self.peaks = {k: float(v) for k, v in (state.get("peaks") or {}).items()}
        window = state.get("window") or {}
        self._loss = None if window.get("loss") is None else torch.tensor(window["loss"], dtype=torch.float32)
        self._grad = None if window.get("grad") is None else torch.tensor(window["grad"], dtype=torch.float32)
        self._iterations = int(window.get("iterations", 0))


class IterationTimer:
    """Host-side seconds per training iteration: waiting for the batch (``data``) and the whole
    iteration (``iter``), from ``time.perf_counter`` (no device sync: on a GPU an iteration's host
    time follows the device at the read-back points, so the epoch mean is right)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.data_s, self.iter_s, self.count = 0.0, 0.0, 0

    def add(self, data_s: float, iter_s: float) -> None:
        self.data_s += data_s
        self.iter_s += iter_s
        self.count += 1

    def compute(self) -> dict[str, float]:
        """``{"data": mean s, "iter": mean s}`` per iteration (the tags ``time/data``, ``time/iter``)."""
        if not self.count:
            return {}
        return {"data": self.data_s / self.count, "iter": self.iter_s / self.count}


AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` (``off``, ``bf16``, ``fp16``); None for off."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"train.amp={amp!r}: use one of {', '.join(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


def grad_scaler(amp: str | None, device: torch.device) -> torch.amp.GradScaler | None:
    """The GradScaler ``train.amp`` needs on ``device``: one for fp16 (its range is narrow), else None."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


@dataclass
class EpochProgress:
    """How far an interrupted epoch got: batches trained and the sums of their loss components, so
    a resumed epoch continues from there with exact epoch means."""

    iterations: int = 0
    loss_sums: list[float] = field(default_factory=lambda: [0.0] * len(LOSS_COMPONENTS))
    grad_norms: dict[str, Any] | None = None  # GradNormMeter.state_dict() of the partial epoch
    samples_done: int = 0  # positions of the epoch's global order trained, over all ranks

    def state_dict(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "loss_sums": list(self.loss_sums), "grad_norms": self.grad_norms,
                "samples_done": self.samples_done}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> EpochProgress:
        return cls(int(state["iterations"]), [float(v) for v in state["loss_sums"]], state.get("grad_norms"),
                   int(state.get("samples_done", 0)))


class TrainingStopped(Exception):
    """``should_stop`` asked the epoch to end after a finished iteration; ``progress`` says where."""

    def __init__(self, epoch: int, progress: EpochProgress):
        super().__init__(f"training stopped in epoch {epoch} after {progress.iterations} iterations")
        self.epoch, self.progress = epoch, progress


class DivergenceError(FloatingPointError):
    """A finite loss above the divergence threshold: stopped like a NaN."""


class DivergenceGuard:
    """The loss limit above which training stops like on a NaN: ``max_loss`` (absolute) and
    ``factor`` times the run's first iteration's total (its ``reference``, read once per run)."""

    def __init__(self, max_loss: float | None = None, factor: float | None = 1e4, reference: float | None = None):
        self.max_loss, self.factor, self.reference = max_loss, factor, reference

    @property
    def limit(self) -> float:
        limits = [math.inf if self.max_loss is None else self.max_loss]
        if self.factor is not None and self.reference is not None:
            limits.append(self.factor * self.reference)
        return min(limits)

    def describe(self) -> str:
        parts = []
        if self.max_loss is not None:
            parts.append(f"train.max_loss={self.max_loss:g}")
        if self.factor is not None and self.reference is not None:
            parts.append(f"train.max_loss_factor={self.factor:g} x the first iteration's {self.reference:.4g}")
        return " and ".join(parts) or "no limit"


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
    divergence: DivergenceGuard | None = None,
    start: EpochProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
    after_step: Callable[[int], None] | None = None,
    amp: str | None = None,
    timer: IterationTimer | None = None,
    spikes: SpikeMonitor | None = None,
) -> dict[str, float]:
    """Train for one pass over ``data_loader``; return the epoch mean of each loss component.

    The optimised loss is ``sum(loss_weights[k] * loss_k)``; the returned dict holds the raw
    (unweighted) components under torchvision's names and no total. ``lr_scheduler`` is stepped
    every iteration. A non-finite total, or one above ``divergence.limit``, raises ``FloatingPointError``
    (``DivergenceError``) naming the iteration, the components and the image ids, at the next
    read-back (at most ``print_freq`` iterations later).

    ``start`` continues an interrupted epoch (the loader must already skip its batches);
    ``should_stop`` is asked after every iteration (a host-side flag, no device sync) and ends the
    epoch with ``TrainingStopped``; ``after_step(iteration)`` is called after every optimizer step.

    ``amp``: the forward pass under autocast in ``bf16`` or ``fp16`` (``off``: none); with ``scaler``
    (a ``GradScaler``, needed for fp16) the loss is scaled. ``amp=None`` keeps the older contract:
    autocast in the device's default dtype exactly when a scaler is given. ``grad_norms`` is updated
    at the iterations its ``due`` picks; ``timer`` collects host-side data and iteration seconds;
    ``spikes`` watches each iteration's loss and measured gradient norms and reports spikes at the
    read-back points, before the NaN check (a spike that precedes a NaN is said first); at a stop its
    open window is left for ``spikes.state_dict`` (a resumed epoch continues it).
    No step reads a value back from the device except at the read-back points.
    """
    device = torch.device(device)
    model.train()
    autocast = amp not in (None, "off") or (amp is None and scaler is not None)
    dtype = amp_dtype(amp) if amp is not None else None
    timer = timer if timer is not None else IterationTimer()
    weights = _weight_vector(loss_weights, device)
    start = start or EpochProgress()
    sums = torch.tensor(start.loss_sums, dtype=torch.float32, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    # Iteration index kept on the device: torch.tensor(it, device=...) would copy from the host
    # every iteration, which stalls the host behind the GPU stream.
    it_device = torch.full((), start.iterations, dtype=torch.long, device=device)
    bad_losses = torch.zeros(len(LOSS_COMPONENTS), device=device)
    guard = divergence or DivergenceGuard(factor=None)
    limit = torch.tensor(guard.limit, device=device)
    recent_ids: dict[int, list[Any]] = {}
    n_batches = start.iterations
    params = [p for group in optimizer.param_groups for p in group["params"]]
    distributed = world_size() > 1
    progress = progress and is_main_process()
    bar = Progress(data_loader, f"Epoch {epoch}", enabled=progress, start=start.iterations)
    spike_sets = list(grad_norms.groups) if grad_norms is not None else []
    t_prev = time.perf_counter()
    for it, (images, targets) in enumerate(bar, start=start.iterations):
        t_data = time.perf_counter() - t_prev
        images, targets = move_to_device(images, targets, device)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss_dict = model(images, targets)
        components = _stack_losses(loss_dict)
        total = (components * weights).sum()
        if guard.reference is None and guard.factor is not None:
            # Once per run (a host sync): the reference the divergence limit is relative to.
            first = float(total.detach())
            if math.isfinite(first) and first > 0:
                guard.reference = first
                limit.fill_(guard.limit)

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        if grad_norms is not None and grad_norms.due(it):
            grad_norms.update()
            if spikes is not None and grad_norms.last is not None:
                spikes.update_grad(grad_norms.last, it_device)
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
        # Remember the first non-finite or diverged iteration without a host sync.
        total_d = total.detach()
        bad = (~torch.isfinite(total_d) | (total_d > limit)) & (first_bad < 0)
        first_bad = torch.where(bad, it_device, first_bad)
        bad_losses = torch.where(bad, detached, bad_losses)
        if spikes is not None:
            spikes.update_loss(total_d, detached, it_device)
        it_device += 1
        recent_ids[it] = [t.get("image_id") for t in targets]
        if after_step is not None:
            after_step(it)

        if (it + 1) % print_freq == 0:
            if spikes is not None:
                spikes.read(epoch, spike_sets)
            _check_finite(first_bad, bad_losses, recent_ids, epoch, weights, guard)  # host sync point
            recent_ids.clear()
            if progress:
                means = sums / n_batches
                *values, total_mean = torch.cat([means, (means * weights).sum()[None]]).tolist()
                postfix = {SHORT_NAMES[k]: f"{v:.3f}" for k, v in zip(LOSS_COMPONENTS, values)}
                times = {k: f"{1e3 * v:.0f}ms" for k, v in timer.compute().items()}  # host clock: no sync
                bar.update({**postfix, "total": f"{total_mean:.3f}", "lr": f"{optimizer.param_groups[0]['lr']:.4g}", **times}, it + 1)
        now = time.perf_counter()
        timer.add(t_data, now - t_prev)
        t_prev = now
        # Several processes must agree on where to stop: they ask at the read-back points only
        # (``should_stop`` then runs a collective); one process asks after every iteration.
        ask = should_stop is not None and (not distributed or (it + 1) % print_freq == 0)
        if ask and should_stop():
            bar.close()
            # Never hand out weights that are already non-finite or diverged.
            _check_finite(first_bad, bad_losses, recent_ids, epoch, weights, guard)
            raise TrainingStopped(epoch, EpochProgress(n_batches, sums.tolist()))
    bar.close()
    if n_batches == 0:
        raise ValueError("train_one_epoch got an empty data loader")
    if spikes is not None:
        spikes.read(epoch, spike_sets)
    # One collective at the end: every rank's bad flag, loss sums and batch count.
    totals = _check_finite(first_bad, bad_losses, recent_ids, epoch, weights, guard,
                           extra=torch.cat([sums, torch.full((1,), float(n_batches), device=device)]))
    if totals is not None:
        sums, n_batches = totals[:-1], totals[-1]
    return dict(zip(LOSS_COMPONENTS, (sums / n_batches).tolist()))


def _check_finite(
    first_bad: torch.Tensor,
    bad_losses: torch.Tensor,
    ids: Mapping[int, list[Any]],
    epoch: int,
    weights: torch.Tensor,
    guard: DivergenceGuard,
    extra: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Raise for the first bad iteration, ranking the likely causes from the evidence.

    In a distributed run one ``all_reduce`` carries every rank's bad flag (and ``extra``, summed
    over ranks, which is returned), so all ranks stop together and none waits in a collective.
    """
    reduced, elsewhere = None, False
    if world_size() > 1:
        flag = (first_bad >= 0).float().reshape(1)
        vec = torch.cat([flag, extra.float()]) if extra is not None else flag
        all_reduce_sum(vec)
        elsewhere, reduced = bool(vec[0] > 0), (vec[1:] if extra is not None else None)
    it = int(first_bad)
    if it < 0:
        if elsewhere:
            raise FloatingPointError(
                f"Non-finite or diverged loss on another rank in epoch {epoch}: that rank's message names the "
                "iteration, components and images; every rank stops."
            )
        return reduced
    values = dict(zip(LOSS_COMPONENTS, bad_losses.tolist()))
    optimised = [k for k, w in zip(LOSS_COMPONENTS, weights.tolist()) if w != 0]
    culprits = [k for k, v in values.items() if not math.isfinite(v)]
    shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    where = f"epoch {epoch}, iteration {it}"
    images = f"image ids {ids.get(it, '?')}"
    if not culprits:
        total = sum(v * w for v, w in zip(values.values(), weights.tolist()))
        raise DivergenceError(
            f"Loss diverged at {where}: total {total:.4g} above the limit {guard.limit:.4g} ({guard.describe()}; {shown}; {images}). "
            "The loss exploded across the batch: lower optimizer.lr or set optimizer.clip_grad_norm "
            "(gradient clipping bounds the step, not the loss: with a far too high lr it only slows the divergence)."
        )
    if len(culprits) >= max(2, len(optimised) - 1):
        raise FloatingPointError(
            f"Non-finite loss at {where}: {', '.join(culprits)} ({shown}; {images}). Every component "
            "failed at once: the weights diverged, most likely a too high learning rate. Lower optimizer.lr or "
            "set optimizer.clip_grad_norm; if it persists at a low lr, check those images' annotations "
            "(python scripts/check_dataset.py, python scripts/probe_losses.py)."
        )
    raise FloatingPointError(
        f"Non-finite loss at {where}: {', '.join(culprits)} ({shown}; {images}). Only "
        f"{'this component' if len(culprits) == 1 else 'these components'} failed: check those images' "
        "annotations first (python scripts/check_dataset.py, python scripts/probe_losses.py), then lower "
        "optimizer.lr or set optimizer.clip_grad_norm."
    )


# ------------------------------------------------------------------------------ evaluation
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
    backend: str = "auto",
    mark: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Validation losses (per component) and COCO metrics for ``bbox`` and ``segm``.

    For the losses the model runs in training mode without gradients with every BatchNorm in eval
    mode; the RPN and RoI samplers draw from a forked RNG seeded with ``seed``, so the value is
    reproducible and the caller's RNG stream is untouched. A torchvision ``GeneralizedRCNN`` runs the
    transform and the backbone once per batch for both losses and detections (``eval_step``). The
    model's parameters, buffers and train/eval modes are the same afterwards. The components are raw
    (unweighted). ``backend``: COCOeval's implementation (``coco_eval.BACKENDS``). ``mark(stage)``,
    when given, is called as each stage ends (``evaluate_batch``'s, then ``"to COCO"`` per batch and
    ``"COCOeval"``), so a benchmark can time them.
    """
    device = torch.device(device)
    coco_gt = coco_gt if coco_gt is not None else getattr(data_loader.dataset, "coco", None)
    sums = torch.zeros(len(LOSS_COMPONENTS), device=device)
    n_images = 0
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # evaluate_batch restores the model's modes
        torch.manual_seed(seed)
        bar = Progress(data_loader, "Evaluating", enabled=progress and is_main_process())
        for images, targets in bar:
            images, targets = move_to_device(images, targets, device)
            loss_dict, outputs = evaluate_batch(model, images, targets, losses=compute_losses, detections=compute_metrics, mark=mark)
            if loss_dict is not None:
                # Weighted by images, so the mean does not depend on how batches (or ranks) split the set.
                sums += _stack_losses(loss_dict) * len(images)
                n_images += len(images)
            if outputs is not None:
                ids = [int(t["image_id"]) for t in targets]
                image_ids.extend(ids)
                results.extend(predictions_to_coco(outputs, ids, mapping, mask_threshold))
                if mark is not None:
                    mark("to COCO")
    if world_size() > 1:
        # Each rank evaluated its own shard: sum the losses by image, gather the detections.
        totals = all_reduce_sum(torch.cat([sums, torch.full((1,), float(n_images), device=device)]))
        sums, n_images = totals[:-1], int(totals[-1])
        shards = all_gather_objects((results, image_ids))
        # In image-id order, as one process would have produced them: COCOeval breaks score ties
        # by the order of the results, so the metrics then equal a single-process evaluation.
        results = sorted((r for shard, _ in shards for r in shard), key=lambda r: r["image_id"])
        image_ids = sorted(i for _, ids in shards for i in ids)
    val_losses = dict(zip(LOSS_COMPONENTS, (sums / max(n_images, 1)).tolist())) if compute_losses else {}
    metrics: dict[str, dict[str, float]] = {}
    if compute_metrics:
        if coco_gt is None:
            raise ValueError("evaluate needs coco_gt (or a data_loader.dataset with .coco) for COCO metrics")
        # COCOeval once over the whole set, on rank 0; every rank gets its numbers. The confusion
        # matrix rides along under metrics["confusion"] (not a scalar: epoch_scalars skips it).
        if is_main_process():
            metrics = coco_metrics(coco_gt, results, image_ids, backend=backend)
            if mark is not None:
                mark("COCOeval")
            metrics[CONFUSION_KEY] = confusion_matrix(coco_gt, results, image_ids)  # type: ignore[assignment]
        metrics = broadcast_object(metrics)
    return val_losses, metrics
