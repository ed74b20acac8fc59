"""Mask R-CNN builders (torchvision R-50 FPN v1/v2 and the small CPU preset) and weight loading."""

from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.modeling.weights import WeightsError, is_local_path, load_weights_file

__all__ = ["WeightsError", "build_model", "is_local_path", "load_weights_file"]
