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
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

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
    outputs: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    mapping: CategoryMapping,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Model detections -> COCO result dicts (xywh boxes, COCO category ids, RLE masks).

    An output's masks are either full-size (``masks``: ``model(images)``) or each detection's
    ``M x M`` probabilities over its box (``box_masks`` + ``image_size``: ``evaluate_batch(...,
    paste_masks=False)``); both give the same RLE strings (``box_mask_rles``). One device-to-host
    copy per batch for the boxes, scores and labels; full-size masks in one more, thresholded on the
    device (one byte per pixel travels); masks over boxes per image, as their runs' edges.
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
    full = [i for i, out in enumerate(outputs) if "masks" in out and "box_masks" not in out]
    full_masks = dict(zip(full, _masks_on_host([outputs[i] for i in full], mask_threshold) or []))
    results: list[dict[str, Any]] = []
    offset = 0
    for i, (image_id, n) in enumerate(zip(image_ids, counts)):
        block, offset = rows[offset:offset + n], offset + n
        if n == 0:
            continue
        xywh = np.concatenate([block[:, :2], block[:, 2:4] - block[:, :2]], axis=1).tolist()
        scores = block[:, 4].tolist()
        labels = block[:, 5].astype(np.int64).tolist()
        out = outputs[i]
        if "box_masks" in out:  # one image at a time: nothing of the image's size per detection
            rles = box_mask_rles(out["box_masks"], out["boxes"], out["image_size"], mask_threshold)
        else:
            rles = mask_utils.encode(full_masks[i]) if i in full_masks else None
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
    if not outputs or not all("masks" in out for out in outputs):
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


# Crop pixels binarised per host copy in box_mask_rles: a bound on its memory, whatever the boxes.
CROP_PIXELS_PER_COPY = 1 << 24


def box_mask_rles(
    box_masks: torch.Tensor, boxes: torch.Tensor, image_size: Sequence[int], threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Compressed RLEs of ``paste_masks_in_image(box_masks, boxes, image_size) > threshold``: the
    same strings as ``mask_utils.encode`` of those full-size masks, without an image-sized array.

    ``box_masks``: ``N x 1 x M x M`` probabilities (torchvision's RoI heads' output); ``boxes``:
    ``N x 4`` in image coordinates. Each mask is pasted as torchvision pastes it (one pixel of
    padding, the box scaled to match and truncated to integers, a bilinear resize to that box, the
    part inside the image kept), on ``box_masks``' device; only that crop is binarised and copied to
    the host, and its column runs, placed among the zeros around it, are the image's RLE counts.
    """
    if threshold < 0:
        raise ValueError(f"mask_threshold {threshold} < 0 would make every pixel outside a box foreground: "
                         "use 0 <= mask_threshold < 1 (eval.mask_threshold)")
    h, w = int(image_size[0]), int(image_size[1])
    if len(boxes) == 0:
        return []
    padded, scale = expand_masks(box_masks.detach(), padding=1)
    pasted = expand_boxes(boxes.detach(), scale).to(torch.int64).tolist()  # a host sync; once per image
    # Per detection whose box reaches into the image: (detection, x0, y0, columns, rows) of the part
    # inside, (height, width, x, y) of the pasted box.
    crops = []
    for j, (bx0, by0, bx1, by1) in enumerate(pasted):
        x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, w), max(by0, 0), min(by1 + 1, h)
        if x1 > x0 and y1 > y0:
            crops.append((j, x0, y0, x1 - x0, y1 - y0, max(by1 - by0 + 1, 1), max(bx1 - bx0 + 1, 1), bx0, by0))
    counts = [np.array([h * w])] * len(pasted)  # an empty mask, unless a crop says otherwise
    group, pixels = [], 0
    for crop in crops:
        group.append(crop)
        pixels += crop[3] * (crop[4] + 1)
        if pixels >= CROP_PIXELS_PER_COPY:
            _group_counts(padded, group, pixels, threshold, h, w, counts)
            group, pixels = [], 0
    _group_counts(padded, group, pixels, threshold, h, w, counts)
    return mask_utils.frPyObjects([{"size": [h, w], "counts": c} for c in counts], h, w)


def _group_counts(padded: torch.Tensor, group: list[tuple[int, ...]], pixels: int, threshold: float, h: int, w: int,
                  counts: list[np.ndarray]) -> None:
    """``counts[j]`` for each crop of ``group``: the uncompressed RLE counts of the ``h x w`` image
    that is the binarised crop among zeros, from one buffer of the group's crops (``pixels`` long)."""
    if not group:
        return
    # Each crop column-major with a zero after each column, so every column's runs end in it; one
    # leading zero: the first run of the buffer (and of each crop) starts from background.
    bits = torch.zeros(pixels + 1, dtype=torch.bool, device=padded.device)
    offset = 1
    masks = padded.split(1)  # 1 x 1 x (M + 2) x (M + 2) each
    for j, x0, y0, cols, rows, box_h, box_w, bx0, by0 in group:
        # torchvision's paste_mask_in_image: the same resize of the same values, without the H x W image.
        resized = F.interpolate(masks[j], size=(box_h, box_w), mode="bilinear", align_corners=False).contiguous()
        # (as_strided: one call where indexing takes several; both are fresh contiguous tensors)
        inside = resized.as_strided((rows, cols), (box_w, 1), (y0 - by0) * box_w + x0 - bx0)
        torch.gt(inside, threshold, out=bits.as_strided((rows, cols), (1, rows + 1), offset))  # column-major
        offset += cols * (rows + 1)
    changed = bits[1:] != bits[:-1]  # a run starts or ends between bits[k] and bits[k + 1]
    # Only the edges travel from an accelerator (one sync per group of crops).
    k = np.flatnonzero(changed.numpy()) if changed.device.type == "cpu" else changed.nonzero().view(-1).cpu().numpy()
    # Per edge: its crop, and its position in the image (column-major): crop position (c, r) is
    # pixel (x0 + c) * h + y0 + r; a column's closing zero (r = rows) is pixel y0 + rows of it.
    table = np.array([(x0, y0, cols, rows) for _, x0, y0, cols, rows, *_ in group], dtype=np.int64)
    sizes = table[:, 2] * (table[:, 3] + 1)
    starts = np.cumsum(sizes) - sizes
    which = np.searchsorted(starts, k, side="right") - 1
    local = k - starts[which]
    x0, y0, rows = table[which, 0], table[which, 1], table[which, 3]
    edges = local + (local // (rows + 1)) * (h - rows - 1) + x0 * h + y0
    # A whole-height crop's column ends where the next begins: a run across the two is one run.
    same = (edges[1:] == edges[:-1]) & (which[1:] == which[:-1])
    keep = np.ones(len(edges), dtype=bool)
    keep[1:] &= ~same
    keep[:-1] &= ~same
    keep &= edges != h * w  # a run reaching the image's last pixel: no empty run after it
    edges, which = edges[keep], which[keep]
    # Counts per crop: the differences of 0, its edges, h * w (COCO's RLE starts with background).
    per_crop = np.bincount(which, minlength=len(group))
    padded_edges = np.empty(len(edges) + 2 * len(group), dtype=np.int64)
    first = np.cumsum(per_crop + 2) - (per_crop + 2)
    padded_edges[first] = 0
    padded_edges[first + per_crop + 1] = h * w
    padded_edges[np.arange(len(edges)) + 2 * which + 1] = edges
    diffs = np.diff(padded_edges)
    for g, (j, *_) in enumerate(group):
        counts[j] = diffs[first[g]:first[g] + per_crop[g] + 1]


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
    copies = [dict(r) for r in results]  # one copy for every IoU type (loadRes edits its input)
    for iou_type in iou_types:
        truth = scoring.get(iou_type, scoring["bbox"])
        if truth is None:  # no annotation has a mask: nothing to score masks against (bbox only)
            continue
        usable = _for_loadres(truth, results, copies, iou_type)
        if not usable:
            present = classes_with_ground_truth(truth, image_ids)
            per_class = {name: 0.0 if cat in present else float("nan") for cat, name in class_metric_names(truth).items()}
            metrics[iou_type] = {**dict.fromkeys(METRIC_NAMES, 0.0), **per_class}
            continue
        with contextlib.redirect_stdout(sink):
            ev = _cocoeval(_ground_truth(truth, backend, sink), usable, iou_type, backend, sink)
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


# The backend's index of each scoring ground truth, built on its first evaluation and kept while
# that ground truth lives (it is cached on the dataset's COCO: ``scoring_ground_truth``). Held here,
# not on the object, so a dataset pickled to its loader workers does not carry it.
_BACKEND_TRUTH: weakref.WeakKeyDictionary[COCO, dict[str, Any]] = weakref.WeakKeyDictionary()


def _ground_truth(coco_gt: COCO, backend: str, sink: io.StringIO) -> Any:
    """``coco_gt`` as ``backend``'s COCO object, indexed once per ``coco_gt``."""
    if backend == "pycocotools":
        return coco_gt
    from faster_coco_eval import COCO as FasterCOCO

    cached = _BACKEND_TRUTH.setdefault(coco_gt, {})
    if backend not in cached:
        # Shares the annotation dicts, no copy.
        cached[backend] = FasterCOCO(coco_gt.dataset, print_function=_printer(sink))
    cached[backend].print_function = _printer(sink)  # this call's sink, not the first call's
    return cached[backend]


def _cocoeval(gt: Any, results: list[dict[str, Any]], iou_type: str, backend: str, sink: io.StringIO) -> Any:
    """A COCOeval of ``backend`` over ``results`` (copies: ``loadRes`` edits them)."""
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
    return _for_loadres(coco_gt, results, [dict(r) for r in results], iou_type)


def _for_loadres(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], copies: list[dict[str, Any]], iou_type: str,
) -> list[dict[str, Any]]:
    """``copies`` (one per result, reused for each IoU type) set for ``iou_type`` as
    ``results_for_loadres`` describes, in place: what an earlier loadRes and COCOeval wrote into
    them (``bbox`` from the mask, a box polygon, ``area``, ...) is overwritten or removed."""
    if iou_type != "segm":
        for r, c in zip(results, copies):
            c["bbox"] = r["bbox"]
            if "segmentation" in r:
                c["segmentation"] = r["segmentation"]
            else:
                c.pop("segmentation", None)
        return copies
    out = []
    for r, c in zip(results, copies):
        if "segmentation" not in r:
            continue
        c.pop("bbox", None)
        seg = r["segmentation"]
        if isinstance(seg, list) or (isinstance(seg, dict) and isinstance(seg.get("counts"), list)):
            image = coco_gt.imgs[r["image_id"]]
            rles = mask_utils.frPyObjects(seg, image["height"], image["width"])
            seg = mask_utils.merge(rles) if isinstance(rles, list) else rles
        c["segmentation"] = seg
        out.append(c)
    return out
