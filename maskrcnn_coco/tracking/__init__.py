"""Experiment tracking: the tracker protocol and backends (TensorBoard, CSV; MLflow and W&B in
``mlflow_tracker``/``wandb_tracker``, optional extras), and the one scalar vocabulary."""

from maskrcnn_coco.tracking.backends import (
    CompositeTracker,
    CSVTracker,
    ExperimentTracker,
    GuardedTracker,
    NullTracker,
    TensorBoardTracker,
    log_scalars,
    log_training_metrics,
)
from maskrcnn_coco.tracking.hparams import KEY_HPARAMS, Hyperparams, flatten_params, key_hparams
from maskrcnn_coco.tracking.scalars import epoch_scalars

__all__ = [
    "KEY_HPARAMS",
    "CSVTracker",
    "CompositeTracker",
    "ExperimentTracker",
    "GuardedTracker",
    "Hyperparams",
    "NullTracker",
    "TensorBoardTracker",
    "epoch_scalars",
    "flatten_params",
    "key_hparams",
    "log_scalars",
    "log_training_metrics",
]
