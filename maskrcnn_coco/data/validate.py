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
* **Image decoding and size** (``image_problem``): the slow, complete check (about 2 ms per
  640x480 JPEG per core, page cache warm: COCO train2017 is ~4 core-minutes), done by the dataset
  checker, and at build time only with ``data.on_invalid=drop`` (threads); with ``error`` the same
  check happens when an image is loaded.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
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
    if "segmentation" not in ann:
        return BAD_SEGMENTATION, "no segmentation", None
    seg = ann["segmentation"]
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


def image_problem(path: str | Path, width: int, height: int) -> tuple[str, str] | None:
    """``(kind, problem)`` when the image at ``path`` cannot be used as a ``width`` x ``height`` RGB
    image, else None. Decodes the whole image (the slow, complete check)."""
    try:
        image = load_rgb(path)
    except FileNotFoundError:
        return MISSING_FILE, "file not found"
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib/struct errors...
        return UNDECODABLE, f"cannot be decoded ({describe_error(err)})"
    if image.size != (int(width), int(height)):
        return SIZE_MISMATCH, f"is {image.size[0]}x{image.size[1]} pixels but the annotation file says {int(width)}x{int(height)}"
    return None


def check_images(
    root: str | Path,
    images: Sequence[Mapping[str, Any]],
    *,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "Decoding images",
) -> list[dict[str, Any]]:
    """Decode every image record of ``images`` (threads: PIL releases the GIL while decoding);
    one record (``image_id``, ``file``, ``kind``, ``problem``) per image that cannot be used."""
    root = Path(root)
    workers = workers or min(8, os.cpu_count() or 1)

    def one(img: Mapping[str, Any]) -> dict[str, Any] | None:
        found = image_problem(root / img["file_name"], img["width"], img["height"])
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


# ------------------------------------------------------------------------------------- a split
@dataclass
class SplitCheck:
    """Everything known about one split after ``check_split``.

    ``ids`` are the images the split uses (after ``drop_empty``, ``max_images`` and, with
    ``on_invalid=drop``, without the bad images); ``bad_images`` are the unusable images among
    those selected; ``decoded`` says whether images were decoded (else only existence is known).
    """

    annotations: AnnotationReport
    bad_images: list[dict[str, Any]]
    ids: list[int]
    selected: int
    usable_ann_ids: set[int]
    decoded: bool
    empty_categories: list[tuple[int, str]] = field(default_factory=list)


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
) -> SplitCheck:
    """Validate a split: annotations, image records, files (and decoding when ``decode``).

    With ``apply``, the invalid annotations are removed from ``coco`` and the repairs applied (see
    ``apply_annotation_report``), so its ground truth is what training uses.
    """
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
    ids = sorted(coco.imgs)
    if train and drop_empty:
        ids = [i for i in ids if any(a["id"] in usable for a in coco.imgToAnns.get(i, []))]
    if max_images is not None:
        ids = ids[:max_images]
    selected = set(ids)
    bad_images = [p for p in bad_images if p["image_id"] in selected]
    bad_ids = {p["image_id"] for p in bad_images}
    candidates = [(i, coco.imgs[i]["file_name"]) for i in ids if i not in bad_ids]
    missing = find_missing_files(images_dir, candidates)
    bad_images += [{"image_id": i, "file": n, "kind": MISSING_FILE, "problem": f"not found in {images_dir}"} for i, n in missing]
    bad_ids |= {i for i, _ in missing}
    if decode:
        todo = [coco.imgs[i] for i in ids if i not in bad_ids]
        bad_images += check_images(images_dir, todo, workers=workers, progress=progress, desc=desc)
        bad_ids = {p["image_id"] for p in bad_images}
    if on_invalid == "drop":
        ids = [i for i in ids if i not in bad_ids]
    check = SplitCheck(report, bad_images, ids, len(selected), usable, decode)
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

