"""A run's epoch history, by scalar tag: ``metrics.jsonl`` read back, the sweep objective, the best epoch.

The history is a list of ``{"epoch": e, <tag>: value, ...}`` (tags from
``maskrcnn_coco.tracking.scalars``); ``fit`` writes one line of it per epoch to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from maskrcnn_coco.tracking.scalars import check_objective, lower_is_better, on_full_val_set

HISTORY_FILE = "metrics.jsonl"


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epoch records of a run folder (``metrics.jsonl``), empty when it has none."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_metric(record: Mapping[str, Any], tag: str) -> float | None:
    """The value of ``tag`` in one epoch record; None when absent or not finite."""
    value = record.get(tag)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def best_epoch(history: Sequence[Mapping[str, Any]], tag: str) -> tuple[int | None, float | None]:
    """(epoch, value) with the best ``tag``: lowest for losses, highest for mAP; among the epochs
    measured on the whole val set (``eval.subset``'s epochs are another measure)."""
    scored = [(r["epoch"], v) for r in history if (v := record_metric(r, tag)) is not None and on_full_val_set(r)]
    if not scored:
        return None, None
    pick = min if lower_is_better(tag) else max
    return pick(scored, key=lambda ev: ev[1])


def last_value(history: Sequence[Mapping[str, Any]], tag: str) -> float | None:
    """``tag`` at the last epoch that has it."""
    return next((v for r in reversed(history) if (v := record_metric(r, tag)) is not None), None)


def objective_value(history: Sequence[Mapping[str, Any]], metric: str, mode: str) -> float:
    """What the entry point returns to a sweeper: ``metric`` at the last epoch that has it, or its best."""
    check_objective(metric, mode)
    value = best_epoch(history, metric)[1] if mode == "best" else last_value(history, metric)
    return float("nan") if value is None else value
