"""Per-class evaluation: AP per category from COCOeval, and a confusion matrix of matched detections.

* ``per_class_ap(ev, coco_gt)``: COCOeval's ``eval["precision"]`` (T x R x K x A x M) averaged over
  IoU thresholds and recall for area ``all`` and ``maxDets`` 100, per category, under the metric name
  ``AP_class_<key>`` (so ``epoch_scalars`` makes the tag ``mAP/<bbox|segm>_AP_class_<key>``; the key is
  ``tracking.scalars.class_keys``'s ASCII form of the name). A class with no ground truth in the
  evaluated images is NaN (undefined, not logged).
* ``confusion_matrix(coco_gt, results, image_ids)``: per image, detections (score >=
  ``score_threshold``) taken by decreasing score, each matched to the unmatched ground-truth box of
  any class with the highest IoU >= ``iou_threshold`` (one-to-one, greedy). Rows are ground-truth
  classes plus ``background`` (a detection that matched nothing: a false positive); columns are
  predicted classes plus ``missed`` (a ground-truth object no detection matched). Detections on crowd
  regions are ignored, as COCOeval does. Plain JSON-able data, the classes by their names as written
  (``metric_names`` has their keys).
* ``save_confusion``: the matrix as JSON and PNG; the PNG shows each name as written where an
  installed font has its glyphs, else its key (``utils.fonts``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from maskrcnn_coco.data.validate import usable_ground_truth
from maskrcnn_coco.tracking.scalars import CLASS_AP_PREFIX, class_key, class_keys
from maskrcnn_coco.utils.fonts import plot_fonts, plot_labels

# The key under which ``evaluate`` returns the confusion matrix next to ``bbox``/``segm``.
CONFUSION_KEY = "confusion"
BACKGROUND = "background"
MISSED = "missed"


def class_metric_names(coco_gt: Any) -> dict[int, str]:
    """``{category id: "AP_class_<key>"}``, keys unique in category id order (``class_keys``)."""
    cat_ids = sorted(coco_gt.cats)
    keys = class_keys([coco_gt.cats[c].get("name", c) for c in cat_ids], cat_ids)
    return {cat_id: CLASS_AP_PREFIX + key for cat_id, key in zip(cat_ids, keys)}


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


@dataclass
class ImageMatch:
    """One image's detections matched to its ground truth (``match_images``)."""

    image_id: int
    pairs: list[tuple[Mapping[str, Any], Mapping[str, Any] | None]]  # (detection, matched object or None: a false positive)
    missed: list[Mapping[str, Any]]  # objects no detection matched


def match_images(coco_gt: Any, results: Sequence[Mapping[str, Any]], image_ids: Sequence[int], *,
                 iou_threshold: float = 0.5, score_threshold: float = 0.5) -> Iterator[ImageMatch]:
    """The one matching rule of the confusion matrix and the evaluate command's error list: per image
    (in id order), detections of score >= ``score_threshold`` of a known category, by decreasing score,
    each to the unmatched non-crowd object of any class with the highest box IoU >= ``iou_threshold``
    (one-to-one, greedy). A detection that matches nothing but covers a crowd region by that IoU is
    left out, as COCOeval ignores it. ``coco_gt`` is used as given (callers pass ``usable_ground_truth``)."""
    known = set(coco_gt.cats)
    by_image: dict[int, list[Mapping[str, Any]]] = {}
    for r in results:
        if r.get("score", 1.0) >= score_threshold and r["category_id"] in known:
            by_image.setdefault(int(r["image_id"]), []).append(r)
    for image_id in sorted({int(i) for i in image_ids}):
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if a["category_id"] in known]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        gts = [a for a in anns if not a.get("iscrowd", 0)]
        dets = sorted(by_image.get(image_id, []), key=lambda r: -r["score"])
        ious = (np.asarray(mask_utils.iou([d["bbox"] for d in dets], [g["bbox"] for g in gts], [0] * len(gts)))
                if dets and gts else np.zeros((len(dets), len(gts))))
        on_crowd = (np.asarray(mask_utils.iou([d["bbox"] for d in dets], [c["bbox"] for c in crowd], [1] * len(crowd))).max(axis=1)
                    >= iou_threshold if dets and crowd else np.zeros(len(dets), dtype=bool))
        matched = [False] * len(gts)
        pairs: list[tuple[Mapping[str, Any], Mapping[str, Any] | None]] = []
        for d, det in enumerate(dets):
            best, best_iou = -1, iou_threshold
            for g in range(len(gts)):
                if not matched[g] and ious[d, g] >= best_iou:
                    best, best_iou = g, ious[d, g]
            if best >= 0:
                matched[best] = True
                pairs.append((det, gts[best]))
            elif not on_crowd[d]:
                pairs.append((det, None))
        yield ImageMatch(image_id, pairs, [g for g, hit in zip(gts, matched) if not hit])


def confusion_matrix(
    coco_gt: Any,
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
) -> dict[str, Any]:
    """Ground truth (rows, + ``background``) x predicted class (columns, + ``missed``) of matched boxes
    (``match_images``), scored against the same ground truth as COCOeval (``usable_ground_truth``)."""
    coco_gt = usable_ground_truth(coco_gt)
    cat_ids = sorted(coco_gt.cats)
    names = [str(coco_gt.cats[c].get("name", c)) for c in cat_ids]
    index = {c: i for i, c in enumerate(cat_ids)}
    metric_names = class_metric_names(coco_gt)
    k = len(cat_ids)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    for match in match_images(coco_gt, results, image_ids, iou_threshold=iou_threshold, score_threshold=score_threshold):
        for det, gt in match.pairs:
            row = k if gt is None else index[gt["category_id"]]  # k: background, a false positive
            matrix[row, index[det["category_id"]]] += 1
        for gt in match.missed:
            matrix[index[gt["category_id"]], k] += 1
    return {
        "ground_truth": [*names, BACKGROUND],
        "predicted": [*names, MISSED],
        "category_ids": cat_ids,
        # Each class's AP metric name (``AP_class_<key>``), so readers find its ``mAP/..._AP_class_`` tag.
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
    predicted, ground_truth = _axis_labels(confusion)
    size = max(4.0, 0.5 * n + 2.0)
    with plot_fonts([*predicted, *ground_truth]):  # the fonts must be set while the figure's texts are made
        fig, ax = plt.subplots(figsize=(size, size * 0.9))
        ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        if n <= 30:
            for (i, j), value in np.ndenumerate(matrix):
                if value:
                    ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=8,
                            color="white" if shares[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), predicted, rotation=90 if n > 8 else 45, ha="right" if n <= 8 else "center")
        ax.set_yticks(range(n), ground_truth)
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


def _axis_labels(confusion: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The predicted and ground-truth tick labels: each class's name, or its key where no installed
    font has the name's glyphs (keys from ``metric_names``; ``class_key`` for a matrix without them)."""
    predicted, ground_truth = list(confusion["predicted"]), list(confusion["ground_truth"])
    k = len(ground_truth) - 1  # the classes, then background / missed
    metric_names = list(confusion.get("metric_names") or [])
    keys = ([m.removeprefix(CLASS_AP_PREFIX) for m in metric_names] if len(metric_names) == k
            else [class_key(n) for n in ground_truth[:k]])
    classes = plot_labels(ground_truth[:k], keys)
    return [*classes, *plot_labels(predicted[k:], predicted[k:])], [*classes, *plot_labels(ground_truth[k:], ground_truth[k:])]
