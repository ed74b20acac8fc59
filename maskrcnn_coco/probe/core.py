"""Loss-component probe: forward-only passes through the training pipeline, per component and per
FPN level, with diagnoses.

The model runs its own, unmodified training forward (``model(images, targets)`` in train mode, under
``torch.no_grad()``). Recording wrappers observe what torchvision's loss code receives: the RPN's
sampled anchors and its loss inputs, the RoI heads' sampled proposals and the inputs of
``fastrcnn_loss`` and ``maskrcnn_loss``. Per-level contributions are then computed from those same
tensors with the same functions and normalisers, so they sum to each component. BatchNorm buffers
are restored after every batch, so the model leaves the probe bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.ops import box_iou

from maskrcnn_coco.analysis.diagnostics import chance_values
from maskrcnn_coco.data.coco import find_invalid_annotations
from maskrcnn_coco.engine.eval_step import restored_modes
from maskrcnn_coco.engine.loop import move_to_device
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS, weighted_total

# A weighted component this many times the median of the other optimised ones dominates.
DOMINANCE_FACTOR = 5.0
# A raw value within CHANCE_MARGIN of its chance value (``analysis.diagnostics.chance_values``: what a
# fresh, uniform predictor scores) is a fresh predictor's baseline, not a fault.
CHANCE_MARGIN = 1.25
# Anchor fit: an object whose best anchor IoU stays below the RPN's background threshold gets positives
# only from low-quality matching; more than this share of a batch's objects means the anchors do not fit.
ANCHOR_MISFIT_SHARE = 0.5
# RPN sampler saturated: positives reach this share of the sampler's positive_fraction.
SATURATION_SHARE = 0.9
# Proposal collapse: fewer sampled RoI proposals than this share of box_batch_size_per_image x images.
COLLAPSE_SHARE = 0.25
# Usual values of each component for a Mask R-CNN in training (torchvision/detectron2 recipes on
# COCO-like data); outside them is reported as information, not as a fault.
TYPICAL_RANGES: dict[str, tuple[float, float]] = {
    "loss_classifier": (0.02, 1.5),
    "loss_box_reg": (0.01, 1.0),
    "loss_mask": (0.05, 0.8),
    "loss_objectness": (0.002, 0.7),
    "loss_rpn_box_reg": (0.002, 0.5),
}
ADVICE: dict[str, str] = {
    "loss_objectness": (
        "check loss.weights.loss_objectness, the anchor sizes against the object sizes "
        "(model.anchor_sizes; see per-level positive anchors) and the object density per level"
    ),
    "loss_rpn_box_reg": (
        "check loss.weights.loss_rpn_box_reg and whether the anchor sizes and aspect ratios "
        "(model.anchor_sizes, model.aspect_ratios) fit the object shapes"
    ),
    "loss_classifier": (
        "check loss.weights.loss_classifier, the labels (category ids, class count), the "
        "proposal sampling (model.box_batch_size_per_image) and the heads' lr (optimizer.head_lr_multiplier)"
    ),
    "loss_box_reg": (
        "check loss.weights.loss_box_reg and the box annotations: COCO bbox is [x, y, width, height] "
        "(xyxy boxes give large regression targets)"
    ),
    "loss_mask": (
        "check loss.weights.loss_mask, that the segmentations line up with the boxes, and the "
        "heads' lr: fresh mask heads learn slowly at the backbone's rate (optimizer.head_lr_multiplier)"
    ),
}


@dataclass
class _Recorded:
    """What one training forward handed to torchvision's loss code."""

    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    batch_shape: tuple[int, int] = (0, 0)
    targets: list[dict[str, torch.Tensor]] = field(default_factory=list)
    feature_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    rpn_inputs: tuple | None = None
    rpn_samples: tuple | None = None
    box_proposals: list[torch.Tensor] | None = None
    fastrcnn_inputs: tuple | None = None
    maskrcnn_inputs: tuple | None = None
    anchors: list[torch.Tensor] | None = None
    rpn_proposals: list[int] | None = None


class _RecordingSampler:
    """Wraps a BalancedPositiveNegativeSampler and keeps its first draw."""

    def __init__(self, sampler: Any, rec: _Recorded):
        self.sampler, self.rec = sampler, rec

    def __call__(self, labels):
        pos, neg = self.sampler(labels)
        if self.rec.rpn_samples is None:
            self.rec.rpn_samples = (pos, neg)
        return pos, neg

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


@contextlib.contextmanager
def _recording(model: nn.Module) -> Iterator[_Recorded]:
    """Observe a GeneralizedRCNN training forward without changing what it computes."""
    rec = _Recorded()
    rpn, heads = model.rpn, model.roi_heads

    def on_transform(_module, _args, output):
        images, targets = output
        rec.image_sizes = [tuple(s) for s in images.image_sizes]
        rec.batch_shape = tuple(images.tensors.shape[-2:])
        rec.targets = [{k: v.detach() for k, v in t.items() if isinstance(v, torch.Tensor)} for t in targets or []]

    def on_backbone(_module, _args, output):
        rec.feature_shapes = {k: tuple(v.shape[-2:]) for k, v in output.items()}

    def on_anchors(_module, _args, output):
        rec.anchors = [a.detach() for a in output]

    def on_rpn(_module, _args, output):
        rec.rpn_proposals = [len(b) for b in output[0]]

    def on_box_pool(_module, args):
        if rec.box_proposals is None:
            rec.box_proposals = [p.detach() for p in args[1]]

    original_compute_loss = rpn.compute_loss

    def compute_loss(objectness, pred_bbox_deltas, labels, regression_targets):
        rec.rpn_inputs = (objectness.detach(), pred_bbox_deltas.detach(), labels, regression_targets)
        return original_compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)

    original_fastrcnn, original_maskrcnn = tv_roi_heads.fastrcnn_loss, tv_roi_heads.maskrcnn_loss

    def fastrcnn_loss(class_logits, box_regression, labels, regression_targets):
        rec.fastrcnn_inputs = (class_logits.detach(), box_regression.detach(), labels, regression_targets)
        return original_fastrcnn(class_logits, box_regression, labels, regression_targets)

    def maskrcnn_loss(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs):
        rec.maskrcnn_inputs = (mask_logits.detach(), proposals, gt_masks, gt_labels, mask_matched_idxs)
        return original_maskrcnn(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs)

    handles = [
        model.transform.register_forward_hook(on_transform),
        model.backbone.register_forward_hook(on_backbone),
        heads.box_roi_pool.register_forward_pre_hook(on_box_pool),
        rpn.anchor_generator.register_forward_hook(on_anchors),
        rpn.register_forward_hook(on_rpn),
    ]
    original_sampler = rpn.fg_bg_sampler
    rpn.compute_loss = compute_loss
    rpn.fg_bg_sampler = _RecordingSampler(original_sampler, rec)
    tv_roi_heads.fastrcnn_loss, tv_roi_heads.maskrcnn_loss = fastrcnn_loss, maskrcnn_loss
    try:
        yield rec
    finally:
        tv_roi_heads.fastrcnn_loss, tv_roi_heads.maskrcnn_loss = original_fastrcnn, original_maskrcnn
        rpn.fg_bg_sampler = original_sampler
        del rpn.compute_loss  # back to the class's method
        for h in handles:
            h.remove()


# -------------------------------------------------------------------------- per-level maths
def _level_names(rec: _Recorded) -> list[str]:
    return list(rec.feature_shapes)


def _pooler_levels(pooler: Any, boxes: Sequence[torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Index into ``names`` of the level the RoI pooler takes each box from (its own LevelMapper)."""
    if sum(len(b) for b in boxes) == 0:
        return torch.zeros(0, dtype=torch.long)
    mapped = pooler.map_levels(list(boxes)).flatten().long().cpu()
    lookup = torch.tensor([names.index(n) for n in pooler.featmap_names])
    # A NaN box maps to no level (-1) rather than to a garbage index.
    valid = (mapped >= 0) & (mapped < len(lookup))
    levels = torch.full_like(mapped, -1)
    levels[valid] = lookup[mapped[valid]]
    return levels


def _anchor_levels(anchor_generator: Any, boxes: Sequence[torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Index into ``names`` of the level whose anchor sizes are nearest (in log scale) to each box's
    size ``sqrt(w * h)``: where the RPN's IoU matching finds the box's positive anchors when its
    aspect ratio is among the anchors'. -1 for a degenerate box or an unknown anchor layout."""
    boxes = torch.cat([b.float().cpu() for b in boxes]) if boxes else torch.zeros(0, 4)
    sizes = getattr(anchor_generator, "sizes", ())
    levels = torch.full((len(boxes),), -1, dtype=torch.long)
    if len(boxes) == 0 or len(sizes) != len(names):
        return levels
    side = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt().log2()
    distance = torch.stack([
        torch.stack([(side - math.log2(s)).abs() for s in level_sizes]).min(dim=0).values for level_sizes in sizes
    ], dim=1)
    valid = torch.isfinite(side)
    levels[valid] = distance[valid].argmin(dim=1)
    return levels


def _sum_by_level(values: torch.Tensor, levels: torch.Tensor, names: Sequence[str], denom: int) -> dict[str, float]:
    """Per-sample losses summed per level and divided by the loss's own normaliser ``denom``."""
    levels = levels.to(values.device)
    keep = levels >= 0
    sums = torch.zeros(len(names), dtype=values.dtype, device=values.device).index_add_(0, levels[keep], values[keep])
    return dict(zip(names, (sums / denom).tolist()))


def _count_by_level(levels: torch.Tensor, names: Sequence[str]) -> dict[str, int]:
    return dict(zip(names, torch.bincount(levels[levels >= 0], minlength=len(names)).tolist()))


def _rpn_terms(model: nn.Module, rec: _Recorded, names: list[str]) -> dict[str, Any]:
    objectness, deltas, labels, reg_targets = rec.rpn_inputs
    pos_masks, neg_masks = rec.rpn_samples
    anchors_per_loc = model.rpn.anchor_generator.num_anchors_per_location()
    per_level = [h * w * a for (h, w), a in zip(rec.feature_shapes.values(), anchors_per_loc)]
    level_of_anchor = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(per_level)).repeat(len(labels))
    pos = torch.where(torch.cat(pos_masks))[0]
    neg = torch.where(torch.cat(neg_masks))[0]
    sampled = torch.cat([pos, neg])
    n_sampled = sampled.numel()
    labels_all = torch.cat(labels)
    reg_all = torch.cat(reg_targets)
    bce = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels_all[sampled], reduction="none")
    l1 = F.smooth_l1_loss(deltas[pos], reg_all[pos], beta=1 / 9, reduction="none").sum(dim=1)
    lv_sampled, lv_pos = level_of_anchor[sampled.cpu()], level_of_anchor[pos.cpu()]
    return {
        "loss_objectness": _sum_by_level(bce, lv_sampled, names, n_sampled),
        "loss_rpn_box_reg": _sum_by_level(l1, lv_pos, names, n_sampled),
        "sampled": n_sampled,
        "positive": pos.numel(),
        "positive_per_level": _count_by_level(lv_pos, names),
        "sampled_per_level": _count_by_level(lv_sampled, names),
        "anchors_per_image": dict(zip(names, per_level)),
        "objectness_std": float(objectness.float().std()) if objectness.numel() > 1 else 0.0,
    }


def _box_terms(model: nn.Module, rec: _Recorded, names: list[str]) -> dict[str, Any]:
    class_logits, box_regression, labels, reg_targets = rec.fastrcnn_inputs
    labels_all = torch.cat(labels)
    reg_all = torch.cat(reg_targets)
    n = labels_all.numel()
    ce = F.cross_entropy(class_logits, labels_all, reduction="none")
    pos = torch.where(labels_all > 0)[0]
    regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    l1 = F.smooth_l1_loss(regression[pos, labels_all[pos]], reg_all[pos], beta=1 / 9, reduction="none").sum(dim=1)
    levels = _pooler_levels(model.roi_heads.box_roi_pool, rec.box_proposals, names)
    return {
        "loss_classifier": _sum_by_level(ce, levels, names, n),
        "loss_box_reg": _sum_by_level(l1, levels[pos.cpu()], names, n),
        "sampled": n,
        "positive": pos.numel(),
        "class_logits_std": float(class_logits.float().std(dim=0).max()) if n > 1 else 0.0,
        "num_classes": int(class_logits.shape[-1]),  # K + 1, background included
    }


def _anchor_fit(model: nn.Module, rec: _Recorded) -> dict[str, Any]:
    """How well the anchors cover the ground truth: each object's best IoU with any anchor of its image,
    against the RPN matcher's thresholds (an object below the background threshold gets positive
    anchors only from low-quality matching, i.e. from anchors that barely overlap it)."""
    matcher = model.rpn.proposal_matcher
    best = []
    for target, anchors in zip(rec.targets, rec.anchors or []):
        boxes = target["boxes"].float()
        if len(boxes) and len(anchors):
            best.append(box_iou(boxes, anchors.float().to(boxes.device)).max(dim=1).values.cpu())
    best_iou = torch.cat(best) if best else torch.zeros(0)
    boxes = torch.cat([t["boxes"].float().cpu() for t in rec.targets]) if rec.targets else torch.zeros(0, 4)
    sides = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    sides = sides[torch.isfinite(sides)]
    finite = best_iou[torch.isfinite(best_iou)]
    return {
        "objects": int(finite.numel()),
        "below_bg_iou": int((finite < matcher.low_threshold).sum()),
        "below_fg_iou": int((finite < matcher.high_threshold).sum()),
        "best_iou_median": float(finite.median()) if finite.numel() else math.nan,
        "rpn_bg_iou_thresh": float(matcher.low_threshold),
        "rpn_fg_iou_thresh": float(matcher.high_threshold),
        "object_sizes": [float(sides.min()), float(sides.max())] if sides.numel() else [],
        "anchor_sizes": [list(level) for level in getattr(model.rpn.anchor_generator, "sizes", ())],
    }


def _mask_terms(model: nn.Module, rec: _Recorded, names: list[str]) -> dict[str, Any]:
    zero = dict.fromkeys(names, 0.0)
    if rec.maskrcnn_inputs is None:
        return {"loss_mask": zero, "positive": 0, "resolution": 0}
    mask_logits, proposals, gt_masks, gt_labels, matched = rec.maskrcnn_inputs
    m = mask_logits.shape[-1]
    labels = torch.cat([gl[idx] for gl, idx in zip(gt_labels, matched)])
    targets = [project_masks_on_boxes(gm, p, i, m) for gm, p, i in zip(gt_masks, proposals, matched)]
    targets = torch.cat(targets) if targets else mask_logits.new_zeros((0, m, m))
    n_pos = labels.numel()
    if targets.numel() == 0:
        return {"loss_mask": zero, "positive": 0, "resolution": m}
    picked = mask_logits[torch.arange(n_pos, device=labels.device), labels]
    per_roi = F.binary_cross_entropy_with_logits(picked, targets, reduction="none").sum(dim=(1, 2))
    levels = _pooler_levels(model.roi_heads.mask_roi_pool, proposals, names)
    denom = n_pos * m * m
    return {
        "loss_mask": _sum_by_level(per_roi, levels, names, denom),
        "positive": n_pos,
        "resolution": m,
    }


# ------------------------------------------------------------------------------- the probe
def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def _restore_buffers(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    for name, buf in model.named_buffers():
        buf.copy_(saved[name])


def _gt_problems(targets: Sequence[Mapping[str, torch.Tensor]], image_sizes: Sequence[tuple[int, int]], image_ids: Sequence[Any]) -> list[str]:
    """Invalid ground-truth boxes among the targets the model received."""
    problems = []
    for t, (h, w), image_id in zip(targets, image_sizes, image_ids):
        for j, box in enumerate(t.get("boxes", torch.zeros(0, 4)).float().cpu()):
            x1, y1, x2, y2 = box.tolist()
            if not torch.isfinite(box).all():
                problems.append(f"image {image_id} box {j} {box.tolist()} has NaN/Inf")
            elif x2 <= x1 or y2 <= y1:
                problems.append(f"image {image_id} box {j} {box.tolist()} has non-positive width/height")
            elif x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
                problems.append(f"image {image_id} box {j} {box.tolist()} lies outside the {w}x{h} image")
    return problems


def probe_batch(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    targets: Sequence[Mapping[str, Any]],
    *,
    loss_weights: Mapping[str, float] | None = None,
    seed: int = 0,
    coco: Any = None,
    batch_idx: int = 0,
) -> dict[str, Any]:
    """Probe one batch (already on the model's device); returns the batch record.

    The RNG is seeded with ``seed`` right before the forward, so ``torch.manual_seed(seed);
    model.train(); model(images, targets)`` reproduces the raw components exactly.
    """
    weights = {k: float((loss_weights or {}).get(k, 1.0)) for k in LOSS_COMPONENTS}
    image_ids = [t.get("image_id") for t in targets]
    saved = _buffers(model)
    failure = None
    try:
        with restored_modes(model), torch.no_grad(), _recording(model) as rec:
            model.train()
            torch.manual_seed(seed)
            loss_dict = model(list(images), [dict(t) for t in targets])
    except (ValueError, RuntimeError, IndexError, AssertionError) as err:
        # torchvision rejects e.g. degenerate boxes; report the batch instead of stopping the probe.
        failure = f"{type(err).__name__}: {err}"
    finally:
        _restore_buffers(model, saved)
    if failure is not None:
        return _failed_record(batch_idx, images, targets, weights, failure, coco)

    raw = {k: float(loss_dict[k]) for k in LOSS_COMPONENTS}
    names = _level_names(rec)
    rpn = _rpn_terms(model, rec, names)
    box = _box_terms(model, rec, names)
    mask = _mask_terms(model, rec, names)
    per_level = {
        "loss_objectness": rpn["loss_objectness"],
        "loss_rpn_box_reg": rpn["loss_rpn_box_reg"],
        "loss_classifier": box["loss_classifier"],
        "loss_box_reg": box["loss_box_reg"],
        "loss_mask": mask["loss_mask"],
    }
    weighted = {k: raw[k] * weights[k] for k in LOSS_COMPONENTS}

    # Batch statistics: grid, anchors and ground truth per level. Objects are counted twice, by the
    # RPN's view (nearest anchor size, beside the positive anchors) and by the RoI pooler's rule
    # (the level the heads pool their box and mask losses from): the two rules differ.
    batch_size = len(images)
    gt_boxes = [t["boxes"] for t in rec.targets]
    total_objects = int(sum(len(b) for b in gt_boxes))
    gt_per_level = _count_by_level(_anchor_levels(model.rpn.anchor_generator, gt_boxes, names), names)
    gt_pooled = _count_by_level(_pooler_levels(model.roi_heads.box_roi_pool, gt_boxes, names), names)
    pooled = set(model.roi_heads.box_roi_pool.featmap_names)
    per_level_stats = []
    for name in names:
        h, w = rec.feature_shapes[name]
        objects = gt_per_level[name]
        per_level_stats.append({
            "level": name,
            "stride": round(rec.batch_shape[0] / h) if h else None,
            "grid": [h, w],
            "anchors_per_image": rpn["anchors_per_image"][name],
            "anchors": rpn["anchors_per_image"][name] * batch_size,
            "pooled_by_roi_heads": name in pooled,
            "gt_objects": objects,
            "gt_objects_roi": gt_pooled[name],
            "object_density": objects / (h * w * batch_size) if h * w else 0.0,
            "positive_anchors": rpn["positive_per_level"][name],
            "sampled_anchors": rpn["sampled_per_level"][name],
        })

    record = {
        "batch_idx": batch_idx,
        "image_ids": image_ids,
        "batch_stats": {
            "batch_size": batch_size,
            "total_objects": total_objects,
            "num_levels": len(names),
            "input_size": list(rec.batch_shape),
            "per_level_stats": per_level_stats,
        },
        "loss_components": {**raw, "total": sum(raw.values())},
        "scaling_coefficients": weights,
        "weighted_components": {**weighted, "total": weighted_total(raw, weights)},
        "normalization_factors": {
            "loss_objectness": rpn["sampled"],
            "loss_rpn_box_reg": rpn["sampled"],
            "loss_classifier": box["sampled"],
            "loss_box_reg": box["sampled"],
            "loss_mask": mask["positive"],
        },
        "sampling": {
            "rpn_sampled_anchors": rpn["sampled"],
            "rpn_positive_anchors": rpn["positive"],
            "roi_sampled_proposals": box["sampled"],
            "roi_positive_proposals": box["positive"],
            "mask_positive_proposals": mask["positive"],
            "mask_resolution": mask["resolution"],
        },
        "per_level_losses": per_level,
        # What the samplers aim for (from the model): the per-level counts are read against these.
        "sampler": {
            "rpn_batch_size_per_image": model.rpn.fg_bg_sampler.batch_size_per_image,
            "rpn_positive_fraction": model.rpn.fg_bg_sampler.positive_fraction,
            "box_batch_size_per_image": model.roi_heads.fg_bg_sampler.batch_size_per_image,
            "box_positive_fraction": model.roi_heads.fg_bg_sampler.positive_fraction,
        },
        "anchor_fit": _anchor_fit(model, rec),
        "chance_values": chance_values(box["num_classes"] - 1),  # num_classes counts the background
        "warnings": [],
    }
    record["sampling"]["rpn_proposals"] = sum(rec.rpn_proposals or [])
    record["warnings"] = diagnose(record, rpn_std=rpn["objectness_std"], cls_std=box["class_logits_std"], gt_problems=_gt_problems(rec.targets, rec.image_sizes, image_ids), coco=coco)
    return record


def _failed_record(batch_idx: int, images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]],
                   weights: Mapping[str, float], failure: str, coco: Any) -> dict[str, Any]:
    """The record of a batch whose forward raised: NaN components and the reason."""
    image_ids = [t.get("image_id") for t in targets]
    nan = dict.fromkeys(LOSS_COMPONENTS, math.nan)
    record = {
        "batch_idx": batch_idx,
        "image_ids": image_ids,
        "batch_stats": {"batch_size": len(images), "total_objects": int(sum(len(t["boxes"]) for t in targets)),
                        "num_levels": 0, "input_size": [], "per_level_stats": []},
        "loss_components": {**nan, "total": math.nan},
        "scaling_coefficients": dict(weights),
        "weighted_components": {**nan, "total": math.nan},
        "normalization_factors": dict.fromkeys(LOSS_COMPONENTS, 0),
        "sampling": {},
        "per_level_losses": {k: {} for k in LOSS_COMPONENTS},
        "error": failure,
    }
    sizes = [tuple(img.shape[-2:]) for img in images]
    gt = _gt_problems(targets, sizes, image_ids)
    record["warnings"] = diagnose(record, rpn_std=1.0, cls_std=1.0, gt_problems=gt, coco=coco)
    record["warnings"][0]["message"] += f"; the model's forward raised {failure}"
    return record


def diagnose(record: Mapping[str, Any], *, rpn_std: float, cls_std: float, gt_problems: Sequence[str], coco: Any = None) -> list[dict[str, Any]]:
    """Warnings and information for one batch record (see docs/loss_probe.md)."""
    out: list[dict[str, Any]] = []
    batch, ids = record["batch_idx"], record["image_ids"]
    raw = record["loss_components"]

    bad = [k for k in LOSS_COMPONENTS if not math.isfinite(raw[k])]
    if bad:
        detail = "; ".join(gt_problems) if gt_problems else "no invalid ground-truth box among the targets"
        out.append({
            "severity": "warning", "code": "non_finite", "components": bad, "image_ids": ids,
            "message": f"batch {batch}: non-finite {', '.join(bad)} (images {ids}); ground truth: {detail}",
        })
    elif gt_problems:
        out.append({
            "severity": "warning", "code": "invalid_ground_truth", "image_ids": ids,
            "message": f"batch {batch}: invalid ground-truth boxes reached the model: {'; '.join(gt_problems)}",
        })
    if coco is not None:
        for p in find_invalid_annotations(coco, [i for i in ids if i is not None]):
            out.append({
                "severity": "warning", "code": "invalid_annotation", "image_ids": [p["image_id"]],
                "annotation_id": p["annotation_id"],
                "message": (f"batch {batch}: image {p['image_id']} annotation {p['annotation_id']}: {p['problem']} "
                            "(skipped by the data pipeline, so the model never sees this object)"),
            })

    out += _dominance(record)
    out += _anchor_and_sampling(record)

    if rpn_std < 1e-6 or cls_std < 1e-6:
        which = "RPN objectness" if rpn_std < 1e-6 else "box classifier"
        out.append({
            "severity": "warning", "code": "constant_predictions", "image_ids": ids,
            "message": (f"batch {batch}: {which} predictions are constant across the batch: the weights are likely "
                        "not loaded (check model.weights / --weights) or the layer is zeroed"),
        })

    for name, (lo, hi) in TYPICAL_RANGES.items():
        value = raw[name]
        if math.isfinite(value) and not lo <= value <= hi:
            out.append({
                "severity": "info", "code": "out_of_range", "component": name,
                "message": f"batch {batch}: {name} = {value:.4g} is outside its usual range [{lo}, {hi}] for Mask R-CNN",
            })
    return out


def _dominance(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Dominance among the optimised components (weight > 0), judged on weighted values.

    A zero-weight component is not optimised: it is reported as information and left out of the
    median, so it cannot make the others look dominant. A component at its chance value (a fresh
    predictor) whose weight is no larger than the others' is the model's starting point, not a fault:
    information, not a warning.
    """
    out: list[dict[str, Any]] = []
    batch, ids = record["batch_idx"], record["image_ids"]
    raw, weighted, weights = record["loss_components"], record["weighted_components"], record["scaling_coefficients"]
    chance = record.get("chance_values", {})
    for name in LOSS_COMPONENTS:
        if weights[name] == 0:
            out.append({
                "severity": "info", "code": "not_optimised", "component": name,
                "message": f"batch {batch}: {name} is not optimised (loss.weights.{name}=0): left out of the dominance check",
            })
    optimised = {k: weighted[k] for k in LOSS_COMPONENTS if weights[k] != 0 and math.isfinite(weighted[k])}
    for name, value in optimised.items():
        others = [v for k, v in optimised.items() if k != name]
        med = statistics.median(others) if others else 0.0
        if not (med > 0 and value >= DOMINANCE_FACTOR * med):
            continue
        level = chance.get(name)
        other_weights = [abs(weights[k]) for k in optimised if k != name]
        if level is not None and raw[name] <= CHANCE_MARGIN * level and abs(weights[name]) <= max(other_weights):
            out.append({
                "severity": "info", "code": "at_chance", "component": name,
                "message": (f"batch {batch}: {name} = {raw[name]:.4g} is at its chance value {level:.3g} (a fresh "
                            f"predictor) and {value / med:.1f}x the median of the others: the starting point of "
                            "training, not a fault; with trained weights it means this head has not learnt"),
            })
            continue
        hint = ADVICE[name]
        if name == "loss_objectness":
            starved = [s["level"] for s in record["batch_stats"]["per_level_stats"] if s["gt_objects"] and not s["positive_anchors"]]
            if starved:
                hint += f"; levels with objects but no positive anchor: {starved}"
        if level is not None and raw[name] > 3 * level:
            hint += (f"; {raw[name]:.3g} is far above chance ({level:.3g}): a predictor initialised with large "
                     "logits gives that at the start (torchvision's Kaiming-initialised MaskRCNNPredictor: "
                     "loss_mask 7-9 for a fresh maskrcnn_r50_fpn), otherwise the predictions are confidently wrong")
        out.append({
            "severity": "warning", "code": "dominant_component", "component": name, "image_ids": ids,
            "message": (f"batch {batch}: {name} dominates: weighted {value:.4g} is {value / med:.1f}x the median "
                        f"of the other optimised components ({med:.4g}); {hint}"),
        })
    return out


def _anchor_and_sampling(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Anchor fit, RPN sampler saturation and RoI proposal collapse, from the batch's own counts.

    These hold with any weights: which anchors are positive depends only on anchors and ground truth.
    """
    out: list[dict[str, Any]] = []
    batch, ids = record["batch_idx"], record["image_ids"]
    sampling, sampler, fit = record.get("sampling", {}), record.get("sampler"), record.get("anchor_fit")
    levels = record["batch_stats"]["per_level_stats"]
    images = record["batch_stats"]["batch_size"]
    if fit and fit["objects"] and fit["below_bg_iou"] > ANCHOR_MISFIT_SHARE * fit["objects"]:
        starved = [s["level"] for s in levels if s["gt_objects"] and not s["positive_anchors"]]
        stray = [s["level"] for s in levels if s["positive_anchors"] and not s["gt_objects"]]
        sizes = fit["object_sizes"]
        anchor_sizes = sorted({a for level in fit["anchor_sizes"] for a in level})
        detail = [f"best anchor IoU median {fit['best_iou_median']:.2f}"]
        if sizes and anchor_sizes:
            detail.append(f"objects {sizes[0]:.0f}-{sizes[1]:.0f} px, anchors {anchor_sizes[0]:g}-{anchor_sizes[-1]:g} px")
        if starved:
            detail.append(f"levels with objects but no positive anchor: {starved}")
        if stray:
            detail.append(f"positive anchors on levels without objects: {stray}")
        out.append({
            "severity": "warning", "code": "anchor_fit", "image_ids": ids,
            "message": (f"batch {batch}: no positive anchor for {fit['below_bg_iou']} of {fit['objects']} objects "
                        f"(no anchor reaches IoU {fit['rpn_bg_iou_thresh']:g}; their positives are low-quality matches): "
                        f"anchors do not fit the objects (model.anchor_sizes, model.aspect_ratios); {'; '.join(detail)}"),
        })
    if sampler and sampling.get("rpn_sampled_anchors"):
        pos, sampled = sampling["rpn_positive_anchors"], sampling["rpn_sampled_anchors"]
        fraction = sampler["rpn_positive_fraction"]
        if pos / sampled >= SATURATION_SHARE * fraction:
            out.append({
                "severity": "warning", "code": "rpn_sampler_saturated", "image_ids": ids,
                "message": (f"batch {batch}: RPN sampler saturated: positives are {pos / sampled:.0%} of sampled anchors "
                            f"({pos}/{sampled}; its positive_fraction caps them at {fraction:.0%}, healthy is a few %): "
                            "many anchors tie as best matches of objects they barely overlap, check model.anchor_sizes"),
            })
    if sampler and "roi_sampled_proposals" in sampling:
        expected = sampler["box_batch_size_per_image"] * images
        got = sampling["roi_sampled_proposals"]
        if expected and got < COLLAPSE_SHARE * expected:
            out.append({
                "severity": "warning", "code": "proposal_collapse", "image_ids": ids,
                "message": (f"batch {batch}: proposal collapse: {got} RoI proposals sampled of {expected} expected "
                            f"(model.box_batch_size_per_image x {images} images); the RPN passed "
                            f"{sampling.get('rpn_proposals', '?')} proposals after NMS: the RoI heads learn from few "
                            "boxes, check model.anchor_sizes and the RPN's proposal counts (model.rpn_post_nms_top_n_train)"),
            })
    return out


def check_per_level_sums(record: Mapping[str, Any], tol: float = 1e-5) -> list[str]:
    """Components whose per-level contributions do not add up to the component (should be none)."""
    bad = []
    for name, levels in record["per_level_losses"].items():
        total = record["loss_components"][name]
        if math.isfinite(total) and abs(sum(levels.values()) - total) > tol * max(1.0, abs(total)):
            bad.append(name)
    return bad


def run_probe(
    model: nn.Module,
    data_loader: Any,
    device: torch.device | str,
    *,
    num_batches: int,
    loss_weights: Mapping[str, float] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Probe the first ``num_batches`` batches of ``data_loader``; batch ``i`` uses seed ``seed + i``."""
    from tqdm import tqdm

    device = torch.device(device)
    coco = getattr(getattr(data_loader, "dataset", None), "coco", None)
    records = []
    it = iter(data_loader)
    for batch_idx in tqdm(range(num_batches), desc="Probing", disable=not progress, leave=False):
        try:
            images, targets = next(it)
        except StopIteration:
            break
        images, targets = move_to_device(images, targets, device)
        record = probe_batch(model, images, targets, loss_weights=loss_weights, seed=seed + batch_idx, coco=coco, batch_idx=batch_idx)
        mismatch = check_per_level_sums(record)
        if mismatch:
            record["warnings"].append({
                "severity": "warning", "code": "per_level_mismatch", "components": mismatch,
                "message": f"batch {batch_idx}: per-level contributions of {mismatch} do not sum to the component "
                           "(a model whose losses differ from torchvision's Mask R-CNN?)",
            })
        records.append(record)
    return records
