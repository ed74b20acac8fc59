"""The data, optimizer and checkpoint sections: seconds per training batch from the loader (the
configured one, or COCO-sized JPEG files with the time the loop would wait for them), one optimizer
step per implementation, writing a training checkpoint of the configured model."""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from maskrcnn_coco.benchmark.coco_synth import SynthParams, ensure_synthetic_coco
from maskrcnn_coco.benchmark.setup import Setup
from maskrcnn_coco.benchmark.timing import Timing, spread, timed
from maskrcnn_coco.data.coco import build_data
from maskrcnn_coco.engine.checkpoint import LAST, epoch_checkpoint_name, save_checkpoint, training_state
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.solver.param_groups import OPTIMIZER_IMPLS, build_optimizer
from maskrcnn_coco.solver.schedule import build_lr_scheduler
from maskrcnn_coco.utils.errors import ConfigError


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


def fastest_iteration_s(train: dict[str, Any] | None, iters: int) -> tuple[str, float] | None:
    """``(mode, seconds)`` of the fastest measured training iteration of ours (median wall): the mode in
    which the loader has the least time to keep up."""
    modes = {label: entry["ours"]["wall"]["median"] / iters for label, entry in (train or {}).items()
             if isinstance(entry, dict) and "ours" in entry and entry["ours"]["wall"]["median"]}
    if not modes:
        return None
    label = min(modes, key=modes.get)
    return label, modes[label]


def bench_coco_loader(data_cfg: Any, args: argparse.Namespace, train: dict[str, Any] | None, device: torch.device,
                      seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Our training loader (``data=coco``: PIL decoding, masks from polygons, augmentation, collation)
    on a synthetic set with real JPEG files at COCO's sizes (``coco_synth``, ``image_scale=10``: ~156 kB
    per file, ~7 polygons per image), with ``data_cfg``'s workers (``auto`` in the preset).

    * ``first_batch_s``: the first batch (the workers start);
    * ``with_compute``: what the loop waits per batch when each batch is followed by one training
      iteration of the fastest measured mode (simulated by sleeping: on CUDA the main process mostly
      waits for the GPU, and the workers are processes of their own), and that wait's share of an
      iteration (``share``), the ``time/data`` a run would log;
    * ``loader_only``: batches fetched back to back: the loader's own rate, images/s of all workers and
      per worker.
    """
    batches = args.loader_batches
    bs = int(data_cfg.batch_size)
    # Enough images for the first batch and both passes in one epoch (no epoch boundary inside a pass).
    paths = ensure_synthetic_coco(SynthParams(num_train=(2 * batches + 2) * bs, num_val=2, seed=seed, image_scale=10))
    cfg = OmegaConf.merge(data_cfg, {"root": str(paths.root)})
    data = build_data(cfg, seed=seed, progress=False, pin_memory=device.type == "cuda")
    loader = data.train_loader
    fastest = fastest_iteration_s(train, args.iters)
    it = iter(loader)
    _, first_s, _ = timed(lambda: next(it), torch.device("cpu"))
    sizes = sorted({(im["width"], im["height"]) for im in loader.dataset.coco.imgs.values()})
    out: dict[str, Any] = {"loader": "coco_synth (JPEG, COCO sizes)", "num_workers": loader.num_workers, "batch_size": bs,
                           "image_sizes": sizes, "first_batch_s": first_s, "with_compute": None}
    if fastest is not None:
        mode, iter_s = fastest
        waits = []
        for _ in range(batches):
            _, wait, _ = timed(lambda: next(it), torch.device("cpu"))
            waits.append(wait)
            time.sleep(iter_s)  # the iteration: the workers decode the next batches meanwhile
        out["with_compute"] = {"mode": mode, "iteration_s": iter_s, "wait_s": spread(waits),
                               "mean_wait_s": statistics.fmean(waits), "share": sum(waits) / (sum(waits) + batches * iter_s)}
    _, wall, cpu = timed(lambda: [next(it) for _ in range(batches)], torch.device("cpu"))
    images = batches * bs
    out["loader_only"] = {"batches": batches, "seconds": wall, "main_cpu_s": cpu, "images_per_s": images / wall,
                          "images_per_s_per_worker": images / wall / max(loader.num_workers, 1)}
    share = out["with_compute"]["share"] if out["with_compute"] else None
    log(f"  data: {loader.num_workers} workers, {out['loader_only']['images_per_s']:.1f} img/s loader alone"
        + (f", waiting {100 * share:.1f}% of an iteration" if share is not None else ""))
    return out


def _bytes(tensors: Any) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(_bytes(v) for v in tensors)
    return 0


def bench_checkpoint(setup: Setup, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Writing the configured model's training checkpoint as the run does (``engine.checkpoint``:
    ``training_state``, then ``save_checkpoint``: temp file + rename; no fsync, so the time is the
    serialisation and the page cache's, not the disk's), with SGD momentum for every parameter as after
    any training step, and the config as ``extra``; then the ``last.pth`` copy an epoch adds. In a
    temporary folder under ``folder``, removed afterwards."""
    cfg, model = setup.cfg, setup.model
    weights = copy.deepcopy(model.state_dict())
    optimizer = build_optimizer(cfg.optimizer, model, verbose=False)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # allocates the optimizer state (momentum buffers) a checkpoint carries
    for p in params:
        p.grad = None
    model.load_state_dict(weights)  # weight decay moved the weights: later sections see the same model
    scheduler = build_lr_scheduler(cfg.scheduler, optimizer, max(len(setup.train_batches), 1), cfg.epochs)
    state = TrainingState(model, optimizer, scheduler, None, setup.mapping, cfg.epochs)
    extra = {"config": OmegaConf.to_container(cfg, resolve=True)}
    folder.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=folder))
    timings = {"snapshot": Timing(), "save": Timing(), "copy_last": Timing()}
    cpu_clock = torch.device("cpu")  # writing is host work: no device synchronisation
    try:
        path, last = directory / epoch_checkpoint_name(1), directory / LAST
        for trial in range(args.warmup + args.repeats):
            snapshot, wall, cpu = timed(lambda: training_state(state, 1, extra=extra), setup.device)
            _, save_wall, save_cpu = timed(lambda snapshot=snapshot: save_checkpoint(path, snapshot), cpu_clock)
            _, copy_wall, copy_cpu = timed(lambda: shutil.copyfile(path, last), cpu_clock)
            if trial >= args.warmup:  # the first writes (allocator, page cache) are not timed
                timings["snapshot"].add(wall, cpu)
                timings["save"].add(save_wall, save_cpu)
                timings["copy_last"].add(copy_wall, copy_cpu)
        size = path.stat().st_size
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    summaries = {name: timing.summary() for name, timing in timings.items()}
    return {"model": cfg.model.arch, "file_mb": size / 2**20, "weights_mb": _bytes(model.state_dict()) / 2**20,
            "optimizer_mb": _bytes(optimizer.state_dict()["state"]) / 2**20, **summaries,
            "save_mb_per_s": size / 2**20 / summaries["save"]["wall"]["median"]}
