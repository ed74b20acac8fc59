"""The one scalar vocabulary: an epoch record becomes ``{tag: float}`` here and nowhere else.

Every consumer (trackers, the console block, ``metrics.jsonl``, the sweep summary, the sweep
objective, anything that reads a run back) uses these tags:

* ``loss/train_total`` (the weighted sum: what was optimised) and ``loss/train_<component>`` (raw);
  ``loss/train`` when only a float total is known
* ``loss/val`` (weighted total) and ``loss/val_<component>``
* ``mAP/<bbox|segm>_<AP|AP50|AP75|APs|APm|APl>`` (finite values only: COCO's undefined ones are left out)
* ``lr`` (the backbone group's, else the first group's) and ``lr/<group>``
* ``grad_norm/<group>``, ``time/<name>``
* ``spike/loss``, ``spike/grad_norm``: the epoch's largest iteration-level ratio (a window's peak over
  its reference, ``engine.monitors.SpikeMonitor``); what the spike warnings compare with their factors

Iteration-level scalars (``iteration_scalars``), one namespace ``iter/`` at ``step=global_step`` (the
optimizer steps so far), every ``print_freq`` iterations and at an epoch's end; each is the mean over
the window since the previous read-back (the epoch tags above are untouched):

* ``iter/<component>`` (raw, e.g. ``iter/loss_mask``) and ``iter/loss_total`` (weighted)
* ``iter/lr/<group>`` (the groups as ``lr/<group>`` names them), ``iter/grad_norm/<set>`` (windows
  in which the gradient norms were measured)
* ``iter/time_data``, ``iter/time_iter`` (seconds per iteration), ``iter/images_per_s`` (all ranks)
* ``iter/memory/<name>`` in MiB: ``main_rss_mb``, ``workers_uss_mb``, ``workers_pss_mb`` (with loader
  workers), ``cuda_max_allocated_mb`` (the window's peak), ``cuda_reserved_mb``
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

from maskrcnn_coco.config import DEFAULT_OBJECTIVE, LOSS_COMPONENTS
from maskrcnn_coco.utils.errors import ConfigError

T = TypeVar("T")

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
TRAIN_TOTAL = "loss/train_total"
TRAIN_ONLY_TOTAL = "loss/train"  # a train loss known only as a float total
VAL_TOTAL = "loss/val"
ITER_PREFIX = "iter/"
ITER_TOTAL = "iter/loss_total"
OBJECTIVE_MODES = ("final", "best")

__all__ = [
    "DEFAULT_OBJECTIVE",
    "ITER_PREFIX",
    "LOSS_COMPONENTS",
    "METRIC_NAMES",
    "check_objective",
    "epoch_scalars",
    "iteration_scalars",
    "loss_tag",
    "loss_weights_from_config",
    "map_tag",
    "weighted_total",
]


def loss_tag(split: str, component: str | None = None) -> str:
    """``loss/<split>_<component>`` (raw), or the weighted total: ``loss/train_total``, ``loss/val``."""
    if component is None:
        return TRAIN_TOTAL if split == "train" else VAL_TOTAL
    return f"loss/{split}_{component}"


def map_tag(iou_type: str, metric: str) -> str:
    """``mAP/<bbox|segm>_<metric>`` (``metric``: one of ``METRIC_NAMES``, or ``AP_class_<name>``)."""
    return f"mAP/{iou_type}_{metric}"


def loss_weights_from_config(weights: Any) -> dict[str, float]:
    """``cfg.loss.weights`` (dataclass or DictConfig) -> ``{component: weight}`` for all five."""
    return {name: float(getattr(weights, name)) for name in LOSS_COMPONENTS}


def weighted_total(components: Mapping[str, T], weights: Mapping[str, float] | None = None) -> T:
    """Sum of ``weight * component`` (weight 1.0 where ``weights`` has none); works for floats and tensors."""
    weights = weights or {}
    total: Any = 0.0
    for name, value in components.items():
        total = total + float(weights.get(name, 1.0)) * value
    return total


def _losses(split: str, value: Any, weights: Mapping[str, float] | None) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        return {TRAIN_ONLY_TOTAL if split == "train" else VAL_TOTAL: float(value)}
    if not value:
        return {}
    total_tag = TRAIN_TOTAL if split == "train" else VAL_TOTAL
    tags = {total_tag: float(weighted_total(value, weights))}
    tags.update({loss_tag(split, name): float(v) for name, v in value.items()})
    return tags


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """One epoch's record -> ``{tag: value}`` under the README's naming scheme.

    ``record`` keys (all optional): ``train_loss`` / ``val_loss`` (a dict of raw components, or a
    float total), ``loss_weights`` (for the weighted totals; 1.0 where absent), ``metrics``
    (``{"bbox": {"AP": ...}, "segm": {...}}``), ``lr`` (``{group: lr}`` or a float),
    ``grad_norm`` (``{group: norm}``), ``time`` (``{name: seconds}``), ``spike`` (``{name: ratio}``).
    """
    weights = record.get("loss_weights")
    tags: dict[str, float] = {}
    tags.update(_losses("train", record.get("train_loss"), weights))
    tags.update(_losses("val", record.get("val_loss"), weights))
    for iou_type, values in (record.get("metrics") or {}).items():
        for name, value in (values or {}).items():
            # Non-numeric entries (the confusion matrix ``evaluate`` returns as ``metrics["confusion"]``) are no scalars.
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                tags[map_tag(iou_type, name)] = float(value)
    lr = record.get("lr")
    if isinstance(lr, Mapping):
        if lr:
            tags["lr"] = float(lr.get("backbone", next(iter(lr.values()))))
        tags.update({f"lr/{group}": float(v) for group, v in lr.items()})
    elif lr is not None:
        tags["lr"] = float(lr)
    for prefix in ("grad_norm", "time", "spike"):
        tags.update({f"{prefix}/{name}": float(v) for name, v in (record.get(prefix) or {}).items()})
    return tags


def iteration_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """One read-back window -> ``{tag: value}`` under the ``iter/`` namespace (module docstring).

    ``record`` keys (all optional): ``loss`` (``{component: window mean}``, raw), ``loss_weights``
    (for ``iter/loss_total``; 1.0 where absent), ``lr`` (``{group: lr}``), ``grad_norm``
    (``{set: window mean}``), ``time`` (``{"data": s, "iter": s}``), ``images_per_s``, ``memory``
    (``{name: MiB}``, names ending in ``_mb``).
    """
    tags: dict[str, float] = {}
    losses = record.get("loss") or {}
    if losses:
        tags.update({ITER_PREFIX + name: float(v) for name, v in losses.items()})
        tags[ITER_TOTAL] = float(weighted_total(losses, record.get("loss_weights")))
    for prefix in ("lr", "grad_norm", "memory"):
        tags.update({f"{ITER_PREFIX}{prefix}/{name}": float(v) for name, v in (record.get(prefix) or {}).items()})
    tags.update({f"{ITER_PREFIX}time_{name}": float(v) for name, v in (record.get("time") or {}).items()})
    if record.get("images_per_s") is not None:
        tags[ITER_PREFIX + "images_per_s"] = float(record["images_per_s"])
    return tags


# ------------------------------------------------------------------------- reading tags back
def check_objective(metric: str, mode: str = "final") -> None:
    """Reject an objective tag the history cannot answer, before any training."""
    iou_type, _, name = metric.removeprefix("mAP/").partition("_")
    is_map = metric.startswith("mAP/") and iou_type in IOU_TYPES and name in METRIC_NAMES
    if not is_map and metric not in (VAL_TOTAL, TRAIN_TOTAL):
        raise ConfigError(
            f"objective.metric={metric!r}: use mAP/<bbox|segm>_<{'|'.join(METRIC_NAMES)}>, {VAL_TOTAL} or {TRAIN_TOTAL}"
        )
    if mode not in OBJECTIVE_MODES:
        raise ConfigError(f"objective.mode={mode!r}: use {' or '.join(OBJECTIVE_MODES)}")


def lower_is_better(tag: str) -> bool:
    return tag.startswith("loss/")
