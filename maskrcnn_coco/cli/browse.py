"""Command line of the dataset browser (``python scripts/browse_dataset.py --output DIR [hydra overrides]``).

Draws the ground truth (masks, boxes, class names as written, annotation ids) on images as the
training pipeline gives them to the model. The config is composed exactly as training composes it
(``cli.probe.compose_config``) and the split is built by the training code
(``data.coco.build_datasets``), so EXIF orientation, the crowd policy, placeholder categories and
box-only annotations are what training uses. Three views, combinable:

* default: no augmentation (``build_transforms(False, ...)``), the image in its own frame;
* ``--augmented``: through the training augmentation (``data.augment``), each image seeded as the
  training sampler seeds it in epoch ``--epoch`` (``samplers.sample_seed`` under ``SeededSamples``),
  so a run is reproducible and shows what training draws for that image;
* ``--model-input``: resized as the model's ``GeneralizedRCNNTransform`` resizes (``model.min_size``,
  ``model.max_size``; built from the config without weights), drawn un-normalised, before padding.

Annotation ids are exact: the sanitising step of the pipeline (``SanitizeBoundingBoxes``, which may
drop a box an augmentation pushed out of the image) is run on the instances' indices in place of
their labels (``TracedTransforms``), so each drawn instance knows which annotation it came from.

Written: ``<output>/<split>_<image_id>.png`` per image and ``<output>/contact_sheet.png`` (the first
``SHEET_MAX`` of them), drawn by ``utils.draw``. Exit status: 0, or 2 with one ``Error:`` line on bad
input (config, unknown image id, unusable data).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torchvision.transforms import v2
from tqdm import tqdm

from maskrcnn_coco.cli.args import parse_with_overrides
from maskrcnn_coco.cli.check_dataset import check_data_config
from maskrcnn_coco.cli.probe import compose_config
from maskrcnn_coco.config import AugmentConfig, validate_config
from maskrcnn_coco.data.coco import CategoryMapping, build_datasets, build_transforms, resolve_data_paths
from maskrcnn_coco.data.exports import has_mask
from maskrcnn_coco.data.samplers import SeededSamples, sample_seed
from maskrcnn_coco.engine.per_image import choose_subset
from maskrcnn_coco.utils.draw import contact_sheet, draw_instances, enlarged, save_png
from maskrcnn_coco.utils.errors import ConfigError, UserError
from maskrcnn_coco.utils.logs import ensure_console_logging

SHEET_NAME = "contact_sheet.png"
SHEET_MAX = 64  # images on the contact sheet (the first ones): its tiles are held until it is drawn
INDEX_KEY = "instance_index"  # which of the image's usable annotations each output instance is
BOX_ONLY = "(box only)"
EMPTY_MASK = "(empty mask)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Draw the ground truth (masks, boxes, class names, annotation ids) on images as the training "
        "pipeline gives them to the model: one PNG per image and a contact sheet. Extra arguments are Hydra "
        "overrides, as in training (e.g. data=coco data.root=/data/coco). Exit status: 0, or 2 on bad input.",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder for <split>_<image_id>.png and contact_sheet.png")
    p.add_argument("--split", choices=("train", "val"), default="train", help="which split (default train)")
    p.add_argument("--config", default=None, help="a config name in conf/ or a YAML path (default: the training config)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ids", default=None, metavar="ID,ID", help="these image ids (comma-separated, e.g. 12,57)")
    which.add_argument("--random", action="store_true", help="a seeded random sample of --num-images images (see --seed)")
    p.add_argument("--num-images", type=int, default=16, help="how many images without --ids (default 16: the split's first)")
    p.add_argument("--seed", type=int, default=None, help="seed of --random (default: the config's seed)")
    p.add_argument("--augmented", action="store_true",
                   help="through the training augmentation (data.augment), each image seeded as training seeds it in --epoch")
    p.add_argument("--epoch", type=int, default=1, help="with --augmented: the training epoch whose draws are shown (default 1)")
    p.add_argument("--model-input", action="store_true",
                   help="resized as the model resizes its inputs (model.min_size, model.max_size), before normalising and padding")
    p.add_argument("--min-side", type=int, default=256,
                   help="enlarge images whose longer side is below this by an integer factor (nearest neighbour), so "
                   "captions stay legible (default 256; 0: the pipeline's size, pixel for pixel)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_ids(text: str) -> list[int]:
    """``"12,57"`` -> ``[12, 57]`` (duplicates dropped, order kept)."""
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            ids.append(int(part))
        except ValueError:
            raise ConfigError(f"--ids: {part!r} is not an image id (comma-separated integers, e.g. --ids 12,57)") from None
    if not ids:
        raise ConfigError("--ids: no image id given (comma-separated integers, e.g. --ids 12,57)")
    return list(dict.fromkeys(ids))


def select_indices(dataset: Any, args: argparse.Namespace, seed: int, split: str, annotations: Path) -> list[int]:
    """Dataset indices of the images to draw: ``--ids`` (each must be one the split uses), else the
    first ``--num-images``, or with ``--random`` that many drawn from ``seed``."""
    if args.ids is None:
        n = min(args.num_images, len(dataset))
        return choose_subset(len(dataset), n, seed) if args.random else list(range(n))
    position = {image_id: i for i, image_id in enumerate(dataset.ids)}
    for image_id in parse_ids(args.ids):
        if image_id in position:
            continue
        if image_id in dataset.coco.imgs:
            raise ConfigError(f"image id {image_id} is in {annotations} but the {split} split does not use it (no usable "
                              "annotation, an unusable image, or beyond data.max_*_images; check_dataset.py says which)")
        raise ConfigError(f"image id {image_id} is not in the {split} split's annotation file {annotations}")
    return [position[image_id] for image_id in parse_ids(args.ids)]


class TracedTransforms:
    """A ``build_transforms`` pipeline run step by step, that also says which of the image's usable
    annotations each output instance is (``target[INDEX_KEY]``).

    Its sanitising step (``SanitizeBoundingBoxes``: drops boxes an augmentation made empty) filters
    the indices 0..N-1 in place of the labels; the labels are then taken at the kept indices. Its
    decision depends on the boxes alone and the random steps draw once per call, so the image, boxes,
    masks and labels are exactly what the pipeline itself gives under the same seed."""

    def __init__(self, transforms: v2.Compose):
        self.steps: list[Callable[..., Any]] = list(transforms.transforms)

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        kept = None
        for step in self.steps:
            if isinstance(step, v2.SanitizeBoundingBoxes):
                labels = target["labels"]
                image, target = step(image, {**target, "labels": torch.arange(len(labels))})
                kept = target["labels"]
                target = {**target, "labels": labels[kept]}
            else:
                image, target = step(image, target)
        target[INDEX_KEY] = kept if kept is not None else torch.arange(len(target["labels"]))
        return image, target


def usable_annotations(dataset: Any, image_id: int) -> list[dict[str, Any]]:
    """The annotations of ``image_id`` that become targets, in the order of its target's instances
    (``CocoInstances._record`` keeps ``imgToAnns`` order, the usable ones only)."""
    return [a for a in dataset.coco.imgToAnns.get(image_id, []) if a["id"] in dataset.usable_ann_ids]


def model_resize(cfg: DictConfig, num_classes: int) -> Any:
    """The model's ``GeneralizedRCNNTransform`` (eval mode: the resize is deterministic), from a model
    built as training builds it but without weights: nothing downloaded or read."""
    from maskrcnn_coco.modeling.build import build_model  # only for --model-input: torchvision's model code

    bare = copy.deepcopy(cfg)  # the whole config: model.min_size may interpolate data.image_size
    bare.model.weights = None
    bare.model.backbone_weights = None
    transform = build_model(bare.model, num_classes).transform
    return transform.eval()


def instance_notes(annotations: Sequence[dict[str, Any]], masks: torch.Tensor) -> list[str]:
    """Each instance's annotation id, marked ``(box only)`` for an annotation without segmentation and
    ``(empty mask)`` for one whose mask has no pixel left: training skips both in the mask loss."""
    notes = []
    for ann, mask in zip(annotations, masks):
        mark = BOX_ONLY if not has_mask(ann) else EMPTY_MASK if not mask.any() else ""
        notes.append(f"{ann['id']} {mark}".rstrip())
    return notes


def draw_sample(image: torch.Tensor, target: dict[str, Any], annotations: Sequence[dict[str, Any]], names: Sequence[str],
                min_side: int) -> torch.Tensor:
    """``image`` with its target drawn: masks, boxes, class names and ``#<annotation id>`` with its
    mark (``instance_notes``); uint8 ``(3, H, W)``."""
    labels = [int(v) for v in target["labels"].tolist()]
    captions = [names[label - 1] if 0 < label <= len(names) else str(label) for label in labels]
    masks = target["masks"].bool()
    # The marks go with the ids: draw.py colours an instance by its caption, which stays the class name.
    notes = instance_notes(annotations, masks)
    image, boxes, masks = enlarged(image, target["boxes"].float(), masks, min_side)
    return draw_instances(image, boxes, captions, masks, ids=notes)


def sheet_caption(split: str, image_id: int, annotations: Sequence[dict[str, Any]]) -> str:
    """``train 12: 3 objects, 1 box only``."""
    n, box_only = len(annotations), sum(1 for a in annotations if not has_mask(a))
    return f"{split} {image_id}: {n} object{'' if n == 1 else 's'}" + (f", {box_only} box only" if box_only else "")


def describe_view(args: argparse.Namespace, cfg: DictConfig) -> str:
    """What the pictures show, in words."""
    parts = [f"training augmentation of epoch {args.epoch} (seed {cfg.seed})" if args.augmented else "no augmentation"]
    if args.model_input:
        parts.append(f"resized as the model does (model.min_size={cfg.model.min_size}, model.max_size={cfg.model.max_size})")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parse_with_overrides(parser, argv)
    progress = not args.no_progress
    output = Path(args.output)
    try:
        if args.num_images < 1:
            raise ConfigError("--num-images must be at least 1")
        if args.epoch < 1:
            raise ConfigError("--epoch must be at least 1 (training counts epochs from 1)")
        if args.min_side < 0:
            raise ConfigError("--min-side must be >= 0")
        if args.ids is not None:
            parse_ids(args.ids)  # bad syntax fails before the data is read
        if output.exists() and not output.is_dir():
            raise ConfigError(f"--output {output} is a file, not a folder")
        cfg = compose_config(args.config, list(extra))
        check_data_config(cfg)
        validate_config(cfg.data, prefix="data.")
        if args.model_input:
            validate_config(cfg.model, prefix="model.")
        ensure_console_logging()  # the dataset's lines (crowd policy, box-only, EXIF...) as training says them
        paths = resolve_data_paths(cfg.data, progress=progress).as_dict()
        dataset = build_datasets(cfg.data, splits=(args.split,), progress=progress, paths=paths)[args.split]
        mapping: CategoryMapping = dataset.mapping
        indices = select_indices(dataset, args, cfg.seed if args.seed is None else args.seed, args.split,
                                 paths[f"{args.split}_annotations"])
        augment = cfg.data.augment if args.augmented else AugmentConfig()
        samples = SeededSamples(dataset.with_transforms(TracedTransforms(build_transforms(args.augmented, augment, mapping))))
        resize = model_resize(cfg, mapping.num_classes) if args.model_input else None
    except (UserError, OmegaConfBaseException) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2

    print(f"{args.split}: {len(indices)} of {len(dataset)} images, {describe_view(args, cfg)} -> {output}")
    tiles, captions, written = [], [], 0
    try:
        for index in tqdm(indices, desc="Drawing", disable=None if progress else True, dynamic_ncols=True, leave=False):
            key = (index, sample_seed(cfg.seed, args.epoch, index)) if args.augmented else index
            image, target = samples[key]
            image_id = int(target["image_id"])
            if resize is not None:  # the target's tensors are resized with the image (not in place)
                image, resized = resize.resize(image, {k: target[k] for k in ("boxes", "masks")})
                target = {**target, **resized}
            usable = usable_annotations(dataset, image_id)
            annotations = [usable[i] for i in target[INDEX_KEY].tolist()]
            drawn = draw_sample(image, target, annotations, mapping.names, args.min_side)
            save_png(drawn, output / f"{args.split}_{image_id}.png")
            written += 1
            if len(tiles) < SHEET_MAX:
                tiles.append(drawn)
                captions.append(sheet_caption(args.split, image_id, annotations))
        columns = min(8, math.ceil(math.sqrt(len(tiles))))
        save_png(contact_sheet(tiles, captions, columns=columns), output / SHEET_NAME)
    except UserError as err:  # an image that cannot be loaded (DataError naming its file and id)
        print(f"Error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"Error: cannot write to {output}: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {written} images and the contact sheet to {output}")
    return 0


def cli() -> None:
    """Console script ``maskrcnn-browse``: ``main``'s return value is the exit status."""
    sys.exit(main())
