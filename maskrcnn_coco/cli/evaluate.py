"""Command line of the evaluation (``python scripts/evaluate.py --weights CKPT [hydra overrides]``,
console ``maskrcnn-eval``).

Evaluates any weights file ``inference.read_weights`` reads (a checkpoint of ours, an exported weights
file, a torchvision state dict) on a split (``--split``) or another annotation file
(``data.val_annotations=...``), exactly as training evaluates after an epoch: the config is composed
as training composes it, the validation split and its loader are built by the training code
(``data.coco``), and ``engine.evaluate.evaluate`` gives the val losses and COCO metrics (sharded over
the ranks under ``torchrun``, gathered to rank 0), so a run's last checkpoint reproduces the last
epoch's numbers of its ``metrics.jsonl``.

The config (``compose_eval_config``): for a checkpoint in a run folder (``<run>/checkpoints/x.pth``),
that run's ``.hydra/config.yaml`` with the overrides on top (group overrides such as ``data=coco`` or
``model=...`` replace the run's section); elsewhere the default config (or ``--config``) with the
overrides. In both, the model section is the one the weights were trained with (``model_config`` in
the file) except for the keys an override sets; a torchvision state dict selects its architecture.

Written under ``<--output or the run folder>/eval/<timestamp>/`` (rank 0):

* ``evaluation.json``: the scalars under the run's tags (``loss/val_*``, ``mAP/*``, as ``metrics.jsonl``
  has them), the metrics, the per-class table, images/s, what was evaluated;
* ``coco_results.json``: the detections as COCO results (bbox and RLE segmentation, the annotation
  file's category ids), ready for a COCO-style evaluation server;
* ``per_class.csv``: per class its AP (bbox, segm), instances, correct, confused, missed and false
  positives (from the confusion matrix);
* ``confusion.json`` / ``confusion.png`` (``evaluation.per_class``);
* ``to_check.json``: per image its false positives, objects detected as another class and missed
  objects (the confusion matrix's matching: IoU >= 0.5, score >= 0.5), the images with most first;
  ``to_check.png``: the first ``--check-images`` of them, ground truth beside predictions.

None of these names is a run's history (``metrics.jsonl``, event files), so run readers
(``analysis.inspect``, ``analysis.history``) never take an evaluation folder for a run.
Exit status: 0, or 2 with one ``Error:`` line on bad input (missing or unfit weights, config, data).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pycocotools import mask as mask_utils

from maskrcnn_coco.analysis.diagnostics import json_safe
from maskrcnn_coco.analysis.sweep import override_key
from maskrcnn_coco.cli.args import parse_with_overrides
from maskrcnn_coco.cli.check_dataset import check_data_config
from maskrcnn_coco.cli.experiment import resolve_device
from maskrcnn_coco.cli.probe import compose_config
from maskrcnn_coco.config import validate_config
from maskrcnn_coco.data.coco import CategoryMapping, build_datasets, build_transforms, make_loader, resolve_data_paths
from maskrcnn_coco.data.exports import plural
from maskrcnn_coco.data.validate import usable_ground_truth
from maskrcnn_coco.engine.checkpoint import display_path
from maskrcnn_coco.engine.evaluate import EvalObserver, evaluate
from maskrcnn_coco.engine.visualize import draw_prediction
from maskrcnn_coco.engine.writers import format_class_aps, format_epoch_summary
from maskrcnn_coco.evaluation.per_class import CONFUSION_KEY, match_images, save_confusion
from maskrcnn_coco.inference import RUN_CONFIG, WeightsFile, build_for_weights, read_weights
from maskrcnn_coco.tracking.scalars import (
    IOU_TYPES,
    LOSS_COMPONENTS,
    METRIC_NAMES,
    class_names_by_key,
    epoch_scalars,
    loss_tag,
    loss_weights_from_config,
    map_tag,
)
from maskrcnn_coco.utils import dist
from maskrcnn_coco.utils.draw import contact_sheet, save_png
from maskrcnn_coco.utils.errors import ConfigError, UserError
from maskrcnn_coco.utils.logs import ensure_console_logging

EVAL_DIR = "eval"  # under the run folder (or --output): eval/<timestamp>/
METRICS_FILE = "evaluation.json"  # not metrics.json(l): the run readers must not take it for a history
RESULTS_FILE = "coco_results.json"
PER_CLASS_FILE = "per_class.csv"
CONFUSION_STEM = "confusion"
TO_CHECK_FILE, TO_CHECK_SHEET = "to_check.json", "to_check.png"
# The confusion matrix's matching (evaluation.per_class.confusion_matrix's defaults).
IOU_THRESHOLD, SCORE_THRESHOLD = 0.5, 0.5
# conf/ groups and the schema each is typed by, when a run's saved section is used as it is.
GROUP_SCHEMAS = {
    "data": lambda section: f"{section.get('name', 'coco')}_schema",
    "model": lambda section: "small_schema" if section.get("arch") == "small" else "torchvision_schema",
    "optimizer": lambda section: "optimizer_schema",
    "tracker": lambda section: "tracker_schema",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate weights (a checkpoint, an exported weights file or a torchvision state dict) on a split "
        "or an annotation file as training evaluates: val loss per component, COCO box/mask AP, AP per class, "
        "the confusion matrix, COCO results and the images to check. Extra arguments are Hydra overrides, as in "
        "training (e.g. data=coco data.root=/data/other data.val_annotations=/data/other/val.json). Exit status: 0, "
        "or 2 on bad input.",
    )
    p.add_argument("--weights", required=True, metavar="CKPT", help="the weights file (e.g. runs/maskrcnn/<run>/checkpoints/last.pth)")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="write into DIR/eval/<timestamp>/ (default: the checkpoint's run folder, else runs_dir)")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="which split's images and annotations (default val; train is read as validation reads "
                   "images: no augmentation)")
    p.add_argument("--config", default=None,
                   help="a config name in conf/ or a YAML path (default: the checkpoint's run config, else the training config)")
    p.add_argument("--check-images", type=int, default=16, metavar="N",
                   help=f"images drawn in {TO_CHECK_SHEET}, those with most errors first (default 16; 0: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def error_line(err: BaseException) -> str:
    """``Error: <message>`` on one line: a message from a library (torch.load's, Hydra's) may span several."""
    return "Error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip())


# ------------------------------------------------------------------------------------ config
def run_primary(run_dir: Path, groups: Mapping[str, str]) -> dict[str, Any]:
    """A primary config of the run's saved ``.hydra/config.yaml``: each conf/ group section typed by
    its schema (``GROUP_SCHEMAS``), except the groups an override chooses (``groups``: group ->
    option), whose section comes from that option instead."""
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / RUN_CONFIG), resolve=False)
    defaults: list[Any] = ["config_schema"]
    for group, schema in GROUP_SCHEMAS.items():
        if group in groups:
            defaults.append({group: groups[group]})
            saved.pop(group, None)
        elif group in saved:
            defaults.append({group: schema(saved[group])})
    return {"defaults": [*defaults, "_self_"], **saved}


def compose_eval_config(weights: WeightsFile, config: str | None, overrides: Sequence[str]) -> DictConfig:
    """The config to evaluate ``weights`` with (module docstring): the run's config or the default one,
    the overrides, then the weights' own model config where no override sets the key."""
    overrides = list(overrides)
    groups = {override_key(o): o.split("=", 1)[1] for o in overrides if "=" in o and override_key(o) in GROUP_SCHEMAS}
    trained = weights.model_config
    if weights.run_dir is not None and config is None:
        with tempfile.TemporaryDirectory() as tmp:
            primary = Path(tmp) / "run_config.yaml"
            OmegaConf.save(OmegaConf.create(run_primary(weights.run_dir, groups)), primary)
            rest = [o for o in overrides if override_key(o) not in groups]
            cfg = _composed(str(primary), rest, f"{weights.run_dir / RUN_CONFIG} with the overrides {rest}")
    else:
        if trained is not None and "model" not in groups:
            # The conf/model option of the trained architecture (the file names are the arch names).
            overrides.append(f"model={trained['arch']}")
        cfg = _composed(config, overrides)
    if trained is not None and "model" not in groups:
        set_keys = {override_key(o) for o in overrides}
        for key, value in trained.items():
            if f"model.{key}" not in set_keys and key in cfg.model:
                OmegaConf.update(cfg, f"model.{key}", value, merge=False)
    return cfg


def _composed(config: str | None, overrides: Sequence[str], what: str | None = None) -> DictConfig:
    """``compose_config``, its error naming ``what`` (the run's config, not the temporary primary) and
    saying how to reach annotation files from the shapes data, which has none."""
    try:
        return compose_config(config, overrides)
    except ConfigError as err:
        text = error_line(err).removeprefix("Error: ")  # Hydra's message spans lines
        hint = ("; the shapes data has no annotation-file keys: add data=coco data.root=<folder> to evaluate "
                "COCO-format files" if "data.val_" in text or "data.train_" in text else "")
        raise ConfigError(f"{what}: {text}{hint}" if what else f"{text}{hint}") from None


# -------------------------------------------------------------------------------------- data
def eval_dataset(cfg: DictConfig, split: str, progress: bool) -> tuple[Any, dict[str, Path]]:
    """The split as validation reads it (``build_datasets``' val pipeline: no augmentation; the train
    split's files read through it for ``--split train``) and its paths."""
    paths = resolve_data_paths(cfg.data, progress=progress).as_dict()
    files = {"val_images": paths[f"{split}_images"], "val_annotations": paths[f"{split}_annotations"]}
    return build_datasets(cfg.data, splits=("val",), progress=progress, paths=files)["val"], files


def eval_mapping(weights: WeightsFile, dataset: Any, annotations: Path) -> CategoryMapping:
    """The model's classes, checked against the annotation file's: every category of the file must be
    one the model predicts (same COCO id), so targets and detections share a label space. A file
    without classes (a bare state dict) takes the dataset's when the counts agree. ``annotations``
    names the file in the errors."""
    data = dataset.mapping
    model = weights.mapping
    if model is None:
        if weights.num_classes != data.num_classes:
            raise ConfigError(f"{weights.path} predicts {weights.num_classes - 1} classes (no names in the file) but "
                              f"{annotations} has {data.num_classes - 1}: evaluate it on an annotation file of its classes")
        return data
    unknown = [f"{cid} {name!r}" for cid, name in zip(data.coco_ids, data.names) if cid not in model.coco_ids]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        known = ", ".join(f"{cid} {name!r}" for cid, name in list(zip(model.coco_ids, model.names))[:5])
        raise ConfigError(f"{annotations} has categories the model does not predict ({shown}); the model's are "
                          f"{known}{' ...' if len(model.coco_ids) > 5 else ''}: evaluate on an annotation file with "
                          "the category ids it was trained on")
    names = dict(zip(model.coco_ids, model.names))
    renamed = [f"{cid} {name!r} (model: {names[cid]!r})" for cid, name in zip(data.coco_ids, data.names) if names[cid] != name]
    if renamed and dist.is_main_process():
        print(f"Note: categories matched by id but named differently: {', '.join(renamed[:5])}")
    return model


def image_errors(coco_gt: Any, results: Sequence[Mapping[str, Any]], image_ids: Sequence[int], *,
                 iou_threshold: float = IOU_THRESHOLD, score_threshold: float = SCORE_THRESHOLD) -> list[dict[str, Any]]:
    """Per image with any, its errors under the confusion matrix's matching (``per_class.match_images``):
    ``false_positives`` (matched nothing), ``wrong_class`` (matched an object of another class) and
    ``missed`` (objects no detection matched), annotation ids named. Most errors first, then by image id."""
    coco_gt = usable_ground_truth(coco_gt)
    names = {cid: str(cat.get("name", cid)) for cid, cat in coco_gt.cats.items()}
    out = []
    for match in match_images(coco_gt, results, image_ids, iou_threshold=iou_threshold, score_threshold=score_threshold):
        false_positives, wrong_class = [], []
        for det, gt in match.pairs:
            found = {"category_id": det["category_id"], "name": names[det["category_id"]], "score": det["score"], "bbox": det["bbox"]}
            if gt is None:
                false_positives.append(found)
            elif gt["category_id"] != det["category_id"]:
                wrong_class.append({**found, "annotation_id": gt["id"], "annotated": names[gt["category_id"]]})
        missed = [{"annotation_id": g["id"], "category_id": g["category_id"], "name": names[g["category_id"]], "bbox": g["bbox"]}
                  for g in match.missed]
        if false_positives or wrong_class or missed:
            image = coco_gt.imgs.get(match.image_id, {})
            out.append({"image_id": match.image_id, "file_name": image.get("file_name"),
                        "errors": len(false_positives) + len(wrong_class) + len(missed),
                        "false_positives": false_positives, "wrong_class": wrong_class, "missed": missed})
    return sorted(out, key=lambda e: (-e["errors"], e["image_id"]))


def check_sheet(dataset: Any, errors: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]],
                mapping: CategoryMapping, count: int) -> torch.Tensor | None:
    """The first ``count`` images of ``errors``, each its ground truth beside its detections of score >=
    ``SCORE_THRESHOLD`` (``visualize.draw_prediction``), on one contact sheet; None when none."""
    position = {int(image_id): i for i, image_id in enumerate(dataset.ids)}
    tiles, captions = [], []
    for entry in errors[:count]:
        image, target = dataset[position[entry["image_id"]]]
        dets = [r for r in results if r["image_id"] == entry["image_id"] and r["score"] >= SCORE_THRESHOLD]
        boxes = torch.tensor([r["bbox"] for r in dets], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        height, width = image.shape[-2:]
        masks = (torch.from_numpy(mask_utils.decode([r["segmentation"] for r in dets])).permute(2, 0, 1).float()
                 if dets else torch.zeros(0, height, width))
        detections = {"boxes": boxes, "masks": masks, "scores": torch.tensor([r["score"] for r in dets]),
                      "labels": torch.tensor([mapping.to_label(r["category_id"]) for r in dets], dtype=torch.int64)}
        tiles.append(draw_prediction(image, target, detections, mapping.names, score_threshold=SCORE_THRESHOLD))
        counts = [plural(len(entry["false_positives"]), "false positive"),
                  f"{len(entry['wrong_class'])} of another class", f"{len(entry['missed'])} missed"]
        counts = [text for text, n in zip(counts, (entry["false_positives"], entry["wrong_class"], entry["missed"])) if n]
        captions.append(f"image {entry['image_id']}: " + ", ".join(counts))
    if not tiles:
        return None
    return contact_sheet(tiles, captions, columns=min(4, math.ceil(math.sqrt(len(tiles)))), tile_size=512)


# ---------------------------------------------------------------------------------- reports
def per_class_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per class of the confusion matrix: id, name, AP per IoU type, and its row's counts."""
    confusion = metrics[CONFUSION_KEY]
    matrix = np.asarray(confusion["matrix"])
    k = len(confusion["category_ids"])
    rows = []
    for i, (cid, name, metric) in enumerate(zip(confusion["category_ids"], confusion["ground_truth"], confusion["metric_names"])):
        row = {"category_id": cid, "name": name}
        row.update({f"{iou_type}_AP": metrics.get(iou_type, {}).get(metric) for iou_type in IOU_TYPES})
        instances = int(matrix[i].sum())
        row.update(instances=instances, correct=int(matrix[i, i]), other_class=instances - int(matrix[i, i]) - int(matrix[i, k]),
                   missed=int(matrix[i, k]), false_positives=int(matrix[k, i]))
        rows.append(row)
    return rows


def format_report(scalars: Mapping[str, float], names: Mapping[str, str]) -> str:
    """The evaluation part of the epoch block (``format_epoch_summary``: val loss, box and mask mAP)
    with each val component under the val loss, a table of the six COCO APs, and the AP per class line
    (``format_class_aps``)."""
    # Without training tags the block's first two lines are the epoch header and an empty training title.
    lines = format_epoch_summary(0, 0, scalars).splitlines()[2:]
    components = [f"   {c}: {scalars[loss_tag('val', c)]:.4f}" for c in sorted(LOSS_COMPONENTS) if loss_tag("val", c) in scalars]
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("📈")), 0)
    lines[at:at] = components
    table = ["   " + " ".join(f"{m:>6}" for m in ("", *METRIC_NAMES))]
    for iou_type in IOU_TYPES:
        values = [scalars.get(map_tag(iou_type, m)) for m in METRIC_NAMES]
        if any(v is not None for v in values):
            table.append("   " + " ".join([f"{iou_type:>6}", *(f"{v:6.3f}" if v is not None else f"{'n/a':>6}" for v in values)]))
    per_class = format_class_aps(scalars, names=names)
    return "\n".join([*lines, *(table if len(table) > 1 else []), *([per_class] if per_class else [])])


def new_output_dir(root: Path) -> Path:
    """``<root>/eval/<timestamp>/``, a new folder (``_2``, ... appended within the same second)."""
    base = root / EVAL_DIR / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}_{n}")
    out.mkdir(parents=True)
    return out


def write_reports(out: Path, summary: Mapping[str, Any], results: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any],
                  errors: Sequence[Mapping[str, Any]], title: str) -> list[Path]:
    """Every file of the evaluation folder but the sheet; returns their paths."""
    written = [out / METRICS_FILE, out / RESULTS_FILE, out / PER_CLASS_FILE, out / TO_CHECK_FILE]
    (out / METRICS_FILE).write_text(json.dumps(json_safe(dict(summary)), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / RESULTS_FILE).write_text(json.dumps(list(results)) + "\n")
    rows = summary["per_class"]
    with (out / PER_CLASS_FILE).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["category_id"])
        writer.writeheader()
        writer.writerows([{k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows])
    (out / TO_CHECK_FILE).write_text(json.dumps(json_safe(list(errors)), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    written += save_confusion(metrics[CONFUSION_KEY], out / CONFUSION_STEM, title=title)
    return written


# ------------------------------------------------------------------------------------- main
def prepare(args: argparse.Namespace, extra: Sequence[str]) -> dict[str, Any]:
    """Everything the evaluation needs, or a ``UserError``: weights, config, device, data, model."""
    if args.check_images < 0:
        raise ConfigError("--check-images must be >= 0")
    weights = read_weights(args.weights)
    cfg = compose_eval_config(weights, args.config, extra)
    check_data_config(cfg)
    validate_config(cfg.data, prefix="data.")
    validate_config(cfg.eval, prefix="eval.")
    device = resolve_device(cfg.device)  # under torchrun: the local rank's GPU
    dist.init_distributed(device.type)
    if device.type == "cuda" and device.index is not None:  # set_device refuses a bare "cuda" (torch 2.11)
        torch.cuda.set_device(device)
    progress = bool(cfg.progress) and not args.no_progress
    ensure_console_logging()  # the dataset's lines (crowd policy, EXIF, ...) as training says them
    if not dist.is_main_process():
        dist.synchronize()  # rank 0 first: it may generate the shapes set, which the others then read
    dataset, files = eval_dataset(cfg, args.split, progress and dist.is_main_process())
    if dist.is_main_process():
        dist.synchronize()
    mapping = eval_mapping(weights, dataset, files["val_annotations"])
    if mapping.state_dict() != dataset.mapping.state_dict():
        # Targets in the model's label space (for the val losses): the category ids mapped by the model's classes.
        dataset = dataset.with_transforms(build_transforms(False, cfg.data.augment, mapping))
    loader = make_loader(dataset, cfg.data.val_batch_size or cfg.data.batch_size, shuffle=False,
                         num_workers=cfg.data.num_workers, seed=cfg.seed, pin_memory=device.type == "cuda")
    hint = ("Evaluate it with the model settings it was trained with: from its run folder, or with the model=... and "
            "model.* overrides of its run (.hydra/config.yaml)")
    model = build_for_weights(cfg.model, weights, hint).to(device)
    if cfg.train.channels_last:  # as training evaluated it
        model = model.to(memory_format=torch.channels_last)
    return {"weights": weights, "cfg": cfg, "device": device, "progress": progress, "dataset": dataset, "files": files,
            "mapping": mapping, "loader": loader, "model": model}


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate as the module docstring says; the exit status (0, or 2 after one ``Error:`` line). Under
    ``torchrun`` every process runs it; rank 0 alone prints and writes."""
    parser = build_parser()
    args, extra = parse_with_overrides(parser, argv)
    try:
        return _run(args, extra)
    finally:
        dist.destroy_distributed()


def _run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    try:
        parts = prepare(args, extra)
    except (UserError, OmegaConfBaseException) as err:
        print(error_line(err), file=sys.stderr)
        return 2
    cfg, weights, dataset, mapping = parts["cfg"], parts["weights"], parts["dataset"], parts["mapping"]
    device, loader, model, progress = parts["device"], parts["loader"], parts["model"], parts["progress"]
    annotations = parts["files"]["val_annotations"]
    if dist.is_main_process():
        print(f"Evaluating {weights.path} ({weights.kind}) on {annotations}: {len(dataset)} images, device {device}"
              + (f", {dist.world_size()} processes" if dist.world_size() > 1 else ""))
    try:
        t0 = time.perf_counter()
        kept: list[list[dict[str, Any]]] = []  # the detections behind the metrics (rank 0)
        val_losses, metrics = evaluate(model, loader, device, mapping=mapping, coco_gt=dataset.coco,
                                       compute_losses=cfg.eval.val_loss, mask_threshold=cfg.eval.mask_threshold,
                                       progress=progress, backend=cfg.eval.backend,
                                       observer=EvalObserver(results=lambda results, _ids: kept.append(results)))
        t2 = time.perf_counter()
        results = kept[0] if kept else []
    except UserError as err:  # an image that cannot be loaded (DataError naming its file and id)
        print(error_line(err), file=sys.stderr)
        return 2
    if not dist.is_main_process():
        return 0

    record = {"val_loss": val_losses or None, "metrics": metrics, "loss_weights": loss_weights_from_config(cfg.loss.weights)}
    scalars = epoch_scalars(record)
    names = class_names_by_key(dataset.mapping.names, dataset.mapping.coco_ids)
    errors = image_errors(dataset.coco, results, dataset.ids)
    n = len(dataset)
    speed = {"images": n, "seconds": t2 - t0, "images_per_s": n / max(t2 - t0, 1e-9)}
    summary = {
        "weights": str(weights.path), "weights_kind": weights.kind, "split": args.split,
        "annotations": str(annotations), "images_dir": str(parts["files"]["val_images"]),
        "scalars": scalars, "val_loss": val_losses, "metrics": {k: v for k, v in metrics.items() if k != CONFUSION_KEY},
        "per_class": per_class_rows(metrics), "to_check_images": len(errors), "speed": speed,
        "world_size": dist.world_size(), "device": str(device),
        "config": {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("data", "model", "eval")},
    }
    print(format_report(scalars, names))
    root = Path(args.output) if args.output else weights.run_dir if weights.run_dir is not None else Path(cfg.runs_dir)
    try:
        out = new_output_dir(root)
        written = write_reports(out, summary, results, metrics, errors, title=f"{weights.path.name} on {args.split}")
        sheet = check_sheet(dataset, errors, results, mapping, args.check_images) if args.check_images else None
        if sheet is not None:
            written.append(save_png(sheet, out / TO_CHECK_SHEET))
    except OSError as err:
        print(f"Error: cannot write to {root}: {err}", file=sys.stderr)
        return 2
    fp = sum(len(e["false_positives"]) for e in errors)
    missed = sum(len(e["missed"]) for e in errors)
    print(f"🔎 To check: {len(errors)} of {n} images with false positives ({fp}), objects of another class "
          f"({sum(len(e['wrong_class']) for e in errors)}) or missed objects ({missed}) at IoU >= {IOU_THRESHOLD:g}, "
          f"score >= {SCORE_THRESHOLD:g}: {display_path(out / TO_CHECK_FILE)}")
    print(f"⏱️ {n} images in {t2 - t0:.1f} s: {speed['images_per_s']:.2f} images/s (val losses, detections and COCOeval)")
    print(f"Wrote {', '.join(p.name for p in written)} to {display_path(out)}")
    return 0


def cli() -> None:
    """Console script ``maskrcnn-eval``: ``main``'s return value is the exit status."""
    sys.exit(main())

