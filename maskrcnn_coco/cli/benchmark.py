"""Benchmark (``python scripts/benchmark.py``, ``maskrcnn-benchmark``): what our loop costs against a
bare torchvision loop, measured in one process on the same model, data and seed.

Sections (``--sections``, all by default):

* ``train``: ``train_one_epoch`` with everything ``fit`` gives it (gradient norms of the groups and the
  loss-producing modules at ``train.grad_norm_every``, the divergence guard, the schedule, the
  timer) against a bare loop (forward, sum, backward, step, scheduler), per ``train.amp`` mode
  (``--amp``) and optionally in channels_last (``--channels-last``). Trials alternate A/B/A/B; before
  each one the model, a fresh optimizer and schedule and every RNG are restored to the same
  snapshot, so A and B train the same steps and must end with bit-identical weights (checked).
* ``eval``: ``evaluate`` with validation losses and COCO metrics against bare inference + COCOeval.
* ``data``: seconds per training batch from the configured loader, as a share of an iteration.
* ``cocoeval``: COCOeval per backend on the same detections (the stats must be identical).
* ``optimizer``: one optimizer step per implementation (for_loop, foreach, fused).

Wall time and process CPU time (``time.process_time``, all threads) are reported side by side: on a
shared machine the CPU time is the steadier of the two. Pairs alternate their order (A B, B A, ...);
ratios are per pair, their median and spread (min..max) printed and written to the JSON (``--output``).

On CPU the default is the training config (``model=small``, shapes data) with one thread; on CUDA
torchvision's ``maskrcnn_r50_fpn`` on synthetic 800x1333 images (``--data synthetic``), every amp mode.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskrcnn_coco.cli.args import parse_with_overrides
from maskrcnn_coco.cli.experiment import build_components, check_config, resolve_device, seed_everything
from maskrcnn_coco.cli.probe import compose_config
from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine.checkpoint import load_training_checkpoint, rng_state, set_rng_state
from maskrcnn_coco.engine.evaluate import evaluate
from maskrcnn_coco.engine.hooks import Hook, HookList
from maskrcnn_coco.engine.loop import move_to_device, train_one_epoch
from maskrcnn_coco.engine.monitors import DivergenceGuard, GradNormMeter
from maskrcnn_coco.engine.settings import AMP_DTYPES, FitSettings, amp_dtype, grad_scaler
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.engine.writers import default_hooks
from maskrcnn_coco.evaluation.coco_eval import coco_metrics, predictions_to_coco, resolve_backend, results_for_loadres
from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.solver.param_groups import OPTIMIZER_IMPLS, build_optimizer
from maskrcnn_coco.solver.schedule import build_lr_scheduler
from maskrcnn_coco.tracking.scalars import loss_weights_from_config
from maskrcnn_coco.utils.errors import ConfigError, UserError

SECTIONS = ("train", "eval", "data", "cocoeval", "optimizer")
JSON_KEYS = ("meta", *SECTIONS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Our training loop and evaluation against bare torchvision, interleaved A/B in one process. "
        "Extra arguments are Hydra overrides, as in training (e.g. model=maskrcnn_r50_fpn).",
    )
    p.add_argument("--iters", type=int, default=6, help="training iterations per trial (default 6)")
    p.add_argument("--repeats", type=int, default=3, help="A/B pairs per measurement (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed trials of each variant first (default 1)")
    p.add_argument("--eval-batches", type=int, default=5, help="validation batches per evaluation trial (default 5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU for steadier numbers on a shared machine, torch's own on CUDA)")
    p.add_argument("--amp", default=None, help="comma-separated train.amp modes (default: off,bf16 on CPU; off,bf16,fp16 on CUDA)")
    p.add_argument("--channels-last", action="store_true", help="also time every amp mode with the model in channels_last")
    p.add_argument("--data", choices=("auto", "config", "synthetic"), default="auto",
                   help="config: the configured loaders; synthetic: random images of --image-size (default: config on CPU, synthetic on CUDA)")
    p.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"), help="synthetic image size (default 800 1333)")
    p.add_argument("--batch-size", type=int, default=None, help="synthetic batch size (default data.batch_size)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"which to run (default {','.join(SECTIONS)})")
    p.add_argument("--weights", default=None, help="a checkpoint (ours) to load before the evaluation section (default: the initial weights)")
    p.add_argument("--config", default=None, help="a config name in conf/ or a YAML path (default: the training config)")
    p.add_argument("--output", default=None, help="JSON file (default runs/benchmark/<date>_<time>.json)")
    return p


# ------------------------------------------------------------------------------ measuring
@dataclass
class Timing:
    """Wall and process-CPU seconds of repeated trials of one variant."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    def summary(self, images: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"wall_s": self.wall, "cpu_s": self.cpu, "wall": spread(self.wall), "cpu": spread(self.cpu)}
        if images:
            out["images_per_s"] = spread([images / w for w in self.wall if w > 0])
            out["images_per_cpu_s"] = spread([images / c for c in self.cpu if c > 0])
        return out


def spread(values: Sequence[float]) -> dict[str, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(a: Timing, b: Timing) -> dict[str, Any]:
    """Per interleaved pair: A / B of wall and of CPU time."""
    wall = [x / y for x, y in zip(a.wall, b.wall) if y > 0]
    cpu = [x / y for x, y in zip(a.cpu, b.cpu) if y > 0]
    return {"wall": {**spread(wall), "values": wall}, "cpu": {**spread(cpu), "values": cpu}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - w0, time.process_time() - c0


# ------------------------------------------------------------------------------ setup
@dataclass
class Setup:
    cfg: Any
    model: torch.nn.Module
    device: torch.device
    mapping: CategoryMapping
    loss_weights: dict[str, float]
    train_batches: list[Any]
    val_batches: list[Any]
    coco_gt: Any
    train_loader: Any = None  # the configured loader (data section); None for synthetic data
    data: str = "config"


def take(loader: Any, n: int) -> list[Any]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def synthetic_batches(n: int, batch_size: int, size: tuple[int, int], num_classes: int, seed: int, first_id: int = 1) -> list[Any]:
    """Random images with 1-4 rectangular objects each (boxes, masks, labels), COCO-style image ids."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    batches, image_id = [], first_id
    for _ in range(n):
        images, targets = [], []
        for _ in range(batch_size):
            images.append(torch.rand(3, h, w, generator=g))
            k = int(torch.randint(1, 5, (1,), generator=g))
            wh = torch.rand(k, 2, generator=g) * torch.tensor([w / 3, h / 3]) + 16
            xy = torch.rand(k, 2, generator=g) * (torch.tensor([w, h]) - wh)
            boxes = torch.cat([xy, xy + wh], dim=1).floor()
            masks = torch.zeros(k, h, w, dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[j, y0:y1, x0:x1] = 1
            labels = torch.randint(1, num_classes + 1, (k,), generator=g)
            targets.append({"image_id": image_id, "boxes": boxes, "masks": masks, "labels": labels})
            image_id += 1
        batches.append((images, targets))
    return batches


def coco_from_batches(batches: Sequence[Any], mapping: CategoryMapping) -> Any:
    """A pycocotools COCO holding the targets of ``batches`` as ground truth."""
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    images, anns = [], []
    for batch_images, targets in batches:
        for img, t in zip(batch_images, targets):
            h, w = img.shape[-2:]
            images.append({"id": int(t["image_id"]), "width": int(w), "height": int(h), "file_name": f"{t['image_id']}.png"})
            rles = mask_utils.encode(np.asfortranarray(t["masks"].permute(1, 2, 0).numpy().astype(np.uint8)))
            for box, label, rle in zip(t["boxes"].tolist(), t["labels"].tolist(), rles):
                x0, y0, x1, y1 = box
                anns.append({"id": len(anns) + 1, "image_id": int(t["image_id"]), "category_id": mapping.to_coco_id(int(label)),
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask_utils.area(rle)), "iscrowd": 0,
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": f"class{c}"} for c in mapping.coco_ids]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def pinned(batches: Sequence[Any]) -> list[Any]:
    def pin(v: Any) -> Any:
        return v.pin_memory() if isinstance(v, torch.Tensor) else v

    return [([pin(i) for i in images], [{k: pin(v) for k, v in t.items()} for t in targets]) for images, targets in batches]


def prepare(cfg: Any, args: argparse.Namespace, device: torch.device) -> Setup:
    n_train = args.iters
    if args.data == "synthetic":
        seed_everything(cfg.seed)
        mapping = CategoryMapping([{"id": i, "name": f"class{i}"} for i in range(1, 4)])
        model = build_model(cfg.model, mapping.num_classes).to(device)
        bs = args.batch_size or cfg.data.batch_size
        size = tuple(args.image_size)
        train = synthetic_batches(n_train, bs, size, 3, seed=cfg.seed)
        val = synthetic_batches(args.eval_batches, bs, size, 3, seed=cfg.seed + 1, first_id=10**6)
        coco = coco_from_batches(val, mapping)
        if device.type == "cuda":  # as the loader gives them with pin_memory: copies overlap with compute
            train, val = pinned(train), pinned(val)
        return Setup(cfg, model, device, mapping, loss_weights_from_config(cfg.loss.weights), train, val, coco, data="synthetic")
    parts = build_components(cfg, progress=False)
    train = take(parts.data.train_loader, n_train)
    val = take(parts.data.val_loader, args.eval_batches)
    return Setup(cfg, parts.model, parts.device, parts.mapping, parts.loss_weights, train, val,
                 parts.data.val_loader.dataset.coco, train_loader=parts.data.train_loader)


# ------------------------------------------------------------------------------ training
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
        """The default instruments of a run (gradient norms, timer, divergence guard, spike monitor)."""
        cfg = self.s.cfg
        return default_hooks(None, settings, grad_norm_every=cfg.train.grad_norm_every, diagnostics=cfg.diagnostics,
                             divergence=DivergenceGuard(max_loss=cfg.train.max_loss, factor=cfg.train.max_loss_factor))

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
        components = torch.stack([losses[k] for k in sorted(losses)]).detach().float()
        sum(losses.values()).backward()

        class Idle(Hook):
            def after_backward(self, state: TrainingState) -> None:
                pass

            def after_step(self, state: TrainingState) -> None:
                pass

            def at_read_back(self, state: TrainingState) -> None:
                pass

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
                    runner.after_step(state)
                    state.it_device += 1
                    if (i + 1) % settings.print_freq == 0:
                        runner.call("at_read_back", state)

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
                timing.add(*trial(*v))
                states[label] = bench.state()
            identical[v] = identical[v] and same_state(states["ours"], states["bare"])
            log(f"  train {name(v)} repeat {rep + 1}: ours {ours_t.wall[-1]:.2f}s (cpu {ours_t.cpu[-1]:.2f}s), "
                f"bare {bare_t.wall[-1]:.2f}s (cpu {bare_t.cpu[-1]:.2f}s)")
    base = timings.get(("off", False), (None, None))[0]
    dispatch = {name(v): bench.dispatch_us(v[0]) for v in variants}
    update_s = grad_norm_update_seconds(setup)
    every = setup.cfg.train.grad_norm_every
    out = {}
    for v, (ours_t, bare_t) in timings.items():
        entry = {"ours": ours_t.summary(images), "bare": bare_t.summary(images), "ratio": ratios(ours_t, bare_t),
                 "bit_identical": identical[v], "amp": v[0], "channels_last": v[1]}
        # The loop's one sizeable extra, timed alone (A/B ratios on a shared machine cannot resolve 0.5%).
        iter_s = statistics.median(bare_t.wall if setup.device.type == "cuda" else bare_t.cpu) / len(setup.train_batches)
        entry["overhead"] = {"grad_norm_update_ms": 1e3 * update_s, "grad_norm_every": every, "bare_iteration_s": iter_s,
                             "estimated_ratio_every_1": 1 + update_s / iter_s, "estimated_ratio": 1 + update_s / every / iter_s}
        entry["hooks_us_per_iteration"] = dispatch[name(v)]
        if base is not None and v != ("off", False):
            entry["speedup_vs_off"] = ratios(base, ours_t)  # off / this: above 1 is faster
        out[name(v)] = entry
    return out


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


# ------------------------------------------------------------------------------ evaluation
def bare_cocoeval(coco_gt: Any, results: list[dict[str, Any]], image_ids: Sequence[int], backend: str) -> list[float]:
    """loadRes + COCOeval evaluate/accumulate/summarize per IoU type; the 12 stats of each."""
    import contextlib
    import io

    stats: list[float] = []
    for iou_type in ("bbox", "segm"):
        usable = results_for_loadres(coco_gt, results, iou_type)
        if not usable:
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            if backend == "pycocotools":
                from pycocotools.cocoeval import COCOeval

                ev = COCOeval(coco_gt, coco_gt.loadRes(usable), iouType=iou_type)
            else:
                from faster_coco_eval import COCO as FasterCOCO
                from faster_coco_eval import COCOeval_faster

                gt = FasterCOCO(coco_gt.dataset)
                ev = COCOeval_faster(gt, gt.loadRes(usable), iouType=iou_type, print_function=lambda *a, **k: None)
            ev.params.imgIds = sorted(set(image_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats.extend(float(v) for v in ev.stats[:12])
    return stats


def bench_eval(setup: Setup, args: argparse.Namespace, log: Callable[[str], None]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    s = setup
    backend = resolve_backend(s.cfg.eval.backend)
    images = sum(len(b[0]) for b in s.val_batches)
    ids = [int(t["image_id"]) for _, targets in s.val_batches for t in targets]
    ours_t, bare_t = Timing(), Timing()
    holder: dict[str, Any] = {}

    def ours() -> None:
        holder["ours"] = evaluate(s.model, s.val_batches, s.device, mapping=s.mapping, coco_gt=s.coco_gt, progress=False,
                                  mask_threshold=s.cfg.eval.mask_threshold, backend=backend, seed=s.cfg.seed)

    def bare() -> None:
        s.model.eval()
        results = []
        with torch.inference_mode():
            for images_, targets in s.val_batches:
                images_, _ = move_to_device(images_, [], s.device)
                outputs = s.model(images_)
                results.extend(predictions_to_coco(outputs, [int(t["image_id"]) for t in targets], s.mapping, s.cfg.eval.mask_threshold))
        holder["results"] = results
        holder["bare_stats"] = bare_cocoeval(s.coco_gt, results, ids, backend)
        s.model.train()

    for _ in range(args.warmup):
        ours()
        bare()
    for rep in range(args.repeats):
        for timing, trial in [(ours_t, ours), (bare_t, bare)][:: 1 if rep % 2 == 0 else -1]:
            timing.add(*timed(trial, s.device)[1:])
        log(f"  eval repeat {rep + 1}: ours {ours_t.wall[-1]:.2f}s (cpu {ours_t.cpu[-1]:.2f}s), "
            f"bare {bare_t.wall[-1]:.2f}s (cpu {bare_t.cpu[-1]:.2f}s)")
    stages = eval_stages(s, backend, args.repeats)
    _, metrics = holder["ours"]
    ours_stats = [metrics[t][k] for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    bare_six = [v for i in range(0, len(holder["bare_stats"]), 12) for v in holder["bare_stats"][i:i + 6]]
    bare_six = [v if v >= 0 else float("nan") for v in bare_six]
    equal = len(ours_stats) == len(bare_six) and all(
        (math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(ours_stats, bare_six))
    return {"ours": ours_t.summary(images), "bare": bare_t.summary(images), "ratio": ratios(ours_t, bare_t), "stages": stages,
            "backend": backend, "images": images, "detections": len(holder["results"]), "metrics_equal": equal}, holder["results"]


class StageClock:
    """Wall and CPU seconds between calls, summed per stage name (synchronised on CUDA): ``evaluate``'s ``mark``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, list[float]] = {}
        synchronize(device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def __call__(self, stage: str) -> None:
        synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        total = self.totals.setdefault(stage, [0.0, 0.0])
        total[0] += wall - self._wall
        total[1] += cpu - self._cpu
        self._wall, self._cpu = wall, cpu


LOSS_STAGES = ("rpn loss", "roi_heads loss", "losses")


def eval_stages(setup: Setup, backend: str, repeats: int) -> dict[str, Any]:
    """Where ``evaluate``'s time goes, stage by stage over the validation batches (median of
    ``repeats`` passes), and the floor that exact val losses put under the evaluation ratio: their
    own stages (the RPN and RoI heads in their loss setting, after the shared RPN head) over
    everything that bare inference + COCOeval also does."""
    s = setup
    runs = []
    for _ in range(repeats):
        clock = StageClock(s.device)
        evaluate(s.model, s.val_batches, s.device, mapping=s.mapping, coco_gt=s.coco_gt, progress=False,
                 mask_threshold=s.cfg.eval.mask_threshold, backend=backend, seed=s.cfg.seed, mark=clock)
        runs.append(clock.totals)
    out: dict[str, Any] = {n: {"wall": spread([r[n][0] for r in runs]), "cpu": spread([r[n][1] for r in runs])} for n in runs[0]}
    fractions = []
    for r in runs:
        losses = sum(wall for n, (wall, _) in r.items() if n in LOSS_STAGES)
        rest = sum(wall for n, (wall, _) in r.items() if n not in LOSS_STAGES)
        fractions.append(losses / rest if rest > 0 else float("nan"))
    out["losses_over_rest"] = spread(fractions)
    return out


def bench_cocoeval(setup: Setup, results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    ids = sorted({int(t["image_id"]) for _, targets in setup.val_batches for t in targets})
    backends = ["pycocotools"] + (["faster_coco_eval"] if resolve_backend("auto") == "faster_coco_eval" else [])
    timings = {b: Timing() for b in backends}
    metrics = {}
    for _ in range(args.repeats):
        for b in backends:
            metrics[b], wall, cpu = timed(lambda b=b: coco_metrics(setup.coco_gt, results, ids, backend=b), torch.device("cpu"))
            timings[b].add(wall, cpu)
    first = metrics[backends[0]]
    identical = all(_same_metrics(first, metrics[b]) for b in backends)
    return {"detections": len(results), "backends": {b: t.summary() for b, t in timings.items()}, "identical": identical}


def _same_metrics(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(a[t].keys() == b[t].keys() and all((math.isnan(x) and math.isnan(b[t][k])) or x == b[t][k]
                                                  for k, x in a[t].items()) for t in a)


# ------------------------------------------------------------------------------ data and optimizer
def bench_data(setup: Setup, args: argparse.Namespace, train: dict[str, Any] | None) -> dict[str, Any]:
    if setup.train_loader is None:
        return {"skipped": "synthetic data: no loader to time"}
    per_batch = Timing()
    for _ in range(args.repeats):
        it = iter(setup.train_loader)
        for _ in range(args.iters):
            _, wall, cpu = timed(lambda it=it: next(it, None), torch.device("cpu"))
            per_batch.add(wall, cpu)
    out: dict[str, Any] = {"num_workers": setup.train_loader.num_workers, "per_batch": per_batch.summary()}
    off = (train or {}).get("off")
    if off is not None and per_batch.wall:
        iter_s = off["ours"]["wall"]["median"] / args.iters
        data_s = statistics.median(per_batch.wall)
        out["iteration_s"] = iter_s
        out["fraction"] = data_s / (data_s + iter_s)  # of an iteration that loads in the main process
    return out


def bench_optimizer(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    model = setup.model
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in params)}
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    snapshot = copy.deepcopy(model.state_dict())
    for impl in OPTIMIZER_IMPLS[1:]:
        cfg = copy.deepcopy(setup.cfg.optimizer)
        cfg.impl = impl
        try:
            opt = build_optimizer(cfg, model, verbose=False)
        except (ConfigError, RuntimeError) as err:
            out[impl] = {"skipped": str(err)}
            continue
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()  # state (momentum buffers) allocated outside the timing
        steps = Timing()
        for _ in range(args.repeats):
            _, wall, cpu = timed(lambda opt=opt: [opt.step() for _ in range(args.iters)], setup.device)
            steps.add(wall / args.iters, cpu / args.iters)
        out[impl] = {"step": steps.summary()}
        model.load_state_dict(snapshot)
    for p in params:
        p.grad = None
    return out


# ------------------------------------------------------------------------------ entry point
def default_output() -> Path:
    return Path("runs") / "benchmark" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}.json"


def _fmt(stats: dict[str, Any] | None, unit: str = "", digits: int = 3) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    return f"{stats['median']:.{digits}f}{unit} [{stats['min']:.{digits}f}..{stats['max']:.{digits}f}]"


def format_report(report: dict[str, Any]) -> str:
    lines = [f"Benchmark on {report['meta']['device']} ({report['meta']['threads']} threads), "
             f"{report['meta']['iters']} iterations x {report['meta']['repeats']} repeats; median [min..max]"]
    for label, entry in (report.get("train") or {}).items():
        lines.append(
            f"train {label:<22} ours {_fmt(entry['ours'].get('images_per_s'), ' img/s', 2)}  bare {_fmt(entry['bare'].get('images_per_s'), ' img/s', 2)}"
            f"  ratio wall {_fmt(entry['ratio']['wall'])} cpu {_fmt(entry['ratio']['cpu'])}  bit-identical: {entry['bit_identical']}")
        if "overhead" in entry:
            o = entry["overhead"]
            lines.append(f"      GradNormMeter.update {o['grad_norm_update_ms']:.1f} ms = x{o['estimated_ratio_every_1']:.4f} of a bare "
                         f"iteration every iteration, x{o['estimated_ratio']:.4f} every {o['grad_norm_every']}")
        if "hooks_us_per_iteration" in entry:
            h = entry["hooks_us_per_iteration"]
            lines.append(f"      default hooks per iteration: {h['default_hooks']:.0f} us (their work + dispatch; gradient norms "
                         f"every {report['meta']['grad_norm_every']}), dispatch alone {h['dispatch_only']:.1f} us")
        if "speedup_vs_off" in entry:
            lines.append(f"      {label} vs off (ours): wall x{_fmt(entry['speedup_vs_off']['wall'])} cpu x{_fmt(entry['speedup_vs_off']['cpu'])}")
    ev = report.get("eval")
    if ev:
        lines.append(f"eval ({ev['backend']}, {ev['images']} images, {ev['detections']} detections): ours {_fmt(ev['ours']['wall'], ' s')} "
                     f"(cpu {_fmt(ev['ours']['cpu'], ' s')}), bare {_fmt(ev['bare']['wall'], ' s')} (cpu {_fmt(ev['bare']['cpu'], ' s')}); "
                     f"ratio wall {_fmt(ev['ratio']['wall'])} cpu {_fmt(ev['ratio']['cpu'])}; metrics equal: {ev['metrics_equal']}")
        st = ev.get("stages") or {}
        parts = ", ".join(f"{n} {v['wall']['median']:.3f}" for n, v in st.items() if isinstance(v, dict) and "wall" in v)
        lines.append(f"      stages (wall s over {ev['images']} images): {parts}")
        if st.get("losses_over_rest", {}).get("median") is not None:
            lines.append(f"      the val losses' own stages are x{st['losses_over_rest']['median']:.3f} of the rest: "
                         f"no exact val loss can bring the ratio below {1 + st['losses_over_rest']['median']:.3f}")
    data = report.get("data")
    if data and "per_batch" in data:
        frac = data.get("fraction")
        lines.append(f"data ({data['num_workers']} workers): {_fmt(data['per_batch']['wall'], ' s')} per batch"
                     + (f", {100 * frac:.1f}% of an iteration" if frac is not None else ""))
    ce = report.get("cocoeval")
    if ce:
        parts = ", ".join(f"{b} {_fmt(t['wall'], ' s')} (cpu {_fmt(t['cpu'], ' s')})" for b, t in ce["backends"].items())
        lines.append(f"COCOeval on {ce['detections']} detections: {parts}; identical: {ce['identical']}")
    opt = report.get("optimizer")
    if opt:
        parts = ", ".join(f"{k} {1e3 * v['step']['wall']['median']:.1f} ms" for k, v in opt.items()
                          if isinstance(v, dict) and "step" in v)
        lines.append(f"optimizer step ({opt['parameters'] / 1e6:.1f}M parameters): {parts}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parse_with_overrides(parser, argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    try:
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"--sections: unknown {unknown}; use any of {', '.join(SECTIONS)}")
        if args.iters < 1 or args.repeats < 1 or args.eval_batches < 1 or args.warmup < 0:
            raise ConfigError("--iters, --repeats and --eval-batches must be at least 1, --warmup at least 0")
        device = resolve_device(args.device)
        cuda = device.type == "cuda"
        if args.data == "auto":
            args.data = "synthetic" if cuda else "config"
        overrides = [f"device={device}", "progress=false", "tracker=none", *extra]
        if cuda and not any(o.startswith("model=") for o in extra):
            overrides.insert(0, "model=maskrcnn_r50_fpn")
        cfg = compose_config(args.config, overrides)
        check_config(cfg)
        modes = [m.strip() for m in (args.amp or ("off,bf16,fp16" if cuda else "off,bf16")).split(",") if m.strip()]
        bad = [m for m in modes if m not in AMP_DTYPES]
        if bad:
            raise ConfigError(f"--amp: unknown {bad}; use any of {', '.join(AMP_DTYPES)}")
        if cuda and "bf16" in modes and not torch.cuda.is_bf16_supported():
            modes.remove("bf16")
        threads = args.threads if args.threads is not None else (0 if cuda else 1)
        if threads > 0:
            torch.set_num_threads(threads)
        setup = prepare(cfg, args, device)
    except (UserError, FileNotFoundError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        print(line, flush=True)

    report: dict[str, Any] = {"meta": {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "iters": args.iters, "repeats": args.repeats,
        "warmup": args.warmup, "data": setup.data, "model": cfg.model.arch, "batch_size": len(setup.train_batches[0][0]),
        "image_size": list(setup.train_batches[0][0][0].shape[-2:]), "overrides": overrides, "amp_modes": modes,
        "grad_norm_every": cfg.train.grad_norm_every, "optimizer_impl": cfg.optimizer.impl,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }}
    for key in SECTIONS:
        report[key] = None
    results: list[dict[str, Any]] = []
    if "train" in sections:
        log("train: ours (train_one_epoch as fit runs it) vs bare torchvision loop")
        report["train"] = bench_train(setup, args, modes, log)
    if "eval" in sections or "cocoeval" in sections:
        if args.weights:
            setup.model.load_state_dict(load_training_checkpoint(args.weights)["model"])
        log("eval: evaluate (val losses + COCO metrics) vs bare inference + COCOeval")
        eval_report, results = bench_eval(setup, args, log)
        if "eval" in sections:
            report["eval"] = eval_report
    if "data" in sections:
        report["data"] = bench_data(setup, args, report["train"])
    if "cocoeval" in sections:
        report["cocoeval"] = bench_cocoeval(setup, results, args)
    if "optimizer" in sections:
        report["optimizer"] = bench_optimizer(setup, args)
    report["meta"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(format_report(report))
    output = Path(args.output) if args.output else default_output()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"Wrote {output}")
    return 0


def cli() -> None:
    """Console-script entry point (``maskrcnn-benchmark``)."""
    sys.exit(main())
