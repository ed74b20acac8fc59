"""A COCO-sized synthetic instance set on disk: COCO's annotation statistics, tiny image files.

What it is for: measuring what the *annotation index* costs (memory of the dataset and of its
loader workers, start-up time), not the model. So the annotation file looks like COCO 2017's train
file where that matters for memory, and the images are as small as possible:

* ``num_train`` images (``num_val`` in a second file), COCO 2017's folder layout
  (``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``), each image record
  with COCO's fields (``license``, ``file_name`` ``000000000001.jpg``, ``coco_url``, ``height``,
  ``width``, ``date_captured``, ``flickr_url``, ``id``);
* 80 categories with COCO's ids and names (1..90 without the 10 ids COCO leaves unused,
  ``UNUSED_COCO_IDS``);
* per image ``max(1, Poisson(mean_instances))`` instances (COCO train2017: 860k / 118k = 7.3), each
  one polygon of ``min_points``..``max_points`` points (uniform), a uniform category, the polygon's
  extent as ``bbox``, its shoelace ``area``, ``iscrowd: 0``; annotation ids from 1 in each file;
  coordinates with two decimals, inside the image, so ``data.validate`` accepts every annotation;
* image files of a few sizes (``IMAGE_SIZES``: 64x48 landscape, 48x64 portrait, square, 3:2, so
  aspect-ratio grouping sees several groups as on COCO), each its own file name: hard links to one
  JPEG template per size (a copy where the file system has no hard links), written by threads.
  ``image_scale=10`` makes them COCO's sizes (640x480, 480x640, 640x640, 640x430) and the polygons
  with them: what the benchmark's ``data`` section decodes (``--loader coco``).

Everything is deterministic from ``SynthParams`` (the seed included). ``ensure_synthetic_coco``
writes the set once under ``<data_dir>/<params key>/`` and re-uses it afterwards.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maskrcnn_coco.data.shapes import ShapesPaths

log = logging.getLogger(__name__)

# Bump when the generated content changes, so cached sets are regenerated.
GENERATOR_VERSION = 1

UNUSED_COCO_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
_COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in UNUSED_COCO_IDS)
# COCO's 80 categories, ids and names as in instances_train2017.json.
COCO_CATEGORIES = [{"id": i, "name": n, "supercategory": "coco"} for i, n in zip(COCO_CATEGORY_IDS, _COCO_NAMES)]

# (width, height, share of the images): COCO's mix of landscape, portrait, square and 3:2, shrunk.
IMAGE_SIZES = ((64, 48, 0.6), (48, 64, 0.25), (64, 64, 0.05), (64, 43, 0.1))
SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SynthParams:
    """What identifies a generated set."""

    num_train: int = 20_000
    num_val: int = 50
    seed: int = 0
    mean_instances: float = 7.3  # per image: max(1, Poisson(mean_instances))
    min_points: int = 20  # polygon points per instance, uniform in [min_points, max_points]
    max_points: int = 60
    image_scale: int = 1  # IMAGE_SIZES times this (10: COCO's image sizes)

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(f"SynthParams: num_train={self.num_train} and num_val={self.num_val} must be >= 1")
        if not 3 <= self.min_points <= self.max_points:
            raise ValueError(f"SynthParams: need 3 <= min_points ({self.min_points}) <= max_points ({self.max_points})")
        if not self.mean_instances > 0:
            raise ValueError(f"SynthParams: mean_instances={self.mean_instances} must be > 0")
        if self.image_scale < 1:
            raise ValueError(f"SynthParams: image_scale={self.image_scale} must be >= 1")

    def key(self) -> str:
        fields = asdict(self)
        if fields["image_scale"] == 1:  # the sets written before the field existed keep their key
            del fields["image_scale"]
        payload = json.dumps({**fields, "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


# A generated set's files (COCO 2017's layout under ``root``): the same five paths as the shapes set's.
SynthPaths = ShapesPaths


def synth_paths(root: str | Path) -> SynthPaths:
    root = Path(root)
    return SynthPaths(
        root=root,
        train_images=root / "train2017",
        val_images=root / "val2017",
        train_annotations=root / "annotations" / "instances_train2017.json",
        val_annotations=root / "annotations" / "instances_val2017.json",
    )


def default_data_dir() -> Path:
    """``$MASKRCNN_COCO_CACHE/coco_synth`` (default ``~/.cache/maskrcnn_coco/coco_synth``)."""
    return Path(os.path.expanduser(os.environ.get("MASKRCNN_COCO_CACHE", "~/.cache/maskrcnn_coco"))) / "coco_synth"


# ------------------------------------------------------------------------------------------ annotations
def _polygons(rng: np.random.Generator, width: int, height: int, points: np.ndarray) -> tuple[list[list[float]], np.ndarray, np.ndarray]:
    """One star-shaped polygon per entry of ``points`` (its point count), inside ``[0, width] x
    [0, height]``, two decimals: (flat ``[x0, y0, x1, y1, ...]`` lists, bboxes ``[x, y, w, h]`` (n, 4),
    shoelace areas (n,)). All polygons of an image at once: per-polygon numpy calls were the generator's main cost."""
    n, total = len(points), int(points.sum())
    short = min(width, height)
    centre = rng.uniform([0.1 * width, 0.1 * height], [0.9 * width, 0.9 * height], size=(n, 2))
    radius = rng.uniform(3.0, 0.45 * short, size=n)
    owner = np.repeat(np.arange(n), points)
    # Sorted angles within each polygon: sort by (owner, angle) in one lexsort.
    angles = rng.uniform(0.0, 2 * math.pi, size=total)
    angles = angles[np.lexsort((angles, owner))]
    r = radius[owner] * rng.uniform(0.6, 1.0, size=total)
    xy = centre[owner] + np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)
    xy = np.round(np.clip(xy, 0.0, [width, height]), 2)

    ends = np.cumsum(points)
    starts = ends - points
    lo, hi = np.minimum.reduceat(xy, starts, axis=0), np.maximum.reduceat(xy, starts, axis=0)
    boxes = np.round(np.concatenate([lo, hi - lo], axis=1), 2)
    following = np.arange(1, total + 1)
    following[ends - 1] = starts  # each polygon's last point closes on its first
    x, y = xy[:, 0], xy[:, 1]
    areas = np.round(0.5 * np.abs(np.add.reduceat(x * y[following] - x[following] * y, starts)), 2)
    flat = xy.ravel().tolist()
    return [flat[2 * s: 2 * e] for s, e in zip(starts.tolist(), ends.tolist())], boxes, areas


def make_annotations(params: SynthParams, split: str = "train") -> dict[str, Any]:
    """The COCO annotation dict of ``split`` (``train``: ``num_train`` images, ``val``: ``num_val``),
    deterministic from ``params``. No file is written."""
    # Millions of new lists and dicts, no cycles: the cyclic GC would only slow this by a third.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _make_annotations(params, split)
    finally:
        if enabled:
            gc.enable()


def _make_annotations(params: SynthParams, split: str) -> dict[str, Any]:
    count = {"train": params.num_train, "val": params.num_val}[split]
    folder = f"{split}2017"
    rng = np.random.default_rng([params.seed, SPLITS[split]])
    sizes = np.array([(w, h) for w, h, _ in IMAGE_SIZES]) * params.image_scale
    shares = np.array([s for _, _, s in IMAGE_SIZES])
    size_of = rng.choice(len(IMAGE_SIZES), size=count, p=shares / shares.sum())
    instances = np.maximum(1, rng.poisson(params.mean_instances, size=count))
    category_ids = np.array(COCO_CATEGORY_IDS)

    images, annotations = [], []
    for index in range(count):
        image_id = index + 1
        width, height = (int(v) for v in sizes[size_of[index]])
        file_name = f"{image_id:012d}.jpg"
        images.append({
            "license": int(rng.integers(1, 9)),
            "file_name": file_name,
            "coco_url": f"http://images.cocodataset.org/{folder}/{file_name}",
            "height": height,
            "width": width,
            "date_captured": f"2013-{1 + index % 12:02d}-{1 + index % 28:02d} {index % 24:02d}:{index % 60:02d}:{(7 * index) % 60:02d}",
            "flickr_url": f"http://farm{1 + index % 9}.staticflickr.com/{1000 + index % 9000}/{image_id:012d}_synthetic_z.jpg",
            "id": image_id,
        })
        n = int(instances[index])
        points = rng.integers(params.min_points, params.max_points + 1, size=n)
        categories = rng.choice(category_ids, size=n)
        polygons, boxes, areas = _polygons(rng, width, height, points)
        for polygon, box, area, category_id in zip(polygons, boxes.tolist(), areas.tolist(), categories.tolist()):
            annotations.append({
                "segmentation": [polygon],
                "area": area,
                "iscrowd": 0,
                "image_id": image_id,
                "bbox": box,
                "category_id": category_id,
                "id": len(annotations) + 1,
            })
    return {
        "info": {"description": f"maskrcnn_coco synthetic COCO ({split}, {count} images)", "version": str(GENERATOR_VERSION),
                 "year": 2017, "contributor": "maskrcnn_coco.benchmark.coco_synth", "date_created": "2017/09/01"},
        "licenses": [{"url": f"http://creativecommons.org/licenses/{i}/2.0/", "id": i, "name": f"License {i}"} for i in range(1, 9)],
        "images": images,
        "annotations": annotations,
        "categories": COCO_CATEGORIES,
    }


# --------------------------------------------------------------------------------------------- images
def template_jpeg(width: int, height: int, seed: int) -> bytes:
    """A small JPEG of ``width`` x ``height`` (a colour gradient with noise), deterministic."""
    rng = np.random.default_rng([seed, width, height])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * xx / width, 255 * yy / height, 128 + 64 * np.sin(xx / 5 + yy / 7)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_images(images: Sequence[dict[str, Any]], folder: str | Path, seed: int = 0, threads: int = 8) -> None:
    """One file per image record (``file_name``, ``width``, ``height``) in ``folder``: a hard link
    to the template JPEG of its size (``folder/../templates/``), or a copy without hard links."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    templates_dir = folder.parent / "templates"
    templates_dir.mkdir(exist_ok=True)
    templates: dict[tuple[int, int], Path] = {}
    for w, h in sorted({(int(im["width"]), int(im["height"])) for im in images}):
        path = templates_dir / f"{w}x{h}-seed{seed}.jpg"
        if not path.is_file():  # never rewritten: the images already linked to it share its inode
            path.write_bytes(template_jpeg(w, h, seed))
        templates[(w, h)] = path

    def one(image: dict[str, Any]) -> None:
        source, target = templates[(int(image["width"]), int(image["height"]))], folder / image["file_name"]
        try:
            os.link(source, target)
        except FileExistsError:
            target.unlink()
            os.link(source, target)
        except OSError:  # no hard links here (some network and FAT file systems)
            shutil.copyfile(source, target)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for _ in pool.map(one, images, chunksize=256):
            pass


# ------------------------------------------------------------------------------------------ the set
def ensure_synthetic_coco(params: SynthParams, data_dir: str | Path | None = None, threads: int = 8) -> SynthPaths:
    """The paths of the set for ``params`` under ``data_dir`` (default ``default_data_dir()``),
    generating it first if it is not there. Written into a scratch folder renamed at the end, so an
    interrupted run never leaves a half-written set that a later one would trust."""
    data_dir = Path(os.path.expanduser(str(data_dir))) if data_dir is not None else default_data_dir()
    final = data_dir / params.key()
    if (final / "params.json").is_file():
        return synth_paths(final)
    tmp = data_dir / f".{params.key()}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    paths = synth_paths(tmp)
    paths.train_annotations.parent.mkdir(parents=True)
    for split, folder, ann_file in (("train", paths.train_images, paths.train_annotations),
                                    ("val", paths.val_images, paths.val_annotations)):
        coco = make_annotations(params, split)
        write_images(coco["images"], folder, seed=params.seed, threads=threads)
        # json.dumps, not json.dump: only the one-shot encoder is the C one (json.dump streams through Python).
        ann_file.write_text(json.dumps(coco, separators=(",", ":")))
        log.info("coco_synth: %s: %d images, %d annotations", split, len(coco["images"]), len(coco["annotations"]))
    (tmp / "params.json").write_text(json.dumps({**asdict(params), "version": GENERATOR_VERSION}, indent=2))
    try:
        tmp.rename(final)
    except OSError:  # another process finished the same set first
        shutil.rmtree(tmp, ignore_errors=True)
    return synth_paths(final)
