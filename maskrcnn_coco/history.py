"""Reading ``fit``'s epoch history (``metrics.json``) by scalar tag: the sweep objective and best epoch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from maskrcnn_coco.errors import ConfigError

OBJECTIVE_MODES = ("final", "best")


def check_objective(metric: str, mode: str = "final") -> None:
    """Reject an objective the history cannot answer, before any training."""
    if not (metric.startswith("mAP/") and "_" in metric) and metric not in ("loss/val", "loss/train_total"):
        raise ConfigError(f"objective.metric={metric!r}: use mAP/<bbox|segm>_<AP|AP50|...>, loss/val or loss/train_total")
    if mode not in OBJECTIVE_MODES:
        raise ConfigError(f"objective.mode={mode!r}: use final or best")


def record_metric(record: Mapping[str, Any], metric: str) -> float | None:
    """The value of tag ``metric`` in one epoch record; None when absent or not finite."""
    check_objective(metric)
    if metric.startswith("mAP/"):
        iou_type, _, name = metric[4:].partition("_")
        value = ((record.get("metrics") or {}).get(iou_type) or {}).get(name)
    elif metric == "loss/val":
        value = record.get("val_total")
    else:
        value = record.get("train_total")
    return None if value is None or not math.isfinite(value) else float(value)


def best_epoch(history: Sequence[Mapping[str, Any]], metric: str) -> tuple[int | None, float | None]:
    """(epoch, value) with the best ``metric``: lowest for losses, highest for mAP."""
    scored = [(r["epoch"], v) for r in history if (v := record_metric(r, metric)) is not None]
    if not scored:
        return None, None
    pick = min if metric.startswith("loss/") else max
    return pick(scored, key=lambda ev: ev[1])


def objective_value(history: Sequence[Mapping[str, Any]], metric: str, mode: str) -> float:
    """What the entry point returns to a sweeper: ``metric`` at the last epoch that has it, or its best."""
    check_objective(metric, mode)
    if mode == "best":
        value = best_epoch(history, metric)[1]
    else:
        values = [v for r in history if (v := record_metric(r, metric)) is not None]
        value = values[-1] if values else None
    return float("nan") if value is None else value
