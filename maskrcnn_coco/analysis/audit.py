"""Start-of-run audit: is every loss component trained, and can the anchors fit the objects?

``audit_run(model, optimizer, loss_weights, ...)`` runs once after the optimizer is built, before any
training, and returns an ``AuditReport``: a table and ``Diagnosis`` warnings (``analysis.diagnostics``).

* **Loss producers.** For each module that produces a loss (``rpn.head``, ``roi_heads.box_head``,
  ``roi_heads.box_predictor``, ``roi_heads.mask_head``, ``roi_heads.mask_predictor``): its trainable
  parameter count, its effective learning rate (the lr of the optimizer param groups its parameters
  are in, before warmup) and the weights of the losses it feeds. A module with no trainable parameter,
  at lr 0 or at an lr below ``min_lr_ratio`` times the largest group lr feeding a weighted loss is a
  warning naming it, its components and the key to change; so is a component with weight 0.
* **Anchor fit.** Every training object's box (annotations only, scaled as the model's transform
  resizes its image: shorter side to ``min_size``, longer side at most ``max_size``) against the RPN's
  anchor shapes (each level's sizes x aspect ratios, centred on the object: the usual approximation of
  the best anchor on the grid). The best IoU per object, its distribution and the share of objects that
  cannot reach the RPN's positive threshold (0.7). Above ``anchor_unreachable_share``, and by more than
  ``anchor_excess_share`` above the share of the best one-size-per-level anchors for these boxes (octave
  spacing always leaves some objects between two sizes), it is a warning with those sizes as the fix.
  ``anchor_fit`` and the rule ``anchor_misfit`` are also the loss probe's (per batch, and on the probed
  split's objects: ``dataset_anchor_fit``), so the two report the same numbers against the same thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from maskrcnn_coco.analysis.diagnostics import PRODUCERS, WEIGHT_KEY, Diagnosis
from maskrcnn_coco.config import LOSS_COMPONENTS, DiagnosticsConfig

# Module -> the loss components it produces (the inverse of diagnostics.PRODUCERS), in model order.
LOSS_MODULES: dict[str, tuple[str, ...]] = {
    module: tuple(c for c in LOSS_COMPONENTS if module in PRODUCERS[c])
    for module in ("rpn.head", "roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.mask_head", "roi_heads.mask_predictor")
}
TORCHVISION_ANCHORS = ((32,), (64,), (128,), (256,), (512,))


@dataclass
class ProducerRow:
    module: str
    components: tuple[str, ...]
    parameters: int
    trainable: int
    lr: float | None  # the largest effective lr of its trainable parameters; None: in no param group
    groups: tuple[str, ...]  # the optimizer groups holding its trainable parameters
    weights: dict[str, float]


@dataclass
class AnchorFit:
    num_objects: int
    threshold: float
    best_iou_min: float
    best_iou_p10: float
    best_iou_median: float
    unreachable_share: float  # objects whose best IoU is below ``threshold``
    box_size_quantiles: dict[str, float]  # sqrt(w*h) after resizing: p5, p50, p95
    anchor_sizes: list[list[float]]
    aspect_ratios: list[list[float]]
    suggested_sizes: list[int] | None = None
    suggested_unreachable_share: float | None = None
    # Objects below ``threshold``: ``unreachable_share`` x ``num_objects`` (estimated beyond MAX_FIT_OBJECTS).
    num_unreachable: int = 0


@dataclass
class AuditReport:
    producers: list[ProducerRow]
    anchor_fit: AnchorFit | None
    warnings: list[Diagnosis] = field(default_factory=list)

    def format(self) -> str:
        header = f"{'loss producer':<26} {'trainable':>11} {'lr':>9}  {'group':<14} loss weights"
        lines = ["Loss audit:", header, "-" * len(header)]
        for row in self.producers:
            lr = "-" if row.lr is None else f"{row.lr:.3g}"
            weights = ", ".join(f"{c}={row.weights[c]:g}" for c in row.components)
            lines.append(f"{row.module:<26} {row.trainable:>11,} {lr:>9}  {','.join(row.groups) or '-':<14} {weights}")
        fit = self.anchor_fit
        if fit is not None:
            q = fit.box_size_quantiles
            lines.append(
                f"Anchor fit: {fit.num_objects} training objects, size sqrt(w*h) p5/p50/p95 {q['p5']:.0f}/{q['p50']:.0f}/{q['p95']:.0f} px "
                f"after resizing; anchors {_sizes_text(fit.anchor_sizes)} px x ratios {_ratios_text(fit.aspect_ratios)}; "
                f"best centred-anchor IoU min/p10/median {fit.best_iou_min:.2f}/{fit.best_iou_p10:.2f}/{fit.best_iou_median:.2f}; "
                f"{fit.unreachable_share:.0%} of objects below the RPN's positive IoU {fit.threshold:g} "
                f"(best one size per level for these objects, {_sizes_text([[s] for s in fit.suggested_sizes or []])}: "
                f"{fit.suggested_unreachable_share or 0.0:.0%})"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "producers": [{**row.__dict__, "components": list(row.components), "groups": list(row.groups)} for row in self.producers],
            "anchor_fit": None if self.anchor_fit is None else dict(self.anchor_fit.__dict__),
            "warnings": [w.to_json() for w in self.warnings],
        }


def _sizes_text(sizes: Sequence[Sequence[float]]) -> str:
    return "[" + ",".join("/".join(f"{s:g}" for s in level) for level in sizes) + "]"


def _ratios_text(ratios: Sequence[Sequence[float]]) -> str:
    distinct = sorted({float(r) for level in ratios for r in level})
    return "[" + ",".join(f"{r:g}" for r in distinct) + "]"


# ------------------------------------------------------------------------------ loss producers
def _group_label(pg: Mapping[str, Any], index: int) -> str:
    return str(pg.get("group", pg.get("name", index)))


def _lr_key(group: str, head_group: bool) -> str:
    return "optimizer.head_lr_multiplier" if head_group else f"optimizer.groups.{group}.lr_mult"


def producer_rows(model: nn.Module, optimizer: torch.optim.Optimizer, loss_weights: Mapping[str, float]) -> list[ProducerRow]:
    """One row per loss-producing module the model has."""
    lr_of: dict[int, tuple[float, str]] = {}
    for i, pg in enumerate(optimizer.param_groups):
        lr = float(pg.get("initial_lr", pg["lr"]))  # before the warmup factor a scheduler applied
        for p in pg["params"]:
            lr_of[id(p)] = (lr, _group_label(pg, i))
    rows = []
    for module_name, components in LOSS_MODULES.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        params = list(module.parameters())
        trainable = [p for p in params if p.requires_grad]
        found = [lr_of[id(p)] for p in trainable if id(p) in lr_of]
        rows.append(ProducerRow(
            module=module_name,
            components=components,
            parameters=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in trainable),
            lr=max((lr for lr, _ in found), default=None),
            groups=tuple(dict.fromkeys(g for _, g in found)),
            weights={c: float(loss_weights.get(c, 1.0)) for c in components},
        ))
    return rows


def producer_warnings(rows: Sequence[ProducerRow], optimizer: torch.optim.Optimizer, loss_weights: Mapping[str, float],
                      config: DiagnosticsConfig, head_group: str = "heads") -> list[Diagnosis]:
    """Weighted components whose producer cannot learn, and components with weight 0 (or below)."""
    out = []
    lrs = [float(pg.get("initial_lr", pg["lr"])) for pg in optimizer.param_groups]
    top = max(lrs, default=0.0)
    for c in LOSS_COMPONENTS:
        w = float(loss_weights.get(c, 1.0))
        if w <= 0:
            out.append(Diagnosis(
                kind="zero_weight" if w == 0 else "negative_weight", components=(c,), section="not-optimised",
                message=f"{c} has loss weight {w:g}: it is {'not optimised' if w == 0 else 'maximised'}.",
                cause=(f"{WEIGHT_KEY.format(c)}={w:g}: nothing trains {' and '.join(PRODUCERS[c])} for {c}; its logged "
                       "value is for information only and will drift (an untrained head at test time)"),
                config_key=WEIGHT_KEY.format(c), evidence={"weight": w},
            ))
    for row in rows:
        weighted = [c for c in row.components if row.weights[c] > 0]
        if not weighted:
            continue
        names = " and ".join(weighted)
        if row.trainable == 0:
            out.append(Diagnosis(
                kind="frozen_producer", components=tuple(weighted), subject=row.module, section="frozen-producer",
                message=(f"{row.module} feeds {names} (weight {', '.join(f'{row.weights[c]:g}' for c in weighted)}) but has "
                         f"no trainable parameter ({row.parameters:,} frozen)."),
                cause=f"its parameters have requires_grad=False, so {names} cannot be trained through it",
                config_key="requires_grad set in code (no config key freezes the heads; model.trainable_backbone_layers only freezes the backbone)",
                evidence={"parameters": row.parameters, "trainable": 0},
            ))
            continue
        if row.lr is None:
            out.append(Diagnosis(
                kind="frozen_producer", components=tuple(weighted), subject=row.module, section="frozen-producer",
                message=f"{row.module} feeds {names} but none of its {row.trainable:,} trainable parameters is in the optimizer.",
                cause="the optimizer was built without its parameters",
                config_key="optimizer.groups (give its prefix to a group)",
                evidence={"trainable": row.trainable},
            ))
            continue
        key = ", ".join(_lr_key(g, g == head_group) for g in row.groups)
        if row.lr <= 0:
            out.append(Diagnosis(
                kind="frozen_producer", components=tuple(weighted), subject=row.module, section="frozen-producer",
                message=f"{row.module} feeds {names} but its learning rate is 0 (group {', '.join(row.groups)}).",
                cause=f"a zero lr multiplier freezes {row.module}: {names} can only move through the other modules",
                config_key=key, evidence={"lr": row.lr, "groups": list(row.groups), "trainable": row.trainable},
            ))
        elif top > 0 and row.lr < config.min_lr_ratio * top:
            out.append(Diagnosis(
                kind="slow_producer", components=tuple(weighted), subject=row.module, section="frozen-producer",
                message=(f"{row.module} feeds {names} at lr {row.lr:.3g}, {top / row.lr:.0f}x below the largest group lr "
                         f"{top:.3g} (group {', '.join(row.groups)})."),
                cause=f"an lr multiplier far below 1 leaves {row.module} practically frozen",
                config_key=key, evidence={"lr": row.lr, "largest_lr": top, "groups": list(row.groups)},
            ))
    return out


# ---------------------------------------------------------------------------------- anchor fit
def box_sizes(boxes: Any) -> np.ndarray:
    """``(N, 2)`` widths and heights of ``(N, 4)`` xyxy boxes (a tensor or an array), finite and positive
    ones only: the form ``anchor_fit`` takes (the loss probe's batch boxes, already resized by the model)."""
    arr = boxes.detach().float().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes, dtype=np.float64)
    arr = arr.reshape(-1, 4).astype(np.float64)
    wh = np.stack([arr[:, 2] - arr[:, 0], arr[:, 3] - arr[:, 1]], axis=1)
    keep = np.isfinite(wh).all(axis=1) & (wh > 0).all(axis=1)
    return wh[keep]


def object_sizes(
    coco: Any, image_ids: Iterable[int] | None = None, ann_ids: Iterable[int] | None = None, *,
    min_size: float, max_size: float,
) -> np.ndarray:
    """``(N, 2)`` widths and heights of the non-crowd annotation boxes, scaled like the model's
    transform scales their image (shorter side to ``min_size``, longer side at most ``max_size``)."""
    images = set(coco.imgs) if image_ids is None else set(image_ids)
    usable = None if ann_ids is None else set(ann_ids)
    out = []
    for ann in coco.anns.values():
        if ann["image_id"] not in images or ann.get("iscrowd", 0) or (usable is not None and ann["id"] not in usable):
            continue
        img = coco.imgs[ann["image_id"]]
        h, w = float(img["height"]), float(img["width"])
        scale = min(min_size / min(h, w), max_size / max(h, w))
        bw, bh = float(ann["bbox"][2]), float(ann["bbox"][3])
        if bw > 0 and bh > 0:
            out.append((bw * scale, bh * scale))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def anchor_shapes(sizes: Sequence[Sequence[float]], ratios: Sequence[Sequence[float]]) -> np.ndarray:
    """``(M, 2)`` widths and heights of every level's anchors as torchvision's ``AnchorGenerator``
    makes them (ratio = height / width, area = size^2)."""
    shapes = []
    for level_sizes, level_ratios in zip(sizes, ratios):
        for r in level_ratios:
            for s in level_sizes:
                shapes.append((s / math.sqrt(r), s * math.sqrt(r)))
    return np.asarray(shapes, dtype=np.float64).reshape(-1, 2)


def best_centred_iou(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Per box, the best IoU with any anchor centred on it."""
    if len(boxes) == 0 or len(anchors) == 0:
        return np.zeros(len(boxes))
    bw, bh = boxes[:, None, 0], boxes[:, None, 1]
    aw, ah = anchors[None, :, 0], anchors[None, :, 1]
    inter = np.minimum(bw, aw) * np.minimum(bh, ah)
    return (inter / (bw * bh + aw * ah - inter)).max(axis=1)


def suggest_anchor_sizes(boxes: np.ndarray, levels: int, ratios: Sequence[float], threshold: float) -> tuple[list[int], float]:
    """One size per level, doubling per level like the FPN strides, with the first size chosen (from
    the box-size quantiles up) to leave the fewest objects below ``threshold``. Returns (sizes, share left)."""
    side = np.sqrt(boxes[:, 0] * boxes[:, 1])
    lo, hi = max(2.0, float(np.quantile(side, 0.01)) / 2), max(4.0, float(np.quantile(side, 0.5)) * 1.5)
    best: tuple[float, float, list[int]] | None = None
    for s0 in np.unique(np.round(np.geomspace(lo, hi, 120))):
        sizes = [int(s0) * 2**i for i in range(levels)]
        iou = best_centred_iou(boxes, anchor_shapes([[s] for s in sizes], [list(ratios)] * levels))
        score = (float((iou < threshold).mean()), -float(np.median(iou)), sizes)
        if best is None or score[:2] < best[:2]:
            best = score
    assert best is not None
    return best[2], best[0]


# Objects beyond this are subsampled (fixed seed) for the fit: COCO train2017 has 860k.
MAX_FIT_OBJECTS = 20000


def anchor_fit(boxes: np.ndarray, sizes: Sequence[Sequence[float]], ratios: Sequence[Sequence[float]], threshold: float) -> AnchorFit | None:
    """The best centred-anchor IoU of each box (``(N, 2)`` widths, heights) and the suggested sizes."""
    if len(boxes) == 0:
        return None
    total = len(boxes)
    if total > MAX_FIT_OBJECTS:
        boxes = boxes[np.random.default_rng(0).choice(total, MAX_FIT_OBJECTS, replace=False)]
    iou = best_centred_iou(boxes, anchor_shapes(sizes, ratios))
    side = np.sqrt(boxes[:, 0] * boxes[:, 1])
    fit = AnchorFit(
        num_objects=total,
        threshold=threshold,
        best_iou_min=float(iou.min()),
        best_iou_p10=float(np.quantile(iou, 0.1)),
        best_iou_median=float(np.median(iou)),
        unreachable_share=float((iou < threshold).mean()),
        box_size_quantiles={f"p{q}": float(np.quantile(side, q / 100)) for q in (5, 50, 95)},
        anchor_sizes=[[float(s) for s in level] for level in sizes],
        aspect_ratios=[[float(r) for r in level] for level in ratios],
    )
    fit.num_unreachable = round(fit.unreachable_share * total)
    level_ratios = sorted({float(r) for level in ratios for r in level})
    fit.suggested_sizes, fit.suggested_unreachable_share = suggest_anchor_sizes(boxes, len(sizes), level_ratios, threshold)
    return fit


ANCHOR_CAUSE = ("anchor sizes far from the object sizes: the RPN only gets low-quality positive anchors, so "
                "loss_rpn_box_reg stays far above its healthy value and the proposals are poor")


def anchor_misfit(fit: AnchorFit | Mapping[str, Any] | None, config: DiagnosticsConfig) -> bool:
    """The anchor-fit rule (start-of-run audit and loss probe): more than ``anchor_unreachable_share`` of
    the objects below the threshold, and more than ``anchor_excess_share`` above the share the best
    one-size-per-level anchors leave. ``fit``: an ``AnchorFit`` or its dict."""
    if fit is None:
        return False
    values = fit if isinstance(fit, Mapping) else fit.__dict__
    share = float(values["unreachable_share"])
    best = values.get("suggested_unreachable_share")
    best = 0.0 if best is None else float(best)
    return share > config.anchor_unreachable_share and share - best > config.anchor_excess_share


def anchor_warning(fit: AnchorFit, config: DiagnosticsConfig, arch: str | None, has_anchor_key: bool) -> Diagnosis | None:
    if not anchor_misfit(fit, config):
        return None
    sizes = fit.suggested_sizes or []
    left = f"{fit.suggested_unreachable_share or 0.0:.0%} of objects would stay below {fit.threshold:g}"
    if has_anchor_key:
        fix = f"model.anchor_sizes=[{','.join(str(s) for s in sizes)}] (one size per level, from the box sizes: {left})"
    else:
        levels = ",".join(f"({s},)" for s in sizes)
        fix = (f"a custom anchor generator: model={arch} has no anchor key (torchvision's default is {TORCHVISION_ANCHORS}); "
               f"build the model with rpn_anchor_generator=AnchorGenerator(sizes=({levels}), ...) in code ({left}), or "
               "rescale the images with model.min_size/model.max_size so the objects match the default anchors")
    q = fit.box_size_quantiles
    return Diagnosis(
        kind="anchor_fit", components=("loss_objectness", "loss_rpn_box_reg"), subject="rpn.anchor_generator",
        section="anchors-do-not-fit",
        message=(f"Anchors do not fit the objects: {fit.unreachable_share:.0%} of {fit.num_objects} training objects cannot reach "
                 f"the RPN's positive IoU {fit.threshold:g} with any anchor (best centred IoU min/p10/median "
                 f"{fit.best_iou_min:.2f}/{fit.best_iou_p10:.2f}/{fit.best_iou_median:.2f}; object size p5/p50/p95 "
                 f"{q['p5']:.0f}/{q['p50']:.0f}/{q['p95']:.0f} px after resizing, anchors {_sizes_text(fit.anchor_sizes)} px)."),
        cause=ANCHOR_CAUSE,
        config_key=fix,
        evidence={k: v for k, v in fit.__dict__.items() if k not in ("aspect_ratios",)},
    )


# ------------------------------------------------------------------------------------- the audit
def _dataset_boxes(dataset: Any, model: nn.Module) -> np.ndarray | None:
    """The dataset's object sizes (``object_sizes``) as ``model``'s transform resizes them; None
    without ``dataset.coco`` or a model transform."""
    coco = getattr(dataset, "coco", None)
    transform = getattr(model, "transform", None)
    if coco is None or transform is None:
        return None
    min_size = transform.min_size[-1] if isinstance(transform.min_size, (tuple, list)) else transform.min_size
    return object_sizes(coco, getattr(dataset, "ids", None), getattr(dataset, "usable_ann_ids", None),
                        min_size=float(min_size), max_size=float(transform.max_size))


def audit_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_weights: Mapping[str, float],
    *,
    train_dataset: Any = None,
    config: DiagnosticsConfig | None = None,
    arch: str | None = None,
    has_anchor_key: bool | None = None,
) -> AuditReport:
    """The start-of-run audit of ``model`` (a torchvision Mask R-CNN, possibly DDP-wrapped) trained by
    ``optimizer`` with ``loss_weights``; ``train_dataset`` (with ``coco``, ``ids``, ``usable_ann_ids``)
    for the anchor fit. ``has_anchor_key``: the model config has ``model.anchor_sizes`` (the small preset)."""
    config = config if config is not None else DiagnosticsConfig()
    model = getattr(model, "module", model)
    rows = producer_rows(model, optimizer, loss_weights)
    warnings = producer_warnings(rows, optimizer, loss_weights, config)
    fit = dataset_anchor_fit(train_dataset, model) if train_dataset is not None else None
    if fit is not None:
        warning = anchor_warning(fit, config, arch, bool(has_anchor_key))
        if warning is not None:
            warnings.append(warning)
    return AuditReport(producers=rows, anchor_fit=fit, warnings=warnings)


def model_anchor_fit(model: nn.Module, boxes: np.ndarray) -> AnchorFit | None:
    """``anchor_fit`` of ``(N, 2)`` box sizes against ``model``'s RPN anchors and positive IoU (its
    matcher's ``high_threshold``, 0.7); None without objects or an anchor generator."""
    model = getattr(model, "module", model)
    generator = getattr(getattr(model, "rpn", None), "anchor_generator", None)
    if generator is None:
        return None
    matcher = getattr(model.rpn, "proposal_matcher", None)
    return anchor_fit(boxes, generator.sizes, generator.aspect_ratios, float(getattr(matcher, "high_threshold", 0.7)))


def dataset_anchor_fit(dataset: Any, model: nn.Module) -> AnchorFit | None:
    """The anchor fit of every usable object of ``dataset`` (with ``coco``, ``ids``, ``usable_ann_ids``):
    the audit's at the start of a run, the loss probe's for the probed split."""
    model = getattr(model, "module", model)
    boxes = _dataset_boxes(dataset, model)
    return None if boxes is None else model_anchor_fit(model, boxes)
