"""COCO evaluation: model detections to COCO results, and pycocotools' COCOeval metrics.

Two departures from calling COCOeval naively, both as detectron2 does:

* The ground truth scored against is what training uses: annotations the data pipeline skips as
  invalid (NaN boxes, undecodable segmentations, ...) are not scored either (crowd annotations stay:
  COCOeval uses them to ignore detections). A dataset's ``coco`` is already cleaned when it is built;
  any other ``COCO`` is checked here and a cleaned copy used.
* ``segm`` results reach ``loadRes`` without their ``bbox``, so pycocotools computes each detection's
  area from its mask, not its box, and APs/APm/APl sort masks by mask area like the ground truth.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.data.validate import usable_ground_truth
from maskrcnn_coco.evaluation.per_class import class_metric_names, classes_with_ground_truth, per_class_ap
from maskrcnn_coco.tracking.scalars import METRIC_NAMES

log = logging.getLogger(__name__)


def predictions_to_coco(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    mapping: CategoryMapping,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Model detections -> COCO result dicts (xywh boxes, COCO category ids, RLE masks)."""
    results: list[dict[str, Any]] = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        rles = None
        if "masks" in out:
            masks = out["masks"].detach()
            masks = (masks[:, 0] if masks.dim() == 4 else masks) > mask_threshold
            arr = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
            rles = mask_utils.encode(arr)
        for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            res = {"image_id": int(image_id), "category_id": mapping.to_coco_id(label), "bbox": box, "score": score}
            if rles is not None:
                rle = rles[i]
                res["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            results.append(res)
    return results


def coco_metrics(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], image_ids: Sequence[int], iou_types: Sequence[str] = ("bbox", "segm"), verbose: bool = False
) -> dict[str, dict[str, float]]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl per IoU type over ``image_ids``, and the AP of each
    category as ``AP_class_<name>`` (``evaluation.per_class``; tags ``mAP/segm_AP_class_<name>``).

    Values COCO leaves undefined (-1, e.g. APl when no object is large, or a class with no ground
    truth in ``image_ids``) are returned as NaN. The ground truth is ``coco_gt`` without the
    annotations training skips (``usable_ground_truth``).
    """
    coco_gt = usable_ground_truth(coco_gt)
    metrics: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        usable = results_for_loadres(coco_gt, results, iou_type)
        if not usable:
            present = classes_with_ground_truth(coco_gt, image_ids)
            per_class = {name: 0.0 if cat in present else float("nan") for cat, name in class_metric_names(coco_gt).items()}
            metrics[iou_type] = {**dict.fromkeys(METRIC_NAMES, 0.0), **per_class}
            continue
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            coco_dt = coco_gt.loadRes(usable)
            ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            ev.params.imgIds = sorted({int(i) for i in image_ids})
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if verbose:
            log.info("COCOeval %s:\n%s", iou_type, sink.getvalue())
        metrics[iou_type] = {
            name: (float(v) if v >= 0 else float("nan")) for name, v in zip(METRIC_NAMES, ev.stats[:6])
        }
        metrics[iou_type].update(per_class_ap(ev, coco_gt))
    return metrics


def results_for_loadres(coco_gt: COCO, results: Sequence[Mapping[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Copies of ``results`` for ``coco_gt.loadRes`` and ``iou_type``.

    For ``segm`` the ``bbox`` is dropped (loadRes would otherwise take the detection's area from
    its box) and polygon or uncompressed-RLE segmentations are encoded as the compressed RLE that
    loadRes needs, on the image's size from ``coco_gt``.
    """
    if iou_type != "segm":
        return [dict(r) for r in results]
    out = []
    for r in results:
        if "segmentation" not in r:
            continue
        res = {k: v for k, v in r.items() if k != "bbox"}
        seg = res["segmentation"]
        if isinstance(seg, list) or (isinstance(seg, dict) and isinstance(seg.get("counts"), list)):
            image = coco_gt.imgs[r["image_id"]]
            rles = mask_utils.frPyObjects(seg, image["height"], image["width"])
            res["segmentation"] = mask_utils.merge(rles) if isinstance(rles, list) else rles
        out.append(res)
    return out
