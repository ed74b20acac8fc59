"""Command line of the loss probe (``python scripts/probe_losses.py``).

The config is composed exactly as training composes it (same ``conf/``, schemas and overrides), and
the data loaders, model builder, weight loading and loss weights are the training ones
(``experiment.build_components``), and the findings' thresholds are the config's ``diagnostics.*``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from maskrcnn_coco.analysis.sweep import register_resolvers
from maskrcnn_coco.cli.args import parse_with_overrides
from maskrcnn_coco.cli.experiment import build_components, check_config
from maskrcnn_coco.config import config_dir, register_configs
from maskrcnn_coco.engine.per_image import annotations_sheet
from maskrcnn_coco.probe.core import run_probe
from maskrcnn_coco.probe.report import (
    format_batch,
    format_comparison,
    format_per_image,
    format_split_comparison,
    format_summary,
    load_records,
    per_image_outliers,
    write_reports,
)
from maskrcnn_coco.utils.draw import save_png
from maskrcnn_coco.utils.errors import ConfigError, UserError

SHEET_NAME = "annotations_to_check.png"


def build_parser() -> argparse.ArgumentParser:
    # No fixed prog: usage names what was run (probe_losses.py or maskrcnn-probe).
    p = argparse.ArgumentParser(
        description="Forward-only loss probe through the exact training pipeline: per component, per FPN "
        "level, with diagnoses. Extra arguments are Hydra overrides, as in training (e.g. data=coco data.root=...).",
    )
    p.add_argument("--num-batches", type=int, default=2, help="batches to probe (default 2)")
    p.add_argument("--config", default=None, help="a config name in conf/ or a YAML path (default: the training config)")
    p.add_argument("--output-dir", default=None,
                   help="where the reports go (default runs/loss_probe/<date>_<time>/, a new folder per probe)")
    p.add_argument("--format", choices=("json", "csv", "both"), default="both", help="report format (default both)")
    p.add_argument("--verbose", action="store_true", help="print per-level statistics and losses for each batch")
    p.add_argument("--weights", default=None, help="full model weights: a checkpoint of ours or a torchvision state dict")
    p.add_argument("--backbone-weights", default=None, help="backbone weights (a ResNet state dict)")
    p.add_argument("--seed", type=int, default=None, help="seed for data order, init and samplers (default: the config's)")
    p.add_argument("--split", choices=("train", "val"), action="append", default=None,
                   help="which pipeline to probe (default train); twice (--split train --split val) probes both "
                   "and compares them component by component")
    p.add_argument("--per-image", action="store_true",
                   help="also each image's loss components on its own (one forward per image), the images whose "
                   f"component stands far above the rest, and {SHEET_NAME} of them with their ground truth")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two probe outputs (folders or files) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def quote_override_value(value: str) -> str:
    """``value`` as a single-quoted Hydra override value, read back by Hydra as exactly ``value``.

    Unquoted, Hydra's grammar rejects ``=`` (sweep job folders are named ``0_key=value``) and reads
    ``,`` as a sweep and ``[...]`` as a list. Inside quotes only two things need escaping: a quote
    (``\\'``), and backslashes directly before a quote or at the end (doubled).
    """
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


def default_output_dir() -> Path:
    """A new folder per probe, so a second probe never overwrites the first one's reports."""
    return Path("runs") / "loss_probe" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def compose_config(config: str | None, overrides: Sequence[str]) -> DictConfig:
    """Compose like the training entry point does: ``conf/config.yaml`` or another primary config."""
    register_configs()
    register_resolvers()
    overrides = list(overrides)
    conf = config_dir()
    if config is None:
        folder, name = conf, "config"
    elif config.endswith((".yaml", ".yml")) or "/" in config:
        path = Path(config).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"Config file not found: {config}")
        folder, name = path.parent, path.stem
        # The groups (data/, model/, ...) still come from the project's conf/.
        overrides.append(f"hydra.searchpath=[file://{conf}]")
    else:
        if not (conf / f"{config}.yaml").is_file():
            available = sorted(p.stem for p in conf.glob("*.yaml"))
            raise ConfigError(f"Config {config!r} not found in {conf} (available: {', '.join(available)}); or pass a YAML path")
        folder, name = conf, config
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
            return compose(name, overrides=overrides)
    except HydraException as err:
        raise ConfigError(f"Could not compose config {name!r} with {overrides}: {err}") from None


def _label(path: str) -> str:
    """A probe output's name in the comparison: its folder (also for a file inside it)."""
    p = Path(path)
    return (p.parent.name if p.is_file() else p.name) or path


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parse_with_overrides(parser, argv)
    try:
        if args.compare:
            a, b = args.compare
            print(format_comparison(load_records(a), load_records(b), _label(a), _label(b), args.verbose))
            return 0
        if args.num_batches < 1:
            raise ConfigError("--num-batches must be at least 1")
        overrides = list(extra)
        if args.weights:
            overrides.append(f"model.weights={quote_override_value(args.weights)}")
        if args.backbone_weights:
            overrides.append(f"model.backbone_weights={quote_override_value(args.backbone_weights)}")
        if args.seed is not None:
            overrides.append(f"seed={args.seed}")
        cfg = compose_config(args.config, overrides)
        check_config(cfg)
        progress = not args.no_progress
        parts = build_components(cfg, progress=progress)
        splits = list(dict.fromkeys(args.split or ["train"]))
        by_split, samples, datasets = {}, {}, {}
        for split in splits:
            loader = parts.data.train_loader if split == "train" else parts.data.val_loader
            samples[split], datasets[split] = {}, loader.dataset
            # Train: each batch's own statistics, as training normalises; val: the running ones, as the
            # run's evaluation does (a val set unlike training then shows in the val/train ratios).
            by_split[split] = run_probe(
                parts.model, loader, parts.device, num_batches=args.num_batches,
                loss_weights=parts.loss_weights, seed=cfg.seed, progress=progress, config=cfg.diagnostics,
                statistics="batch" if split == "train" else "running", per_image=args.per_image,
                samples=samples[split] if args.per_image else None,
            )
    except (UserError, FileNotFoundError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2

    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir()
    written = []
    for split, records in by_split.items():
        if len(by_split) > 1:
            print(f"== split: {split} ==")
        for record in records:
            print(format_batch(record, verbose=args.verbose))
        print(format_summary(records))
        if args.per_image:
            print(format_per_image(records))
        run = {
            "config": args.config or "config",
            "config_overrides": overrides,
            "weights": cfg.model.weights,
            "backbone_weights": cfg.model.backbone_weights,
            "seed": cfg.seed,
            "split": split,
            "loss_weights": OmegaConf.to_container(cfg.loss.weights),
        }
        # One split: the reports go straight into the folder; several: one sub-folder per split.
        folder = output_dir / split if len(by_split) > 1 else output_dir
        written += write_reports(records, run, folder, args.format)
        if args.per_image:
            sheet = annotations_sheet(per_image_outliers(records), samples[split], parts.data.mapping.names,
                                      dataset=datasets[split])
            if sheet is not None:
                written.append(save_png(sheet, folder / SHEET_NAME))
    if {"train", "val"} <= set(by_split):
        print(format_split_comparison(by_split["train"], by_split["val"]))
    print("Wrote " + ", ".join(str(p) for p in written))
    return 0


def cli() -> None:
    """Console script ``maskrcnn-probe``: ``main``'s return value is the exit status."""
    sys.exit(main())
