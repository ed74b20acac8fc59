"""The training engine: the loop functions, ``fit`` with its sinks, and the checkpoint format."""

from maskrcnn_coco.engine.fit import fit
from maskrcnn_coco.engine.loop import GradNormMeter, evaluate, move_to_device, train_one_epoch
from maskrcnn_coco.engine.sinks import (
    Checkpointer,
    ConsoleSummary,
    EpochResult,
    FitState,
    HistoryWriter,
    Sink,
    TrackerWriter,
    default_sinks,
    format_epoch_summary,
)

__all__ = [
    "Checkpointer",
    "ConsoleSummary",
    "EpochResult",
    "FitState",
    "GradNormMeter",
    "HistoryWriter",
    "Sink",
    "TrackerWriter",
    "default_sinks",
    "evaluate",
    "fit",
    "format_epoch_summary",
    "move_to_device",
    "train_one_epoch",
]
