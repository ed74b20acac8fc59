"""Per-class evaluation: AP per category from COCOeval, and a confusion matrix of matched detections.

* ``per_class_ap(ev, coco_gt)``: COCOeval's ``eval["precision"]`` (T x R x K x A x M) averaged over
  IoU thresholds and recall for area ``all`` and ``maxDets`` 100, per category, under the metric name
  ``AP_class_<name>`` (so ``epoch_scalars`` makes the tag ``mAP/<bbox|segm>_AP_class_<name>``). A class
  with no ground truth in the evaluated images is NaN (undefined, not logged).
* ``confusion_matrix(coco_gt, results, image_ids)``: per image, detections (score >=
  ``score_threshold``) taken by decreasing score, each matched to the unmatched ground-truth box of
  any class with the highest IoU >= ``iou_threshold`` (one-to-one, greedy). Rows are ground-truth
  classes plus ``background`` (a detection that matched nothing: a false positive); columns are
  predicted classes plus ``missed`` (a ground-truth object no detection matched). Detections on crowd
  regions are ignored, as COCOeval does. Plain JSON-able data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from maskrcnn_coco.data.validate import usable_ground_truth

CLASS_AP_PREFIX = "AP_class_"
# The key under which ``evaluate`` returns the confusion matrix next to ``bbox``/``segm``.
CONFUSION_KEY = "confusion"
BACKGROUND = "background"
MISSED = "missed"


def sanitize(name: str) -> str:
    """A category name as a tag fragment: runs of characters other than letters, digits, ``_``, ``-``
    and ``.`` become ``_`` (``traffic light`` -> ``traffic_light``)."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", str(name)).strip("_") or "unnamed"


def class_metric_names(coco_gt: Any) -> dict[int, str]:
    """``{category id: "AP_class_<sanitized name>"}``; a name shared after sanitizing gets its id appended."""
    names: dict[int, str] = {}
    taken: set[str] = set()
    for cat_id in sorted(coco_gt.cats):
        base = sanitize(coco_gt.cats[cat_id].get("name", cat_id))
        name = base if base not in taken else f"{base}_{cat_id}"
        taken.add(name)
        names[cat_id] = CLASS_AP_PREFIX + name
    return names


def per_class_ap(ev: Any, coco_gt: Any) -> dict[str, float]:
    """AP per category from an accumulated ``COCOeval`` (NaN where COCO leaves it undefined)."""
    names = class_metric_names(coco_gt)
    precision = np.asarray(ev.eval["precision"])  # T x R x K x A x M
    area = list(ev.params.areaRngLbl).index("all")
    max_dets = list(ev.params.maxDets).index(max(ev.params.maxDets))
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, area, max_dets]
        valid = p[p > -1]
        out[names[cat_id]] = float(valid.mean()) if valid.size else float("nan")
    return out


def classes_with_ground_truth(coco_gt: Any, image_ids: Sequence[int]) -> set[int]:
    wanted = {int(i) for i in image_ids}
    return {a["category_id"] for a in coco_gt.anns.values() if a["image_id"] in wanted and not a.get("iscrowd", 0)}


def confusion_matrix(
    coco_gt: Any,
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
) -> dict[str, Any]:
    """Ground truth (rows, + ``background``) x predicted class (columns, + ``missed``) of matched boxes,
    scored against the same ground truth as COCOeval (``usable_ground_truth``)."""
    coco_gt = usable_ground_truth(coco_gt)
    cat_ids = sorted(coco_gt.cats)
    names = [str(coco_gt.cats[c].get("name", c)) for c in cat_ids]
    index = {c: i for i, c in enumerate(cat_ids)}
    metric_names = class_metric_names(coco_gt)
    k = len(cat_ids)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    by_image: dict[int, list[Mapping[str, Any]]] = {}
    for r in results:
        if r.get("score", 1.0) >= score_threshold and r["category_id"] in index:
            by_image.setdefault(int(r["image_id"]), []).append(r)
    for image_id in sorted({int(i) for i in image_ids}):
        gts = [a for a in coco_gt.imgToAnns.get(image_id, []) if a["category_id"] in index]
        crowd = [a for a in gts if a.get("iscrowd", 0)]
        gts = [a for a in gts if not a.get("iscrowd", 0)]
        dets = sorted(by_image.get(image_id, []), key=lambda r: -r["score"])
        matched = [False] * len(gts)
        if dets and gts:
            ious = np.asarray(mask_utils.iou([d["bbox"] for d in dets], [g["bbox"] for g in gts], [0] * len(gts)))
        else:
            ious = np.zeros((len(dets), len(gts)))
        crowd_iou = (np.asarray(mask_utils.iou([d["bbox"] for d in dets], [c["bbox"] for c in crowd], [1] * len(crowd)))
                     if dets and crowd else np.zeros((len(dets), 0)))
        for d, det in enumerate(dets):
            best, best_iou = -1, iou_threshold
            for g in range(len(gts)):
                if not matched[g] and ious[d, g] >= best_iou:
                    best, best_iou = g, ious[d, g]
            if best >= 0:
                matched[best] = True
                matrix[index[gts[best]["category_id"]], index[det["category_id"]]] += 1
            elif not (crowd_iou.shape[1] and crowd_iou[d].max() >= iou_threshold):
                matrix[k, index[det["category_id"]]] += 1  # a false positive
        for g, gt in enumerate(gts):
            if not matched[g]:
                matrix[index[gt["category_id"]], k] += 1  # missed
    return {
        "ground_truth": [*names, BACKGROUND],
        "predicted": [*names, MISSED],
        "category_ids": cat_ids,
        # Each class's AP metric name (``AP_class_<name>``), so readers find its ``mAP/..._AP_class_`` tag.
        "metric_names": [metric_names[c] for c in cat_ids],
        "matrix": matrix.tolist(),
        # No bare number at this level: ``epoch_scalars`` turns numbers under ``metrics`` into tags.
        "params": {"iou_threshold": iou_threshold, "score_threshold": score_threshold},
    }


def save_confusion(confusion: Mapping[str, Any], stem: str | Path, title: str | None = None) -> list[Path]:
    """``<stem>.json`` and ``<stem>.png`` (counts, rows normalised for the colour); returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(dict(confusion), indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion["matrix"], dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(matrix)
    size = max(4.0, 0.5 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    if n <= 30:
        for (i, j), value in np.ndenumerate(matrix):
            if value:
                ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), confusion["predicted"], rotation=90 if n > 8 else 45, ha="right" if n <= 8 else "center")
    ax.set_yticks(range(n), confusion["ground_truth"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    params = confusion.get("params") or {}
    iou, score = params.get("iou_threshold"), params.get("score_threshold")
    sub = f"IoU >= {iou:g}, score >= {score:g}" if iou is not None and score is not None else ""
    ax.set_title(f"{title}\n{sub}" if title else sub, fontsize=10)
    fig.tight_layout()
    png_path = stem.with_suffix(".png")
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return [json_path, png_path]

