"""COCO evaluation: model detections to COCO results, and pycocotools' COCOeval metrics.

Two departures from calling COCOeval naively, both as detectron2 does:

* The ground truth scored against is what training uses: annotations the data pipeline skips as
  invalid (NaN boxes, undecodable segmentations, ...) are not scored either (crowd annotations stay:
  COCOeval uses them to ignore detections). A dataset's ``coco`` is already cleaned when it is built;
  any other ``COCO`` is checked here and a cleaned copy used.
* ``segm`` results reach ``loadRes`` without their ``bbox``, so pycocotools computes each detection's
  area from its mask, not its box, and APs/APm/APl sort masks by mask area like the ground truth.

COCOeval comes from pycocotools or from ``faster-coco-eval`` (the same algorithm with its matching
and accumulation in C++; the same stats, about 3x faster): ``backend`` is one of ``BACKENDS``,
``auto`` taking faster-coco-eval when it is installed.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_coco.config import EVAL_BACKENDS
from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.data.validate import usable_ground_truth
from maskrcnn_coco.evaluation.ground_truth import scoring_ground_truth
from maskrcnn_coco.evaluation.per_class import class_metric_names, classes_with_ground_truth, per_class_ap
from maskrcnn_coco.tracking.scalars import METRIC_NAMES

log = logging.getLogger(__name__)

BACKENDS = EVAL_BACKENDS  # the choices of eval.backend


def resolve_backend(backend: str = "auto") -> str:
    """``pycocotools`` or ``faster_coco_eval``: ``auto`` is faster-coco-eval when it is importable."""
    if backend not in BACKENDS:
        raise ValueError(f"COCOeval backend {backend!r}: use one of {', '.join(BACKENDS)} (eval.backend)")
    if backend == "pycocotools":
        return backend
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        if backend == "faster_coco_eval":
            raise ImportError("eval.backend=faster_coco_eval needs the faster-coco-eval package: pip install faster-coco-eval") from None
        return "pycocotools"
    return "faster_coco_eval"


def predictions_to_coco(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    mapping: CategoryMapping,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Model detections -> COCO result dicts (xywh boxes, COCO category ids, RLE masks).

    One device-to-host copy per batch for the boxes, scores and labels, and one for the masks
    (thresholded on the device, so one byte per pixel travels).
    """
    outputs = list(outputs)
    if not outputs:
        return []
    counts = [len(out["boxes"]) for out in outputs]
    rows = torch.cat([
        torch.cat([out["boxes"].detach().float().reshape(-1, 4), out["scores"].detach().float().reshape(-1, 1),
                   out["labels"].detach().float().reshape(-1, 1)], dim=1)
        for out in outputs
    ]).cpu().numpy()  # (sum of counts) x 6; labels are exact as float32 below 2**24
    masks = _masks_on_host(outputs, mask_threshold)
    results: list[dict[str, Any]] = []
    offset = 0
    for i, (image_id, n) in enumerate(zip(image_ids, counts)):
        block, offset = rows[offset:offset + n], offset + n
        if n == 0:
            continue
        xywh = np.concatenate([block[:, :2], block[:, 2:4] - block[:, :2]], axis=1).tolist()
        scores = block[:, 4].tolist()
        labels = block[:, 5].astype(np.int64).tolist()
        rles = mask_utils.encode(masks[i]) if masks is not None else None
        for j, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            res = {"image_id": int(image_id), "category_id": mapping.to_coco_id(label), "bbox": box, "score": score}
            if rles is not None:
                rle = rles[j]
                res["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            results.append(res)
    return results


def _masks_on_host(outputs: Sequence[Mapping[str, torch.Tensor]], threshold: float) -> list[np.ndarray] | None:
    """Per image an ``H x W x N`` Fortran-ordered uint8 array (what ``mask_utils.encode`` takes) of
    the binarised masks, from one copy of the whole batch; None when the outputs have no masks."""
    if not all("masks" in out for out in outputs):
        return None
    flat, shapes = [], []
    for out in outputs:
        m = out["masks"].detach()
        m = (m[:, 0] if m.dim() == 4 else m) > threshold  # N x H x W
        # N x W x H in C order is H x W x N in Fortran order: transpose on the device, view on the host.
        flat.append(m.transpose(1, 2).reshape(-1))
        shapes.append((m.shape[0], m.shape[2], m.shape[1]))
    data = torch.cat(flat).cpu().numpy().view(np.uint8)
    arrays, offset = [], 0
    for n, w, h in shapes:
        size = n * w * h
        arrays.append(data[offset:offset + size].reshape(n, w, h).transpose(2, 1, 0))
        offset += size
    return arrays


def coco_metrics(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], image_ids: Sequence[int], iou_types: Sequence[str] = ("bbox", "segm"),
    verbose: bool = False, backend: str = "auto",
) -> dict[str, dict[str, float]]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl per IoU type over ``image_ids``, and the AP of each
    category as ``AP_class_<name>`` (``evaluation.per_class``; tags ``mAP/segm_AP_class_<name>``).

    Values COCO leaves undefined (-1, e.g. APl when no object is large, or a class with no ground
    truth in ``image_ids``) are returned as NaN. The ground truth is ``coco_gt`` without the
    annotations training skips (``usable_ground_truth``), normalised for COCOeval
    (``evaluation.ground_truth``: ids 1..N, ``area``, ``iscrowd``, box-only objects); without any
    mask in it, ``segm`` is left out.
    """
    coco_gt = usable_ground_truth(coco_gt)
    scoring = scoring_ground_truth(coco_gt)
    backend = resolve_backend(backend)
    metrics: dict[str, dict[str, float]] = {}
    sink = io.StringIO()  # COCOeval's prints, kept off the console
    indexed: dict[int, Any] = {}  # the backend's ground truth per scoring COCO, indexed once
    for iou_type in iou_types:
        truth = scoring.get(iou_type, scoring["bbox"])
        if truth is None:  # no annotation has a mask: nothing to score masks against (bbox only)
            continue
        usable = results_for_loadres(truth, results, iou_type)
        if not usable:
            present = classes_with_ground_truth(truth, image_ids)
            per_class = {name: 0.0 if cat in present else float("nan") for cat, name in class_metric_names(truth).items()}
            metrics[iou_type] = {**dict.fromkeys(METRIC_NAMES, 0.0), **per_class}
            continue
        with contextlib.redirect_stdout(sink):
            if id(truth) not in indexed:
                indexed[id(truth)] = _ground_truth(truth, backend, sink)
            ev = _cocoeval(indexed[id(truth)], usable, iou_type, backend, sink)
            ev.params.imgIds = sorted({int(i) for i in image_ids})
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if verbose:
            log.info("COCOeval %s (%s):\n%s", iou_type, backend, sink.getvalue())
        sink.seek(0)
        sink.truncate()
        metrics[iou_type] = {
            name: (float(v) if v >= 0 else float("nan")) for name, v in zip(METRIC_NAMES, ev.stats[:6])
        }
        metrics[iou_type].update(per_class_ap(ev, truth))
    return metrics


def _printer(sink: io.StringIO) -> Callable[..., None]:
    def quiet(*args: Any, **kwargs: Any) -> None:
        sink.write(" ".join(str(a) for a in args) + "\n")  # print's output, kept off the console

    return quiet


def _ground_truth(coco_gt: COCO, backend: str, sink: io.StringIO) -> Any:
    """``coco_gt`` as ``backend``'s COCO object."""
    if backend == "pycocotools":
        return coco_gt
    from faster_coco_eval import COCO as FasterCOCO

    return FasterCOCO(coco_gt.dataset, print_function=_printer(sink))  # shares the annotation dicts, no copy


def _cocoeval(gt: Any, results: list[dict[str, Any]], iou_type: str, backend: str, sink: io.StringIO) -> Any:
    """A COCOeval of ``backend`` over ``results`` (already copies: ``loadRes`` edits them)."""
    if backend == "pycocotools":
        return COCOeval(gt, gt.loadRes(results), iouType=iou_type)
    from faster_coco_eval import COCOeval_faster

    return COCOeval_faster(gt, gt.loadRes(results), iouType=iou_type, print_function=_printer(sink))


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
