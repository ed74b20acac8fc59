"""The loss probe: forward-only passes through the training pipeline, per component and FPN level."""

from maskrcnn_coco.probe.core import run_probe

__all__ = ["run_probe"]
