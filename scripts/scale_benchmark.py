"""Start-up and memory at COCO scale: python scripts/scale_benchmark.py [--images 20000,60000] [--ranks 2,4].

Issue #23 item 5. For each ``--images`` N, on a synthetic COCO 2017-like set (N train images and
``--val-images`` val images, COCO's categories, ~7.3 polygons of 20-60 points per image, tiny real
JPEG files; ``maskrcnn_coco.benchmark.coco_synth``, generated once and re-used):

1. **Start-up**, each case in a fresh child process: the project's ``build_data`` (both splits,
   through the real config) then the first training batch from a loader with ``--workers`` workers,
   with ``data.index_cache=off`` (every start validates and indexes the JSON), with an empty cache
   (the first run: build and write) and with the cache written (every later run, every other rank).
   Wall and process CPU seconds, peak RSS, and the index's size on disk (records / ground truth).
2. **A node's memory** with ``--ranks`` R gloo ranks started together (as torchrun starts them),
   each building the data and reading ``--batches`` batches with ``--workers`` workers: the PSS of
   every rank and worker summed (pages shared by several processes count once over the node), with
   the cache off (each rank its own index), on an empty cache (the first run: local rank 0 builds
   and keeps the parsed file, the others map what it wrote) and on the written cache (every later
   run: all map one file).

Loader workers' USS over epochs is ``scripts/worker_memory.py``; evaluation time and peak memory for
5,000 x 100 results is ``scripts/results_path_benchmark.py --sections cocoeval``. MB are MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()  # before the heavy imports: a child's start-up includes them

from omegaconf import OmegaConf  # noqa: E402

from maskrcnn_coco.benchmark.coco_synth import SynthParams, ensure_synthetic_coco  # noqa: E402
from maskrcnn_coco.config import CocoDataConfig  # noqa: E402

CASES = ("off", "first", "cached")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/scale_benchmark.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="20000,60000", metavar="N[,N]", help="training images of each set (default 20000,60000)")
    p.add_argument("--val-images", type=int, default=5000, help="validation images (default 5000)")
    p.add_argument("--workers", type=int, default=2, help="loader workers per rank (default 2)")
    p.add_argument("--ranks", default="2,4", metavar="R[,R]", help="gloo ranks of the node-memory runs; empty: skip (default 2,4)")
    p.add_argument("--batches", type=int, default=20, help="batches each rank reads in the node-memory runs (default 20)")
    p.add_argument("--data-dir", type=Path, default=None, help="where the synthetic sets are generated (default: the cache folder)")
    p.add_argument("--sections", default="startup,node", help="startup, node or both (default startup,node)")
    p.add_argument("--output", type=Path, default=None, metavar="JSON", help="also write every number here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a JSON spec: one measurement in this process
    args = p.parse_args(argv)
    try:
        args.sizes = [int(n) for n in args.images.split(",") if n.strip()]
        args.rank_counts = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        p.error("--images and --ranks take comma-separated integers, e.g. 20000,60000")
    args.sections = [x for x in args.sections.split(",") if x.strip()]
    if not set(args.sections) <= {"startup", "node"}:
        p.error(f"--sections {','.join(args.sections)!r}: choose among startup, node")
    if not args.sizes or min(args.sizes) < 1 or args.workers < 0 or args.batches < 1 or any(r < 1 for r in args.rank_counts):
        p.error("--images, --batches and --ranks must be >= 1, --workers >= 0")
    return args


def data_config(paths: Any, cache: str, workers: int) -> Any:
    return OmegaConf.structured(CocoDataConfig(
        root=str(paths.root), train_images=str(paths.train_images), train_annotations=str(paths.train_annotations),
        val_images=str(paths.val_images), val_annotations=str(paths.val_annotations), num_workers=workers, index_cache=cache,
    ))


def node_pss_mb() -> tuple[float, float]:
    """(this process's PSS, its loader workers' PSS summed), MiB."""
    from maskrcnn_coco.engine.iteration_log import loader_workers, uss_pss_kib

    own = (uss_pss_kib(os.getpid()) or (0, 0))[1] / 1024
    workers = sum((uss_pss_kib(pid) or (0, 0))[1] for pid in loader_workers()) / 1024
    return own, workers


# ------------------------------------------------------------------------------------ children
def startup_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the data and read the first training batch; wall (from interpreter start), CPU, peak RSS."""
    from maskrcnn_coco.benchmark.coco_synth import synth_paths
    from maskrcnn_coco.data.coco import build_data

    cfg = data_config(synth_paths(spec["root"]), spec["cache"], spec["workers"])
    imports_s = time.perf_counter() - T0
    start, cpu = time.perf_counter(), time.process_time()
    bundle = build_data(cfg, seed=0, progress=False)
    build_s, build_cpu = time.perf_counter() - start, time.process_time() - cpu
    next(iter(bundle.train_loader))
    return {"imports_s": imports_s, "build_s": build_s, "build_cpu_s": build_cpu,
            "first_batch_s": time.perf_counter() - T0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_images": len(bundle.train_loader.dataset), "val_images": len(bundle.val_loader.dataset)}


def node_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of a node: init gloo, build the data, read ``batches`` batches, measure PSS at a barrier."""
    import torch.distributed as torch_dist

    from maskrcnn_coco.benchmark.coco_synth import synth_paths
    from maskrcnn_coco.data.coco import build_data

    rank = int(os.environ["RANK"])
    torch_dist.init_process_group("gloo", init_method=f"file://{spec['init']}", rank=rank, world_size=spec["ranks"])
    cfg = data_config(synth_paths(spec["root"]), spec["cache"], spec["workers"])
    start = time.perf_counter()
    bundle = build_data(cfg, seed=0, progress=False)
    build_s = time.perf_counter() - start
    loader = iter(bundle.train_loader)
    for _ in range(spec["batches"]):
        next(loader)
    torch_dist.barrier()  # every rank at its steady state before anyone reads PSS
    own, workers = node_pss_mb()
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    return {"rank": rank, "build_s": build_s, "pss_mb": own, "workers_pss_mb": workers}


def run_child(spec: dict[str, Any], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True)


def result(proc: subprocess.Popen) -> dict[str, Any]:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"scale_benchmark: a measurement failed (exit status {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def folder_mb(folder: Path, pattern: str) -> float:
    return sum(p.stat().st_size for p in folder.rglob(pattern)) / 2**20


# ------------------------------------------------------------------------------------ the command
def measure_size(args: argparse.Namespace, n: int, scratch: Path) -> dict[str, Any]:
    paths = ensure_synthetic_coco(SynthParams(num_train=n, num_val=args.val_images, seed=0), args.data_dir)
    out: dict[str, Any] = {"images": n, "val_images": args.val_images,
                           "annotations_mb": paths.train_annotations.stat().st_size / 2**20, "startup": {}, "node": {}}
    if "startup" in args.sections:
        cache = scratch / f"index-{n}"
        for case in CASES:
            spec = {"mode": "startup", "root": str(paths.root), "workers": args.workers, "cache": "off" if case == "off" else str(cache)}
            out["startup"][case] = row = result(run_child(spec))
            print(f"  N={n} start-up, cache {case:>6}: first batch {row['first_batch_s']:5.1f} s after start (imports "
                  f"{row['imports_s']:.1f} s, build_data {row['build_s']:.1f} s wall / {row['build_cpu_s']:.1f} s CPU), "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
        out["index_mb"] = {"records": folder_mb(cache, "*.npy"), "ground_truth": folder_mb(cache, "ground_truth.pkl"),
                           "meta": folder_mb(cache, "meta.pkl")}
        print(f"  N={n} index on disk: records {out['index_mb']['records']:.0f} MB, ground truth "
              f"{out['index_mb']['ground_truth']:.0f} MB (the JSON: {out['annotations_mb']:.0f} MB)", flush=True)
    if "node" not in args.sections:
        return out
    for ranks in args.rank_counts:
        node_cache = scratch / f"node-{n}-{ranks}"
        shutil.rmtree(node_cache, ignore_errors=True)
        # off: every rank its own index; first: local rank 0 builds and writes it (the first run);
        # cached: every rank maps the written one (every later run).
        for case in CASES:
            spec = {"mode": "node", "root": str(paths.root), "workers": args.workers, "batches": args.batches, "ranks": ranks,
                    "cache": "off" if case == "off" else str(node_cache), "init": str(scratch / f"init-{n}-{ranks}-{case}")}
            procs = [run_child(spec, {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks)})
                     for r in range(ranks)]
            rows = [result(p) for p in procs]
            total = sum(r["pss_mb"] + r["workers_pss_mb"] for r in rows)
            builds = ", ".join(f"{r['build_s']:.1f}" for r in sorted(rows, key=lambda r: r["rank"]))
            out["node"][f"{ranks}_{case}"] = {"ranks": rows, "node_pss_mb": total}
            print(f"  N={n} node of {ranks} ranks x {args.workers} workers, cache {case:>6}: summed PSS {total:6.0f} MB "
                  f"(ranks {sum(r['pss_mb'] for r in rows):.0f}, workers {sum(r['workers_pss_mb'] for r in rows):.0f}); "
                  f"build_data per rank {builds} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps((startup_child if spec["mode"] == "startup" else node_child)(spec)))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="scale_benchmark-") as tmp:
        for n in args.sizes:
            print(f"== {n} training images + {args.val_images} val images", flush=True)
            results.append(measure_size(args, n, Path(tmp)))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"workers": args.workers, "sizes": results}, indent=1))
        print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
