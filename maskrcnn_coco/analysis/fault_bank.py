"""The fault bank: faults planted in a copy of a COCO-format set (the built-in shapes) or in the
configuration, to check that the run names the failing part (``scripts/fault_bank.py``,
``tests/test_fault_bank.py``, docs/LOSS_BREAKDOWN.md "The fault bank").

A data fault rewrites the copy's annotation file or images (``plant``); a configuration fault is a
list of Hydra overrides. Every planting is seeded, and takes a ``strength`` so that tests can plant a
fault at other strengths than the ones the rules were measured with.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_coco.data.shapes import ShapesPaths, shapes_paths


def _rle_decode(segmentation: Mapping[str, Any]) -> np.ndarray:
    rle = dict(segmentation)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle)


def _rle_encode(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def shift_masks(coco: dict[str, Any], strength: float, rng: np.random.Generator) -> None:
    """Masks moved off their objects by ``strength`` x the object's size (boxes untouched): an
    exporter or a converter that offsets masks."""
    for ann in coco["annotations"]:
        mask = _rle_decode(ann["segmentation"])
        _, _, w, h = ann["bbox"]
        angle = rng.uniform(0, 2 * np.pi)
        dx, dy = round(strength * w * np.cos(angle)), round(strength * h * np.sin(angle))
        moved = np.zeros_like(mask)
        hh, ww = mask.shape
        src = mask[max(0, -dy):hh - max(0, dy), max(0, -dx):ww - max(0, dx)]
        moved[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
        if moved.any():
            ann["segmentation"] = _rle_encode(moved)
            ann["area"] = float(moved.sum())


def jitter_boxes(coco: dict[str, Any], strength: float, rng: np.random.Generator) -> None:
    """Each box edge moved by up to ``strength`` x the box size (masks untouched): careless boxes."""
    sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        x0, x1 = x + rng.uniform(-strength, strength) * w, x + w + rng.uniform(-strength, strength) * w
        y0, y1 = y + rng.uniform(-strength, strength) * h, y + h + rng.uniform(-strength, strength) * h
        x0, x1 = sorted((float(np.clip(x0, 0, width - 1)), float(np.clip(x1, 1, width))))
        y0, y1 = sorted((float(np.clip(y0, 0, height - 1)), float(np.clip(y1, 1, height))))
        ann["bbox"] = [x0, y0, max(x1 - x0, 1.0), max(y1 - y0, 1.0)]


def relabel(coco: dict[str, Any], strength: float, rng: np.random.Generator) -> None:
    """A share ``strength`` of the annotations given another category at random: careless labelling."""
    ids = [c["id"] for c in coco["categories"]]
    for ann in coco["annotations"]:
        if rng.random() < strength:
            ann["category_id"] = int(rng.choice([i for i in ids if i != ann["category_id"]]))


def make_rare(coco: dict[str, Any], strength: float, rng: np.random.Generator, category_id: int = 3) -> None:
    """Keep the images without ``category_id`` and just enough with it that the class holds a share
    ``strength`` of the instances (no unlabelled object is left in a kept image)."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    without = [i for i, anns in by_image.items() if all(a["category_id"] != category_id for a in anns)]
    with_cat = [i for i, anns in by_image.items() if any(a["category_id"] == category_id for a in anns)]
    rng.shuffle(with_cat)
    kept = set(without)
    total = sum(len(by_image[i]) for i in kept)
    rare = 0
    for i in with_cat:
        n = sum(a["category_id"] == category_id for a in by_image[i])
        if (rare + n) / (total + len(by_image[i])) > strength:
            continue
        kept.add(i)
        rare += n
        total += len(by_image[i])
    coco["images"] = [img for img in coco["images"] if img["id"] in kept]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]


def darken_images(folder: Path, coco: Mapping[str, Any], strength: float) -> None:
    """Every image's pixel values multiplied by ``strength`` (< 1: darker): a validation set taken
    under other light or exported with another colour pipeline."""
    for img in coco["images"]:
        path = folder / img["file_name"]
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) * strength
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


@dataclass(frozen=True)
class Fault:
    """One kind of planted fault: ``split`` and ``plant`` for a data fault (``plant(coco, strength, rng)``
    rewrites the annotation dict; ``images`` darkens that split's images), ``overrides`` for a
    configuration fault (``{strength}`` is formatted in)."""

    kind: str
    strength: float
    split: str = "train"
    plant: Callable[..., None] | None = None
    images: bool = False
    overrides: tuple[str, ...] = ()
    description: str = ""
    expect: Mapping[str, Any] = field(default_factory=dict)


def plant(source: ShapesPaths, target: str | Path, fault: Fault, seed: int = 0) -> ShapesPaths:
    """A copy of ``source`` under ``target`` with ``fault`` planted (the other split untouched)."""
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source.root, target)
    paths = shapes_paths(target)
    if fault.plant is None and not fault.images:
        return paths
    ann_file = paths.train_annotations if fault.split == "train" else paths.val_annotations
    coco = json.loads(ann_file.read_text())
    rng = np.random.default_rng(seed)
    if fault.plant is not None:
        fault.plant(coco, fault.strength, rng)
        ann_file.write_text(json.dumps(coco))
    if fault.images:
        darken_images(paths.train_images if fault.split == "train" else paths.val_images, coco, fault.strength)
    return paths


def data_overrides(paths: ShapesPaths, size: int = 128) -> list[str]:
    """Hydra overrides that train on a planted copy (images of ``size`` px) as COCO-format data."""
    return ["data=coco", f"data.root={paths.root}", f"data.train_images={paths.train_images}",
            f"data.val_images={paths.val_images}", f"data.train_annotations={paths.train_annotations}",
            f"data.val_annotations={paths.val_annotations}", "data.batch_size=4", "data.num_workers=0",
            "data.augment.hflip_prob=0.5",
            # The small preset sizes its input from data.image_size, which COCO-format data has not.
            f"model.min_size={size}", f"model.max_size={size}"]
