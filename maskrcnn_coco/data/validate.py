"""Checks of COCO-format data, and the image loader that turns every PIL mode into RGB.

Used by ``data.coco`` when a dataset is built, by ``evaluation.coco_eval`` for the ground truth it
scores against, and by the dataset checker (``scripts/check_dataset.py``). Everything here returns
records (plain dicts) rather than raising, so that one pass can report every problem.

What is checked, and when:

* **Annotations** (every one, when the dataset is built; 5-10 us each on one core, a fraction of
  what pycocotools takes to load the JSON; no mask is rasterised): the image and category exist,
  the bbox is 4 finite numbers with positive width/height overlapping the image, the segmentation
  decodes (polygons: lists of >= 3 finite points; RLE: ``size`` equal to the image's
  ``[height, width]`` in the annotation file) and roughly agrees with the bbox (IoU of the
  segmentation's extent with the bbox >= ``MIN_MASK_BOX_IOU``, from the polygon coordinates or
  ``pycocotools.mask.toBbox``). Crowd annotations are checked too: COCOeval uses them. Polygon
  parts with fewer than 3 points are removed when the annotation has other, usable parts
  (detectron2 does the same); an annotation left without any is invalid.
* **Image records and files** (when the dataset is built): width/height are positive integers and
  every file the split uses exists (one directory listing per folder, so cheap even for COCO).
* **Image decoding and size** (``check_images`` with ``exif.decode_problem``, in each image's EXIF
  frame; sizes are read from the headers at every build): the slow, complete check (about 2 ms per
  640x480 JPEG per core, page cache warm: COCO train2017 is ~4 core-minutes), done by the dataset
  checker, and at build time only with ``data.on_invalid=drop`` (threads); with ``error`` the same
  check happens when an image is loaded.
* **Masks against their boxes, graded** (``mask_box_agreement``): the IoU of each usable bbox with
  its mask's tight box (~6 us per annotation: at the start of a run) and, in the dataset checker,
  the share of the mask's pixels inside the box; counts and names the annotations below 0.8 and
  0.7 and warns when more than 3 % are below 0.7. Not a rejection: the data is kept as it is.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tqdm import tqdm

ON_INVALID = ("error", "drop")
# Loose on purpose: only a segmentation that lies essentially elsewhere than its box is rejected.
MIN_MASK_BOX_IOU = 0.1

# Kinds of problem (the checker counts per kind).
UNKNOWN_IMAGE = "unknown image_id"
UNKNOWN_CATEGORY = "unknown category"
BAD_BBOX = "bad bbox"
BAD_SEGMENTATION = "bad segmentation"
MASK_BOX_MISMATCH = "mask/box mismatch"
DUPLICATE_ID = "duplicate annotation id"
BAD_IMAGE_RECORD = "bad image record"
MISSING_FILE = "missing file"
UNDECODABLE = "undecodable image"
SIZE_MISMATCH = "image size mismatch"
DEGENERATE_PARTS = "polygon parts < 3 points removed"


# --------------------------------------------------------------------------------- image records
def _integral(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and float(value).is_integer()


def _positive_int(value: Any) -> bool:
    return _integral(value) and value > 0


def image_record_problem(image: Mapping[str, Any]) -> str | None:
    """Why an entry of ``images`` cannot be used (no file name, no positive integer size), or None."""
    name = image.get("file_name")
    if not isinstance(name, str) or not name:
        return f"file_name {name!r} is not a file name"
    if not (_positive_int(image.get("width")) and _positive_int(image.get("height"))):
        return f"width={image.get('width')!r}, height={image.get('height')!r}: not positive integers"
    return None


# ----------------------------------------------------------------------------------- annotations
def _polygons(segmentation: list) -> tuple[str | None, list | None, list[float] | None, int]:
    """(problem, usable parts, extent [x0, y0, x1, y1], parts removed) of a polygon segmentation."""
    if not segmentation:
        return "empty segmentation []", None, None, 0
    kept, first_problem = [], None
    x0 = y0 = math.inf
    x1 = y1 = -math.inf
    for part in segmentation:
        problem = None
        if not isinstance(part, (list, tuple)):
            problem = f"polygon {part!r} is not a list of coordinates"
        elif len(part) < 6:
            problem = f"polygon with {len(part) // 2} point{'s' if len(part) // 2 != 1 else ''} {list(part)} (needs >= 3)"
        elif len(part) % 2:
            problem = f"polygon with an odd number of coordinates ({len(part)})"
        else:
            try:
                total = sum(part)  # C speed; NaN/Inf anywhere makes it non-finite
            except TypeError:
                total = None
            if total is None:
                problem = "polygon coordinates are not all numbers"
            elif not math.isfinite(total):
                problem = "polygon has NaN/Inf coordinates"
        if problem:
            first_problem = first_problem or problem
            continue
        xs, ys = part[0::2], part[1::2]
        bounds = (min(xs), min(ys), max(xs), max(ys))
        x0, y0 = min(x0, bounds[0]), min(y0, bounds[1])
        x1, y1 = max(x1, bounds[2]), max(y1, bounds[3])
        kept.append(part)
    if not kept:
        return first_problem, None, None, len(segmentation)
    return None, kept, [x0, y0, x1, y1], len(segmentation) - len(kept)


def _rle(segmentation: dict, image: Mapping[str, Any]) -> tuple[str | None, list[float] | None]:
    """(problem, extent) of an RLE segmentation on ``image``."""
    size, counts = segmentation.get("size"), segmentation.get("counts")
    height, width = int(image["height"]), int(image["width"])
    if not isinstance(size, (list, tuple)) or [*size] != [height, width]:
        return f"RLE size {size!r} differs from the image's [height, width] [{height}, {width}]", None
    try:
        if isinstance(counts, (list, tuple)):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                return "RLE counts are not non-negative integers", None
            if sum(counts) != height * width:
                return f"RLE counts cover {sum(counts)} pixels, not {height}x{width}", None
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": list(counts)}, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            return f"RLE counts of type {type(counts).__name__} (expected a list or a string)", None
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    except Exception as err:  # noqa: BLE001 - a corrupt compressed string: pycocotools' errors vary
        return f"RLE cannot be decoded ({type(err).__name__}: {err})", None
    return None, [x, y, x + w, y + h]


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def check_annotation(
    ann: Mapping[str, Any], image: Mapping[str, Any] | None, known_ids: Iterable[int], *, record_problem: str | bool | None = True
) -> tuple[str | None, str | None, list | None]:
    """``(kind, problem, repaired)`` for one annotation.

    ``kind``/``problem`` say why it cannot be used (both None if it can); ``repaired`` is its list
    of polygons without the degenerate parts when some had to be removed (else None).
    ``record_problem``: the image record's problem when the caller already knows it (None: none).
    """
    if image is None:
        return UNKNOWN_IMAGE, f"image_id {ann.get('image_id')} is not in the images list", None
    if record_problem is True:
        record_problem = image_record_problem(image)
    if record_problem:
        return BAD_IMAGE_RECORD, f"its image {ann.get('image_id')}: {record_problem}", None
    category = ann.get("category_id")
    if not (type(category) is int or _integral(category)) or int(category) not in known_ids:
        return UNKNOWN_CATEGORY, f"unknown category_id {ann.get('category_id')!r}", None
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return BAD_BBOX, f"bbox {bbox!r} is not [x, y, width, height]", None
    x, y, w, h = bbox
    try:
        finite = math.isfinite(x + y + w + h)  # NaN/Inf anywhere makes the sum non-finite
    except TypeError:  # strings, None, ...
        return BAD_BBOX, f"bbox {list(bbox)!r} is not 4 numbers", None
    if not finite:
        return BAD_BBOX, f"bbox {list(bbox)} has NaN/Inf", None
    if w <= 0 or h <= 0:
        return BAD_BBOX, f"bbox {list(bbox)} has non-positive width/height", None
    if x >= image["width"] or y >= image["height"] or x + w <= 0 or y + h <= 0:
        return BAD_BBOX, f"bbox {list(bbox)} lies outside the {image['width']}x{image['height']} image", None
    seg = ann.get("segmentation")
    if seg is None or (isinstance(seg, list) and not seg):
        return None, None, None  # box-only: trains the box branches (no mask target), scored as bbox
    repaired = None
    if isinstance(seg, list):
        problem, kept, extent, removed = _polygons(seg)
        if removed and kept:
            repaired = kept
    elif isinstance(seg, dict):
        problem, extent = _rle(seg, image)
    else:
        problem, extent = f"segmentation of type {type(seg).__name__} is neither polygons nor RLE", None
    if problem:
        return BAD_SEGMENTATION, problem, None
    iou = _iou(extent, [x, y, x + w, y + h])
    if iou < MIN_MASK_BOX_IOU:
        shown = [round(v, 1) for v in extent]
        return MASK_BOX_MISMATCH, f"segmentation spans {shown} (x0, y0, x1, y1) but bbox is {list(bbox)} (IoU {iou:.2f})", None
    return None, None, repaired


@dataclass
class AnnotationReport:
    """Unusable annotations (skipped) and repaired ones (kept, degenerate polygon parts removed).

    Records: ``annotation_id``, ``image_id``, ``file``, ``kind``, ``problem``, ``iscrowd``; repaired
    ones also carry the new ``segmentation``.
    """

    invalid: list[dict[str, Any]] = field(default_factory=list)
    repaired: list[dict[str, Any]] = field(default_factory=list)
    # Python ids of the invalid annotation dicts: duplicate annotation ids make ids ambiguous.
    invalid_objects: set[int] = field(default_factory=set)


def validate_annotations(coco: Any) -> AnnotationReport:
    """Check every annotation of a pycocotools ``COCO`` (crowd ones included)."""
    known = set(coco.cats)
    imgs = coco.imgs
    record_problems = {i: image_record_problem(img) for i, img in imgs.items()}
    report = AnnotationReport()
    seen: set[Any] = set()
    for ann in coco.dataset.get("annotations", []):
        ann_id = ann.get("id")
        image = imgs.get(ann.get("image_id"))
        if ann_id in seen:
            kind, problem, repaired = DUPLICATE_ID, f"annotation id {ann_id} is used more than once (the first is kept)", None
        else:
            seen.add(ann_id)
            kind, problem, repaired = check_annotation(ann, image, known, record_problem=record_problems.get(ann.get("image_id")))
        if kind is None and repaired is None:
            continue
        record = {
            "annotation_id": ann_id,
            "image_id": ann.get("image_id"),
            "file": image.get("file_name") if image else None,
            "iscrowd": int(bool(ann.get("iscrowd", 0))),
        }
        if kind is not None:
            report.invalid.append({**record, "kind": kind, "problem": problem})
            report.invalid_objects.add(id(ann))
        else:
            removed = len(ann["segmentation"]) - len(repaired)
            report.repaired.append({**record, "kind": DEGENERATE_PARTS, "segmentation": repaired,
                                    "problem": f"{removed} polygon part{'s' if removed > 1 else ''} with < 3 points removed"})
    return report


def apply_annotation_report(coco: Any, report: AnnotationReport) -> None:
    """Remove the invalid annotations from ``coco`` (in place, indexes rebuilt) and apply the repairs.

    ``coco.skipped_annotations`` keeps the invalid records: it marks ``coco`` as checked (see
    ``usable_ground_truth``) and lets later diagnostics name what was skipped.
    """
    if report.repaired:
        fixes = {r["annotation_id"]: r["segmentation"] for r in report.repaired}
        for ann in coco.dataset["annotations"]:
            if ann.get("id") in fixes and id(ann) not in report.invalid_objects:
                ann["segmentation"] = fixes[ann["id"]]
    if report.invalid:
        coco.dataset["annotations"] = [a for a in coco.dataset["annotations"] if id(a) not in report.invalid_objects]
        _reindex(coco)
    coco.skipped_annotations = list(report.invalid)


def _reindex(coco: Any) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()


def usable_ground_truth(coco: Any) -> Any:
    """``coco`` for scoring: as is when already checked (a dataset's ``coco``) or clean, else a copy
    without the annotations that training skips (crowd annotations stay: COCOeval needs them)."""
    if getattr(coco, "skipped_annotations", None) is not None:
        return coco
    cached = getattr(coco, "_usable_ground_truth", None)
    if cached is not None:
        return cached
    report = validate_annotations(coco)
    if not report.invalid and not report.repaired:
        coco.skipped_annotations = []
        return coco
    fixes = {r["annotation_id"]: r["segmentation"] for r in report.repaired}
    anns = [
        {**a, "segmentation": fixes[a["id"]]} if a.get("id") in fixes else a
        for a in coco.dataset["annotations"] if id(a) not in report.invalid_objects
    ]
    clean = COCO()
    clean.dataset = {**coco.dataset, "annotations": anns}
    _reindex(clean)
    clean.skipped_annotations = list(report.invalid)
    coco._usable_ground_truth = clean
    return clean


# ----------------------------------------------------------------------------------- image files
def find_missing_files(root: str | Path, images: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    """``(image_id, file_name)`` of the files absent from ``root``: one listing per folder, then a
    ``stat`` only for names not found in it (case-insensitive file systems, links)."""
    root = Path(root)
    by_folder: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for image_id, name in images:
        by_folder[os.path.dirname(name)].append((image_id, name))
    missing = []
    for folder, entries in by_folder.items():
        try:
            with os.scandir(root / folder) as it:
                present = {e.name for e in it if e.is_file()}
        except OSError:
            present = set()
        missing += [(i, n) for i, n in entries if os.path.basename(n) not in present and not (root / n).is_file()]
    return missing


# -------------------------------------------------------------------------------- image decoding
def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (v / 257: 65535 -> 255, 257 * k -> k)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Own min..max -> 0..255 (NaN -> 0; a constant image -> 0)."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    scaled = np.where(finite, (np.clip(values, lo, hi) - lo) / (hi - lo) * 255.0, 0.0)
    return np.rint(scaled).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> an 8-bit RGB image with the intensities the file means.

    * ``I;16*`` (16-bit grey, e.g. 16-bit PNG): value / 257, so the full 0..65535 range maps to
      0..255 (PIL's own ``convert("RGB")`` clips at 255 and gives a white image).
    * ``I`` (32-bit integer): taken as 16-bit data (value / 257) when within 0..65535, which is what
      16-bit PNG/TIFF files give; otherwise scaled from the image's own min..max.
    * ``F`` (32-bit float): taken as 0..1 intensities (x 255) when within 0..1; otherwise scaled from
      the image's own min..max. NaN becomes 0.
    * ``RGBA``, ``LA``, ``PA``, ``RGBa``: alpha dropped (the stored colours, not composited), as
      PIL's and torchvision's ``convert("RGB")`` do.
    * ``P``: through its palette (with RGBA when the palette has transparency).
    * ``L``, ``1``, ``CMYK``, ``YCbCr``, ``RGBX``, ...: PIL's conversion.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        return _gray_to_rgb(_scale_16bit(np.asarray(image)))
    if mode == "I":
        values = np.asarray(image)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _gray_to_rgb(_scale_16bit(values))
        return _gray_to_rgb(_stretch(values))
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        finite = values[np.isfinite(values)]
        if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1):
            return _gray_to_rgb(np.rint(np.nan_to_num(np.clip(values, 0, 1), nan=0.0) * 255).astype(np.uint8))
        return _gray_to_rgb(_stretch(values))
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"PIL mode {mode!r} cannot be converted to RGB ({err})") from None


def load_rgb(path: str | Path) -> Image.Image:
    """Open, fully decode (PIL loads lazily: a truncated file fails only here) and convert to RGB."""
    with Image.open(path) as image:
        image.load()
        rgb = to_rgb(image)
        if rgb is image:  # still backed by the file, which the `with` closes
            rgb = image.copy()
    return rgb


def describe_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def check_images(
    root: str | Path,
    images: Sequence[Mapping[str, Any]],
    *,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "Decoding images",
    exif: str = "apply",
) -> list[dict[str, Any]]:
    """Decode every image record of ``images`` (threads: PIL releases the GIL while decoding), in the
    frame the ``exif`` policy gives it; one record (``image_id``, ``file``, ``kind``, ``problem``)
    per image that cannot be used."""
    from maskrcnn_coco.data.exif import decode_problem  # it builds on this module

    root = Path(root)
    workers = workers or min(8, os.cpu_count() or 1)

    def one(img: Mapping[str, Any]) -> dict[str, Any] | None:
        found = decode_problem(root / img["file_name"], img["width"], img["height"], exif)
        if found is None:
            return None
        return {"image_id": img["id"], "file": img["file_name"], "kind": found[0], "problem": found[1]}

    out: list[dict[str, Any]] = []
    bar = tqdm(total=len(images), desc=desc, disable=None if progress else True, dynamic_ncols=True, leave=False)  # off outside a terminal
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for record in pool.map(one, images, chunksize=16):
            bar.update()
            if record is not None:
                out.append(record)
    bar.close()
    return out


# ----------------------------------------------------------------------- mask/box agreement
# The graded report of masks and boxes that disagree (issue #20), below the hard MIN_MASK_BOX_IOU
# rejection. Module constants until they move to the config: an annotation is named below each
# level; the warning fires when more than MASK_BOX_WARN_SHARE of the set is below the lower one.
# Healthy data sits at 1.00 on both numbers (the shapes set exactly; COCO's boxes are its polygons'
# tight boxes), so the levels leave room for rounding and careless single boxes alike.
MASK_BOX_LEVELS = (0.8, 0.7)
MASK_BOX_WARN_SHARE = 0.03
# Below a level, a mask whose tight box has the bbox's size (each side within SAME_SIZE of it) but
# leaves the bbox (less than MASK_INSIDE_BOX of it inside) is shifted against its box: an exporter
# or converter that offsets masks. Any other disagreement is a box whose edges miss the mask's
# extent (too large, too small, or drawn carelessly edge by edge). The tight box decides, not the
# pixels: a circle shifted along a diagonal keeps most of its pixels inside the old box.
MASK_INSIDE_BOX = 0.9
SAME_SIZE = 0.8
MASK_BOX_EXAMPLES = 10
MASK_BOX_CAUSE = "masks or boxes shifted or scaled by the exporter or a converter, or boxes drawn carelessly"


@dataclass(frozen=True)
class MaskBoxRecord:
    """One annotation's agreement: ``iou`` of its bbox with its mask's tight box; ``inside``: the share
    of its mask's pixels inside the bbox (None when not measured); ``extent_inside``: the share of
    the mask's tight box inside the bbox (tells a mask off its box from a box too large)."""

    image_id: int
    annotation_id: int
    iou: float
    extent_inside: float
    inside: float | None = None
    size_ratio: float = 1.0  # the smaller of the tight box's width and height ratios to the bbox's (<= 1)

    @property
    def score(self) -> float:
        """The lower of the measured numbers: what is compared with the levels."""
        return self.iou if self.inside is None else min(self.iou, self.inside)

    @property
    def mask_off(self) -> bool:
        """The mask is shifted against a bbox of its size (else: the bbox's edges miss the mask's extent)."""
        return self.extent_inside < MASK_INSIDE_BOX and self.size_ratio >= SAME_SIZE

    def format(self) -> str:
        numbers = f"{self.iou:.2f}" if self.inside is None else f"{self.inside:.2f} / {self.iou:.2f}"
        return f"image {self.image_id} ann {self.annotation_id}: {numbers}"


@dataclass
class MaskBoxAgreement:
    """How well the usable annotations' masks lie on their boxes (``mask_box_agreement``).

    ``below``: level -> count of annotations whose score (``MaskBoxRecord.score``) is below it;
    ``bad_ids``: the annotation ids below the lowest level; ``masks_off`` / ``boxes_loose``: those
    of them whose mask leaves the box / whose box is larger than the mask; ``worst``: the lowest
    scores, worst first. ``pixels``: whether the in-box pixel share was measured (else only the IoU).
    """

    source: str | None
    measured: int
    pixels: bool
    below: dict[float, int]
    bad_ids: tuple[int, ...]
    masks_off: int
    boxes_loose: int
    worst: list[MaskBoxRecord]
    seconds: float = 0.0

    @property
    def bad(self) -> int:
        return self.below[MASK_BOX_LEVELS[-1]]

    @property
    def share_bad(self) -> float:
        return self.bad / self.measured if self.measured else 0.0

    @property
    def warns(self) -> bool:
        return self.share_bad > MASK_BOX_WARN_SHARE

    def _criterion(self) -> str:
        level = MASK_BOX_LEVELS[-1]
        iou = f"a box/mask-box IoU (bbox against the mask's tight box) below {level}"
        return f"less than {level:.0%} of their mask inside their box or {iou}" if self.pixels else iou

    def _numbers(self) -> str:
        return "in-box share / IoU" if self.pixels else "IoU"

    def named(self, level: float = MASK_BOX_LEVELS[-1]) -> list[MaskBoxRecord]:
        """The worst annotations below ``level``, worst first."""
        return [r for r in self.worst if r.score < level]

    def describe(self) -> str:
        """What is seen, with the numbers and the worst ids (no cause): a finding's message."""
        where = f"{self.source}: " if self.source else ""
        worst = "; ".join(r.format() for r in self.named()[:5])
        kinds = (f"{self.masks_off} with the mask shifted against a box of its size, {self.boxes_loose} with box edges "
                 "that miss the mask's extent")
        return (f"{where}masks that do not lie on their boxes: {self.bad} of {self.measured} annotations "
                f"({self.share_bad:.1%}) have {self._criterion()} ({kinds}; worst, {self._numbers()}: {worst})")

    def warning(self) -> str | None:
        """One line with the likely cause when more than ``MASK_BOX_WARN_SHARE`` of the set is below
        the lowest level, else None."""
        if not self.warns:
            return None
        return f"{self.describe()}. Likely cause: {MASK_BOX_CAUSE}; python scripts/check_dataset.py lists the worst annotations"

    def format(self, indent: str = "  ", examples: int = MASK_BOX_EXAMPLES) -> list[str]:
        """The dataset checker's lines: counts per level, then the worst annotations (``warning``
        says what they mean)."""
        counts = ", ".join(f"{n} below {level}" for level, n in self.below.items())
        numbers = "in-box share of the mask and box/mask-box IoU" if self.pixels else "box/mask-box IoU"
        lines = [f"{indent}masks on their boxes ({numbers}, {self.measured} annotations): {counts}"
                 f" (warns above {MASK_BOX_WARN_SHARE:.0%} below {MASK_BOX_LEVELS[-1]})"]
        shown = self.named(MASK_BOX_LEVELS[0])[:examples]
        if shown:
            lines.append(f"{indent}  worst ({self._numbers()}): " + "; ".join(r.format() for r in shown))
        return lines


def segmentation_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """An annotation's segmentation (polygons, an uncompressed or a compressed RLE) as one compressed
    RLE of the ``height`` x ``width`` image, what ``pycocotools.mask`` decodes and measures."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    counts = segmentation["counts"]
    if isinstance(counts, (list, tuple)):
        return mask_utils.frPyObjects({"size": [height, width], "counts": list(counts)}, height, width)
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _share_inside(segmentation: Any, box: Sequence[float], height: int, width: int) -> float | None:
    """Share of the mask's pixels inside ``box`` (x0, y0, x1, y1); None for a mask without pixels."""
    rle = segmentation_rle(segmentation, height, width)
    area = float(mask_utils.area(rle))
    if area <= 0:
        return None
    box_rle = mask_utils.frPyObjects(np.array([[box[0], box[1], box[2] - box[0], box[3] - box[1]]], np.float64), height, width)[0]
    inter = mask_utils.merge([rle, box_rle], intersect=True)
    return float(mask_utils.area(inter)) / area


def _boxes_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise IoU of ``(N, 4)`` boxes ``a`` and ``b`` (x0, y0, x1, y1), and the share of ``a`` inside
    ``b`` (a line or a point: 1 when it touches ``b``, else 0)."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    union = area_a + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
        inside = np.where(area_a > 0, inter / area_a, ((iw >= 0) & (ih >= 0)).astype(np.float64))
    return iou, inside


def _size_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise, the smaller of the width and height ratios of boxes ``a`` and ``b`` (each ratio <= 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = [np.fmin(x, 1 / x) for x in ((a[:, 2] - a[:, 0]) / (b[:, 2] - b[:, 0]), (a[:, 3] - a[:, 1]) / (b[:, 3] - b[:, 1]))]
    return np.nan_to_num(np.fmin(*ratios), nan=0.0)


def _polygon_extents(parts: list[list], owners: list[int], count: int) -> np.ndarray:
    """``(count, 4)`` extents (x0, y0, x1, y1) of the rows owning ``parts`` (NaN for rows owning none),
    in a few numpy calls instead of a min/max per part (most of the cost at COCO scale)."""
    extents = np.full((count, 4), np.nan)
    if not parts:
        return extents
    lengths = np.fromiter((len(p) // 2 for p in parts), np.int64, len(parts))
    xy = np.fromiter(itertools.chain.from_iterable(parts), np.float64).reshape(-1, 2)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    owner = np.asarray(owners)
    firsts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # a row's parts are consecutive
    rows = owner[firsts]
    for column, reduce in ((0, np.minimum), (1, np.minimum), (2, np.maximum), (3, np.maximum)):
        per_part = reduce.reduceat(xy[:, column % 2], starts)
        extents[rows, column] = reduce.reduceat(per_part, firsts)
    return extents


@dataclass
class _AgreementRows:
    """What ``mask_box_agreement`` reads of each annotation, in columns (COCO has 860k of them)."""

    ids: list[tuple[int, int]] = field(default_factory=list)  # (image id, annotation id)
    boxes: list[Sequence[float]] = field(default_factory=list)
    segs: list[Any] = field(default_factory=list)
    rle_extents: dict[int, list[float]] = field(default_factory=dict)
    rles: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # compressed RLEs, boxed in one call
    parts: list[list] = field(default_factory=list)  # every polygon part, rows in order
    owners: list[int] = field(default_factory=list)  # the row of each part

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(N, 4)`` mask extents and boxes, both x0, y0, x1, y1."""
        extents = _polygon_extents(self.parts, self.owners, len(self.ids))
        for row, extent in self.rle_extents.items():
            extents[row] = extent
        if self.rles:
            xywh = mask_utils.toBbox([rle for _, rle in self.rles]).reshape(-1, 4)
            extents[[row for row, _ in self.rles]] = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        xywh = np.asarray(self.boxes, np.float64).reshape(-1, 4)
        return extents, np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _agreement_rows(coco: Any, images: Iterable[int], usable: set[int] | None, *, careful: bool) -> _AgreementRows:
    """The annotations to measure; ``careful``: skip those with values that are not numbers."""
    rows = _AgreementRows()
    for image_id in images:
        image = coco.imgs[image_id]
        for ann in coco.imgToAnns.get(image_id, []):
            if (ann.get("iscrowd", 0) if usable is None else ann["id"] not in usable) or (careful and not _readable(ann)):
                continue
            seg, bbox = ann.get("segmentation"), ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                continue
            row = len(rows.ids)
            if isinstance(seg, list):
                kept = [p for p in seg if isinstance(p, (list, tuple)) and len(p) >= 6 and not len(p) % 2]
                if not kept:
                    continue
                rows.parts += kept
                rows.owners += [row] * len(kept)
                seg = kept
            elif isinstance(seg, dict):
                counts = seg.get("counts")
                if not careful and isinstance(counts, str) and seg.get("size") == [image["height"], image["width"]]:
                    rows.rles.append((row, {"size": seg["size"], "counts": counts.encode("ascii")}))
                else:
                    problem, extent = _rle(seg, image)
                    if problem:
                        continue
                    rows.rle_extents[row] = extent
            else:
                continue
            rows.ids.append((image_id, ann["id"]))
            rows.boxes.append(bbox)
            rows.segs.append(seg)
    return rows


def mask_box_agreement(
    coco: Any,
    image_ids: Iterable[int] | None = None,
    usable_ann_ids: Iterable[int] | None = None,
    *,
    pixels: bool = False,
    source: str | None = None,
    examples: int = MASK_BOX_EXAMPLES,
) -> MaskBoxAgreement:
    """How well the masks of ``coco``'s annotations (on ``image_ids``, among ``usable_ann_ids``;
    None: every image, every non-crowd annotation) lie on their boxes.

    Always: the IoU of each bbox with its mask's tight box (from the polygon coordinates or
    ``pycocotools.mask.toBbox``; no mask decoded; about 5 us per polygon annotation). With
    ``pixels``: also the share of the mask's pixels inside the bbox, which rasterises each mask
    that sticks out of its box by more than half a pixel (about 80 us each; a mask within its
    box has share 1 at no cost), so the dataset checker measures it and the start of a run does
    not. Meant for checked annotations (``validate_annotations``): a segmentation that cannot be
    read is left out, not reported.
    """
    start = time.perf_counter()
    images = sorted(coco.imgs) if image_ids is None else list(image_ids)
    usable = None if usable_ann_ids is None else set(usable_ann_ids)
    rows = _agreement_rows(coco, images, usable, careful=False)
    try:
        extents, box = rows.arrays()
    except Exception:  # noqa: BLE001 - not numbers, a corrupt RLE string: unchecked data (validate_annotations names it)
        rows = _agreement_rows(coco, images, usable, careful=True)
        extents, box = rows.arrays()
    ids, segs = rows.ids, rows.segs
    finite = np.isfinite(extents).all(axis=1) & np.isfinite(box).all(axis=1)
    iou, extent_inside = _boxes_iou(extents, box)
    inside = np.full(len(ids), np.nan)
    if pixels:
        within = (extents[:, :2] >= box[:, :2] - 0.5).all(axis=1) & (extents[:, 2:] <= box[:, 2:] + 0.5).all(axis=1)
        inside[within] = 1.0
        for row in np.flatnonzero(finite & ~within):
            image = coco.imgs[ids[row][0]]
            share = _share_inside(segs[row], box[row], int(image["height"]), int(image["width"]))
            inside[row] = np.nan if share is None else share
    scores = np.where(finite, np.fmin(iou, inside), np.inf)  # fmin: an unmeasured share leaves the IoU

    size_ratio = _size_ratio(extents, box)

    def record(i: int) -> MaskBoxRecord:
        share = None if math.isnan(inside[i]) else float(inside[i])
        return MaskBoxRecord(*ids[i], float(iou[i]), float(extent_inside[i]), share, float(size_ratio[i]))

    bad = scores < MASK_BOX_LEVELS[-1]
    masks_off = int((bad & (extent_inside < MASK_INSIDE_BOX) & (size_ratio >= SAME_SIZE)).sum())  # as MaskBoxRecord.mask_off
    order = np.argsort(scores, kind="stable")[:min(examples, int(finite.sum()))]
    return MaskBoxAgreement(
        source=source, measured=int(finite.sum()), pixels=pixels,
        below={level: int((scores < level).sum()) for level in MASK_BOX_LEVELS},
        bad_ids=tuple(sorted(ids[i][1] for i in np.flatnonzero(bad))), masks_off=masks_off, boxes_loose=int(bad.sum()) - masks_off,
        worst=[record(i) for i in order], seconds=time.perf_counter() - start,
    )


def _readable(ann: Mapping[str, Any]) -> bool:
    """The bbox and every polygon coordinate are numbers (the slow, per-annotation check)."""
    seg, bbox = ann.get("segmentation"), ann.get("bbox")
    numbers = list(bbox) if isinstance(bbox, (list, tuple)) else [None]
    if isinstance(seg, list):
        numbers += [v for p in seg if isinstance(p, (list, tuple)) for v in p]
    return all(isinstance(v, (int, float)) for v in numbers)


# ------------------------------------------------------------------------------------- a split
@dataclass
class SplitCheck:
    """Everything known about one split after ``check_split``.

    ``ids`` are the images the split uses (after ``drop_empty``, ``max_images`` and, with
    ``on_invalid=drop``, without the bad images); ``bad_images`` are the unusable images among
    those selected; ``decoded`` says whether images were decoded (else only existence is known).
    ``negatives``: images (of the file, before ``max_images``) without a usable annotation;
    ``relocated``: images whose ``file_name`` was found by its basename (``exports``); ``frames``:
    the EXIF frame of each image (``exif.FramePlan``).
    """

    annotations: AnnotationReport
    bad_images: list[dict[str, Any]]
    ids: list[int]
    selected: int
    usable_ann_ids: set[int]
    decoded: bool
    empty_categories: list[tuple[int, str]] = field(default_factory=list)
    negatives: int = 0
    relocated: list[dict[str, Any]] = field(default_factory=list)
    frames: Any = None


def check_split(
    coco: Any,
    images_dir: str | Path,
    *,
    train: bool,
    drop_empty: bool,
    max_images: int | None,
    on_invalid: str,
    decode: bool,
    workers: int | None = None,
    progress: bool = False,
    apply: bool = True,
    desc: str = "Decoding images",
    exif: str = "apply",
) -> SplitCheck:
    """Validate a split: annotations, image records (duplicate ids included), files (found by their
    basename when the path as written does not exist), each image's EXIF frame (``exif``: the
    ``data.exif`` policy; sizes checked from the headers), and decoding when ``decode``.

    With ``apply``, the invalid annotations are removed from ``coco`` and the repairs applied (see
    ``apply_annotation_report``), so its ground truth is what training uses.
    """
    # Imported here: both modules build on this one (load_rgb, the record kinds).
    from maskrcnn_coco.data.exif import plan_frames
    from maskrcnn_coco.data.exports import duplicate_image_records, relocate_by_basename

    report = validate_annotations(coco)
    if apply:
        apply_annotation_report(coco, report)
    invalid_objects = report.invalid_objects
    usable = {
        a["id"] for a in coco.dataset["annotations"] if not a.get("iscrowd", 0) and id(a) not in invalid_objects
    }
    bad_images = [
        {"image_id": i, "file": img.get("file_name"), "kind": BAD_IMAGE_RECORD, "problem": problem}
        for i, img in sorted(coco.imgs.items())
        if (problem := image_record_problem(img))
    ]
    bad_images += duplicate_image_records(coco.dataset)
    ids = sorted(coco.imgs)
    annotated = {i for i in ids if any(a["id"] in usable for a in coco.imgToAnns.get(i, []))}
    negatives = len(ids) - len(annotated)
    if train and drop_empty:
        ids = [i for i in ids if i in annotated]
    if max_images is not None:
        ids = ids[:max_images]
    selected = set(ids)
    bad_images = [p for p in bad_images if p["image_id"] in selected]
    bad_ids = {p["image_id"] for p in bad_images}
    candidates = [(i, coco.imgs[i]["file_name"]) for i in ids if i not in bad_ids]
    relocated, missing = relocate_by_basename(images_dir, find_missing_files(images_dir, candidates), coco)
    bad_images += [{"image_id": i, "file": n, "kind": MISSING_FILE, "problem": f"not found in {images_dir}"} for i, n in missing]
    bad_ids |= {i for i, _ in missing}
    frames = plan_frames(images_dir, [coco.imgs[i] for i in ids if i not in bad_ids], exif, workers=workers,
                         progress=progress, desc="Reading image headers")
    bad_images += frames.problems
    bad_ids |= {p["image_id"] for p in frames.problems}
    if decode:
        todo = [coco.imgs[i] for i in ids if i not in bad_ids]
        bad_images += check_images(images_dir, todo, workers=workers, progress=progress, desc=desc, exif=exif)
        bad_ids = {p["image_id"] for p in bad_images}
    if on_invalid == "drop":
        ids = [i for i in ids if i not in bad_ids]
    check = SplitCheck(report, bad_images, ids, len(selected), usable, decode, negatives=negatives, relocated=relocated, frames=frames)
    if train:
        check.empty_categories = categories_without_instances(coco, ids, usable)
    return check


def categories_without_instances(coco: Any, image_ids: Iterable[int], usable_ann_ids: set[int]) -> list[tuple[int, str]]:
    """``(category id, name)`` of the categories with no usable annotation on ``image_ids``."""
    seen = {a["category_id"] for i in image_ids for a in coco.imgToAnns.get(i, []) if a["id"] in usable_ann_ids}
    return [(cid, str(c.get("name", cid))) for cid, c in sorted(coco.cats.items()) if cid not in seen]


def format_record(p: Mapping[str, Any]) -> str:
    """One line naming the annotation (if any), the image, the file and the problem."""
    where = f"image {p.get('image_id')}" + (f" ({p['file']})" if p.get("file") else "")
    if "annotation_id" in p:
        crowd = ", crowd" if p.get("iscrowd") else ""
        where = f"ann {p.get('annotation_id')} ({where}{crowd})"
    return f"{where}: {p['problem']}"


def summarize(records: Sequence[Mapping[str, Any]], examples: int = 3, sep: str = "; ") -> str:
    """``kind: n, kind: n`` counts then the first ``examples`` records."""
    counts = Counter(p["kind"] for p in records)
    by_kind = ", ".join(f"{k}: {n}" for k, n in counts.most_common())
    shown = sep.join(format_record(p) for p in records[:examples])
    return f"({by_kind}), e.g. {shown}"

