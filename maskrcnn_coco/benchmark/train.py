"""The training section: ``train_one_epoch`` with the default hooks (the iteration log included) against a
bare torchvision loop, and what the read-back's iteration log costs, timed alone."""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from maskrcnn_coco.benchmark.setup import Setup
from maskrcnn_coco.benchmark.timing import Timing, ratios, timed
from maskrcnn_coco.engine.checkpoint import rng_state, set_rng_state
from maskrcnn_coco.engine.hooks import Hook, HookList
from maskrcnn_coco.engine.iteration_log import IterationLog, MemoryReader, loader_workers, main_rss_mb
from maskrcnn_coco.engine.loop import move_to_device, stack_losses, train_one_epoch
from maskrcnn_coco.engine.monitors import DivergenceGuard, GradNormMeter
from maskrcnn_coco.engine.settings import FitSettings, amp_dtype, grad_scaler
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.engine.writers import TrackerWriter, default_hooks
from maskrcnn_coco.solver.param_groups import build_optimizer
from maskrcnn_coco.solver.schedule import build_lr_scheduler
from maskrcnn_coco.tracking.backends import NullTracker
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS


class TrainBench:
    """Restores one snapshot before every trial: weights, BN buffers, fresh optimizer and schedule, RNGs."""

    def __init__(self, setup: Setup):
        self.s = setup
        self.snapshot = copy.deepcopy(setup.model.state_dict())
        self.rng = rng_state()

    def restore(self, channels_last: bool) -> tuple[torch.optim.Optimizer, Any]:
        model = self.s.model
        model.load_state_dict(self.snapshot)
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model.train()
        set_rng_state(self.rng)
        optimizer = build_optimizer(self.s.cfg.optimizer, model, verbose=False)
        scheduler = build_lr_scheduler(self.s.cfg.scheduler, optimizer, max(len(self.s.train_batches), 1), self.s.cfg.epochs)
        return optimizer, scheduler

    def settings(self, amp: str) -> FitSettings:
        cfg = self.s.cfg
        return FitSettings(device=self.s.device, loss_weights=self.s.loss_weights, amp=amp, scaler=grad_scaler(amp, self.s.device),
                           clip_grad_norm=cfg.optimizer.clip_grad_norm, print_freq=cfg.print_freq, progress=False)

    def hooks(self, settings: FitSettings) -> list[Hook]:
        """The default instruments of a run (gradient norms, timer, divergence guard, spike monitor) and,
        as a run with a run folder has them, the iteration log and a tracker writer (to a null tracker:
        the ``iter/`` scalars are made and handed over, the backends' own cost is theirs)."""
        cfg = self.s.cfg
        hooks = default_hooks(None, settings, grad_norm_every=cfg.train.grad_norm_every, diagnostics=cfg.diagnostics,
                              divergence=DivergenceGuard(max_loss=cfg.train.max_loss, factor=cfg.train.max_loss_factor))
        if not any(isinstance(h, IterationLog) for h in hooks):
            hooks.append(IterationLog())
        return [*hooks, TrackerWriter(NullTracker())]

    def ours(self, amp: str, channels_last: bool) -> tuple[float, float]:
        """train_one_epoch with the default hooks, as fit runs it (the epoch's record included); returns (wall, cpu)."""
        s = self.s
        optimizer, scheduler = self.restore(channels_last)
        settings = self.settings(amp)
        hooks = self.hooks(settings)

        def run() -> None:
            train_one_epoch(s.model, optimizer, s.train_batches, s.device, 1, hooks, settings=settings, lr_scheduler=scheduler)

        _, wall, cpu = timed(run, s.device)
        return wall, cpu

    def dispatch_us(self, amp: str, calls: int = 50) -> dict[str, float]:
        """Microseconds per iteration of the default hooks' per-iteration events (``after_backward``,
        ``after_step``, and ``at_read_back`` every ``print_freq``) on the model's current gradients and
        a real step's losses: their work (gradient norms, spike and guard bookkeeping, timer) plus the
        dispatch itself, and the dispatch alone (hooks that do nothing)."""
        s = self.s
        optimizer, _ = self.restore(False)
        settings = self.settings(amp)
        state = TrainingState(s.model, optimizer, None, None, s.mapping, 1)
        images, targets = move_to_device(*s.train_batches[0], s.device)
        with torch.autocast(s.device.type, dtype=amp_dtype(amp), enabled=amp_dtype(amp) is not None):
            losses = s.model(images, targets)
        components = stack_losses(losses).detach().float()
        sum(losses.values()).backward()

        class Idle(Hook):  # overrides the per-iteration events with nothing: the dispatch alone
            after_backward = after_step = at_read_back = lambda self, state: None

        out = {}
        for label, hooks in (("default_hooks", self.hooks(settings)), ("dispatch_only", [Idle() for _ in range(6)])):
            runner = HookList(hooks)
            state.hooks, state.iteration, state.epoch = runner, 0, 1
            state.weights = torch.ones(len(components), device=s.device)
            state.loss_sums, state.it_device = torch.zeros_like(components), torch.zeros((), dtype=torch.long, device=s.device)
            state.step_components, state.step_total = components, components.sum()
            runner.call("before_epoch", state)

            def iterations(runner: HookList = runner) -> None:
                for i in range(calls):
                    state.iteration, state.step_grad_norms = i, None
                    runner.after_backward(state)
                    state.loss_sums += components
                    state.n_batches, state.global_step = i + 1, state.global_step + 1
                    runner.after_step(state)
                    state.it_device += 1
                    if (i + 1) % settings.print_freq == 0:
                        runner.call("at_read_back", state)
                        state.scalars.clear()

            _, wall, cpu = timed(iterations, s.device)
            out[label] = 1e6 * (wall if s.device.type == "cuda" else cpu) / calls
        optimizer.zero_grad(set_to_none=True)
        return out

    def bare(self, amp: str, channels_last: bool) -> tuple[float, float]:
        """torchvision's loop: forward, (weighted) sum, backward, step, scheduler.

        It restates ``train_one_epoch``'s step on purpose, without our bookkeeping: it is the baseline
        the loop is timed against and must end with bit-identical weights, so it cannot call the loop."""
        cfg, s = self.s.cfg, self.s
        optimizer, scheduler = self.restore(channels_last)
        scaler = grad_scaler(amp, s.device)
        dtype, clip = amp_dtype(amp), cfg.optimizer.clip_grad_norm
        weights = s.loss_weights
        params = [p for g in optimizer.param_groups for p in g["params"]]

        def run() -> None:
            for images, targets in s.train_batches:
                images, targets = move_to_device(images, targets, s.device)
                with torch.autocast(s.device.type, dtype=dtype, enabled=dtype is not None):
                    loss_dict = s.model(images, targets)
                loss = sum(weights.get(k, 1.0) * v for k, v in loss_dict.items())
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()

        _, wall, cpu = timed(run, s.device)
        return wall, cpu

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.s.model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def bench_train(setup: Setup, args: argparse.Namespace, modes: Sequence[str], log: Callable[[str], None]) -> dict[str, Any]:
    bench = TrainBench(setup)
    images = sum(len(b[0]) for b in setup.train_batches)
    variants = [(amp, cl) for cl in ([False, True] if args.channels_last else [False]) for amp in modes]
    timings = {v: (Timing(), Timing()) for v in variants}
    identical = dict.fromkeys(variants, True)
    peaks: dict[tuple[str, bool], dict[str, float]] = {v: {} for v in variants}  # CUDA: peak MiB per variant and loop
    for v in variants:
        for _ in range(args.warmup):
            bench.ours(*v)
            bench.bare(*v)
    for rep in range(args.repeats):
        for v in variants:
            ours_t, bare_t = timings[v]
            # A B, then B A: an effect of going first or second (caches, allocator, clock) cancels in the median.
            order = [("ours", ours_t, bench.ours), ("bare", bare_t, bench.bare)][:: 1 if rep % 2 == 0 else -1]
            states = {}
            for label, timing, trial in order:
                reset_peak_memory(setup.device)
                timing.add(*trial(*v))
                states[label] = bench.state()
                peak = peak_memory_mb(setup.device)
                if peak is not None:
                    peaks[v][label] = max(peaks[v].get(label, 0.0), peak)
            identical[v] = identical[v] and same_state(states["ours"], states["bare"])
            log(f"  train {name(v)} repeat {rep + 1}: ours {ours_t.wall[-1]:.2f}s (cpu {ours_t.cpu[-1]:.2f}s), "
                f"bare {bare_t.wall[-1]:.2f}s (cpu {bare_t.cpu[-1]:.2f}s)")
    base = timings.get(("off", False), (None, None))[0]
    update_s = grad_norm_update_seconds(setup)  # on the last trial's gradients (dispatch_us clears them)
    log_cost = iteration_log_cost(setup)
    dispatch = {name(v): bench.dispatch_us(v[0]) for v in variants}
    every = setup.cfg.train.grad_norm_every
    out = {}
    for v, (ours_t, bare_t) in timings.items():
        entry = {"ours": ours_t.summary(images), "bare": bare_t.summary(images), "ratio": ratios(ours_t, bare_t),
                 "bit_identical": identical[v], "amp": v[0], "channels_last": v[1],
                 # torch.cuda.max_memory_allocated over a trial (MiB): null on CPU.
                 "peak_memory_mb": peaks[v] or None}
        # The loop's one sizeable extra, timed alone (A/B ratios on a shared machine cannot resolve 0.5%).
        iter_s = statistics.median(bare_t.wall if setup.device.type == "cuda" else bare_t.cpu) / len(setup.train_batches)
        entry["overhead"] = {"grad_norm_update_ms": 1e3 * update_s, "grad_norm_every": every, "bare_iteration_s": iter_s,
                             "estimated_ratio_every_1": 1 + update_s / iter_s, "estimated_ratio": 1 + update_s / every / iter_s}
        entry["hooks_us_per_iteration"] = dispatch[name(v)]
        # The iteration log's read-back, once every print_freq iterations (its loader-worker reads are
        # bounded apart: at most workers_share of the time).
        read_back_s = log_cost["read_back_us"]["cpu" if setup.device.type == "cpu" else "wall"] / 1e6
        entry["iteration_log"] = {**log_cost, "print_freq": setup.cfg.print_freq,
                                  "estimated_ratio": 1 + read_back_s / setup.cfg.print_freq / iter_s}
        if base is not None and v != ("off", False):
            entry["speedup_vs_off"] = ratios(base, ours_t)  # off / this: above 1 is faster
        out[name(v)] = entry
    return out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` since the last reset, in MiB; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def grad_norm_update_seconds(setup: Setup, calls: int = 20) -> float:
    """Median seconds of one ``GradNormMeter.update`` (groups and modules) on the model's current gradients."""
    optimizer = build_optimizer(setup.cfg.optimizer, setup.model, verbose=False)
    meter = GradNormMeter.from_optimizer(optimizer, model=setup.model)
    meter.update()
    times = []
    for _ in range(calls):
        _, wall, cpu = timed(meter.update, setup.device)
        times.append(wall if setup.device.type == "cuda" else cpu)  # CPU time: steadier on a shared CPU
    return statistics.median(times)


def name(variant: tuple[str, bool]) -> str:
    return variant[0] + ("+channels_last" if variant[1] else "")


def iteration_log_cost(setup: Setup, calls: int = 50) -> dict[str, Any]:
    """What the iteration log costs, timed alone (A/B ratios on a shared machine cannot resolve it), in
    microseconds, median of ``calls`` (wall and process CPU): ``read_back_us``, one
    ``IterationLog.at_read_back`` (the one host copy of the loss and gradient-norm sums, the window
    means, every group's lr, the main process's memory, the scalars; its loader-worker reads left out);
    ``main_memory_us``, the main process's RSS read alone; ``workers_memory_us``, one read of the
    loader workers' USS and PSS (``smaps_rollup``), when the configured loader has workers, which the
    log makes at most within ``workers_share`` of the time."""
    device = setup.device
    optimizer = build_optimizer(setup.cfg.optimizer, setup.model, verbose=False)
    meter = GradNormMeter.from_optimizer(optimizer, model=setup.model)
    state = TrainingState(setup.model, optimizer, None, None, setup.mapping, 1)
    state.hooks = HookList([meter])  # where the log finds the meter's sums
    k = len(LOSS_COMPONENTS)
    state.weights = torch.ones(k, device=device)
    state.loss_sums = torch.rand(k, device=device)
    meter.sums, meter.count = torch.rand(len(meter.groups), device=device), 1
    memory = MemoryReader()
    log = IterationLog(memory)
    log.before_epoch(state)
    memory._workers_due = float("inf")  # the workers are timed apart, below
    print_freq = setup.cfg.print_freq
    wall, cpu = [], []
    for _ in range(calls):
        state.n_batches += print_freq
        state.global_step += print_freq
        state.loss_sums += 1.0
        meter.sums, meter.count = meter.sums + 1.0, meter.count + 1

        def read_back() -> None:
            log.at_read_back(state)

        _, w, c = timed(read_back, device)
        wall.append(w)
        cpu.append(c)
        state.scalars.clear()

    def median_us(fn: Callable[[], Any], n: int) -> dict[str, float]:
        ws, cs = [], []
        for _ in range(n):
            _, w, c = timed(fn, torch.device("cpu"))
            ws.append(w)
            cs.append(c)
        return {"wall": 1e6 * statistics.median(ws), "cpu": 1e6 * statistics.median(cs)}

    out: dict[str, Any] = {"read_back_us": {"wall": 1e6 * statistics.median(wall), "cpu": 1e6 * statistics.median(cpu)},
                           "main_memory_us": median_us(main_rss_mb, calls), "workers": len(loader_workers()),
                           "workers_share": memory.workers_share}
    if out["workers"]:
        out["workers_memory_us"] = median_us(MemoryReader.read_workers, 5)
    return out
