"""The loop's instruments as hooks: gradient norms, iteration spikes, the divergence guard, the
iteration timer and periodic step-boundary checkpoints (``engine.hooks`` says when each event runs).

None of them reads the device per iteration: they keep device tensors and read them back at the
read-back points (``at_read_back``), at a stop, or at the epoch's end.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from maskrcnn_coco.analysis.audit import LOSS_MODULES as AUDITED_MODULES
from maskrcnn_coco.analysis.diagnostics import Diagnosis, iteration_spikes
from maskrcnn_coco.config import DiagnosticsConfig
from maskrcnn_coco.engine.hooks import CONTROL, GUARD, MEASURE, MONITOR, Hook
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.solver.param_groups import group_name
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS
from maskrcnn_coco.utils.dist import all_reduce_sum, world_size

log = logging.getLogger(__name__)


def optimizer_groups(optimizer: torch.optim.Optimizer) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters of each logical group (``group``, else ``name``: ``heads`` and ``heads_no_wd`` are one)."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for i, pg in enumerate(optimizer.param_groups):
        groups.setdefault(group_name(pg, i), []).extend(pg["params"])
    return groups


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


class GradNormMeter(Hook):
    """Epoch mean of the gradient L2 norm of named parameter sets (the optimizer's groups, and the
    loss-producing modules), kept on the device and read back once, at ``compute``.

    ``every``: the norms are measured at iterations ``0, every, 2 * every, ...`` of the epoch (``due``)
    and the logged value is the mean over those iterations, an unbiased estimate of the epoch mean
    at ``1/every`` of the cost. One ``_foreach_norm`` over all gradients and one small matmul give
    every set's norm; no host sync.
    """

    priority = MEASURE
    main_process_only = False

    def __init__(self, groups: Mapping[str, Sequence[torch.nn.Parameter]] | None = None, every: int = 1,
                 modules: Mapping[str, Sequence[torch.nn.Parameter]] | None = None):
        if every < 1:
            raise ValueError(f"GradNormMeter(every={every}): must be at least 1 (train.grad_norm_every)")
        self.every = every
        self.sums: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.count = 0
        # Without ``groups`` the meter takes the optimizer's groups and the model's loss modules at the
        # first epoch (``before_epoch``), as ``from_optimizer`` would; a checkpoint's sums wait for it.
        self.bound = groups is not None
        self._pending: Mapping[str, Any] | None = None
        self._bind(groups or {}, modules or {})

    def _bind(self, groups: Mapping[str, Sequence[torch.nn.Parameter]], modules: Mapping[str, Sequence[torch.nn.Parameter]]) -> None:
        self.modules = {name: list(params) for name, params in modules.items() if params}
        self.groups = {name: list(params) for name, params in groups.items() if params}
        self.groups.update(self.modules)
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
        return cls(optimizer_groups(optimizer), every=every, modules=loss_module_parameters(model) if model is not None else None)

    # ---- hook events
    def before_epoch(self, state: TrainingState) -> None:
        if not self.bound:
            self._bind(optimizer_groups(state.optimizer), loss_module_parameters(state.model))
            self.bound = True
            if self._pending is not None:
                self.load_state_dict(self._pending)
        if state.iteration == 0:
            self.reset()
        state.grad_norm_sets = list(self.groups)

    def after_backward(self, state: TrainingState) -> None:
        if self.due(state.iteration):
            self.update()
            state.step_grad_norms = self.last

    def after_train_epoch(self, state: TrainingState) -> None:
        state.record["grad_norm"] = self.compute()
        state.record.setdefault("lr", {}).update(module_lrs(state.optimizer, self.modules))

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
        if not self.bound:
            self._pending = state
            return
        device = next((p.device for params in self.groups.values() for p in params), torch.device("cpu"))
        sums, names = state.get("sums"), state.get("names")
        if sums is not None and (len(sums) != len(self.groups) or (names is not None and list(names) != list(self.groups))):
            # Another set of groups (a checkpoint of an older version): the partial epoch's norms are dropped.
            sums, state = None, {}
        self.sums = None if sums is None else torch.tensor(sums, dtype=torch.float32, device=device)
        self.count = int(state.get("count", 0))


class SpikeMonitor(Hook):
    """Iteration-level spikes of the total loss and of the measured gradient norms, before they become
    a NaN or a divergence (``analysis.diagnostics.iteration_spikes``).

    On the device, per window between two read-back points: the largest finite weighted total, its
    iteration and components, the window's loss sums, and per gradient-norm set the largest measured
    norm and its iteration. ``read`` (at a read-back point, one host copy) compares the window with
    the references kept on the host (the lowest window-mean total so far, each set's median of its
    recent window means), hands each finding to ``on_spike`` (as a hook, by default: every hook's
    ``on_finding``) and starts the next window. The references live across epochs; ``state_dict``
    keeps them in checkpoints.
    """

    priority = MONITOR
    main_process_only = False

    # A gradient norm is judged against the median of its last GRAD_WINDOWS window means (norms drift
    # over training: in the default run they grow several-fold during the first epoch), once it has
    # MIN_GRAD_WINDOWS of them.
    GRAD_WINDOWS = 10
    MIN_GRAD_WINDOWS = 3

    def __init__(self, config: DiagnosticsConfig | None = None,
                 on_spike: Callable[[Diagnosis], None] | None = None):
        self.config = config if config is not None else DiagnosticsConfig()
        self.on_spike = on_spike
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
        if self.on_spike is not None:
            for finding in found:
                self.on_spike(finding)
        return found

    # ---- hook events
    def after_step(self, state: TrainingState) -> None:
        if state.step_grad_norms is not None:
            self.update_grad(state.step_grad_norms, state.it_device)
        self.update_loss(state.step_total, state.step_components, state.it_device)

    def at_read_back(self, state: TrainingState) -> None:
        found = self.read(state.epoch, state.grad_norm_sets)
        if self.on_spike is not None:  # read() handed them over already
            return
        for finding in found:
            if state.hooks is not None and state.hooks.listens("on_finding"):
                state.hooks.call("on_finding", state, finding)
            else:
                log.warning("%s", finding.text())

    def before_epoch(self, state: TrainingState) -> None:
        if state.iteration == 0:
            self.peaks = {}  # each epoch's peaks are its own (a continued epoch keeps its peaks so far)

    def after_train_epoch(self, state: TrainingState) -> None:
        state.record["spike"] = dict(self.peaks)

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



class IterationTimer(Hook):
    """Host-side seconds per training iteration: waiting for the batch (``data``, measured by the
    loop around ``next``) and the whole iteration (``iter``: between two ``after_step``), from
    ``time.perf_counter`` (no device sync: on a GPU an iteration's host time follows the device at
    the read-back points, so the epoch mean is right). The epoch means are the tags ``time/data`` and
    ``time/iter``; at each read-back they are in ``state.latest["time"]`` (the progress line), and the
    means over the window since the previous read-back, with the images per second of all ranks, in
    ``state.latest["time_window"]`` (``data``, ``iter``, ``images_per_s``: the ``iter/`` scalars)."""

    priority = MEASURE
    main_process_only = False

    def __init__(self) -> None:
        self.reset()
        self._t_prev = time.perf_counter()

    def reset(self) -> None:
        self.data_s, self.iter_s, self.count = 0.0, 0.0, 0
        self.images = 0  # this rank's images (the window's throughput; not kept in checkpoints)
        self._mark: tuple[float, float, int, int] = (0.0, 0.0, 0, 0)  # the sums where the window began

    def add(self, data_s: float, iter_s: float, images: int = 0) -> None:
        self.data_s += data_s
        self.iter_s += iter_s
        self.count += 1
        self.images += images

    def compute(self) -> dict[str, float]:
        """``{"data": mean s, "iter": mean s}`` per iteration (the tags ``time/data``, ``time/iter``)."""
        if not self.count:
            return {}
        return {"data": self.data_s / self.count, "iter": self.iter_s / self.count}

    def window(self) -> dict[str, float]:
        """Since the previous call (or the epoch's start): ``{"data": mean s, "iter": mean s,
        "images_per_s": images of all ranks per second}`` (empty without an iteration); starts the next window."""
        data_s, iter_s, count, images = self._mark
        self._mark = (self.data_s, self.iter_s, self.count, self.images)
        n = self.count - count
        if n <= 0:
            return {}
        out = {"data": (self.data_s - data_s) / n, "iter": (self.iter_s - iter_s) / n}
        if self.iter_s > iter_s:
            # Every rank steps in lockstep on batches of the same size.
            out["images_per_s"] = (self.images - images) * world_size() / (self.iter_s - iter_s)
        return out

    def before_epoch(self, state: TrainingState) -> None:
        if state.iteration == 0:
            self.reset()
        # A continued epoch (after a step-boundary stop, or resumed) keeps its window: ``_mark`` stays.
        self._t_prev = time.perf_counter()

    def after_step(self, state: TrainingState) -> None:
        now = time.perf_counter()
        self.add(state.data_time, now - self._t_prev, len(state.step_image_ids))
        self._t_prev = now

    def at_read_back(self, state: TrainingState) -> None:
        state.latest["time"] = self.compute()
        state.latest["time_window"] = self.window()

    def after_train_epoch(self, state: TrainingState) -> None:
        state.record.setdefault("time", {}).update(self.compute())

    def state_dict(self) -> dict[str, Any]:
        return {"data_s": self.data_s, "iter_s": self.iter_s, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.data_s, self.iter_s, self.count = float(state["data_s"]), float(state["iter_s"]), int(state["count"])
        self._mark = (self.data_s, self.iter_s, self.count, self.images)  # a resumed epoch's window starts here


class DivergenceError(FloatingPointError):
    """A finite loss above the divergence threshold: stopped like a NaN."""


class DivergenceGuard(Hook):
    """Stops training on a non-finite loss, or one above ``max_loss`` (absolute) or ``factor`` times the
    run's first iteration's total (its ``reference``, read once per run): ``FloatingPointError``
    (``DivergenceError``) naming the iteration, the components and the image ids, ranking the likely
    causes, at the next read-back (at most ``print_freq`` iterations later), at a stop (never a
    checkpoint of such weights) and at the epoch's end. ``train_one_epoch`` adds a NaN-only guard
    when its hooks have none. Every rank runs it: in a distributed run the check is one
    ``all_reduce`` of the bad flags, so all ranks stop together."""

    priority = GUARD
    main_process_only = False
    critical = True

    def __init__(self, max_loss: float | None = None, factor: float | None = 1e4, reference: float | None = None):
        self.max_loss, self.factor, self.reference = max_loss, factor, reference
        self.first_bad: torch.Tensor | None = None
        self.bad_losses: torch.Tensor | None = None
        self._limit: torch.Tensor | None = None
        self.recent_ids: dict[int, list[Any]] = {}

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

    def before_epoch(self, state: TrainingState) -> None:
        device = state.it_device.device
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_losses = torch.zeros(len(LOSS_COMPONENTS), device=device)
        self._limit = torch.tensor(self.limit, device=device)
        self.recent_ids.clear()

    def after_step(self, state: TrainingState) -> None:
        total = state.step_total
        if self.reference is None and self.factor is not None:
            # Once per run (a host sync): the reference the divergence limit is relative to.
            first = float(total)
            if math.isfinite(first) and first > 0:
                self.reference = first
                self._limit.fill_(self.limit)
        # Remember the first non-finite or diverged iteration without a host sync.
        bad = (~torch.isfinite(total) | (total > self._limit)) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, state.it_device, self.first_bad)
        self.bad_losses = torch.where(bad, state.step_components, self.bad_losses)
        self.recent_ids[state.iteration] = state.step_image_ids

    def at_read_back(self, state: TrainingState) -> None:
        if not state.epoch_end:  # the epoch's end is checked once, in after_train_epoch
            self.check(state)
            self.recent_ids.clear()

    def after_train_epoch(self, state: TrainingState) -> None:
        self.check(state)

    def at_boundary(self, state: TrainingState) -> None:
        self.check(state)  # never hand out weights that are already non-finite or diverged

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reference = state.get("reference")

    def check(self, state: TrainingState) -> None:
        """Raise for the first bad iteration since the epoch (piece) started (a host sync)."""
        elsewhere = False
        if world_size() > 1:
            flag = (self.first_bad >= 0).float().reshape(1)
            all_reduce_sum(flag)
            elsewhere = bool(flag[0] > 0)
        it = int(self.first_bad)
        if it < 0:
            if elsewhere:
                raise FloatingPointError(
                    f"Non-finite or diverged loss on another rank in epoch {state.epoch}: that rank's message names the "
                    "iteration, components and images; every rank stops."
                )
            return
        raise self.error(state.epoch, it, dict(zip(LOSS_COMPONENTS, self.bad_losses.tolist())),
                         state.weights.tolist(), self.recent_ids.get(it, "?"))

    def error(self, epoch: int, it: int, values: Mapping[str, float], weights: Sequence[float], ids: Any) -> FloatingPointError:
        """The exception for a bad iteration, ranking the likely causes from the evidence."""
        optimised = [k for k, w in zip(LOSS_COMPONENTS, weights) if w != 0]
        culprits = [k for k, v in values.items() if not math.isfinite(v)]
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        where = f"epoch {epoch}, iteration {it}"
        images = f"image ids {ids}"
        if not culprits:
            total = sum(v * w for v, w in zip(values.values(), weights))
            return DivergenceError(
                f"Loss diverged at {where}: total {total:.4g} above the limit {self.limit:.4g} ({self.describe()}; {shown}; {images}). "
                "The loss exploded across the batch: lower optimizer.lr or set optimizer.clip_grad_norm "
                "(gradient clipping bounds the step, not the loss: with a far too high lr it only slows the divergence)."
            )
        if len(culprits) >= max(2, len(optimised) - 1):
            return FloatingPointError(
                f"Non-finite loss at {where}: {', '.join(culprits)} ({shown}; {images}). Every component "
                "failed at once: the weights diverged, most likely a too high learning rate. Lower optimizer.lr or "
                "set optimizer.clip_grad_norm; if it persists at a low lr, check those images' annotations "
                "(python scripts/check_dataset.py, python scripts/probe_losses.py)."
            )
        return FloatingPointError(
            f"Non-finite loss at {where}: {', '.join(culprits)} ({shown}; {images}). Only "
            f"{'this component' if len(culprits) == 1 else 'these components'} failed: check those images' "
            "annotations first (python scripts/check_dataset.py, python scripts/probe_losses.py), then lower "
            "optimizer.lr or set optimizer.clip_grad_norm."
        )


class PeriodicCheckpoint(Hook):
    """A step-boundary stop every ``every_n_iters`` optimizer steps (``checkpoint.every_n_iters``): the
    checkpointer writes ``last.pth`` there and the epoch continues with a fresh loader iterator, as a
    run resumed from that checkpoint would, so both train identically."""

    priority = CONTROL
    main_process_only = False  # every rank stops at the same iteration
    critical = True

    def __init__(self, every_n_iters: int):
        if every_n_iters < 1:
            raise ValueError(f"PeriodicCheckpoint(every_n_iters={every_n_iters}): must be at least 1 (checkpoint.every_n_iters)")
        self.every = every_n_iters
        self.saved_at = 0

    def before_fit(self, state: TrainingState) -> None:
        self.saved_at = state.global_step

    def after_step(self, state: TrainingState) -> None:
        if state.global_step - self.saved_at >= self.every:
            state.request_boundary("checkpoint")

    def at_boundary(self, state: TrainingState) -> None:
        self.saved_at = state.global_step
