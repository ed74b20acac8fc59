"""Command line of the dataset checker (``python scripts/check_dataset.py [hydra overrides]``).

The config is composed exactly as training composes it (``cli.probe.compose_config``: same
``conf/``, schemas and overrides), and both splits go through the checks the data pipeline runs
when it builds a dataset (``data.validate.check_split``), plus the slow, complete one: every image
the split uses is opened and decoded, in threads, with a progress bar. No model is built.

Beyond what stops training, it reports data that disagrees with itself (masks off their boxes:
counts below 0.8 and 0.7 of the in-box pixel share and the box/mask-box IoU, and the worst
annotations; ``data.validate.mask_box_agreement``) and each split's statistics, compared between
the splits (``analysis.split_stats``); these warn, they do not change the exit status.

Exit status: 0 when training can start (problems it skips are reported), 1 when training would
fail on this data (a missing or undecodable image with ``data.on_invalid=error``, no usable image,
an unreadable annotation file, ...) or, with ``--strict``, when training would skip or change
anything (``STRICT``: invalid or repaired annotations, dropped images, files found by their
basename, photos loaded in their raw frame, placeholder categories left out), 2 on bad input
(config errors, unknown arguments).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from maskrcnn_coco.analysis.split_stats import MIN_IMAGES, SAMPLE_IMAGES, SplitStats, compare_splits, split_stats
from maskrcnn_coco.cli.args import parse_with_overrides
from maskrcnn_coco.cli.probe import compose_config
from maskrcnn_coco.data.coco import (
    CategoryMapping,
    DataError,
    build_datasets,
    export_lines,
    load_coco,
    prepare_export,
    resolve_data_paths,
)
from maskrcnn_coco.data.validate import (
    MASK_BOX_LEVELS,
    ON_INVALID,
    SplitCheck,
    check_split,
    format_record,
    mask_box_agreement,
)
from maskrcnn_coco.utils.errors import ConfigError, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Check a COCO-format dataset as training reads it, without training: annotations, image "
        "files, image decoding and sizes, categories. Extra arguments are Hydra overrides, as in training "
        "(e.g. data=coco data.root=/data/coco). Exit status: 0 training can start, 1 training would fail, "
        "2 bad input.",
    )
    p.add_argument("--config", default=None, help="a config name in conf/ or a YAML path (default: the training config)")
    p.add_argument("--examples", type=int, default=5, help="examples shown per kind of problem (default 5)")
    p.add_argument("--workers", type=int, default=None, help="threads decoding images (default: min(8, CPU count))")
    p.add_argument("--no-decode", action="store_true", help="skip decoding the images (only the cheap checks training runs at build)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when training would skip or change anything (for CI pipelines that gate a dataset)")
    return p


def check_data_config(cfg: DictConfig) -> None:
    """The data keys training needs, without resolving anything else of the config."""
    missing = [f"data.{k}" for k in cfg.data if OmegaConf.is_missing(cfg.data, k)]  # resolves nothing
    if missing:
        hint = " (e.g. data.root=/data/coco)" if "data.root" in missing else ""
        raise ConfigError(f"Missing required config value: {', '.join(missing)}{hint}")
    if cfg.data.on_invalid not in ON_INVALID:
        raise ConfigError(f"data.on_invalid={cfg.data.on_invalid!r}: use one of {', '.join(ON_INVALID)}")


def _count_lines(title: str, records: Sequence[dict[str, Any]], examples: int) -> list[str]:
    if not records:
        return []
    lines = [f"  {title}: {len(records)}"]
    kinds: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        kinds.setdefault(r["kind"], []).append(r)
    for kind, group in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"    {kind}: {len(group)}")
        lines += [f"      {format_record(r)}" for r in group[:examples]]
        if len(group) > examples:
            lines.append(f"      ... and {len(group) - examples} more")
    return lines


@dataclass
class SplitReport:
    """What the checker says of one split: report lines, fatal problems, warnings (training can
    start), the category mapping and the split's statistics (None when the split cannot be read)."""

    lines: list[str]
    fatal: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    mapping: CategoryMapping | None = None
    stats: SplitStats | None = None
    changed: list[str] = field(default_factory=list)  # what training would skip or change (--strict)


def check_one_split(split: str, paths: dict[str, Path], cfg: DictConfig, args: argparse.Namespace, mapping_ids: list[int] | None) -> SplitReport:
    """The report of one split."""
    data = cfg.data
    images, annotations = paths[f"{split}_images"], paths[f"{split}_annotations"]
    lines = [f"{split}: {annotations}", f"  image folder: {images}"]
    if not annotations.is_file():
        return SplitReport(lines, [f"{split}: annotation file not found: {annotations} (data.{split}_annotations)"])
    if not images.is_dir():
        return SplitReport(lines, [f"{split}: image folder not found: {images} (data.{split}_images)"])
    try:
        coco = load_coco(annotations)
    except Exception as err:  # noqa: BLE001 - json and pycocotools errors alike: the file is unusable
        return SplitReport(lines, [f"{split}: could not read {annotations}: {type(err).__name__}: {err}"])
    n_crowd = sum(1 for a in coco.dataset["annotations"] if a.get("iscrowd", 0))
    said, placeholders = prepare_export(coco, annotations.name, data.crowd)
    try:
        mapping = CategoryMapping(list(coco.cats.values()))
    except UserError as err:
        return SplitReport(lines, [f"{split}: {err}"])
    fatal = []
    if mapping_ids is not None and mapping.coco_ids != mapping_ids:
        fatal.append(f"{split}: the annotation file defines other categories than the train annotations")
    train = split == "train"
    check: SplitCheck = check_split(
        coco, images, train=train, drop_empty=train and data.drop_empty_train_images,
        max_images=data.max_train_images if train else data.max_val_images, on_invalid=data.on_invalid,
        decode=not args.no_decode, workers=args.workers, progress=not args.no_progress, desc=f"Decoding {split} images",
        exif=data.exif,
    )
    used = f"{len(check.ids)} used" + (" for training" if train else "")
    lines.append(f"  images: {len(coco.imgs)} listed, {check.selected} selected, {used}; "
                 f"annotations: {len(coco.dataset['annotations']) + len(check.annotations.invalid)} ({n_crowd} crowd)")
    lines += _count_lines("invalid annotations (skipped by training and evaluation)", check.annotations.invalid, args.examples)
    lines += _count_lines("repaired annotations (kept)", check.annotations.repaired, args.examples)
    verb = "stop training" if data.on_invalid == "error" else "dropped (data.on_invalid=drop)"
    decoded = "" if check.decoded else ", images not decoded (--no-decode)"
    lines += _count_lines(f"unusable images ({verb}{decoded})", check.bad_images, args.examples)
    if check.empty_categories:
        names = ", ".join(f"{name!r} (id {cid})" for cid, name in check.empty_categories)
        lines.append(f"  categories without a training instance ({len(check.empty_categories)}): {names}")
    frames = check.frames
    conventions = [f"  EXIF: {frames.rotated} of {frames.read} images carry a rotation (data.exif={data.exif})"]
    conventions += [f"  {line}" for line in said + export_lines(check, coco, annotations.name, images, train=train,
                                                               drop_empty=train and data.drop_empty_train_images)]
    changed = [f"{split}: {n} {what}" for n, what in (
        (len(check.annotations.invalid), "invalid annotations skipped"),
        (len(check.annotations.repaired), "annotations repaired"),
        (len(check.bad_images), "unusable images"),
        (len(check.relocated), "file_names found by their basename"),
        (len(frames.raw_only), "photos loaded in their raw frame (EXIF)"),
        (len(placeholders), "placeholder categories left out"),
    ) if n]
    if check.bad_images and data.on_invalid == "error":
        fatal.append(f"{split}: {len(check.bad_images)} unusable images with data.on_invalid=error, e.g. "
                     f"{format_record(check.bad_images[0])} (fix them, or set data.on_invalid=drop to skip them)")
    if not check.ids:
        fatal.append(f"{split}: no usable images")
    # The explicit check measures the in-box pixel share too (the start of a run only the IoU).
    agreement = mask_box_agreement(coco, check.ids, check.usable_ann_ids, pixels=True, source=str(annotations))
    stats = split_stats(coco, check.ids, check.usable_ann_ids, images, split=split, sample=0 if args.no_decode else SAMPLE_IMAGES)
    if not any(line.startswith("    ") for line in lines) and not check.empty_categories and not agreement.below[MASK_BOX_LEVELS[0]]:
        lines.append("  no problems found")
    lines += conventions  # what the export's conventions do (data.exif, data.crowd, ...): said, not problems
    lines += agreement.format(examples=args.examples)
    lines.append(f"  statistics: {stats.summary(label=False)}")
    warning = agreement.warning()
    return SplitReport(lines, fatal, [f"{split}: {warning}"] if warning else [], mapping, stats, changed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parse_with_overrides(parser, argv)
    try:
        if args.examples < 0:
            raise ConfigError("--examples must be >= 0")
        cfg = compose_config(args.config, list(extra))
        check_data_config(cfg)
        resolved = resolve_data_paths(cfg.data, progress=not args.no_progress)
    except DataError as err:  # the data's fault (no annotation file where the layout says), not the input's
        print(f"Training would fail:\n  - {err}")
        return 1
    except (UserError, OmegaConfBaseException) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2

    how = "existence only (--no-decode)" if args.no_decode else "every used image decoded"
    print(f"Dataset check: data={cfg.data.name}, data.on_invalid={cfg.data.on_invalid}, images: {how}\n")
    if resolved.lines:
        print("\n".join(resolved.lines) + "\n")
    paths = resolved.as_dict()
    fatal: list[str] = []
    warnings: list[str] = []
    changed: list[str] = []
    mapping_ids = None
    reports = {}
    for split in ("train", "val"):
        report = reports[split] = check_one_split(split, paths, cfg, args, mapping_ids)
        if report.mapping is not None and mapping_ids is None:
            mapping_ids = report.mapping.coco_ids
        print("\n".join(report.lines) + "\n")
        fatal += report.fatal
        warnings += report.warnings
        changed += report.changed
    train, val = reports["train"].stats, reports["val"].stats
    if train is not None and val is not None:
        findings = compare_splits(train, val)
        if min(train.images, val.images) < MIN_IMAGES:
            said = f"not compared (fewer than {MIN_IMAGES} images in a split)"
        elif findings:
            said = f"{len(findings)} difference{'s' if len(findings) > 1 else ''} (below)"
        else:
            said = "no difference beyond the thresholds" + (" (pixels not compared: --no-decode)" if args.no_decode else "")
        print(f"validation against training: {said}\n")
        warnings += [f.text() for f in findings]
    if warnings:
        print("Warnings (the data is used as it is, but may mislead training or its validation):\n"
              + "\n".join(f"  - {w}" for w in warnings) + "\n")
    if fatal:
        print("Training would fail:\n" + "\n".join(f"  - {f}" for f in fatal))
        return 1
    if args.strict and changed:
        print("--strict: training would skip or change:\n" + "\n".join(f"  - {c}" for c in changed))
        return 1
    write_indexes(cfg, paths, not args.no_progress)
    print("OK: training can start with this data.")
    return 0


def write_indexes(cfg: Any, paths: dict[str, Any], progress: bool) -> None:
    """Build both splits as training builds them, so their validated index (``data.index_cache``) is
    written now and the first run (every rank) starts from it; says where, or nothing when it is off."""
    if OmegaConf.select(cfg, "data.index_cache", default="off") == "off":
        return
    quiet = logging.getLogger("maskrcnn_coco.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the check above said it all
    try:
        datasets = build_datasets(cfg.data, progress=progress, paths=paths)
    except UserError as err:  # e.g. a bad image the undecoded check could not see
        print(f"The index was not written: {err}")
        return
    finally:
        quiet.setLevel(level)
    folders = [ds.index.folder for ds in datasets.values() if ds.index.folder is not None]
    if folders:
        print("Index for training written (data.index_cache): " + ", ".join(str(f) for f in folders))


def cli() -> None:
    """Console script entry: ``main``'s return value is the exit status."""
    sys.exit(main())
