"""What ``fit`` does with each finished epoch, as small sink objects (detectron2's hooks/writers).

``fit`` trains and evaluates; after every epoch it hands an ``EpochResult`` (the raw record and its
scalars under the one vocabulary) to each sink in order. A new output is a new sink, never a new
argument of ``fit``. Sinks with ``main_process_only`` (all that write) run on rank 0 only; ``fit``
gates them through ``maskrcnn_coco.utils.dist``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskrcnn_coco.analysis.diagnostics import DIAGNOSTICS_FILE, Diagnosis, class_aps, diagnose
from maskrcnn_coco.analysis.history import HISTORY_FILE
from maskrcnn_coco.config import DiagnosticsConfig
from maskrcnn_coco.engine.checkpoint import TrainingState, save_checkpoint, training_state
from maskrcnn_coco.engine.loop import EpochProgress
from maskrcnn_coco.evaluation.per_class import CONFUSION_KEY, save_confusion
from maskrcnn_coco.tracking.backends import ExperimentTracker, NullTracker, log_scalars, log_text
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS, TRAIN_TOTAL, VAL_TOTAL, lower_is_better
from maskrcnn_coco.utils.dist import is_main_process

log = logging.getLogger(__name__)


# The state sinks read: the one owned by the checkpoint module (kept under this name for readers of fit).
FitState = TrainingState


@dataclass
class EpochResult:
    """One finished epoch: ``record`` (components, metrics, lrs, ...) and ``scalars`` (``{tag: value}``).

    Sinks may add artifacts for the sinks after them (the checkpointer sets ``checkpoint``).
    """

    epoch: int
    record: dict[str, Any]
    scalars: dict[str, float]
    checkpoint: Path | None = None


class Sink:
    """Base class: every hook is a no-op, so a sink overrides only what it needs.

    Order of calls per epoch: ``after_train`` (trained, before evaluation; only when the epoch is
    evaluated), then ``after_epoch`` (with the evaluated record). ``on_progress`` marks a step
    boundary inside an epoch (``checkpoint.every_n_iters``, or a stop signal when ``final``);
    ``on_interrupt`` an interrupt inside an iteration (weights not at a step boundary);
    ``on_finding`` a diagnosis made inside an epoch (an iteration-level spike), as soon as it is seen.
    """

    main_process_only = True

    def before_fit(self, state: TrainingState) -> None:
        pass

    def after_train(self, state: TrainingState, epoch: int) -> None:
        pass

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        pass

    def on_progress(self, state: TrainingState, epoch: int, progress: EpochProgress, final: bool) -> Path | None:
        return None

    def on_interrupt(self, state: TrainingState, epoch: int) -> None:
        pass

    def on_finding(self, state: TrainingState, finding: Diagnosis) -> None:
        pass

    def after_fit(self, state: TrainingState) -> None:
        pass


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Checkpointer(Sink):
    """Checkpoints of the training state (format: ``maskrcnn_coco.engine.checkpoint``).

    * ``last.pth`` after every epoch, written before evaluation too, so a failing evaluation never
      loses the trained epoch; ``epoch_NNN.pth`` every ``every_n_epochs`` epochs, the newest
      ``keep_last`` of them kept (None: all);
    * ``best.pth`` when the epoch's ``best_metric`` tag (e.g. ``mAP/segm_AP``) improves;
    * inside an epoch: ``last.pth`` at ``on_progress`` (every N iterations), ``interrupted.pth`` at a
      stop signal (resumable from that iteration), or after a raw KeyboardInterrupt (marked as not
      at a step boundary, so it is refused for resuming).
    """

    def __init__(
        self,
        directory: str | Path,
        every_n_epochs: int = 1,
        extra: Mapping[str, Any] | None = None,
        *,
        keep_last: int | None = None,
        best_metric: str | None = None,
    ):
        self.directory = Path(directory)
        self.every_n_epochs = every_n_epochs
        self.extra = dict(extra or {})
        self.keep_last = keep_last
        self.best_metric = best_metric

    def _write(self, state: TrainingState, epoch: int) -> Path:
        snapshot = training_state(state, epoch, extra=self.extra)
        last = self.directory / "last.pth"
        if self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0:
            path = save_checkpoint(self.directory / f"epoch_{epoch:03d}.pth", snapshot, copies=[last])
            self._prune()
            return path
        return save_checkpoint(last, snapshot)

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        numbered = sorted(self.directory.glob("epoch_*.pth"))
        for old in numbered[: max(len(numbered) - self.keep_last, 0)]:
            old.unlink(missing_ok=True)

    def after_train(self, state: TrainingState, epoch: int) -> None:
        self._write(state, epoch)

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        improved = False
        value = result.scalars.get(self.best_metric) if self.best_metric else None
        if value is not None and math.isfinite(value):
            best = state.fit.get("best_value")
            if best is None or (value < best if lower_is_better(self.best_metric) else value > best):
                state.fit.update(best_value=value, best_epoch=result.epoch, best_metric=self.best_metric)
                improved = True
        path = self._write(state, result.epoch)
        if improved:
            tmp = self.directory / "best.pth.tmp"
            shutil.copyfile(path, tmp)
            os.replace(tmp, self.directory / "best.pth")
        result.checkpoint = path

    def on_progress(self, state: TrainingState, epoch: int, progress: EpochProgress, final: bool) -> Path:
        name = "interrupted.pth" if final else "last.pth"
        return save_checkpoint(self.directory / name, training_state(state, epoch - 1, progress=progress, extra=self.extra))

    def on_interrupt(self, state: TrainingState, epoch: int) -> None:
        snapshot = {**training_state(state, epoch - 1, extra=self.extra), "interrupted_mid_iteration": True}
        path = save_checkpoint(self.directory / "interrupted.pth", snapshot)
        log.info("Interrupted during epoch %d: saved %s (weights mid-epoch %d; resume from last.pth).", epoch, _display_path(path), epoch)


def format_epoch_summary(epoch: int, epochs: int, scalars: Mapping[str, float], checkpoint: str | Path | None = None) -> str:
    """The console block printed after each epoch, read from the epoch's scalars (components sorted by name)."""
    lines = [f"Epoch {epoch}/{epochs}", "📊 Training Losses:"]
    if TRAIN_TOTAL in scalars:
        lines.append(f"   Total: {scalars[TRAIN_TOTAL]:.4f}")
    components = sorted(k for k in LOSS_COMPONENTS if f"loss/train_{k}" in scalars)
    lines += [f"   {name}: {scalars[f'loss/train_{name}']:.4f}" for name in components]
    if VAL_TOTAL in scalars:
        lines.append(f"📈 Validation Loss: {scalars[VAL_TOTAL]:.4f}")

    def fmt(tag: str) -> str:
        return f"{scalars[tag]:.4f}" if tag in scalars else "n/a"

    for iou_type, label in (("bbox", "📦 Box mAP"), ("segm", "🎭 Mask mAP")):
        if any(tag.startswith(f"mAP/{iou_type}_") for tag in scalars):
            lines.append(f"{label}: {fmt(f'mAP/{iou_type}_AP')} (AP50: {fmt(f'mAP/{iou_type}_AP50')})")
    if checkpoint is not None:
        lines.append(f"💾 Saved checkpoint: {checkpoint}")
    return "\n".join(lines)


def format_class_aps(scalars: Mapping[str, float], most: int = 12) -> str | None:
    """One line of per-class AP (``mAP/segm_AP_class_<name>``, else bbox), lowest first beyond ``most`` classes."""
    iou_type, aps = class_aps(scalars)
    if not aps:
        return None
    shown = list(aps.items()) if len(aps) <= most else sorted(aps.items(), key=lambda kv: kv[1])[:5]
    head = f"🏷️ AP per class ({iou_type})" + ("" if len(aps) <= most else f", lowest 5 of {len(aps)}")
    return f"{head}: " + " | ".join(f"{name} {v:.3f}" for name, v in shown)


class ConsoleSummary(Sink):
    """The epoch block, through logging (rank-zero filtered, also in the run's log file), then the
    per-class AP line when the epoch was evaluated."""

    def after_epoch(self, state: FitState, result: EpochResult) -> None:
        saved = _display_path(result.checkpoint) if result.checkpoint is not None else None
        log.info("%s", format_epoch_summary(result.epoch, state.epochs, result.scalars, saved))
        per_class = format_class_aps(result.scalars)
        if per_class:
            log.info("%s", per_class)


class TrackerWriter(Sink):
    """Every epoch scalar to an ``ExperimentTracker`` at ``step=epoch``."""

    def __init__(self, tracker: ExperimentTracker | None):
        self.tracker = tracker or NullTracker()

    def after_epoch(self, state: FitState, result: EpochResult) -> None:
        log_scalars(self.tracker, result.scalars, result.epoch)


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN: non-finite values become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    return obj


class HistoryWriter(Sink):
    """``metrics.jsonl`` in the run folder: one JSON object of tags per epoch (rewritten atomically)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / HISTORY_FILE

    def after_epoch(self, state: FitState, result: EpochResult) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(_finite_or_none(r)) + "\n" for r in state.history))
        os.replace(tmp, self.path)


class DiagnosticsSink(Sink):
    """The monitors of ``maskrcnn_coco.analysis.diagnostics`` after every epoch, over the history.

    A finding is reported once per run (the first epoch it holds; a spike once per epoch and subject): as a warning under the epoch block
    (console and ``train.log``) and as one JSON object in ``<run_dir>/diagnostics.jsonl`` (``epoch``,
    ``kind``, ``components``, ``subject``, ``evidence``, ``cause``, ``config_key``, ``message``).
    ``start``: the start-of-run audit's findings (epoch 0), written first; their logging is the
    caller's. The file exists (possibly empty) once training starts: empty means nothing was found.
    """

    def __init__(self, run_dir: str | Path, config: DiagnosticsConfig | None = None, *, start: Sequence[Diagnosis] = (),
                 tracker: ExperimentTracker | None = None):
        self.path = Path(run_dir) / DIAGNOSTICS_FILE
        self.tracker = tracker
        self.config = config if config is not None else DiagnosticsConfig()
        self.start = list(start)
        self.reported: set[tuple[Any, ...]] = set()
        self.confusions: list[Mapping[str, Any]] = []
        self.failed = False

    def _append(self, findings: Sequence[Diagnosis]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for finding in findings:
                f.write(json.dumps(finding.to_json()) + "\n")
        if self.tracker is not None:
            for finding in findings:
                # TensorBoard's Text tab: one tag per kind (and subject), at the epoch it was found (0: audit).
                tag = "diagnostics/" + finding.kind + (f"/{finding.subject}" if finding.subject else "")
                log_text(self.tracker, tag, finding.text(), finding.epoch)

    def _report(self, findings: Sequence[Diagnosis]) -> None:
        new = [d for d in findings if d.key not in self.reported]
        for finding in new:
            self.reported.add(finding.key)
            log.warning("%s", finding.text())
        self._append(new)

    def before_fit(self, state: TrainingState) -> None:
        self._append(self.start)
        self.reported.update(d.key for d in self.start)

    def on_finding(self, state: TrainingState, finding: Diagnosis) -> None:
        self._report([finding])

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        confusion = (result.record.get("metrics") or {}).get(CONFUSION_KEY)
        if confusion:
            self.confusions = [*self.confusions, confusion][-max(self.config.patience_epochs, 1):]
        try:
            found = diagnose(state.history, loss_weights=result.record.get("loss_weights"),
                             num_classes=state.mapping.num_classes - 1, config=self.config, confusions=self.confusions,
                             steps_per_epoch=state.global_step / result.epoch if state.global_step else None)
        except Exception as err:  # noqa: BLE001 - a monitor's bug must not stop training
            if not self.failed:
                log.warning("Diagnostics failed after epoch %d (%s: %s); training goes on without them.",
                            result.epoch, type(err).__name__, err)
            self.failed = True
            return
        self._report(found)


class ConfusionWriter(Sink):
    """``confusion_epoch_NNN.json`` and ``.png`` in the run folder after each evaluation: ground-truth
    class x predicted class of matched detections (``maskrcnn_coco.evaluation.per_class``)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        confusion = (result.record.get("metrics") or {}).get(CONFUSION_KEY)
        if confusion:
            save_confusion(confusion, self.run_dir / f"confusion_epoch_{result.epoch:03d}", title=f"epoch {result.epoch}")


def default_sinks(
    run_dir: str | Path,
    tracker: ExperimentTracker | None = None,
    *,
    checkpoint_every: int = 1,
    checkpoint_extra: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    best_metric: str | None = None,
    diagnostics: DiagnosticsConfig | None = None,
    audit: Sequence[Diagnosis] = (),
) -> list[Sink]:
    """Checkpoints, the console block, the diagnostics (unless ``diagnostics.enabled`` is false; ``audit``:
    the start-of-run findings), the confusion matrices, the tracker and ``metrics.jsonl``, in that order."""
    run_dir = Path(run_dir)
    enabled = diagnostics is None or diagnostics.enabled
    return [
        Checkpointer(run_dir / "checkpoints", every_n_epochs=checkpoint_every, extra=checkpoint_extra,
                     keep_last=keep_last, best_metric=best_metric),
        ConsoleSummary(),
        *([DiagnosticsSink(run_dir, diagnostics, start=audit, tracker=tracker)] if enabled else []),
        ConfusionWriter(run_dir),
        TrackerWriter(tracker),
        HistoryWriter(run_dir),
    ]


def call_sinks(sinks: Sequence[Sink], method: str, *args: Any) -> None:
    """Call ``method`` on each sink, skipping main-process-only sinks on other ranks."""
    main = is_main_process()
    for sink in sinks:
        if main or not sink.main_process_only:
            getattr(sink, method)(*args)
