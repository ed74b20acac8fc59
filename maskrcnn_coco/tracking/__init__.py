"""Experiment tracking: the tracker protocol and backends (TensorBoard, CSV; MLflow and W&B in
``mlflow_tracker``/``wandb_tracker``, optional extras), and the one scalar vocabulary."""

from maskrcnn_coco.tracking.backends import (
    CompositeTracker,
    CSVTracker,
    ExperimentTracker,
    GuardedTracker,
    NullTracker,
    TensorBoardTracker,
    TrackerExtras,
    log_artifact,
    log_image,
    log_scalars,
    log_text,
    log_training_metrics,
    resume_tracker,
    step_axis,
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
    "TrackerExtras",
    "epoch_scalars",
    "flatten_params",
    "key_hparams",
    "log_artifact",
    "log_image",
    "log_scalars",
    "log_text",
    "log_training_metrics",
    "resume_tracker",
    "step_axis",
]
