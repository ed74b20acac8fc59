"""maskrcnn_coco: torchvision Mask R-CNN on COCO-format data, with every loss component visible."""

from maskrcnn_coco.engine import evaluate, fit, train_one_epoch
from maskrcnn_coco.inference import load_model, predict
from maskrcnn_coco.solver import get_parameter_groups
from maskrcnn_coco.tracking import (
    CompositeTracker,
    CSVTracker,
    ExperimentTracker,
    NullTracker,
    TensorBoardTracker,
    log_training_metrics,
)

__all__ = [
    "CSVTracker",
    "CompositeTracker",
    "ExperimentTracker",
    "NullTracker",
    "TensorBoardTracker",
    "evaluate",
    "fit",
    "get_parameter_groups",
    "load_model",
    "log_training_metrics",
    "predict",
    "train_one_epoch",
]
__version__ = "0.1.0"
