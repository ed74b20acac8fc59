"""Experiment trackers: one small protocol, TensorBoard and CSV backends, a null, a composite and a guard.

Tags come from ``maskrcnn_coco.tracking.scalars`` (the README's naming scheme), all logged with
``step=epoch``. MLflow and Weights & Biases backends live in ``mlflow_tracker`` and ``wandb_tracker``
(optional extras). ``GuardedTracker`` keeps a failing backend from stopping training.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from maskrcnn_coco.tracking.hparams import key_hparams
from maskrcnn_coco.tracking.layout import custom_scalars_layout
from maskrcnn_coco.tracking.scalars import DEFAULT_OBJECTIVE, TRAIN_TOTAL, VAL_TOTAL, epoch_scalars
from maskrcnn_coco.utils.errors import ConfigError

log = logging.getLogger(__name__)

# Metrics the HParams tab shows beside each run's hyperparameters (scalars logged under these tags;
# at close only those the run logged are listed).
HPARAM_METRICS = tuple(dict.fromkeys((DEFAULT_OBJECTIVE, "mAP/segm_AP50", "mAP/bbox_AP", VAL_TOTAL, TRAIN_TOTAL)))


@runtime_checkable
class ExperimentTracker(Protocol):
    """What ``fit`` needs from a tracking backend."""

    def log_scalar(self, tag: str, value: float, step: int) -> None: ...

    def log_hyperparams(self, params: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def failed_run() -> bool:
    """True when called while an exception propagates (a tracker's ``close`` in a ``finally``):
    the run's status is then failed, not finished."""
    return sys.exc_info()[0] is not None


def import_optional(module: str, extra: str) -> Any:
    """Import a backend's optional library, or say which extra installs it (a ``ConfigError``, at start)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"The {extra} tracker needs the {module!r} package ({err}): pip install 'maskrcnn_coco[{extra}]', "
            f"or drop it from tracker.backends"
        ) from None


class TensorBoardTracker:
    """Writes scalars and hyperparameters into one event file in ``log_dir`` (opened lazily).

    Besides the scalars: a CUSTOM SCALARS layout (``maskrcnn_coco.tracking.layout``: train and val
    of each loss component on one chart, all lr groups, all grad-norm groups, segm and bbox AP),
    rewritten at a flush whenever new tags appeared; and an HParams session: ``key_hparams`` at
    ``log_hyperparams`` (with the whole config as text, ``config``), then at ``close`` the metric
    list (``HPARAM_METRICS`` the run logged, whose last values the HParams table shows) and the end
    status.
    """

    def __init__(self, log_dir: str | Path, flush_secs: int = 30):
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self._writer = None
        self._tags: set[str] = set()
        self._layout_tags: set[str] = set()
        self._hparams: dict[str, Any] | None = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs)
        return self._writer

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, global_step=step)
        self._tags.add(tag)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Markdown in TensorBoard's Text tab (the diagnostics' findings)."""
        self.writer.add_text(tag, text, global_step=step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._hparams = key_hparams(params)
        # Written into this run's own event file: SummaryWriter.add_hparams would open a stray
        # sub-run. TensorBoard keeps the first summary of a tag, so the session start goes now and
        # the experiment (with the metrics this run actually logged) once, at close.
        _, session_start, _ = hparams(self._hparams, {})
        self.writer.file_writer.add_summary(session_start)
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```")
        self.writer.flush()

    def _write_layout(self) -> None:
        if self._tags != self._layout_tags:
            layout = custom_scalars_layout(self._tags)
            if layout:
                self.writer.add_custom_scalars(layout)  # TensorBoard shows the latest layout
            self._layout_tags = set(self._tags)

    def flush(self) -> None:
        if self._writer is not None:
            self._write_layout()
            self._writer.flush()

    def close(self) -> None:
        if self._writer is None:
            return
        self._write_layout()
        if self._hparams is not None:
            from torch.utils.tensorboard.summary import hparams

            metrics = {tag: 0.0 for tag in HPARAM_METRICS if tag in self._tags}
            experiment, _, _ = hparams(self._hparams, metrics)
            self._writer.file_writer.add_summary(experiment)
            self._writer.file_writer.add_summary(_session_end(failed=failed_run()))
        self._writer.close()
        self._writer = None


def _session_end(failed: bool):
    """The HParams session-end summary (torch's ``hparams`` always says success)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    content = plugin_data_pb2.HParamsPluginData(session_end_info=info, version=metadata.PLUGIN_DATA_VERSION)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=plugin))])


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

    def log_text(self, tag: str, text: str, step: int) -> None:
        for t in self.trackers:
            log_text(t, tag, text, step)

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


class GuardedTracker:
    """One backend whose failures never stop training: the first exception it raises (a server
    down, a full disk, a bug) is logged as ONE warning naming the backend and the error, and the
    backend is switched off for the rest of the run; other backends keep logging.

    ``propagate`` lists exception types that are not failures of the backend and pass through
    (the entry point passes its stop-signal exception).
    """

    def __init__(self, tracker: ExperimentTracker, name: str | None = None,
                 propagate: tuple[type[BaseException], ...] = ()):
        self.tracker = tracker
        self.name = name or type(tracker).__name__
        self.propagate = propagate
        self.failed: BaseException | None = None

    def _call(self, method: str, *args: Any) -> None:
        if self.failed is not None:
            return
        try:
            getattr(self.tracker, method)(*args)
        except self.propagate:
            raise
        except Exception as err:  # noqa: BLE001 - any backend error: warn once, keep training
            self.failed = err
            log.warning("Tracker %r failed in %s (%s: %s); it is switched off for the rest of this run, "
                        "training and the other trackers continue.", self.name, method, type(err).__name__, err)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self._call("log_scalar", tag, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if hasattr(self.tracker, "log_text"):
            self._call("log_text", tag, text, step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self._call("log_hyperparams", params)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        if self.failed is None:
            self._call("close")
            return
        try:  # release what the failed backend holds; its errors were already reported once
            self.tracker.close()
        except Exception:
            log.debug("Closing the failed tracker %r raised too", self.name, exc_info=True)


def log_text(tracker: ExperimentTracker, tag: str, text: str, step: int) -> None:
    """Text to the trackers that take text (``log_text`` is optional in the protocol); the others skip it."""
    method = getattr(tracker, "log_text", None)
    if method is not None:
        method(tag, text, step)


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
