"""Loss-component probe: forward-only passes through the training pipeline, per component and per
FPN level, with diagnoses.

The model runs its own, unmodified training forward (``model(images, targets)`` in train mode, under
``torch.no_grad()``; BatchNorm on each batch's statistics, as training normalises, or on its running
statistics, as the run's evaluation does, for the validation split: ``statistics``). Recording
wrappers observe what torchvision's loss code receives: the RPN's sampled anchors and its loss
inputs, the RoI heads' sampled proposals and the inputs of ``fastrcnn_loss`` and ``maskrcnn_loss``.
Per-level contributions are then computed from those same tensors with the same functions and
normalisers, so they sum to each component (the mask loss's too on box-only instances, whose all-zero
masks ``modeling.mask_loss`` leaves out: ``_mask_terms`` weights them alike). BatchNorm buffers are
restored after every batch, so the model leaves the probe bit-identical. With ``per_image``, each
image's components on its own come beside the batch's (``engine.per_image``).

Findings are ``analysis.diagnostics.Diagnosis`` objects (``probe_findings``), stored in each record's
``warnings`` as their JSON form; their thresholds are ``DiagnosticsConfig``'s, and dominance and the
anchor fit are judged by the very rules of the run's monitors and start-of-run audit
(``diagnostics.dominates``, ``audit.anchor_fit`` / ``audit.anchor_misfit``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from maskrcnn_coco.analysis.audit import ANCHOR_CAUSE, anchor_misfit, box_sizes, dataset_anchor_fit, model_anchor_fit
from maskrcnn_coco.analysis.diagnostics import (
    WEIGHT_KEY,
    Diagnosis,
    chance_values,
    dominance,
    dominance_cause,
    dominates,
    optimised_weighted,
)
from maskrcnn_coco.config import DiagnosticsConfig
from maskrcnn_coco.data.coco import find_invalid_annotations
from maskrcnn_coco.engine.eval_step import loss_mode, restored_modes
from maskrcnn_coco.engine.loop import move_to_device
from maskrcnn_coco.engine.per_image import (
    STATISTICS,
    batchnorms,
    buffer_snapshot,
    fresh_norms,
    per_image_losses,
    restore_buffers,
)
from maskrcnn_coco.modeling.mask_loss import MaskedRoIHeads, positive_has_mask
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS, weighted_total

# The thresholds of the findings are DiagnosticsConfig's (``diagnostics.*``): dominance_factor and
# dominance_share, anchor_unreachable_share and anchor_excess_share, probe_chance_factor,
# probe_saturation_share and probe_collapse_share.
# The section of docs/LOSS_BREAKDOWN.md that lists the probe's findings (those without a section of their own).
SECTION = "probe-findings"
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


def _mask_terms(model: nn.Module, rec: _Recorded, names: list[str]) -> dict[str, Any]:
    """Per-level parts of ``loss_mask``, weighted and normalised as the model's own mask loss: with
    ``MaskedRoIHeads`` (every built model) only positives matched to an instance with a mask count,
    over their pixels (``mask_loss.masked_maskrcnn_loss``); plain ``RoIHeads`` count every positive.
    ``positive``: the positives the loss averages over; ``box_only``: those it skips (no mask)."""
    zero = dict.fromkeys(names, 0.0)
    if rec.maskrcnn_inputs is None:
        return {"loss_mask": zero, "positive": 0, "box_only": 0, "resolution": 0}
    mask_logits, proposals, gt_masks, gt_labels, matched = rec.maskrcnn_inputs
    m = mask_logits.shape[-1]
    labels = torch.cat([gl[idx] for gl, idx in zip(gt_labels, matched)])
    targets = [project_masks_on_boxes(gm, p, i, m) for gm, p, i in zip(gt_masks, proposals, matched)]
    targets = torch.cat(targets) if targets else mask_logits.new_zeros((0, m, m))
    n_pos = labels.numel()
    if targets.numel() == 0:
        return {"loss_mask": zero, "positive": 0, "box_only": 0, "resolution": m}
    picked = mask_logits[torch.arange(n_pos, device=labels.device), labels]
    per_roi = F.binary_cross_entropy_with_logits(picked, targets, reduction="none").sum(dim=(1, 2))
    if isinstance(model.roi_heads, MaskedRoIHeads):
        has_mask = positive_has_mask(gt_masks, matched)
    else:  # torchvision's loss: a box-only instance's empty mask is trained as background
        has_mask = torch.ones(n_pos, dtype=torch.bool, device=per_roi.device)
    n_masked = int(has_mask.sum())
    # Multiplied like the model's BCE weight (a 1.0 leaves an all-masked batch's terms unchanged).
    per_roi = per_roi * has_mask.to(per_roi.dtype)
    levels = _pooler_levels(model.roi_heads.mask_roi_pool, proposals, names)
    denom = max(n_masked * m * m, 1)
    return {
        "loss_mask": _sum_by_level(per_roi, levels, names, denom),
        "positive": n_masked,
        "box_only": n_pos - n_masked,
        "resolution": m,
    }


# ------------------------------------------------------------------------------- the probe
def normalisation(model: nn.Module, statistics: str) -> dict[str, Any]:
    """Which statistics the probe's BatchNorm layers normalised with, how many there are, and how many
    still hold their initial running statistics (``per_image.fresh_norms``)."""
    return {"statistics": statistics, "batchnorm_layers": len(batchnorms(model)), "initial_running_stats": fresh_norms(model)}


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
    config: DiagnosticsConfig | None = None,
    split_anchor_fit: Mapping[str, Any] | None = None,
    statistics: str = "batch",
    per_image: bool = False,
) -> dict[str, Any]:
    """Probe one batch (already on the model's device); returns the batch record.

    The RNG is seeded with ``seed`` right before the forward, so ``torch.manual_seed(seed);
    model.train(); model(images, targets)`` reproduces the raw components exactly (with
    ``statistics="running"``: the same under ``eval_step.loss_mode``). ``config``: the findings'
    thresholds; ``split_anchor_fit``: the anchor fit of the probed split's objects (``run_probe``), on
    which the anchor rule is judged (without it, on the batch's own objects).

    ``statistics``: what the BatchNorm layers normalise with: ``"batch"``, each batch's own statistics
    (train mode: what training sees), or ``"running"``, their running statistics (eval mode: what the
    run's own evaluation sees, for ``--split val``). ``per_image``: also each image's components on its
    own (``engine.per_image.per_image_losses`` with the same statistics) in ``record["per_image"]``.
    """
    if statistics not in STATISTICS:
        raise ValueError(f"statistics={statistics!r}: use one of {', '.join(STATISTICS)}")
    weights = {k: float((loss_weights or {}).get(k, 1.0)) for k in LOSS_COMPONENTS}
    image_ids = [t.get("image_id") for t in targets]
    norm = normalisation(model, statistics)
    saved = buffer_snapshot(model)
    failure = None
    try:
        modes = loss_mode(model) if statistics == "running" else _train_mode(model)
        with modes, torch.no_grad(), _recording(model) as rec:
            torch.manual_seed(seed)
            loss_dict = model(list(images), [dict(t) for t in targets])
    except (ValueError, RuntimeError, IndexError, AssertionError) as err:
        # torchvision rejects e.g. degenerate boxes; report the batch instead of stopping the probe.
        failure = f"{type(err).__name__}: {err}"
    finally:
        restore_buffers(model, saved)
    if failure is not None:
        record = _failed_record(batch_idx, images, targets, weights, failure, coco, config)
        record["normalisation"] = norm
        if per_image:
            # The batch has no statistics of its own to lend: running ones, and each image's own error.
            record["per_image"] = per_image_losses(model, images, targets, seed=seed, statistics="running")
            record["normalisation"]["per_image_statistics"] = "running"
        return record

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
            "mask_box_only_proposals": mask["box_only"],
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
        # audit.anchor_fit of the batch's objects (as resized by the model) against the RPN's anchors.
        "anchor_fit": _batch_anchor_fit(model, gt_boxes),
        "chance_values": chance_values(box["num_classes"] - 1),  # num_classes counts the background
        "normalisation": norm,
        "warnings": [],
    }
    if per_image:
        record["per_image"] = per_image_losses(model, images, targets, seed=seed, statistics=statistics)
    record["sampling"]["rpn_proposals"] = sum(rec.rpn_proposals or [])
    findings = probe_findings(
        record, rpn_std=rpn["objectness_std"], cls_std=box["class_logits_std"],
        gt_problems=_gt_problems(rec.targets, rec.image_sizes, image_ids), coco=coco, config=config,
        split_anchor_fit=split_anchor_fit,
    )
    record["warnings"] = [f.to_json() for f in findings]
    return record


@contextlib.contextmanager
def _train_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The whole model in train mode (BatchNorm on batch statistics), its modes restored afterwards."""
    with restored_modes(model):
        model.train()
        yield model


def _batch_anchor_fit(model: nn.Module, boxes: Sequence[torch.Tensor]) -> dict[str, Any] | None:
    """``audit.anchor_fit`` of the batch's ground-truth boxes against ``model``'s anchors, as a dict;
    None for a batch without objects."""
    sizes = box_sizes(torch.cat([b.float().cpu() for b in boxes])) if boxes else box_sizes(torch.zeros(0, 4))
    fit = model_anchor_fit(model, sizes)
    return None if fit is None else dataclasses.asdict(fit)


def _failed_record(batch_idx: int, images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]],
                   weights: Mapping[str, float], failure: str, coco: Any, config: DiagnosticsConfig | None) -> dict[str, Any]:
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
    findings = probe_findings(record, rpn_std=1.0, cls_std=1.0, gt_problems=gt, coco=coco, config=config, failure=failure)
    record["warnings"] = [f.to_json() for f in findings]
    return record


def _finding(record: Mapping[str, Any], kind: str, message: str, *, severity: str = "warning", cause: str = "",
             config_key: str | None = None, section: str = SECTION, components: Sequence[str] = (),
             image_ids: Sequence[Any] | None = None, **extra: Any) -> Diagnosis:
    """A probe finding about the batch of ``record`` (its images unless ``image_ids``)."""
    return Diagnosis(
        kind=kind, components=tuple(components), message=message, cause=cause, config_key=config_key,
        section=section, epoch=None, severity=severity, batch=record["batch_idx"],
        image_ids=tuple(record["image_ids"] if image_ids is None else image_ids), **extra,
    )


def probe_findings(
    record: Mapping[str, Any],
    *,
    rpn_std: float,
    cls_std: float,
    gt_problems: Sequence[str],
    coco: Any = None,
    config: DiagnosticsConfig | None = None,
    split_anchor_fit: Mapping[str, Any] | None = None,
    failure: str | None = None,
) -> list[Diagnosis]:
    """The findings (warnings and information) of one batch record, thresholds from ``config``
    (docs/LOSS_BREAKDOWN.md#probe-findings, docs/loss_probe.md). ``rpn_std``, ``cls_std``: the spread of
    the RPN objectness and box classifier logits over the batch; ``gt_problems``: the invalid
    ground-truth boxes the model received; ``coco``: the annotations, to name invalid ones of the batch's
    images; ``split_anchor_fit``: see ``probe_batch``; ``failure``: why the model's forward raised."""
    cfg = config if config is not None else DiagnosticsConfig()
    out: list[Diagnosis] = []
    batch, ids = record["batch_idx"], record["image_ids"]
    raw = record["loss_components"]

    bad = [k for k in LOSS_COMPONENTS if not math.isfinite(raw[k])]
    if bad:
        detail = "; ".join(gt_problems) if gt_problems else "no invalid ground-truth box among the targets"
        raised = f"; the model's forward raised {failure}" if failure else ""
        out.append(_finding(
            record, "non_finite", f"batch {batch}: non-finite {', '.join(bad)} (images {ids}); ground truth: {detail}{raised}.",
            components=bad, section="nan-or-divergence",
            cause="invalid ground-truth boxes (named above), or broken weights or a wrong input scale when there are none",
            evidence={"ground_truth_problems": list(gt_problems), "failure": failure},
        ))
    elif gt_problems:
        out.append(_finding(
            record, "invalid_ground_truth",
            f"batch {batch}: invalid ground-truth boxes reached the model: {'; '.join(gt_problems)}.",
            cause="the data loader handed the model boxes the data pipeline would have dropped",
            evidence={"ground_truth_problems": list(gt_problems)},
        ))
    if coco is not None:
        for p in find_invalid_annotations(coco, [i for i in ids if i is not None]):
            out.append(_finding(
                record, "invalid_annotation",
                (f"batch {batch}: image {p['image_id']} annotation {p['annotation_id']}: {p['problem']} "
                 "(skipped by the data pipeline, so the model never sees this object)."),
                cause="an invalid entry in the annotation file", config_key="the annotation file (python scripts/check_dataset.py)",
                image_ids=[p["image_id"]], subject=f"annotation {p['annotation_id']}",
                evidence={"annotation_id": p["annotation_id"], "problem": p["problem"]},
            ))

    out += _dominance(record, cfg)
    out += _anchor_and_sampling(record, cfg, split_anchor_fit)

    if rpn_std < 1e-6 or cls_std < 1e-6:
        which, module = ("RPN objectness", "rpn.head") if rpn_std < 1e-6 else ("box classifier", "roi_heads.box_predictor")
        out.append(_finding(
            record, "constant_predictions",
            f"batch {batch}: {which} predictions are constant across the batch.",
            cause="the weights are likely not loaded or the layer is zeroed", config_key="model.weights (--weights)",
            subject=module, evidence={"rpn_objectness_std": rpn_std, "class_logits_std": cls_std},
        ))

    # Every mask positive box-only: loss_mask is 0 by construction, not a value out of range (the
    # console's loss_mask line names the skipped positives).
    sampling = record.get("sampling", {})
    no_mask_target = not sampling.get("mask_positive_proposals") and sampling.get("mask_box_only_proposals")
    for name, (lo, hi) in TYPICAL_RANGES.items():
        value = raw[name]
        if name == "loss_mask" and no_mask_target:
            continue
        if math.isfinite(value) and not lo <= value <= hi:
            out.append(_finding(
                record, "out_of_range",
                f"batch {batch}: {name} = {value:.4g} is outside its usual range [{lo}, {hi}] for Mask R-CNN.",
                severity="info", components=[name], evidence={"value": value, "usual_range": [lo, hi]},
            ))
    return out


def _dominance(record: Mapping[str, Any], cfg: DiagnosticsConfig) -> list[Diagnosis]:
    """Dominance among the optimised components (weight > 0), judged on weighted values by the rule of
    the run's monitors (``diagnostics.dominance`` and ``dominates``, ``cfg.dominance_factor`` and
    ``cfg.dominance_share``).

    A zero-weight component is not optimised: it is reported as information and left out of the
    median, so it cannot make the others look dominant. A component within ``cfg.probe_chance_factor``
    of its chance value (a fresh predictor) whose weight is no larger than the others' is the model's
    starting point, not a fault: information, not a warning.
    """
    out: list[Diagnosis] = []
    batch = record["batch_idx"]
    raw, weights = record["loss_components"], record["scaling_coefficients"]
    chance = record.get("chance_values", {})
    for name in LOSS_COMPONENTS:
        if weights[name] == 0:
            out.append(_finding(
                record, "zero_weight",
                f"batch {batch}: {name} is not optimised ({WEIGHT_KEY.format(name)}=0): left out of the dominance check.",
                severity="info", components=[name], section="not-optimised", evidence={"weight": 0.0},
            ))
    weighted = optimised_weighted(raw, weights)
    for name, (ratio, share, median) in dominance(weighted).items():
        if not dominates(ratio, share, cfg):
            continue
        value, w = weighted[name], weights[name]
        evidence = {"ratio": ratio, "share": share, "others_median": median, "weight": w, "value": raw[name],
                    "weighted": value}
        level = chance.get(name)
        other_weights = [weights[k] for k in weighted if k != name]
        if level is not None and raw[name] <= cfg.probe_chance_factor * level and w <= max(other_weights):
            out.append(_finding(
                record, "at_chance",
                (f"batch {batch}: {name} = {raw[name]:.4g} is at its chance value {level:.3g} (a fresh predictor) and "
                 f"{ratio:.1f}x the median of the others: the starting point of training, not a fault; with trained "
                 "weights it means this head has not learnt."),
                severity="info", components=[name], section="stuck-at-chance", evidence={**evidence, "chance": level},
            ))
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
        cause, key = dominance_cause(name, w)
        out.append(_finding(
            record, "dominant",
            (f"batch {batch}: {name} dominates the optimised loss: weight {w:g} x {raw[name]:.4g} = {value:.4g}, "
             f"{share:.0%} of it and {ratio:.1f}x the median of the other optimised components ({median:.4g}); {hint}."),
            cause=cause, config_key=key, components=[name], section="dominant-component", evidence=evidence,
        ))
    return out


def _anchor_and_sampling(record: Mapping[str, Any], cfg: DiagnosticsConfig,
                         split_fit: Mapping[str, Any] | None = None) -> list[Diagnosis]:
    """Anchor fit, RPN sampler saturation and RoI proposal collapse, from the batch's own counts.

    These hold with any weights: which anchors are positive depends only on anchors and ground truth.
    The anchor fit is the start-of-run audit's (``audit.anchor_fit``: each object's best IoU with any
    anchor shape centred on it, against the RPN's positive IoU) and so is the rule (``audit.anchor_misfit``),
    judged on ``split_fit`` (the probed split's objects) when given: a batch's few objects are too few
    for it (the tiny preset's batches leave 29-60 % of their objects below 0.7, its training set 46 %).
    """
    out: list[Diagnosis] = []
    batch = record["batch_idx"]
    sampling, sampler, fit = record.get("sampling", {}), record.get("sampler"), record.get("anchor_fit")
    levels = record["batch_stats"]["per_level_stats"]
    images = record["batch_stats"]["batch_size"]
    judged = split_fit if split_fit is not None else fit
    # The split is judged on as many objects as the start-of-run audit needs (anchor_min_objects).
    min_objects = cfg.anchor_min_objects if split_fit is not None else 0
    if fit and fit["num_objects"] and anchor_misfit(judged, cfg, min_objects=min_objects):
        threshold = fit["threshold"]
        starved = [s["level"] for s in levels if s["gt_objects"] and not s["positive_anchors"]]
        stray = [s["level"] for s in levels if s["positive_anchors"] and not s["gt_objects"]]
        q = fit["box_size_quantiles"]
        anchor_sizes = sorted({a for level in fit["anchor_sizes"] for a in level})
        detail = [f"best centred-anchor IoU median {fit['best_iou_median']:.2f}",
                  f"objects {q['p5']:.0f}-{q['p95']:.0f} px (p5-p95), anchors {anchor_sizes[0]:g}-{anchor_sizes[-1]:g} px"]
        if starved:
            detail.append(f"levels with objects but no positive anchor: {starved}")
        if stray:
            detail.append(f"positive anchors on levels without objects: {stray}")
        if split_fit is not None:
            detail.append(f"the probed split: {split_fit['unreachable_share']:.0%} of its {split_fit['num_objects']} objects "
                          f"below {threshold:g}")
        sizes = ",".join(str(s) for s in judged.get("suggested_sizes") or [])
        left = judged.get("suggested_unreachable_share") or 0.0
        out.append(_finding(
            record, "anchor_fit",
            (f"batch {batch}: no positive anchor for {fit['num_unreachable']} of {fit['num_objects']} objects (no anchor "
             f"reaches the RPN's positive IoU {threshold:g}, even centred on the object: their positives are "
             f"low-quality matches): anchors do not fit the objects (model.anchor_sizes, model.aspect_ratios); "
             f"{'; '.join(detail)}."),
            cause=ANCHOR_CAUSE,
            config_key=(f"model.anchor_sizes, model.aspect_ratios (one size per level for these objects: [{sizes}], "
                        f"{left:.0%} left below {threshold:g})"),
            components=["loss_objectness", "loss_rpn_box_reg"], subject="rpn.anchor_generator",
            section="anchors-do-not-fit",
            evidence={"batch": dict(fit), "judged_on": "split" if split_fit is not None else "batch",
                      "split": dict(split_fit) if split_fit is not None else None},
        ))
    if sampler and sampling.get("rpn_sampled_anchors"):
        pos, sampled = sampling["rpn_positive_anchors"], sampling["rpn_sampled_anchors"]
        fraction = sampler["rpn_positive_fraction"]
        if pos / sampled >= cfg.probe_saturation_share * fraction:
            out.append(_finding(
                record, "rpn_sampler_saturated",
                (f"batch {batch}: RPN sampler saturated: positives are {pos / sampled:.0%} of sampled anchors "
                 f"({pos}/{sampled}; its positive_fraction caps them at {fraction:.0%}, healthy is a few %)."),
                cause="many anchors tie as best matches of objects they barely overlap (low-quality matching)",
                config_key="model.anchor_sizes", components=["loss_objectness", "loss_rpn_box_reg"],
                subject="rpn.fg_bg_sampler",
                evidence={"positive": pos, "sampled": sampled, "positive_fraction": fraction},
            ))
    if sampler and "roi_sampled_proposals" in sampling:
        expected = sampler["box_batch_size_per_image"] * images
        got = sampling["roi_sampled_proposals"]
        if expected and got < cfg.probe_collapse_share * expected:
            out.append(_finding(
                record, "proposal_collapse",
                (f"batch {batch}: proposal collapse: {got} RoI proposals sampled of {expected} expected "
                 f"(model.box_batch_size_per_image x {images} images); the RPN passed "
                 f"{sampling.get('rpn_proposals', '?')} proposals after NMS: the RoI heads learn from few boxes."),
                cause="the RPN yields few distinct proposals: anchors that do not fit, or too few proposals kept",
                config_key="model.anchor_sizes, model.rpn_post_nms_top_n_train",
                components=["loss_classifier", "loss_box_reg", "loss_mask"], subject="roi_heads.fg_bg_sampler",
                evidence={"sampled": got, "expected": expected, "rpn_proposals": sampling.get("rpn_proposals")},
            ))
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
    config: DiagnosticsConfig | None = None,
    statistics: str = "batch",
    per_image: bool = False,
    samples: dict[Any, tuple[torch.Tensor, dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Probe the first ``num_batches`` batches of ``data_loader``; batch ``i`` uses seed ``seed + i``.
    ``config``: the findings' thresholds (``DiagnosticsConfig``, the training config's ``diagnostics``).
    The anchor rule is judged on every object of the loader's dataset (as the start-of-run audit judges
    the training set) when it has COCO annotations, else on each batch's own objects. ``statistics``
    and ``per_image``: see ``probe_batch``. ``samples``, when given, receives each probed image and its
    target as the model received them, on the CPU, by image id (to draw the images to check)."""
    from tqdm import tqdm

    device = torch.device(device)
    dataset = getattr(data_loader, "dataset", None)
    coco = getattr(dataset, "coco", None)
    split_fit = dataset_anchor_fit(dataset, model) if coco is not None else None
    split_anchor_fit = None if split_fit is None else dataclasses.asdict(split_fit)
    records = []
    it = iter(data_loader)
    for batch_idx in tqdm(range(num_batches), desc="Probing", disable=not progress, leave=False):
        try:
            images, targets = next(it)
        except StopIteration:
            break
        if samples is not None:
            samples.update((t.get("image_id"), (image, t)) for image, t in zip(images, targets))
        images, targets = move_to_device(images, targets, device)
        record = probe_batch(model, images, targets, loss_weights=loss_weights, seed=seed + batch_idx, coco=coco,
                             batch_idx=batch_idx, config=config, split_anchor_fit=split_anchor_fit,
                             statistics=statistics, per_image=per_image)
        mismatch = check_per_level_sums(record)
        if mismatch:
            record["warnings"].append(_finding(
                record, "per_level_mismatch",
                f"batch {batch_idx}: per-level contributions of {mismatch} do not sum to the component.",
                cause="a model whose losses differ from torchvision's Mask R-CNN: the per-level numbers are not trustworthy",
                components=mismatch,
            ).to_json())
        records.append(record)
    return records
