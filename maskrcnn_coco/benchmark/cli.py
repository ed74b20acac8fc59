"""Benchmark (``python scripts/benchmark.py``, ``maskrcnn-benchmark``): what our loop costs against a
bare torchvision loop, measured in one process on the same model, data and seed.

Sections (``--sections``, all by default):

* ``train``: ``train_one_epoch`` with everything ``fit`` gives it (gradient norms of the groups and the
  loss-producing modules at ``train.grad_norm_every``, the divergence guard, the schedule, the
  timer, the iteration log and its ``iter/`` scalars every ``print_freq``) against a bare loop (forward, sum, backward, step, scheduler), per ``train.amp`` mode
  (``--amp``) and optionally in channels_last (``--channels-last``). Trials alternate A/B/A/B; before
  each one the model, a fresh optimizer and schedule and every RNG are restored to the same
  snapshot, so A and B train the same steps and must end with bit-identical weights (checked).
* ``eval``: ``evaluate`` with validation losses and COCO metrics against bare inference + COCOeval.
* ``data``: seconds per training batch from the configured loader, as a share of an iteration.
* ``cocoeval``: COCOeval per backend on the same detections (the stats must be identical).
* ``optimizer``: one optimizer step per implementation (for_loop, foreach, fused).
* ``jpeg``: decoding COCO-sized JPEG files (640x480 and 480x640, quality 90) on the CPU, one thread:
  PIL (``Image.open().convert("RGB")`` + to tensor, our loader's path) against
  ``torchvision.io.decode_jpeg(read_file())``, interleaved A/B on the same files (``benchmark.jpeg``).
* ``checkpoint``: writing the configured model's training checkpoint as a run does (``training_state``
  + ``save_checkpoint``), with SGD momentum, then the ``last.pth`` copy: seconds and MiB.

``--loader coco`` makes the ``data`` section time our ``data=coco`` training loader on a synthetic set of
real JPEG files at COCO's sizes (``coco_synth``, ``--loader-workers``, default ``auto``) and the time the
loop would wait for each batch after an iteration of the fastest measured amp mode (its share of an
iteration: what ``time/data`` would say). On CUDA each training trial also records the peak GPU memory
(``torch.cuda.max_memory_allocated``; null on CPU).

``--preset gpu``: the GPU-ready check in one command (``scripts/gpu_check.sh``), meant to finish within 8
minutes on one GPU: R50-FPN on synthetic 800x1333 images, batch 2, every amp mode (off = fp32, bf16,
fp16) ours against the bare loop with peak memory, the evaluation ratio, ``--loader coco`` with
``data.num_workers=auto``, ``jpeg`` and ``checkpoint``; one JSON whose ``summary`` holds the headline
numbers. Without CUDA it still runs (fp16 reported as ``skipped: no CUDA``, bf16 too unless the CPU
computes bf16 natively); ``--tiny`` shrinks it to seconds on a CPU (2 iterations, 1 repeat, a few
files), which is how CI keeps it working. Flags given on the command line override the preset's values.

Wall time and process CPU time (``time.process_time``, all threads) are reported side by side: on a
shared machine the CPU time is the steadier of the two. Pairs alternate their order (A B, B A, ...);
ratios are per pair, their median and spread (min..max) printed and written to the JSON (``--output``).

On CPU the default is the training config (``model=small``, shapes data) with one thread; on CUDA
torchvision's ``maskrcnn_r50_fpn`` on synthetic 800x1333 images (``--data synthetic``), every amp mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from maskrcnn_coco.benchmark.evaluation import bench_cocoeval, bench_eval
from maskrcnn_coco.benchmark.jpeg import bench_jpeg
from maskrcnn_coco.benchmark.report import default_output, format_report, summarize
from maskrcnn_coco.benchmark.sections import bench_checkpoint, bench_coco_loader, bench_data, bench_optimizer
from maskrcnn_coco.benchmark.setup import prepare
from maskrcnn_coco.benchmark.train import bench_train
from maskrcnn_coco.cli.args import parse_with_overrides
from maskrcnn_coco.cli.experiment import check_config, cpu_has_bf16, resolve_device
from maskrcnn_coco.cli.probe import compose_config
from maskrcnn_coco.engine.checkpoint import load_training_checkpoint
from maskrcnn_coco.engine.settings import AMP_DTYPES
from maskrcnn_coco.utils.errors import ConfigError, UserError

SECTIONS = ("train", "eval", "data", "cocoeval", "optimizer", "jpeg", "checkpoint")
JSON_KEYS = ("meta", *SECTIONS, "summary")

# --preset gpu: the GPU-ready check (module docstring); flags given explicitly win.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {"sections": "train,eval,data,jpeg,checkpoint", "amp": "off,bf16,fp16", "iters": 10, "repeats": 3, "warmup": 1,
            "eval_batches": 5, "batch_size": 2, "loader": "coco", "loader_batches": 30, "jpeg_files": 64},
}
# --tiny: the same sections in seconds on a CPU (CI), so the preset cannot rot.
TINY = {"iters": 2, "repeats": 1, "warmup": 0, "eval_batches": 1, "loader_batches": 3, "jpeg_files": 4,
        "image_size": (64, 64)}
PRESET_BUDGET_S = 480  # --preset gpu must finish within 8 minutes


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
    p.add_argument("--batch-size", type=int, default=None, help="synthetic (and --loader coco) batch size (default data.batch_size)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"which to run (default {','.join(SECTIONS)})")
    p.add_argument("--weights", default=None, help="a checkpoint (ours) to load before the evaluation section (default: the initial weights)")
    p.add_argument("--config", default=None, help="a config name in conf/ or a YAML path (default: the training config)")
    p.add_argument("--output", default=None, help="JSON file (default runs/benchmark/<date>_<time>.json)")
    p.add_argument("--loader", choices=("config", "coco"), default="config",
                   help="what the data section times: the configured loader, or data=coco on COCO-sized JPEG files "
                   "(default config)")
    p.add_argument("--loader-workers", default="auto", help="data.num_workers of --loader coco (default auto)")
    p.add_argument("--loader-batches", type=int, default=20, help="batches per --loader coco measurement (default 20)")
    p.add_argument("--jpeg-files", type=int, default=32, help="JPEG files the jpeg section decodes per trial (default 32)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="gpu: the GPU-ready check (R50-FPN, every amp mode, data, jpeg, checkpoint; one JSON)")
    p.add_argument("--tiny", action="store_true", help="with --preset: a few iterations and files, for a CPU (CI)")
    return p


def apply_preset(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv``; with ``--preset``, its values (and ``--tiny``'s) replace the defaults of the flags
    not given."""
    args, extra = parse_with_overrides(parser, argv)
    if args.preset is None:
        if args.tiny:
            parser.error("--tiny shrinks a preset: use it with --preset gpu")
        return args, extra
    parser.set_defaults(**{**PRESETS[args.preset], **(TINY if args.tiny else {})})
    return parse_with_overrides(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    parser = build_parser()
    args, extra = apply_preset(parser, argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    try:
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"--sections: unknown {unknown}; use any of {', '.join(SECTIONS)}")
        if min(args.iters, args.repeats, args.eval_batches, args.loader_batches, args.jpeg_files) < 1 or args.warmup < 0:
            raise ConfigError("--iters, --repeats, --eval-batches, --loader-batches and --jpeg-files must be at least 1, "
                              "--warmup at least 0")
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
        # A mode this machine cannot run is reported as skipped, so the preset's JSON always has all three.
        skipped = {}
        if cuda and "bf16" in modes and not torch.cuda.is_bf16_supported():
            skipped["bf16"] = {"skipped": "this GPU has no bf16"}
        if not cuda and args.preset and "fp16" in modes:
            skipped["fp16"] = {"skipped": "no CUDA"}
        if not cuda and args.preset and "bf16" in modes and not cpu_has_bf16():
            # Emulated bf16 is ~7x slower than fp32: not what a GPU check is for (without --preset, --amp bf16 times it).
            skipped["bf16"] = {"skipped": "no CUDA, and this CPU has no native bf16"}
        modes = [m for m in modes if m not in skipped]
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
        "preset": args.preset, "tiny": args.tiny, "sections": sections,
    }}
    for key in SECTIONS:
        report[key] = None
    results: list[dict[str, Any]] = []
    output = Path(args.output) if args.output else default_output()
    if "train" in sections:
        log("train: ours (train_one_epoch as fit runs it) vs bare torchvision loop")
        report["train"] = {**bench_train(setup, args, modes, log), **skipped}
    if "eval" in sections or "cocoeval" in sections:
        if args.weights:
            setup.model.load_state_dict(load_training_checkpoint(args.weights)["model"])
        log("eval: evaluate (val losses + COCO metrics) vs bare inference + COCOeval")
        eval_report, results = bench_eval(setup, args, log)
        if "eval" in sections:
            report["eval"] = eval_report
    if "data" in sections and args.loader == "coco":
        log(f"data: our data=coco loader on COCO-sized JPEG files, data.num_workers={args.loader_workers}")
        loader_cfg = compose_config(args.config, ["data=coco", f"data.batch_size={args.batch_size or cfg.data.batch_size}",
                                                  f"data.num_workers={args.loader_workers}"]).data
        report["data"] = bench_coco_loader(loader_cfg, args, report["train"], device, cfg.seed, log)
    elif "data" in sections:
        report["data"] = bench_data(setup, args, report["train"])
    if "cocoeval" in sections:
        report["cocoeval"] = bench_cocoeval(setup, results, args)
    if "optimizer" in sections:
        report["optimizer"] = bench_optimizer(setup, args)
    if "jpeg" in sections:
        log(f"jpeg: decoding {args.jpeg_files} COCO-sized files, PIL vs torchvision.io.decode_jpeg")
        report["jpeg"] = bench_jpeg(args, log)
    if "checkpoint" in sections:
        log(f"checkpoint: {cfg.model.arch}'s training checkpoint, written under {output.parent}")
        report["checkpoint"] = bench_checkpoint(setup, args, output.parent)
    report["meta"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["meta"]["elapsed_s"] = time.perf_counter() - started
    report["summary"] = summarize(report, budget_s=PRESET_BUDGET_S if args.preset else None)
    print(format_report(report))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"Wrote {output}")
    return 0


def cli() -> None:
    """Console-script entry point (``maskrcnn-benchmark``)."""
    sys.exit(main())
