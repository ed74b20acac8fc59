"""Start-of-run audit: is every loss component trained, can the anchors fit the objects, and are the
optimizer's settings in the usual ranges?

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
  The audit judges the fit only on at least ``anchor_min_objects`` training objects: a 24-image shapes set
  gave a warning that 400 images of the same objects do not (the probe passes no minimum).
* **Optimizer** (``optimizer_audit``, when the batch size is given). The real optimizer's settings
  (SGD / Adam / AdamW: lr, weight decay, momentum, betas) and the warmup against the usual ranges
  ``USUAL_RANGES``; outside a range is ``info``, far outside (``FAR_FACTORS``) a ``warning``.
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
from maskrcnn_coco.data.index import has_ground_truth, memoized

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
    # Every finding, ``severity`` warning or info (the optimizer's ranges give both).
    warnings: list[Diagnosis] = field(default_factory=list)
    # The anchor fit is judged on at least this many objects (0: any number).
    anchor_min_objects: int = 0
    optimizer: OptimizerSettings | None = None

    def format(self) -> str:
        header = f"{'loss producer':<26} {'trainable':>11} {'lr':>9}  {'group':<14} loss weights"
        lines = ["Loss audit:", header, "-" * len(header)]
        for row in self.producers:
            lr = "-" if row.lr is None else f"{row.lr:.3g}"
            weights = ", ".join(f"{c}={row.weights[c]:g}" for c in row.components)
            lines.append(f"{row.module:<26} {row.trainable:>11,} {lr:>9}  {','.join(row.groups) or '-':<14} {weights}")
        if self.optimizer is not None:
            found = [_short(w) for w in self.warnings if w.kind == "optimizer_range"]
            if self.optimizer.family is None:
                verdict = f"no usual ranges known for {self.optimizer.name} (known: SGD, Adam, AdamW)"
            else:
                verdict = f"outside the usual ranges: {'; '.join(found)}" if found else "within the usual ranges"
            lines.append(f"Optimizer: {self.optimizer.text()}: {verdict}")
        fit = self.anchor_fit
        if fit is not None and fit.num_objects < self.anchor_min_objects:
            lines.append(f"Anchor fit: not judged ({fit.num_objects} objects, fewer than "
                         f"diagnostics.anchor_min_objects={self.anchor_min_objects})")
        elif fit is not None:
            q = fit.box_size_quantiles
            lines.append(
                f"Anchor fit: on {fit.num_objects} training objects, size sqrt(w*h) p5/p50/p95 {q['p5']:.0f}/{q['p50']:.0f}/{q['p95']:.0f} px "
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
            "anchor_min_objects": self.anchor_min_objects,
            "optimizer": None if self.optimizer is None else dict(self.optimizer.__dict__, total_batch=self.optimizer.total_batch),
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


def anchor_misfit(fit: AnchorFit | Mapping[str, Any] | None, config: DiagnosticsConfig, *, min_objects: int = 0) -> bool:
    """The anchor-fit rule (start-of-run audit and loss probe): more than ``anchor_unreachable_share`` of
    the objects below the threshold, and more than ``anchor_excess_share`` above the share the best
    one-size-per-level anchors leave; never on fewer than ``min_objects`` objects (the audit passes
    ``anchor_min_objects``). ``fit``: an ``AnchorFit`` or its dict."""
    if fit is None:
        return False
    values = fit if isinstance(fit, Mapping) else fit.__dict__
    if int(values["num_objects"]) < min_objects:
        return False
    share = float(values["unreachable_share"])
    best = values.get("suggested_unreachable_share")
    best = 0.0 if best is None else float(best)
    return share > config.anchor_unreachable_share and share - best > config.anchor_excess_share


def anchor_warning(fit: AnchorFit, config: DiagnosticsConfig, arch: str | None, has_anchor_key: bool) -> Diagnosis | None:
    """The audit's anchor-fit warning: ``anchor_misfit`` on at least ``config.anchor_min_objects`` objects."""
    if not anchor_misfit(fit, config, min_objects=config.anchor_min_objects):
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
        message=(f"Anchors do not fit the objects (judged on {fit.num_objects} training objects): {fit.unreachable_share:.0%} of "
                 f"them cannot reach the RPN's positive IoU {fit.threshold:g} with any anchor (best centred IoU min/p10/median "
                 f"{fit.best_iou_min:.2f}/{fit.best_iou_p10:.2f}/{fit.best_iou_median:.2f}; object size p5/p50/p95 "
                 f"{q['p5']:.0f}/{q['p50']:.0f}/{q['p95']:.0f} px after resizing, anchors {_sizes_text(fit.anchor_sizes)} px)."),
        cause=ANCHOR_CAUSE,
        config_key=fix,
        evidence={k: v for k, v in fit.__dict__.items() if k not in ("aspect_ratios",)},
    )


# ----------------------------------------------------------------------------------- optimizer
# The lr ranges are per 16 images (the references' total batch); a run's total batch scales them: SGD by
# the linear rule (Goyal et al. 2017: lr proportional to the batch), Adam and AdamW by the square-root
# rule (Malladi et al. 2022: adaptive methods scale with the square root of the batch).
LR_REFERENCE_BATCH = 16
LR_SCALING = {"sgd": "linear", "adam": "sqrt", "adamw": "sqrt"}
_DETECTION_REFS = "detectron2 and torchvision detection references"
# optimizer -> parameter -> (low, typical, high, source): the usual range of each setting.
USUAL_RANGES: dict[str, dict[str, tuple[float, float, float, str]]] = {
    "sgd": {
        "lr": (0.002, 0.02, 0.1, f"{_DETECTION_REFS}: 0.02 per 16 images, scaled linearly with the total batch (Goyal et al. 2017)"),
        "weight_decay": (1e-5, 1e-4, 1e-3, f"{_DETECTION_REFS}: 1e-4"),
        "momentum": (0.8, 0.9, 0.99, f"{_DETECTION_REFS}: 0.9"),
    },
    "adamw": {
        "lr": (1e-5, 1e-4, 1e-3, "Swin/ConvNeXt Mask R-CNN (mmdetection): 1e-4 per 16 images, scaled with the square root of the total batch"),
        "weight_decay": (1e-4, 0.05, 0.2, "Swin/ConvNeXt Mask R-CNN (mmdetection): 0.05, decoupled (Loshchilov & Hutter 2019)"),
        "beta1": (0.8, 0.9, 0.95, "torch and the detection recipes: (0.9, 0.999)"),
        "beta2": (0.95, 0.999, 0.9999, "torch and the detection recipes: (0.9, 0.999)"),
    },
    "adam": {
        "lr": (1e-5, 1e-4, 1e-3, "as AdamW: 1e-4 per 16 images, scaled with the square root of the total batch"),
        # Adam's weight_decay is an L2 term added to the gradient, then divided by its running RMS: its
        # strength depends on the gradients and the lr, so decoupled decay (AdamW) is the usual choice.
        "weight_decay": (0.0, 0.0, 1e-3, "Loshchilov & Hutter 2019: in Adam, weight_decay is L2, divided by the gradients' RMS; use AdamW for decay"),
        "beta1": (0.8, 0.9, 0.95, "torch and the detection recipes: (0.9, 0.999)"),
        "beta2": (0.95, 0.999, 0.9999, "torch and the detection recipes: (0.9, 0.999)"),
    },
}
# parameter -> (below, above): how many times beyond the low / high edge of its usual range a value is
# far outside it (a warning; outside but nearer: info; None: never a warning on that side). Momentum and
# betas are measured on 1 - value (0.999 is 10x the memory of 0.99). lr above: 2x over the high edge
# (SGD: 10x the scaled typical value), as divergence sets in abruptly; too low an lr, or too little weight
# decay, only slows or weakens training: 10x below for lr, never for weight decay.
FAR_FACTORS: dict[str, tuple[float | None, float | None]] = {
    "lr": (10.0, 2.0),
    "weight_decay": (None, 10.0),
    "momentum": (10.0, 10.0),
    "beta1": (10.0, 10.0),
    "beta2": (10.0, 10.0),
}
_ONE_MINUS = {"momentum", "beta1", "beta2"}
# SGD from this lr on without warmup is a risk (the references warm up over their first 1000 iterations).
WARMUP_LR = 0.01
OPTIMIZER_KEYS = {
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "momentum": "optimizer.factory.momentum",
    "betas": "optimizer.factory.betas",
    "warmup": "scheduler.warmup_iters",
}
# Measured: 400-image x 4-epoch runs of the shapes preset (SGD lr 0.02, batch 4).
WEIGHT_DECAY_MEASURED = ("in 400-image x 4-epoch runs of the shapes preset (SGD lr 0.02, batch 4), weight decay 0.05 "
                         "(500x the usual 1e-4) left every loss component ~40% above a healthy run at epoch 4 (segm AP50 "
                         "0.256 vs ~0.43) and 0.2 left loss_mask at its chance value (0.667), segm AP50 0.038")


@dataclass
class OptimizerSettings:
    """What the optimizer really does, read from its param groups (lrs before warmup)."""

    name: str  # the class name, e.g. SGD
    family: str | None  # its USUAL_RANGES key; None: no usual ranges known
    lr: float  # the base lr (the groups at lr_mult 1: optimizer.lr), else the largest group lr
    largest_lr: float
    batch_size: int  # per process
    world_size: int
    # The distinct weight decays of the decayed groups (the ``*_no_wd`` groups, and groups at 0 beside
    # decayed ones, are at 0 by design); empty: no group decays.
    weight_decays: list[float]
    momentum: float | None = None
    nesterov: bool | None = None
    betas: tuple[float, float] | None = None
    warmup_iters: int | None = None

    @property
    def total_batch(self) -> int:
        return self.batch_size * self.world_size

    def scaled(self, value: float) -> float:
        """A per-16-images lr scaled to this run's total batch by its family's rule."""
        ratio = self.total_batch / LR_REFERENCE_BATCH
        return value * (math.sqrt(ratio) if LR_SCALING.get(self.family or "") == "sqrt" else ratio)

    def text(self) -> str:
        batch = f"batch {self.batch_size}" if self.world_size == 1 else f"total batch {self.total_batch} = {self.batch_size} x {self.world_size} processes"
        parts = [f"{self.name} lr {_num(self.lr)} ({batch})",
                 f"weight decay {'/'.join(_num(w) for w in self.weight_decays) or '0'}"]
        if self.momentum is not None:
            parts.append(f"momentum {_num(self.momentum)}{' nesterov' if self.nesterov else ''}")
        if self.betas is not None:
            parts.append(f"betas ({_num(self.betas[0])}, {_num(self.betas[1])})")
        if self.warmup_iters is not None:
            parts.append(f"warmup {self.warmup_iters} it")
        return ", ".join(parts)


def _num(value: float) -> str:
    """1e-4, 0.02, 0.9, 5e-5: short and exact enough for a config value."""
    if value == 0 or 1e-3 < abs(value) < 1e4:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _family(optimizer: torch.optim.Optimizer) -> str | None:
    name = type(optimizer).__name__
    if name == "SGD":
        return "sgd"
    if name in ("Adam", "AdamW"):
        decoupled = name == "AdamW" or any(pg.get("decoupled_weight_decay") for pg in optimizer.param_groups)
        return "adamw" if decoupled else "adam"
    return None


def optimizer_settings(optimizer: torch.optim.Optimizer, *, batch_size: int, world_size: int = 1,
                       warmup_iters: int | None = None) -> OptimizerSettings:
    """``optimizer``'s settings as ``optimizer_audit`` judges them."""
    groups = [pg for pg in optimizer.param_groups if pg["params"]] or list(optimizer.param_groups)
    lrs = [float(pg.get("initial_lr", pg["lr"])) for pg in groups]  # before the warmup factor
    base = [lr / float(pg["lr_mult"]) for pg, lr in zip(groups, lrs) if float(pg.get("lr_mult", 0.0)) > 0]
    decayed = [pg for pg in groups if not str(pg.get("name", "")).endswith("_no_wd")]
    if any(float(pg.get("weight_decay", 0.0)) > 0 for pg in decayed):
        decayed = [pg for pg in decayed if float(pg.get("weight_decay", 0.0)) > 0]
    first = groups[0] if groups else {}
    betas = first.get("betas")
    return OptimizerSettings(
        name=type(optimizer).__name__,
        family=_family(optimizer),
        lr=max(base) if base else max(lrs, default=0.0),
        largest_lr=max(lrs, default=0.0),
        batch_size=int(batch_size),
        world_size=int(world_size),
        weight_decays=sorted({float(pg.get("weight_decay", 0.0)) for pg in decayed} - {0.0}),
        momentum=None if "momentum" not in first else float(first["momentum"]),
        nesterov=None if "nesterov" not in first else bool(first["nesterov"]),
        betas=None if betas is None else (float(betas[0]), float(betas[1])),
        warmup_iters=None if warmup_iters is None else int(warmup_iters),
    )


def _beyond(param: str, value: float, low: float, high: float) -> tuple[float, str | None]:
    """How many times beyond its usual range ``value`` is (1: within) and on which side of it."""
    if param in _ONE_MINUS:  # 1 - value: 0.999 is 10x beyond 0.99
        if value >= 1.0:
            return math.inf, "above"
        value, low, high = 1.0 - value, 1.0 - high, 1.0 - low
        factor, side = _beyond("", value, low, high)
        return factor, {"below": "above", "above": "below"}.get(side or "")
    if value > high:
        return (value / high if high > 0 else math.inf), "above"
    if value < low:
        return (low / value if value > 0 else math.inf), "below"
    return 1.0, None


def _severity(param: str, factor: float, side: str | None) -> str | None:
    """``warning`` far outside the usual range, ``info`` outside it, None within it."""
    if side is None:
        return None
    far = FAR_FACTORS[param][0 if side == "below" else 1]
    # The tolerance keeps a value exactly at the edge there (1 - 0.95 is not 0.05 in floats).
    return "warning" if far is not None and factor >= far * (1 - 1e-9) else "info"


def _times(ratio: float) -> str:
    """4x, 500x, 2,000x; 1/20 below 1."""
    if ratio < 1:
        return f"1/{_times(1 / ratio)[:-1]}"
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.2g}x"


def _where(severity: str) -> str:
    return "far outside" if severity == "warning" else "outside"


def _range_text(low: float, high: float) -> str:
    return f"{_num(low)}..{_num(high)}"


def _finding(settings: OptimizerSettings, subject: str, severity: str, message: str, cause: str,
             evidence: dict[str, Any]) -> Diagnosis:
    return Diagnosis(
        kind="optimizer_range", components=LOSS_COMPONENTS, subject=subject, section="optimizer-out-of-range",
        message=message, cause=cause, config_key=OPTIMIZER_KEYS[subject], severity=severity,
        evidence={"optimizer": settings.name, "total_batch": settings.total_batch, **evidence},
    )


def _lr_finding(s: OptimizerSettings, ranges: Mapping[str, tuple[float, float, float, str]]) -> Diagnosis | None:
    if s.lr <= 0:  # lr 0 freezes everything: the producer audit names it
        return None
    low, typical, high, source = ranges["lr"]
    low, typical, high = s.scaled(low), s.scaled(typical), s.scaled(high)
    factor, side = _beyond("lr", s.lr, low, high)
    severity = _severity("lr", factor, side)
    if severity is None:
        return None
    rule = "linear-scaling" if LR_SCALING[s.family or ""] == "linear" else "square-root-scaling"
    ratio = s.lr / typical
    times = _times(ratio)
    if side == "above" and severity == "warning":
        cause = ("a step this much larger than the references' for the same batch tends to diverge in the first "
                 "iterations (a non-finite loss, box regression blowing up) or to keep every loss noisy")
    elif side == "above":
        cause = ("a larger step than the references' for the same batch: it may train faster, or spike in the first "
                 "iterations (watch the loss and the gradient norms)")
    else:
        cause = "a step this small barely moves the detector in a schedule of the usual length: every component falls slowly"
    if s.family == "sgd":
        cause += "; optimizer.scale_lr=linear scales optimizer.lr by the total batch / optimizer.reference_batch_size"
    return _finding(
        s, "lr", severity,
        (f"{s.name} lr {_num(s.lr)} at total batch {s.total_batch} is {times} the {rule} value {_num(typical)}: "
         f"{_where(severity)} the usual range for this batch, {_range_text(low, high)} ({source})."),
        cause, {"value": s.lr, "typical": typical, "usual_range": [low, high], "ratio": ratio, "largest_group_lr": s.largest_lr,
                "source": source},
    )


def _weight_decay_finding(s: OptimizerSettings, ranges: Mapping[str, tuple[float, float, float, str]]) -> Diagnosis | None:
    low, typical, high, source = ranges["weight_decay"]
    judged = []
    for wd in s.weight_decays or [0.0]:
        factor, side = _beyond("weight_decay", wd, low, high)
        judged.append((_severity("weight_decay", factor, side), factor, wd, side))
    rank = {None: 0, "info": 1, "warning": 2}
    severity, factor, wd, side = max(judged, key=lambda j: (rank[j[0]], j[1]))
    l2 = s.family == "adam"
    if severity is None and not (l2 and wd > 0):
        return None
    groups = "no group decays" if not s.weight_decays else (
        "groups at " + "/".join(_num(w) for w in s.weight_decays) if len(s.weight_decays) > 1 else "")
    value = f"{_num(wd)}{f' ({groups})' if groups else ''}"
    times = f", {_times(wd / typical)} the typical {_num(typical)}" if typical > 0 and wd > 0 and side == "above" else ""
    if severity is None:  # Adam with an L2 term within the usual range: worth knowing, not a fault
        severity, where = "info", "within"
    else:
        where = _where(severity)
    message = f"{s.name} weight decay {value} is {where} the usual range for {s.name}, {_range_text(low, high)}{times} ({source})."
    if side == "above":
        cause = (f"weight decay pulls every decayed weight toward 0 at each step; far above the usual value it "
                 f"outweighs the loss gradients: {WEIGHT_DECAY_MEASURED}")
    elif side == "below":
        cause = "too little weight decay only weakens the regularisation (more overfitting in long runs); no fault in short ones"
    else:
        cause = ""
    if l2:
        note = ("Adam (not AdamW) adds weight_decay x weight to the gradient and divides it by the gradients' running RMS, "
                "so its strength depends on the gradients and on the lr: use AdamW (optimizer=adamw) for decoupled decay")
        cause = f"{cause}; {note}" if cause else note
    return _finding(s, "weight_decay", severity, message, cause,
                    {"value": wd, "values": s.weight_decays, "typical": typical, "usual_range": [low, high], "source": source})


def _momentum_finding(s: OptimizerSettings, ranges: Mapping[str, tuple[float, float, float, str]]) -> Diagnosis | None:
    if s.momentum is None:
        return None
    low, typical, high, source = ranges["momentum"]
    factor, side = _beyond("momentum", s.momentum, low, high)
    severity = _severity("momentum", factor, side)
    if severity is None:
        return None
    memory = math.inf if s.momentum >= 1 else 1 / (1 - s.momentum)
    if side == "above":
        cause = (f"momentum m averages the gradients of about 1/(1-m) = {memory:.0f} steps: the update keeps its direction "
                 "long after the loss surface changed, overshooting (oscillating or diverging losses)")
    else:
        cause = "little momentum makes the steps noisier and training slower at the same lr; no fault by itself"
    return _finding(
        s, "momentum", severity,
        f"SGD momentum {_num(s.momentum)} is {_where(severity)} the usual range, {_range_text(low, high)} (typical {_num(typical)}: {source}).",
        cause, {"value": s.momentum, "typical": typical, "usual_range": [low, high], "nesterov": s.nesterov, "source": source},
    )


def _betas_finding(s: OptimizerSettings, ranges: Mapping[str, tuple[float, float, float, str]]) -> Diagnosis | None:
    if s.betas is None:
        return None
    rank = {None: 0, "info": 1, "warning": 2}
    off, severity = [], None
    for param, value in zip(("beta1", "beta2"), s.betas):
        low, _, high, _ = ranges[param]
        factor, side = _beyond(param, value, low, high)
        sev = _severity(param, factor, side)
        if sev is not None:
            off.append(f"{param} {_num(value)} {_where(sev)} {_range_text(low, high)}")
            severity = sev if rank[sev] > rank[severity] else severity
    if severity is None:
        return None
    usual = [[ranges[p][0], ranges[p][2]] for p in ("beta1", "beta2")]
    return _finding(
        s, "betas", severity,
        (f"{s.name} betas ({_num(s.betas[0])}, {_num(s.betas[1])}): {'; '.join(off)} (typical "
         f"({_num(ranges['beta1'][1])}, {_num(ranges['beta2'][1])}): {ranges['beta1'][3]})."),
        ("beta1 sets how many steps the first moment (momentum) averages, 1/(1-beta1); beta2 the same for the "
         "squared gradients that normalise the step: too short a memory makes the steps erratic, too long a one "
         "keeps a stale direction or scale"),
        {"value": list(s.betas), "typical": [ranges["beta1"][1], ranges["beta2"][1]], "usual_range": usual},
    )


def _warmup_finding(s: OptimizerSettings) -> Diagnosis | None:
    if s.family != "sgd" or s.warmup_iters != 0 or s.lr < WARMUP_LR:
        return None
    return _finding(
        s, "warmup", "info",
        (f"SGD at lr {_num(s.lr)} starts without warmup (scheduler.warmup_iters=0); the {_DETECTION_REFS} warm up "
         f"linearly from 0.001x over their first 1000 iterations at lr 0.02 per 16 images."),
        ("the first updates of the freshly initialised heads are the largest; at an lr of 0.01 or more without warmup "
         "they can blow up the RPN's and the box head's regression or give a non-finite loss in the first iterations "
         "(Goyal et al. 2017)"),
        {"warmup_iters": 0, "lr": s.lr, "from_lr": WARMUP_LR},
    )


def settings_findings(settings: OptimizerSettings) -> list[Diagnosis]:
    """``optimizer_audit``'s findings for already read ``settings``."""
    ranges = USUAL_RANGES.get(settings.family or "")
    if ranges is None:
        return []
    found = [_lr_finding(settings, ranges), _weight_decay_finding(settings, ranges)]
    if settings.family == "sgd":
        found += [_momentum_finding(settings, ranges), _warmup_finding(settings)]
    else:
        found.append(_betas_finding(settings, ranges))
    return [f for f in found if f is not None]


def optimizer_audit(optimizer: torch.optim.Optimizer, *, batch_size: int, world_size: int = 1,
                    warmup_iters: int | None = None, config: DiagnosticsConfig | None = None) -> list[Diagnosis]:
    """The optimizer's settings against the usual ranges for its kind and the total batch
    (``batch_size`` x ``world_size``): one ``optimizer_range`` finding per setting outside them.

    Ranges (``USUAL_RANGES``; lr per 16 images, scaled by the total batch: linearly for SGD, by its
    square root for Adam/AdamW):

    * SGD: lr 0.02 (0.002..0.1), weight decay 1e-4 (1e-5..1e-3), momentum 0.9 (0.8..0.99);
    * AdamW: lr 1e-4 (1e-5..1e-3), weight decay 0.05 (1e-4..0.2), betas (0.9, 0.999) (beta1 0.8..0.95,
      beta2 0.95..0.9999); Adam alike, but its weight decay is L2 (0..1e-3, and always worth a note);
    * warmup: SGD at lr 0.01 or more with ``warmup_iters=0`` (info).

    Outside a range is ``info``; ``warning`` (far outside) from ``FAR_FACTORS`` times beyond its edge: 10x
    (momentum and betas on 1 - value), except lr above, 2x over the high edge (SGD: 10x the scaled
    typical value: divergence sets in abruptly), and weight decay below, never (too little only weakens
    the regularisation). So the shipped configs are quiet: SGD lr 0.02 at batch 4 is 4x the linear-scaling
    0.005, inside 0.1x..5x; AdamW lr 1e-4 at batch 4 is 2x the square-root-scaled 5e-5. Weight decay
    is judged on the decayed groups only (not the ``*_no_wd`` groups of ``optimizer.no_weight_decay_norm_bias``),
    lr on the base groups (``lr_mult`` 1: ``optimizer.lr``; a head multiplier is a choice the producer audit
    reads). Other optimizers (RMSprop, ...) have no usual ranges: nothing is said. ``config`` is unused
    for now (the ranges are constants), kept so the audit's functions take the same arguments.
    """
    del config
    return settings_findings(optimizer_settings(optimizer, batch_size=batch_size, world_size=world_size,
                                                warmup_iters=warmup_iters))


def _short(finding: Diagnosis) -> str:
    """A finding in a few words, for the audit's Optimizer line."""
    ev = finding.evidence
    label = {"weight_decay": "weight decay"}.get(finding.subject or "", finding.subject or "")
    if finding.subject == "warmup":
        return f"no warmup at lr {_num(ev['lr'])}"
    if finding.subject == "betas":
        (l1, h1), (l2, h2) = ev["usual_range"]
        return f"betas {_where(finding.severity)} ({_range_text(l1, h1)}, {_range_text(l2, h2)})"
    low, high = ev["usual_range"]
    if finding.subject == "weight_decay" and low <= ev["value"] <= high:
        return "weight decay as L2 (Adam, not AdamW)"
    return f"{label} {_num(ev['value'])} {_where(finding.severity)} {_range_text(low, high)}"


# ------------------------------------------------------------------------------------- the audit
def _dataset_boxes(dataset: Any, model: nn.Module) -> np.ndarray | None:
    """The dataset's object sizes (``object_sizes``) as ``model``'s transform resizes them; None
    without ``dataset.coco`` or a model transform."""
    transform = getattr(model, "transform", None)
    if transform is None or not has_ground_truth(dataset):
        return None
    min_size = float(transform.min_size[-1] if isinstance(transform.min_size, (tuple, list)) else transform.min_size)
    max_size = float(transform.max_size)

    def compute() -> np.ndarray:
        return object_sizes(dataset.coco, getattr(dataset, "ids", None), getattr(dataset, "usable_ann_ids", None),
                            min_size=min_size, max_size=max_size)

    return memoized(dataset, f"object_sizes-{min_size:g}-{max_size:g}", compute)


def audit_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_weights: Mapping[str, float],
    *,
    train_dataset: Any = None,
    config: DiagnosticsConfig | None = None,
    arch: str | None = None,
    has_anchor_key: bool | None = None,
    batch_size: int | None = None,
    world_size: int = 1,
    warmup_iters: int | None = None,
) -> AuditReport:
    """The start-of-run audit of ``model`` (a torchvision Mask R-CNN, possibly DDP-wrapped) trained by
    ``optimizer`` with ``loss_weights``; ``train_dataset`` (with ``coco``, ``ids``, ``usable_ann_ids``)
    for the anchor fit. ``has_anchor_key``: the model config has ``model.anchor_sizes`` (the small preset).
    ``batch_size`` (per process; ``world_size`` processes) and ``warmup_iters``: for the optimizer audit,
    run only when ``batch_size`` is given."""
    config = config if config is not None else DiagnosticsConfig()
    model = getattr(model, "module", model)
    rows = producer_rows(model, optimizer, loss_weights)
    warnings = producer_warnings(rows, optimizer, loss_weights, config)
    settings = None
    if batch_size is not None:
        settings = optimizer_settings(optimizer, batch_size=batch_size, world_size=world_size, warmup_iters=warmup_iters)
        warnings += settings_findings(settings)
    fit = dataset_anchor_fit(train_dataset, model) if train_dataset is not None else None
    if fit is not None:
        warning = anchor_warning(fit, config, arch, bool(has_anchor_key))
        if warning is not None:
            warnings.append(warning)
    return AuditReport(producers=rows, anchor_fit=fit, warnings=warnings,
                       anchor_min_objects=config.anchor_min_objects, optimizer=settings)


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
