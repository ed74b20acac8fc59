"""The built-in synthetic "shapes" instance-segmentation dataset, written to disk in COCO format.

Images hold several circles, squares and triangles of random colour, size and rotation on a
textured, noisy background. Shapes may overlap: a later shape occludes earlier ones and their masks
lose the covered pixels (placements that would leave an instance less than half visible are redrawn).
The set is generated once per parameter set under ``<cache_dir>/<hash>/`` and then read by the
same COCO loader as real data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from maskrcnn_coco.utils.errors import ConfigError

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
# Bump when the drawing code changes so cached sets are regenerated.
GENERATOR_VERSION = 1
MIN_VISIBLE_FRACTION = 0.5


@dataclass(frozen=True)
class ShapesParams:
    """What identifies a generated set (defaults live in ``config.ShapesDataConfig``)."""

    num_train: int
    num_val: int
    image_size: int
    seed: int
    min_objects: int
    max_objects: int

    def key(self) -> str:
        payload = json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ShapesPaths:
    root: Path
    train_images: Path
    val_images: Path
    train_annotations: Path
    val_annotations: Path


def shapes_paths(root: Path) -> ShapesPaths:
    return ShapesPaths(
        root=root,
        train_images=root / "train",
        val_images=root / "val",
        train_annotations=root / "annotations" / "instances_train.json",
        val_annotations=root / "annotations" / "instances_val.json",
    )


def ensure_shapes_dataset(params: ShapesParams, cache_dir: str | Path, progress: bool = True) -> ShapesPaths:
    """Return the paths of the dataset for ``params``, generating it first if it is not cached."""
    if not 1 <= params.min_objects <= params.max_objects:
        raise ConfigError(
            f"data.min_objects={params.min_objects} and data.max_objects={params.max_objects}: "
            "need 1 <= min_objects <= max_objects"
        )
    if params.image_size < 32:
        raise ConfigError(f"data.image_size={params.image_size} is too small (at least 32 px)")
    cache_dir = Path(os.path.expanduser(str(cache_dir)))
    final = cache_dir / params.key()
    if (final / "params.json").is_file():
        return shapes_paths(final)
    # Write into a scratch folder and rename at the end, so an interrupted run never leaves a
    # half-written dataset that a later run would trust.
    tmp = cache_dir / f".{params.key()}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    paths = shapes_paths(tmp)
    paths.train_annotations.parent.mkdir(parents=True, exist_ok=True)
    for split, count, folder, ann_file in (
        ("train", params.num_train, paths.train_images, paths.train_annotations),
        ("val", params.num_val, paths.val_images, paths.val_annotations),
    ):
        folder.mkdir(parents=True)
        coco = write_split(params, split, count, folder, progress)
        ann_file.write_text(json.dumps(coco))
    (tmp / "params.json").write_text(json.dumps({**asdict(params), "version": GENERATOR_VERSION}, indent=2))
    try:
        tmp.rename(final)
    except OSError:  # another process finished the same set first
        shutil.rmtree(tmp, ignore_errors=True)
    return shapes_paths(final)


def write_split(params: ShapesParams, split: str, count: int, folder: Path, progress: bool) -> dict:
    """Draw ``count`` images into ``folder`` and return their COCO annotation dict."""
    images, annotations = [], []
    split_id = {"train": 0, "val": 1}[split]
    # disable=None: tqdm switches itself off when not writing to a terminal (no \r frames in log files).
    for idx in tqdm(range(count), desc=f"Generating shapes/{split}", disable=None if progress else True, leave=False):
        rng = np.random.default_rng([params.seed, split_id, idx])
        image, instances = draw_image(rng, params)
        file_name = f"{idx:06d}.png"
        Image.fromarray(image).save(folder / file_name)
        image_id = idx + 1
        images.append({"id": image_id, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
        for category_id, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": f"maskrcnn_coco synthetic shapes ({split})", "version": str(GENERATOR_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def draw_image(rng: np.random.Generator, params: ShapesParams) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One RGB uint8 image and its instances as (category_id, visible HxW uint8 mask)."""
    size = params.image_size
    image = _background(rng, size)
    n_objects = int(rng.integers(params.min_objects, params.max_objects + 1))
    masks: list[np.ndarray] = []
    categories: list[int] = []
    for _ in range(n_objects):
        for _attempt in range(20):
            category = int(rng.integers(1, len(CATEGORIES) + 1))
            mask = _shape_mask(rng, category, size)
            area = mask.sum()
            if area < 30:
                continue
            occluded = [m & ~mask for m in masks]
            if all(o.sum() >= MIN_VISIBLE_FRACTION * m.sum() for o, m in zip(occluded, masks)):
                masks = [*occluded, mask]
                categories.append(category)
                colour = _colour_against(rng, image[mask.astype(bool)].mean(axis=0))
                texture = rng.normal(0.0, 8.0, size=(size, size, 1))
                shaded = np.clip(colour[None, None, :] + texture, 0, 255)
                image = np.where(mask[..., None].astype(bool), shaded, image)
                break
    return image.astype(np.uint8), list(zip(categories, masks))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Blotchy low-frequency texture in random colours plus per-pixel noise."""
    coarse = rng.uniform(40, 215, size=(int(rng.integers(3, 9)),) * 2 + (3,)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float64)
    stripes = 12.0 * np.sin(np.arange(size) * rng.uniform(0.2, 0.8) + rng.uniform(0, 2 * math.pi))
    noise = rng.normal(0.0, 12.0, size=(size, size, 3))
    return np.clip(smooth + stripes[None, :, None] + noise, 0, 255)


def _colour_against(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour at least some distance from the background under the shape."""
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - background) > 90:
            return colour
    return 255.0 - background


def _shape_mask(rng: np.random.Generator, category: int, size: int) -> np.ndarray:
    radius = rng.uniform(0.09, 0.22) * size
    cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    name = CATEGORIES[category - 1]["name"]
    if name == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    else:
        sides = 4 if name == "square" else 3
        angle = rng.uniform(0, 2 * math.pi)
        points = [
            (cx + radius * math.cos(angle + 2 * math.pi * k / sides), cy + radius * math.sin(angle + 2 * math.pi * k / sides))
            for k in range(sides)
        ]
        draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=np.uint8)
