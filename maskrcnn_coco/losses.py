"""Loss components and their weights: the one place that defines what the optimiser minimises."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from maskrcnn_coco.config import LOSS_COMPONENTS

T = TypeVar("T")


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
