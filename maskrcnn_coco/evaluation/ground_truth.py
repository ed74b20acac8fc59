"""The ground truth handed to COCOeval: the project's own, not the annotation file's quirks.

COCOeval (pycocotools, and faster-coco-eval which copies its algorithm) relies on conventions that
real exports break without a word:

* **Annotation id 0.** A match is stored as the ground truth's id and "unmatched" is the value 0, so
  a detection matched to the annotation with id 0 counts as a false positive and that annotation as
  missed. labelme, Label Studio and Roboflow number annotations from 0: perfect predictions then
  score AP 0.44-0.95. Duplicate ids (merged exports) collide in the same way, in ``COCO.anns``.
* **``area`` and ``iscrowd``.** ``evaluateImg`` reads ``g["area"]`` (KeyError after a whole epoch
  when an export leaves it out) and ``iscrowd``.
* **Box-only annotations** (no ``segmentation``) cannot be segm ground truth: ``annToRLE`` fails.

``scoring_ground_truth`` therefore gives, per IoU type, a ground truth in which annotation ids are
1..N (file order) when the file's are not positive and unique, ``area`` is the mask's pixel area
(COCO's definition; the box's for box-only annotations) when missing, ``iscrowd`` is 0 when missing,
and, for ``segm``, box-only annotations are crowd regions (their box as the region): a predicted
mask on such an object is neither a true nor a false positive, since its mask is unknown. When no
annotation has a mask, there is no segm ground truth (``None``): the run reports bbox only. The file's
own ids stay in ``orig_id`` so findings can name them. Only files that need it are copied (shallow
copies of the annotation dicts); COCO's own files pass through untouched.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Any

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskrcnn_coco.data.exports import has_mask
from maskrcnn_coco.data.validate import segmentation_rle, usable_ground_truth

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")


def _area(ann: dict[str, Any], image: dict[str, Any]) -> float:
    if has_mask(ann):
        return float(mask_utils.area(segmentation_rle(ann["segmentation"], int(image["height"]), int(image["width"]))))
    return float(ann["bbox"][2]) * float(ann["bbox"][3])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _needs_new_ids(anns: list[dict[str, Any]]) -> bool:
    ids = [a.get("id") for a in anns]
    return any(not isinstance(i, int) or isinstance(i, bool) or i <= 0 for i in ids) or len(set(ids)) != len(ids)


def _index(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    coco.skipped_annotations = []  # already checked: usable_ground_truth passes it through
    return coco


def scoring_ground_truth(coco_gt: Any) -> dict[str, COCO | None]:
    """``{"bbox": COCO, "segm": COCO | None}``: what COCOeval scores against (module doc), built once
    per ``coco_gt`` (cached on it). ``coco_gt`` without the annotations training skips comes first
    (``usable_ground_truth``)."""
    coco = usable_ground_truth(coco_gt)
    cached = getattr(coco, "_scoring_ground_truth", None)
    if cached is not None:
        return cached
    anns = coco.dataset.get("annotations", [])
    renumber = _needs_new_ids(anns)
    no_area = sum(1 for a in anns if not _number(a.get("area")))
    no_crowd = sum(1 for a in anns if a.get("iscrowd") is None)
    masked = sum(1 for a in anns if has_mask(a))
    box_only = len(anns) - masked
    if not (renumber or no_area or no_crowd):
        bbox = coco
    else:
        fixed = []
        for k, a in enumerate(anns, 1):
            b = dict(a)
            if renumber:
                b["orig_id"], b["id"] = a.get("id"), k
            if b.get("iscrowd") is None:
                b["iscrowd"] = 0
            if not _number(b.get("area")):
                b["area"] = _area(b, coco.imgs[b["image_id"]])
            fixed.append(b)
        bbox = _index({**coco.dataset, "annotations": fixed})
        said = [f"annotation ids renumbered 1..{len(anns)} (the file's are not all positive and unique: COCOeval "
                f"treats id 0 as unmatched)"] if renumber else []
        said += [f"{no_area} missing areas computed"] if no_area else []
        said += [f"{no_crowd} missing iscrowd set to 0"] if no_crowd else []
        log.info("Evaluation ground truth: %s; the file's ids are kept as orig_id.", "; ".join(said))
    if not masked:
        segm = None
    elif not box_only:
        segm = bbox
    else:
        # Box-only objects as crowd regions in segm: a mask predicted on them is ignored, not scored.
        regions = []
        for a in bbox.dataset["annotations"]:
            if has_mask(a):
                regions.append(a)
                continue
            x, y, w, h = a["bbox"]
            regions.append({**a, "iscrowd": 1, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        segm = _index({**bbox.dataset, "annotations": regions})
    out = {"bbox": bbox, "segm": segm}
    coco._scoring_ground_truth = out
    return out
