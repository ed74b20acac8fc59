"""Loader worker memory: python scripts/worker_memory.py [--images 20000] [--workers 2,4] [--epochs 3] [--output run.json].

How much memory each training DataLoader worker gains while it reads a COCO-sized dataset (issue
#23). The workers are forked from the main process and share its pages until they touch them; the
dataset's Python objects (pycocotools' ``COCO``, the per-image lists) get copied page by page as
reference counts and the cyclic GC write to them, so a worker's private memory (USS) grows with the
images it has loaded.

Steps:

1. A synthetic COCO 2017-like set (``maskrcnn_coco.benchmark.coco_synth``: ``--images`` train
   images, ``--val-images`` val images, COCO's categories and ~7.3 polygons of 20-60 points per
   image, tiny JPEG files) is generated once under ``--data-dir`` and re-used.
2. For each worker count of ``--workers``, a fresh child process (so one run's heap and peak RSS do
   not leak into the next) builds the data through the project's own ``build_data`` with a
   ``CocoDataConfig``, then iterates the training loader for ``--epochs`` epochs without a model,
   only receiving the batches (the sampler's epoch set as ``engine.fit`` sets it, so each epoch
   has its own order). After the first batch, every ``--every`` batches and at each epoch's
   end it reads each worker's USS and PSS from ``/proc/<pid>/smaps_rollup`` and the main process's
   RSS and USS (``maskrcnn_coco.engine.iteration_log``'s readers), and prints one table row.
3. At the end of each run: each worker's growth (last sample minus first) in MiB, in KiB per
   image that worker loaded in between and in KiB per image of the training set (a worker's growth
   is bounded by the pages of the index it can copy), the start-up time (``build_data``),
   the epoch times and the main process's peak RSS; with several worker counts, one comparison
   line per count.

Columns: ``wN_images`` = images worker N has delivered to the main process so far (DataLoader
hands batches to its workers round-robin, in order, from worker 0 at each epoch; a worker is also
up to ``prefetch_factor`` = 2 batches ahead of that), ``wN_uss_mb`` / ``wN_pss_mb`` = its USS / PSS,
``main_rss_mb`` / ``main_uss_mb`` = the main process's (its USS falls once the workers are forked, as
the pages it shares with them are no longer private, and rises again as every worker has copied a
page: the original is then the main process's alone). MB here are MiB, KB KiB. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from maskrcnn_coco.benchmark.coco_synth import SynthParams, default_data_dir, ensure_synthetic_coco
from maskrcnn_coco.config import CocoDataConfig
from maskrcnn_coco.data.coco import build_data
from maskrcnn_coco.engine.iteration_log import loader_workers, main_rss_mb, uss_pss_kib

POINTS_PER_EPOCH = 10  # --every 0: this many sample points per epoch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/worker_memory.py",
        description="Measure how the training DataLoader workers' memory (USS/PSS per worker) grows over epochs "
                    "on a synthetic COCO-sized set, built through the project's own build_data (no model).",
        epilog="Example: python scripts/worker_memory.py --images 20000 --workers 2,4 --epochs 3 --output before.json",
    )
    parser.add_argument("--images", type=int, default=20_000, metavar="N", help="training images of the synthetic set (default 20000)")
    parser.add_argument("--val-images", type=int, default=50, metavar="N",
                        help="validation images (built by build_data, never iterated; default 50)")
    parser.add_argument("--workers", default="2,4", metavar="W[,W...]",
                        help="loader worker counts, comma-separated; each runs in its own child process (default 2,4)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs to iterate (default 3)")
    parser.add_argument("--batch-size", type=int, default=4, help="data.batch_size (default 4, the project's default)")
    parser.add_argument("--every", type=int, default=0, metavar="K",
                        help=f"sample every K batches (and at each epoch's end); 0: about {POINTS_PER_EPOCH} points per epoch (default)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"where the synthetic set is generated and cached (default {default_data_dir()})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic set and of the loader's order (default 0)")
    parser.add_argument("--threads", type=int, default=8, help="threads writing the image files (default 8)")
    parser.add_argument("--output", type=Path, default=None, metavar="JSON", help="also write every sample point and summary here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one worker count, in this process
    args = parser.parse_args(argv)
    try:
        args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers {args.workers!r}: give counts separated by commas, e.g. 2,4")
    if not args.worker_counts or min(args.worker_counts) < 1:
        parser.error(f"--workers {args.workers!r}: every count must be >= 1 (worker memory needs workers)")
    for name in ("images", "val_images", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.every < 0:
        parser.error("--every must be >= 0")
    return args


# ------------------------------------------------------------------------------------ measuring
def _start_ticks(pid: int) -> int:
    """A process's start time (clock ticks since boot, ``/proc/<pid>/stat`` field 22): the workers'
    creation order, i.e. their worker index."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat.rsplit(")", 1)[1].split()[19])


def ordered_workers(expected: int) -> list[int]:
    """The loader's worker pids (``loader_workers``) by worker index; raises if there are not ``expected``."""
    pids = loader_workers()
    if len(pids) != expected:
        raise RuntimeError(f"found {len(pids)} loader worker processes ({pids}), expected {expected}")
    return sorted(pids, key=lambda pid: (_start_ticks(pid), pid))


def sample(pids: list[int], images: list[int]) -> dict[str, float]:
    row: dict[str, float] = {}
    for index, pid in enumerate(pids):
        memory = uss_pss_kib(pid)
        if memory is None:
            raise RuntimeError(f"cannot read /proc/{pid}/smaps_rollup of loader worker {index} (it ended?)")
        row[f"w{index}_images"] = images[index]
        row[f"w{index}_uss_mb"] = memory[0] / 1024
        row[f"w{index}_pss_mb"] = memory[1] / 1024
    main = uss_pss_kib(os.getpid())
    row["main_rss_mb"] = main_rss_mb() or float("nan")
    row["main_uss_mb"] = main[0] / 1024 if main else float("nan")
    return row


def columns(workers: int) -> list[str]:
    per_worker = [f"w{i}_{k}" for i in range(workers) for k in ("images", "uss_mb", "pss_mb")]
    return ["epoch", "batch", "time_s", *per_worker, "main_rss_mb", "main_uss_mb"]


def format_row(names: list[str], row: dict[str, Any]) -> str:
    cells = []
    for name in names:
        value = row[name]
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        cells.append(text.rjust(len(name)))
    return "  ".join(cells)


def growth(points: list[dict[str, Any]], pids: list[int], dataset_images: int) -> list[dict[str, Any]]:
    """Per worker: USS and PSS at the first and last sample, their difference, and the USS growth
    (KiB) per image the worker loaded in between and per image of the training set."""
    first, last = points[0], points[-1]
    out = []
    for i, pid in enumerate(pids):
        images = last[f"w{i}_images"] - first[f"w{i}_images"]
        uss = last[f"w{i}_uss_mb"] - first[f"w{i}_uss_mb"]
        out.append({
            "worker": i,
            "pid": pid,
            "images": images,
            "uss_first_mb": first[f"w{i}_uss_mb"],
            "uss_last_mb": last[f"w{i}_uss_mb"],
            "uss_growth_mb": uss,
            "pss_first_mb": first[f"w{i}_pss_mb"],
            "pss_last_mb": last[f"w{i}_pss_mb"],
            "pss_growth_mb": last[f"w{i}_pss_mb"] - first[f"w{i}_pss_mb"],
            "uss_kb_per_image": uss * 1024 / images if images else float("nan"),
            "uss_kb_per_dataset_image": uss * 1024 / dataset_images,
        })
    return out


def measure(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """One worker count: build the data with the project's code, iterate the training loader, sample."""
    params = SynthParams(num_train=args.images, num_val=args.val_images, seed=args.seed)
    paths = ensure_synthetic_coco(params, args.data_dir, threads=args.threads)
    cfg = OmegaConf.structured(CocoDataConfig(
        root=str(paths.root),
        train_images=str(paths.train_images),
        train_annotations=str(paths.train_annotations),
        val_images=str(paths.val_images),
        val_annotations=str(paths.val_annotations),
        num_workers=workers,
        batch_size=args.batch_size,
    ))
    start = time.perf_counter()
    bundle = build_data(cfg, seed=args.seed, progress=False)
    build_s = time.perf_counter() - start
    loader = bundle.train_loader
    n_batches = len(loader)
    every = args.every or max(1, n_batches // POINTS_PER_EPOCH)
    after_build = {"main_rss_mb": main_rss_mb(), "main_uss_mb": (uss_pss_kib(os.getpid()) or (0, 0))[0] / 1024}

    names = columns(workers)
    print(f"\n== {workers} workers: {len(loader.dataset)} training images, batch size {args.batch_size}, {n_batches} batches "
          f"per epoch, sampled every {every} batches; build_data {build_s:.1f} s; main process after build: "
          f"RSS {after_build['main_rss_mb']:.1f} MB, USS {after_build['main_uss_mb']:.1f} MB", flush=True)
    print(format_row(names, dict(zip(names, names))), flush=True)

    images = [0] * workers
    points: list[dict[str, Any]] = []
    pids: list[int] | None = None
    epoch_s = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        # As engine.fit does: a new order each epoch. Without it every epoch repeats the first one's,
        # each worker loads the same images again and its memory stops growing after epoch 1.
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        for b, (batch_images, _targets) in enumerate(loader):
            images[b % workers] += len(batch_images)  # round-robin from worker 0 each epoch (module doc)
            if pids is None:
                pids = ordered_workers(workers)
            first = not points
            if first or (b + 1) % every == 0 or b + 1 == n_batches:
                if ordered_workers(workers) != pids:
                    raise RuntimeError(f"the loader's worker processes changed (were {pids}); persistent workers expected")
                row = {"epoch": epoch, "batch": b + 1, "time_s": time.perf_counter() - start, **sample(pids, images)}
                points.append(row)
                print(format_row(names, row), flush=True)
        epoch_s.append(time.perf_counter() - epoch_start)

    assert pids is not None  # at least one batch per epoch
    run = {
        "workers": workers,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "train_images": len(loader.dataset),
        "batches_per_epoch": n_batches,
        "every": every,
        "build_s": build_s,
        "epoch_s": epoch_s,
        "main_rss_after_build_mb": after_build["main_rss_mb"],
        "main_uss_after_build_mb": after_build["main_uss_mb"],
        "main_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "points": points,
        "growth": growth(points, pids, len(loader.dataset)),
    }
    print_growth(run)
    return run


def print_growth(run: dict[str, Any]) -> None:
    first, last = run["points"][0], run["points"][-1]
    print(f"-- growth per worker, first sample (epoch {first['epoch']}, batch {first['batch']}) to last "
          f"(epoch {last['epoch']}, batch {last['batch']}):")
    names = ["worker", "images", "uss_first_mb", "uss_last_mb", "uss_growth_mb", "pss_last_mb", "pss_growth_mb",
             "uss_kb_per_image", "uss_kb_per_dataset_image"]
    print("  " + format_row(names, dict(zip(names, names))))
    for g in run["growth"]:
        print("  " + format_row(names, {**g, "worker": f"w{g['worker']}"}))
    epochs = ", ".join(f"{s:.1f}" for s in run["epoch_s"])
    print(f"-- start-up (build_data): {run['build_s']:.1f} s; epochs: {epochs} s; main process peak RSS "
          f"{run['main_peak_rss_mb']:.1f} MB", flush=True)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def print_comparison(runs: list[dict[str, Any]]) -> None:
    """One line per worker count: per-worker means, and the workers' USS summed at the end."""
    names = ["workers", "build_s", "uss_first_mb", "uss_last_mb", "uss_growth_mb", "uss_kb_per_image",
             "uss_kb_per_dataset_image", "pss_last_mb", "sum_uss_last_mb", "main_peak_rss_mb"]
    print("\n== per worker count (worker columns: mean over the workers; sum_uss_last_mb: all workers at the end)")
    print(format_row(names, dict(zip(names, names))))
    for run in runs:
        g = run["growth"]
        print(format_row(names, {
            "workers": run["workers"],
            "build_s": run["build_s"],
            "uss_first_mb": mean([w["uss_first_mb"] for w in g]),
            "uss_last_mb": mean([w["uss_last_mb"] for w in g]),
            "uss_growth_mb": mean([w["uss_growth_mb"] for w in g]),
            "uss_kb_per_image": mean([w["uss_kb_per_image"] for w in g]),
            "uss_kb_per_dataset_image": mean([w["uss_kb_per_dataset_image"] for w in g]),
            "pss_last_mb": mean([w["pss_last_mb"] for w in g]),
            "sum_uss_last_mb": sum(w["uss_last_mb"] for w in g),
            "main_peak_rss_mb": run["main_peak_rss_mb"],
        }))


# ------------------------------------------------------------------------------------ the command
def child_argv(args: argparse.Namespace, workers: int, output: Path) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--workers", str(workers), "--output", str(output),
            "--images", str(args.images), "--val-images", str(args.val_images), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--every", str(args.every), "--seed", str(args.seed),
            "--threads", str(args.threads)]
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.child:
        run = measure(args, args.worker_counts[0])
        if args.output:
            args.output.write_text(json.dumps(run, indent=1))
        return 0

    params = SynthParams(num_train=args.images, num_val=args.val_images, seed=args.seed)
    start = time.perf_counter()
    paths = ensure_synthetic_coco(params, args.data_dir, threads=args.threads)
    print(f"Synthetic COCO set ({args.images} train + {args.val_images} val images, seed {args.seed}): {paths.root} "
          f"(ready in {time.perf_counter() - start:.1f} s)", flush=True)

    runs = []
    with tempfile.TemporaryDirectory(prefix="worker_memory-") as tmp:
        for workers in args.worker_counts:
            out = Path(tmp) / f"{workers}.json"
            proc = subprocess.run(child_argv(args, workers, out), check=False)
            if proc.returncode != 0:
                print(f"worker_memory: the run with {workers} workers failed (exit status {proc.returncode})", file=sys.stderr)
                return proc.returncode or 1
            runs.append(json.loads(out.read_text()))
    if len(runs) > 1:
        print_comparison(runs)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"images": args.images, "val_images": args.val_images, "seed": args.seed,
                                           "data": str(paths.root), "runs": runs}, indent=1))
        print(f"\nWrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
