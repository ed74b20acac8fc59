"""The training engine: the loop functions, ``fit``, the hooks and the checkpoint format.

``loop.train_one_epoch`` (the step), ``evaluate.evaluate``, ``fit.fit`` (epochs = train + evaluate +
hooks), ``hooks`` (the events and their dispatch), ``monitors`` (gradient norms, spikes, divergence
guard, timer, periodic checkpoints), ``writers`` (progress, console, trackers, files, diagnostics),
``checkpoint`` (the format, the file names, the checkpointer), ``state`` (the loop state),
``settings`` (``FitSettings``).
"""

from maskrcnn_coco.engine.checkpoint import Checkpointer
from maskrcnn_coco.engine.evaluate import evaluate
from maskrcnn_coco.engine.fit import fit
from maskrcnn_coco.engine.hooks import EpochResult, Hook, HookList
from maskrcnn_coco.engine.loop import move_to_device, train_one_epoch
from maskrcnn_coco.engine.monitors import (
    DivergenceGuard,
    GradNormMeter,
    IterationTimer,
    PeriodicCheckpoint,
    SpikeMonitor,
)
from maskrcnn_coco.engine.settings import FitSettings
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.engine.writers import (
    ConfusionWriter,
    ConsoleSummary,
    DiagnosticsWriter,
    HistoryWriter,
    ProgressBar,
    TrackerWriter,
    default_hooks,
    format_epoch_summary,
)

__all__ = [
    "Checkpointer",
    "ConfusionWriter",
    "ConsoleSummary",
    "DiagnosticsWriter",
    "DivergenceGuard",
    "EpochResult",
    "FitSettings",
    "GradNormMeter",
    "HistoryWriter",
    "Hook",
    "HookList",
    "IterationTimer",
    "PeriodicCheckpoint",
    "ProgressBar",
    "SpikeMonitor",
    "TrackerWriter",
    "TrainingState",
    "default_hooks",
    "evaluate",
    "fit",
    "format_epoch_summary",
    "move_to_device",
    "train_one_epoch",
]
