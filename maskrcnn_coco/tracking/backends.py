"""Experiment trackers: one small protocol, TensorBoard and CSV backends, a null, a composite and a guard.

Tags come from ``maskrcnn_coco.tracking.scalars`` (the README's naming scheme). Two step axes: the
``iter/`` tags (``ITER_PREFIX``) at ``step=`` the global iteration (optimizer steps so far), every other
tag (scalars, text, images) at ``step=epoch`` (``step_axis``). MLflow and Weights & Biases backends live
in ``mlflow_tracker`` and ``wandb_tracker`` (optional extras). ``GuardedTracker`` keeps a failing backend
from stopping training.

Besides the four methods of ``ExperimentTracker`` a backend may implement ``TrackerExtras``: text,
images, files, and continuing after a resume. Each is optional: call it through the module helper of
the same name (``log_text``, ``log_image``, ``log_artifact``, ``resume_tracker``), which skips (or, for
``resume``, falls back for) a tracker without it. (They are not members of ``ExperimentTracker``: a
runtime-checkable protocol's ``isinstance`` would then reject the trackers that lack them.) TensorBoard
and CSV take no files: the run folder itself is where they write.

Resuming (``resume``, called by ``engine.writers.TrackerWriter`` before a resumed run's first epoch,
with the checkpoint's epoch, global step and carried history): every tag must stay ONE curve, no step
twice, none out of order, after any number of stops and resumes, into the same run folder or a new one.

* A backend that starts empty (a new run folder, a new W&B run) logs the carried epoch history once.
* A backend that finds its earlier output of this run (the same folder) logs nothing again but what
  it lacks of the history (an epoch whose checkpoint was written but whose scalars were not, the run
  stopped in between), and drops what an earlier attempt logged after the checkpoint (the iteration
  scalars of a crashed attempt): TensorBoard writes a restart marker, CSV rewrites its file, MLflow
  skips the steps its metric already has. Per backend below.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from maskrcnn_coco.tracking.hparams import HPARAM_METRICS, experiment_summary, key_hparams
from maskrcnn_coco.tracking.layout import compare_pair, custom_scalars_layout, group_pair
from maskrcnn_coco.tracking.scalars import ITER_PREFIX, epoch_scalars
from maskrcnn_coco.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EPOCH_AXIS, ITER_AXIS = "epoch", "iter"
EVENT_FILE_GLOB = "events.out.tfevents.*"

# The run folder's files the MLflow and W&B backends upload at close (globs, relative to the run
# folder; those that exist; a folder goes with its contents). Never checkpoints.
RUN_SUMMARY_FILES = ("metrics.jsonl", "metrics.csv", "hparams.json", "provenance.json", ".hydra/config.yaml",
                     ".hydra/overrides.yaml", "train.log", "diagnostics.jsonl", "diagnostics_last_found.json",
                     "label_check_epoch_*.json",
                     "per_image_losses_epoch_*.json")
RUN_IMAGE_FILES = ("confusion_epoch_*.png", "vis")  # confusion matrices, the prediction images (engine.visualize)


def step_axis(tag: str) -> str:
    """``"iter"`` for an ``iter/`` tag (step = global iteration), else ``"epoch"`` (step = epoch)."""
    return ITER_AXIS if tag.startswith(ITER_PREFIX) else EPOCH_AXIS


def run_files(log_dir: str | Path, patterns: Sequence[str]) -> list[Path]:
    """The paths under ``log_dir`` matching ``patterns`` (globs; a plain name matches itself), in
    pattern order, each once."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        for path in sorted(Path(log_dir).glob(pattern)):
            found.setdefault(path)
    return list(found)


def record_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """One carried history record (``{"epoch": e, tag: value, ...}``) as its scalars (finite numbers)."""
    return {tag: float(v) for tag, v in record.items()
            if tag != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_history(tracker: ExperimentTracker, history: Sequence[Mapping[str, Any]],
                skip: Iterable[tuple[str, int]] = ()) -> None:
    """The carried epoch records, each value at ``step=epoch``, but the ``(tag, epoch)`` in ``skip``
    (what the backend has already); then flush."""
    skip = set(skip)
    for record in history:
        step = int(record["epoch"])
        for tag, value in record_scalars(record).items():
            if (tag, step) not in skip:
                tracker.log_scalar(tag, value, step)
    tracker.flush()


@runtime_checkable
class ExperimentTracker(Protocol):
    """What ``fit`` needs from a tracking backend."""

    def log_scalar(self, tag: str, value: float, step: int) -> None: ...

    def log_hyperparams(self, params: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TrackerExtras(Protocol):
    """What a backend may add to ``ExperimentTracker``; each method is optional (call it through the
    module helper of the same name, which skips a tracker without it). ``image``: uint8 ``(3, H, W)``
    (``utils.draw``); ``step`` as ``step_axis`` says."""

    def log_text(self, tag: str, text: str, step: int) -> None: ...

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def resume(self, epoch: int, global_step: int, history: Sequence[Mapping[str, Any]]) -> None: ...


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


def _restart_marker(writer: Any, step: int) -> None:
    """``SessionLog.START`` at ``step``: TensorBoard drops this file's folder's earlier events at steps >= it."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer.file_writer.add_event(Event(step=step, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))


class TensorBoardTracker:
    """Writes scalars and hyperparameters into one event file in ``log_dir`` (opened lazily).

    Besides the scalars: a CUSTOM SCALARS layout (``maskrcnn_coco.tracking.layout``: train and val
    of each loss component on one chart, all lr groups, all grad-norm groups, segm and bbox AP),
    rewritten at a flush whenever new tags appeared; and an HParams session: ``key_hparams`` at
    ``log_hyperparams`` (with the whole config as text, ``config``), then at ``close`` the metric
    list (``HPARAM_METRICS`` the run logged, whose last values the HParams table shows) and the end
    status.

    Train vs val in two colours (``tracking.layout``): each per-epoch loss tag is also written as
    ``compare/<component>`` into the sub-run ``<log_dir>/train`` or ``<log_dir>/val``; the run's own
    event file holds every tag of the vocabulary, as before. Likewise each lr and grad-norm group
    (``lr/<g>``, ``grad_norm/<g>`` and their ``iter/`` forms) goes once more into ``<log_dir>/groups/<g>``
    (``group_pair``; off with ``group_runs=False``), so their charts have a colour per group. Images (``log_image``) go to the IMAGES tab,
    text to the TEXT tab, both at ``step=epoch``.

    Resume (``resume``): into a new folder, the carried history is written once. Into the same folder
    (event files there from before this tracker opened its own), a restart marker (``SessionLog.START``
    at ``step = global_step + 1``, what ``SummaryWriter(purge_step=...)`` writes) makes TensorBoard drop
    the earlier attempts' events at steps above the checkpoint: the iteration scalars logged after the
    last checkpoint of a crashed attempt. Epoch tags are untouched by it: their steps (epochs) never
    exceed the global step (every epoch has at least one iteration; with exactly one, epoch ==
    global_step and the marker sits one step above the epoch). Then the history records the earlier
    files lack (the epoch checkpointed but not yet logged when the run stopped) are written. The Python
    loader (``EventAccumulator``, ``--load_fast=false``) obeys the marker; the default Rust loader
    ignores it but keeps, per tag, the last value written for a step (a point re-written at step s
    replaces every earlier point at steps >= s), which resolves the same attempts the same way.
    """

    def __init__(self, log_dir: str | Path, flush_secs: int = 30, group_runs: bool = True):
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self.group_runs = group_runs
        self._restart_step: int | None = None  # set by resume: the sub-runs' restart marker
        self._writer = None
        self._pair_writers: dict[str, Any] = {}
        self._earlier: list[Path] = []  # event files of earlier attempts in log_dir
        self._tags: set[str] = set()
        self._layout_tags: set[str] = set()
        self._hparams: dict[str, Any] | None = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # What was there before this tracker's own file: an earlier attempt of this run (resume).
            self._earlier = sorted(self.log_dir.glob(EVENT_FILE_GLOB))
            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs)
        return self._writer

    def _pair_writer(self, sub_run: str):
        if sub_run not in self._pair_writers:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.log_dir / sub_run
            earlier = sorted(folder.glob(EVENT_FILE_GLOB))
            writer = SummaryWriter(log_dir=str(folder), flush_secs=self.flush_secs)
            if earlier and self._restart_step is not None:
                _restart_marker(writer, self._restart_step)  # as in the run's own file (resume)
            self._pair_writers[sub_run] = writer
        return self._pair_writers[sub_run]

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, global_step=step)
        self._tags.add(tag)
        pair = compare_pair(tag) or (group_pair(tag) if self.group_runs else None)
        if pair is not None:
            sub_run, compare_tag = pair
            self._pair_writer(sub_run).add_scalar(compare_tag, value, global_step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Markdown in TensorBoard's Text tab (the diagnostics' findings)."""
        self.writer.add_text(tag, text, global_step=step)

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """A uint8 ``(3, H, W)`` image in the IMAGES tab (one slider step per epoch)."""
        self.writer.add_image(tag, image, global_step=step, dataformats="CHW")

    def resume(self, epoch: int, global_step: int, history: Sequence[Mapping[str, Any]]) -> None:
        """Continue after a checkpoint (class docstring): a restart marker above ``global_step`` when
        this folder holds earlier event files, then the history records they lack (all of them in a
        new folder)."""
        writer = self.writer  # opening it lists the earlier attempts' files
        present: set[tuple[str, int]] = set()
        if self._earlier:
            self._restart_step = global_step + 1
            _restart_marker(writer, self._restart_step)
            present = _logged_steps(self._earlier)
            carried = {tag for record in history for tag in record_scalars(record)}
            later = sorted({s for tag, s in present if tag in carried and s > epoch})
            if later:
                log.warning("%s already holds epochs %s, logged before this resume from epoch %d: TensorBoard's default "
                            "loader shows the new values from where they are logged again, the Python loader "
                            "(EventAccumulator, --load_fast=false) both; resume into a new run folder for clean curves.",
                            self.log_dir, later, epoch)
        log_history(self, history, skip=present)

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
        for pair_writer in self._pair_writers.values():
            pair_writer.flush()

    def close(self) -> None:
        for pair_writer in self._pair_writers.values():
            pair_writer.close()
        self._pair_writers = {}
        if self._writer is None:
            return
        self._write_layout()
        if self._hparams is not None:
            # differs=True on the swept keys: TensorBoard lists and ticks those columns first.
            metrics = [tag for tag in HPARAM_METRICS if tag in self._tags]
            self._writer.file_writer.add_summary(experiment_summary(self._hparams, metrics))
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


def _logged_steps(files: Sequence[Path]) -> set[tuple[str, int]]:
    """``(tag, step)`` of the epoch-axis summaries in event ``files`` (read once, at a resume into the
    same folder: a few seconds for a long run's files)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found: set[tuple[str, int]] = set()
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("summary"):
                found.update((v.tag, event.step) for v in event.summary.value if step_axis(v.tag) == EPOCH_AXIS)
    return found


class CSVTracker:
    """Appends ``step,tag,value`` rows to ``metrics.csv``; hyperparameters go to ``hparams.json``.

    Scalars only: no text, no images (the run folder has the diagnostics, confusion matrices and
    prediction images as files already). Resume (``resume``): ``metrics.csv`` of an earlier attempt in
    the same folder is rewritten without its rows after the checkpoint (``iter/`` rows above the global
    step, epoch rows above the epoch), then the history rows it lacks are appended; in a new folder
    the carried history is written once.
    """

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

    def resume(self, epoch: int, global_step: int, history: Sequence[Mapping[str, Any]]) -> None:
        """Continue after a checkpoint (class docstring)."""
        self.close()
        present: set[tuple[str, int]] = set()
        if self.path.is_file():
            with self.path.open(newline="") as f:
                header, *rows = list(csv.reader(f)) or [["step", "tag", "value"]]
            last = {EPOCH_AXIS: epoch, ITER_AXIS: global_step}
            # A row cut short by a crash (no value) is dropped with the rows after the checkpoint.
            kept = [r for r in rows if len(r) == 3 and r[0].lstrip("-").isdigit() and int(r[0]) <= last[step_axis(r[1])]]
            if len(kept) != len(rows):
                tmp = self.path.with_name(self.path.name + ".tmp")
                with tmp.open("w", newline="") as f:
                    csv.writer(f).writerows([header, *kept])
                os.replace(tmp, self.path)
            present = {(r[1], int(r[0])) for r in kept}
        log_history(self, history, skip=present)

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
    """Fans every call out to several trackers (the optional ones through their helpers)."""

    def __init__(self, trackers: Iterable[ExperimentTracker]):
        self.trackers = list(trackers)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        for t in self.trackers:
            t.log_scalar(tag, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for t in self.trackers:
            log_text(t, tag, text, step)

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        for t in self.trackers:
            log_image(t, tag, image, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        for t in self.trackers:
            log_artifact(t, path, artifact_path)

    def resume(self, epoch: int, global_step: int, history: Sequence[Mapping[str, Any]]) -> None:
        for t in self.trackers:
            resume_tracker(t, epoch, global_step, history)

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
        self._guard(method, lambda: getattr(self.tracker, method)(*args))

    def _guard(self, method: str, call: Callable[[], Any]) -> None:
        if self.failed is not None:
            return
        try:
            call()
        except self.propagate:
            raise
        except Exception as err:  # noqa: BLE001 - any backend error: warn once, keep training
            self.failed = err
            log.warning("Tracker %r failed in %s (%s: %s); it is switched off for the rest of this run, "
                        "training and the other trackers continue.", self.name, method, type(err).__name__, err)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self._call("log_scalar", tag, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._guard("log_text", lambda: log_text(self.tracker, tag, text, step))

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self._guard("log_image", lambda: log_image(self.tracker, tag, image, step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log_artifact", lambda: log_artifact(self.tracker, path, artifact_path))

    def resume(self, epoch: int, global_step: int, history: Sequence[Mapping[str, Any]]) -> None:
        self._guard("resume", lambda: resume_tracker(self.tracker, epoch, global_step, history))

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
    """Text to the trackers that take text (``log_text`` is optional: ``TrackerExtras``); the others skip it."""
    method = getattr(tracker, "log_text", None)
    if method is not None:
        method(tag, text, step)


def log_image(tracker: ExperimentTracker, tag: str, image: torch.Tensor, step: int) -> None:
    """A uint8 ``(3, H, W)`` image to the trackers that take images; the others skip it."""
    method = getattr(tracker, "log_image", None)
    if method is not None:
        method(tag, image, step)


def log_artifact(tracker: ExperimentTracker, path: str | Path, artifact_path: str | None = None) -> None:
    """A file or folder to the trackers that keep files (under ``artifact_path``); the others skip it."""
    method = getattr(tracker, "log_artifact", None)
    if method is not None:
        method(path, artifact_path)


def resume_tracker(tracker: ExperimentTracker, epoch: int, global_step: int,
                   history: Sequence[Mapping[str, Any]]) -> None:
    """Continue ``tracker`` after a checkpoint at ``epoch`` / ``global_step`` with the carried
    ``history`` (``TrackerExtras.resume``, module docstring). A tracker without ``resume`` is taken to
    start empty: it gets the carried history once, each record at ``step=epoch``."""
    method = getattr(tracker, "resume", None)
    if method is not None:
        method(epoch, global_step, history)
    else:
        log_history(tracker, history)


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
