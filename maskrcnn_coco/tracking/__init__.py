"""Experiment tracking: the tracker protocol and backends, and the one scalar vocabulary."""

from maskrcnn_coco.tracking.backends import (
    CompositeTracker,
    CSVTracker,
    ExperimentTracker,
    NullTracker,
    TensorBoardTracker,
    flatten_params,
    log_scalars,
    log_training_metrics,
)
from maskrcnn_coco.tracking.scalars import epoch_scalars

__all__ = [
    "CSVTracker",
    "CompositeTracker",
    "ExperimentTracker",
    "NullTracker",
    "TensorBoardTracker",
    "epoch_scalars",
    "flatten_params",
    "log_scalars",
    "log_training_metrics",
]
