"""Experiment trackers: one small protocol, a TensorBoard and a CSV backend, a null and a composite.

Tags come from ``maskrcnn_coco.tracking.scalars`` (the README's naming scheme), all logged with
``step=epoch``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from maskrcnn_coco.tracking.scalars import DEFAULT_OBJECTIVE, VAL_TOTAL, epoch_scalars

# Metrics the HParams tab shows beside each run's hyperparameters (scalars logged under these tags).
HPARAM_METRICS = tuple(dict.fromkeys((VAL_TOTAL, "mAP/bbox_AP", DEFAULT_OBJECTIVE, "mAP/segm_AP50")))


@runtime_checkable
class ExperimentTracker(Protocol):
    """What ``fit`` needs from a tracking backend."""

    def log_scalar(self, tag: str, value: float, step: int) -> None: ...

    def log_hyperparams(self, params: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"optimizer.lr": 0.02, ...}`` with scalar values (others as strings)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class TensorBoardTracker:
    """Writes scalars and hyperparameters into one event file in ``log_dir`` (opened lazily)."""

    def __init__(self, log_dir: str | Path, flush_secs: int = 30):
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs)
        return self._writer

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, global_step=step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = flatten_params(params)
        # Written into this run's own event file: SummaryWriter.add_hparams would open a stray
        # sub-run. The metric names link the HParams tab to scalars logged under the same tags.
        for summary in hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```")
        self.writer.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class CSVTracker:
    """Appends ``step,tag,value`` rows to ``metrics.csv``; hyperparameters go to ``hparams.json``."""

    def __init__(self, log_dir: str | Path, filename: str = "metrics.csv"):
        self.log_dir = Path(log_dir)
        self.path = self.log_dir / filename
        self._file = None

    def _writer(self):
        if self._file is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            self._file = self.path.open("a", newline="")
            if new:
                csv.writer(self._file).writerow(["step", "tag", "value"])
        return csv.writer(self._file)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self._writer().writerow([step, tag, repr(float(value))])

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / "hparams.json").write_text(json.dumps(params, indent=2, default=str))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class NullTracker:
    """Tracks nothing, so code never needs ``if tracker:``."""

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class CompositeTracker:
    """Fans every call out to several trackers."""

    def __init__(self, trackers: Iterable[ExperimentTracker]):
        self.trackers = list(trackers)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        for t in self.trackers:
            t.log_scalar(tag, value, step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_hyperparams(params)

    def flush(self) -> None:
        for t in self.trackers:
            t.flush()

    def close(self) -> None:
        errors = []
        for t in self.trackers:
            try:
                t.close()
            except Exception as err:  # noqa: BLE001 - close the others even if one fails
                errors.append(err)
        if errors:
            raise errors[0]


def log_scalars(tracker: ExperimentTracker, scalars: Mapping[str, float], step: int) -> None:
    """Log ``{tag: value}`` at ``step`` and flush."""
    for tag, value in scalars.items():
        tracker.log_scalar(tag, float(value), step)
    tracker.flush()


def log_training_metrics(
    tracker: ExperimentTracker,
    epoch: int,
    train_loss: float | Mapping[str, float],
    val_loss: float | Mapping[str, float] | None,
    metrics: Mapping[str, Mapping[str, float]] | None,
    lr: float | Mapping[str, float] | None,
    *,
    loss_weights: Mapping[str, float] | None = None,
    extra: Mapping[str, float] | None = None,
) -> None:
    """Log one epoch under the README's naming scheme (``epoch_scalars``), all at ``step=epoch``.

    ``train_loss``/``val_loss`` may be a float (the total) or a dict of components; a dict's total is
    the weighted sum with ``loss_weights`` (1.0 where absent): what the optimiser minimised.
    ``lr`` may be one float or ``{group: lr}``. Non-finite metric values (COCO's undefined ones,
    e.g. APl without large objects) are skipped. ``extra`` tags are logged as given.
    """
    record = {"train_loss": train_loss, "val_loss": val_loss, "metrics": metrics, "lr": lr, "loss_weights": loss_weights}
    log_scalars(tracker, {**epoch_scalars(record), **(extra or {})}, epoch)
