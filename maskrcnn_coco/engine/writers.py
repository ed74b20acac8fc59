"""The output hooks: the progress line, the console block, trackers, ``metrics.jsonl``, diagnostics and
confusion matrices (detectron2's writers). All run on rank 0 only and none is critical: a failing
output is reported once and training goes on (``engine.hooks``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from maskrcnn_coco.analysis.audit import producer_rows
from maskrcnn_coco.analysis.diagnostics import (
    CHECKS,
    DIAGNOSTICS_FILE,
    LAST_FOUND_FILE,
    Diagnosis,
    RunContext,
    as_key,
    class_aps,
    diagnose,
    format_summary,
    lr_config_key,
    muted,
    training_labels_disagree,
)
from maskrcnn_coco.analysis.history import HISTORY_FILE
from maskrcnn_coco.config import DiagnosticsConfig, VisConfig
from maskrcnn_coco.data.coco import class_instance_counts
from maskrcnn_coco.data.index import atomic_write
from maskrcnn_coco.engine.checkpoint import CHECKPOINT_DIR, Checkpointer, display_path
from maskrcnn_coco.engine.hooks import EpochResult, Hook
from maskrcnn_coco.engine.iteration_log import LATEST_KEY as LOSSES_KEY
from maskrcnn_coco.engine.iteration_log import IterationLog, LossReadBack
from maskrcnn_coco.engine.label_check import LATEST_KEY as LABEL_CHECK_KEY
from maskrcnn_coco.engine.label_check import LabelCheck, rule_input
from maskrcnn_coco.engine.monitors import (
    DivergenceGuard,
    GradNormMeter,
    IterationTimer,
    PeriodicCheckpoint,
    SpikeMonitor,
)
from maskrcnn_coco.engine.per_image import PerImageLosses
from maskrcnn_coco.engine.progress import Progress
from maskrcnn_coco.engine.settings import FitSettings
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.engine.visualize import PredictionImages
from maskrcnn_coco.evaluation.per_class import CONFUSION_KEY, save_confusion
from maskrcnn_coco.tracking.backends import ExperimentTracker, NullTracker, log_scalars, log_text, resume_tracker
from maskrcnn_coco.tracking.scalars import (
    IOU_TYPES,
    LOSS_COMPONENTS,
    TRAIN_TOTAL,
    VAL_TOTAL,
    class_key,
    class_names_by_key,
    loss_tag,
    map_tag,
)

log = logging.getLogger(__name__)


def format_epoch_summary(epoch: int, epochs: int, scalars: Mapping[str, float], checkpoint: str | Path | None = None) -> str:
    """The console block printed after each epoch, read from the epoch's scalars (components sorted by name)."""
    lines = [f"Epoch {epoch}/{epochs}", "📊 Training Losses:"]
    if TRAIN_TOTAL in scalars:
        lines.append(f"   Total: {scalars[TRAIN_TOTAL]:.4f}")
    components = sorted(k for k in LOSS_COMPONENTS if loss_tag("train", k) in scalars)
    lines += [f"   {name}: {scalars[loss_tag('train', name)]:.4f}" for name in components]
    if VAL_TOTAL in scalars:
        lines.append(f"📈 Validation Loss: {scalars[VAL_TOTAL]:.4f}")

    def fmt(tag: str) -> str:
        return f"{scalars[tag]:.4f}" if tag in scalars else "n/a"

    for iou_type, label in zip(IOU_TYPES, ("📦 Box mAP", "🎭 Mask mAP")):
        if any(tag.startswith(map_tag(iou_type, "")) for tag in scalars):
            lines.append(f"{label}: {fmt(map_tag(iou_type, 'AP'))} (AP50: {fmt(map_tag(iou_type, 'AP50'))})")
    if checkpoint is not None:
        lines.append(f"💾 Saved checkpoint: {checkpoint}")
    if "eval/images" in scalars:  # eval.subset's epochs say so: their numbers are not the full set's
        images, total = int(scalars["eval/images"]), int(scalars.get("eval/val_images", scalars["eval/images"]))
        lines.append(f"🔎 Evaluated on a fixed subset of {images} of {total} val images (eval.subset)" if images < total
                     else f"🔎 Evaluated on the full val set, {total} images")
    return "\n".join(lines)


def format_class_aps(scalars: Mapping[str, float], most: int = 12, names: Mapping[str, str] | None = None) -> str | None:
    """One line of per-class AP (``mAP/segm_AP_class_<key>``, else bbox), lowest first beyond ``most``
    classes; each class shown by its name as written (``names``: key -> name, ``class_names_by_key``)."""
    names = names or {}
    iou_type, aps = class_aps(scalars)
    if not aps:
        return None
    shown = list(aps.items()) if len(aps) <= most else sorted(aps.items(), key=lambda kv: kv[1])[:5]
    head = f"🏷️ AP per class ({iou_type})" + ("" if len(aps) <= most else f", lowest 5 of {len(aps)}")
    return f"{head}: " + " | ".join(f"{names.get(key, key)} {v:.3f}" for key, v in shown)


class ConsoleSummary(Hook):
    """The epoch block, through logging (rank-zero filtered, also in the run's log file), then the
    per-class AP line when the epoch was evaluated."""

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        saved = display_path(result.checkpoint) if result.checkpoint is not None else None
        log.info("%s", format_epoch_summary(result.epoch, state.epochs, result.scalars, saved))
        mapping = state.mapping
        names = class_names_by_key(mapping.names, mapping.coco_ids) if mapping is not None else None
        per_class = format_class_aps(result.scalars, names=names)
        if per_class:
            log.info("%s", per_class)


class TrackerWriter(Hook):
    """Every epoch scalar to an ``ExperimentTracker`` at ``step=epoch``, and the scalars hooks put at a
    read-back (``state.put_scalar``) at ``step=global_step``.

    A resumed run (``before_fit`` with a checkpoint's epoch or global step) first tells each backend
    where it continues (``tracking.backends.resume_tracker``): a backend starting empty (a new run
    folder) gets the carried history once; one continuing its earlier output (the same folder) logs
    only what that output lacks and drops or skips what was logged after the checkpoint, so every tag
    stays one curve after any number of stops and resumes.
    """

    def __init__(self, tracker: ExperimentTracker | None):
        self.tracker = tracker or NullTracker()

    def before_fit(self, state: TrainingState) -> None:
        if state.epoch or state.global_step:
            resume_tracker(self.tracker, state.epoch, state.global_step, state.history)

    def at_read_back(self, state: TrainingState) -> None:
        if state.scalars:
            log_scalars(self.tracker, state.scalars, state.global_step)

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        log_scalars(self.tracker, result.scalars, result.epoch)


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN: non-finite values become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    return obj


class HistoryWriter(Hook):
    """``metrics.jsonl`` in the run folder: one JSON object of tags per epoch (rewritten atomically)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / HISTORY_FILE

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(_finite_or_none(r)) + "\n" for r in state.history))
        os.replace(tmp, self.path)


class DiagnosticsWriter(Hook):
    """The monitors of ``maskrcnn_coco.analysis.diagnostics`` after every epoch, over the history.

    A finding is reported once per run (the first epoch it holds; a spike once per epoch and subject),
    also across a resume (what was reported is the hook's checkpointed state): as a warning under the
    epoch block (console and ``train.log``) and as one JSON object in ``<run_dir>/diagnostics.jsonl``
    (``Diagnosis.to_json``: the fields ``analysis.diagnostics.FINDING_FIELDS``). ``start``: the
    start-of-run audit's findings (epoch 0), written first; their logging is the caller's. The file
    exists (possibly empty) once training starts: empty means nothing was found.
    """

    def __init__(self, run_dir: str | Path, config: DiagnosticsConfig | None = None, *, start: Sequence[Diagnosis] = (),
                 tracker: ExperimentTracker | None = None, class_counts: Mapping[str, int] | None = None,
                 train_images: int | None = None):
        self.path = Path(run_dir) / DIAGNOSTICS_FILE
        self.tracker = tracker
        self.config = config if config is not None else DiagnosticsConfig()
        # Keyed as the per-class AP tags name the classes.
        self.class_counts = {class_key(name): n for name, n in (class_counts or {}).items()}
        self.train_images = train_images
        self.start = [d for d in start if not muted(d, self.config.ignore)]
        self.reported: set[tuple[Any, ...]] = set()
        # The last epoch each monitor finding held (by key): the summary says which no longer hold.
        self.last_found: dict[tuple[Any, ...], int] = {}
        self.confusions: list[Mapping[str, Any]] = []
        # (epoch, the label check's summary: engine/label_check.py) per evaluation.
        self.agreements: list[tuple[int, Mapping[str, Any]]] = []

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
        new = [d for d in findings if d.key not in self.reported and not muted(d, self.config.ignore)]
        for finding in new:
            self.reported.add(finding.key)
            # A healthy run prints no warning: what is worth knowing but no fault is an info line.
            log.log(logging.WARNING if finding.severity == "warning" else logging.INFO, "%s", finding.text())
        self._append(new)

    def before_fit(self, state: TrainingState) -> None:
        if self.config.ignore:
            log.info("diagnostics.ignore=%s: these findings are not reported", list(self.config.ignore))
        self._append(self.start)  # this start's audit (a resumed run audits again)
        self.reported.update(d.key for d in self.start)

    def _last_found_rows(self) -> list[list[Any]]:
        """``last_found`` as JSON-ready rows ``[key, epoch]`` (``as_key`` turns a key back)."""
        return [[list(k), e] for k, e in self.last_found.items()]

    def state_dict(self) -> dict[str, Any]:
        """What was reported (so a resumed run does not say it again), the last epoch each finding held and
        the recent confusion matrices."""
        return {"reported": sorted(self.reported, key=repr), "confusions": list(self.confusions),
                "last_found": self._last_found_rows(),
                "agreements": [list(a) for a in self.agreements]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reported = {as_key(k) for k in state.get("reported") or []}
        self.confusions = list(state.get("confusions") or [])
        self.last_found = {as_key(k): int(e) for k, e in state.get("last_found") or []}  # none in older checkpoints
        self.agreements = [(int(e), dict(c)) for e, c in state.get("agreements") or []
                           if isinstance(c, Mapping)]  # a checkpoint of an older layout carries none

    def on_finding(self, state: TrainingState, finding: Diagnosis) -> None:
        self._report([finding])

    def context(self, state: TrainingState, loss_weights: Mapping[str, float] | None) -> RunContext:
        """The producers' current learning rates and keys, the class counts and the start's findings."""
        return run_context(getattr(state, "model", None), getattr(state, "optimizer", None), loss_weights,
                           class_counts=self.class_counts, start=[d.to_json() for d in self.start],
                           train_images=self.train_images)

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        confusion = (result.record.get("metrics") or {}).get(CONFUSION_KEY)
        if confusion:
            self.confusions = [*self.confusions, confusion][-max(self.config.patience_epochs, 1):]
        weights = result.record.get("loss_weights")
        # A monitor's bug does not stop training: this hook is not critical (one warning, then it is off).
        found = diagnose(state.history, loss_weights=weights,
                         num_classes=state.mapping.num_classes - 1, config=self.config, confusions=self.confusions,
                         steps_per_epoch=state.global_step / result.epoch if state.global_step else None,
                         context=self.context(state, weights))
        latest = getattr(state, "latest", None) or {}
        check = latest.get(LABEL_CHECK_KEY)
        if check and check.get("epoch") == result.epoch:
            self.agreements = [*self.agreements, (result.epoch, rule_input(check))][-4:]
            found += training_labels_disagree(self.agreements, self.config)
        per_image = latest.get("per_image")
        if per_image and per_image.get("epoch") == result.epoch:
            found = [cite_images(d, per_image) for d in found]
        self.last_found.update((d.key, result.epoch) for d in found)
        self._report(found)
        payload = {"epoch": result.epoch, "last_found": self._last_found_rows()}
        atomic_write(self.path.with_name(LAST_FOUND_FILE), lambda f: f.write(json.dumps(payload).encode()))

    def after_fit(self, state: TrainingState) -> None:
        """The "Diagnosis summary" block: every finding of the run (``diagnostics.jsonl``, across resumes)
        ranked by severity and evidence, or "no findings" with the number of checks."""
        found = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] if self.path.is_file() else []
        text = format_summary(found, epochs=state.epoch, checks=len(CHECKS), last_found=self.last_found)
        log.info("%s", text)
        if self.tracker is not None:
            log_text(self.tracker, "diagnostics/summary", "```\n" + text + "\n```", state.epoch)


def run_context(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                loss_weights: Mapping[str, float] | None, *, class_counts: Mapping[str, int],
                start: Sequence[Mapping[str, Any]] = (), train_images: int | None = None) -> RunContext:
    """What the monitors read beside the history: each loss producer's current lr and the key that
    sets it (from the optimizer's groups), the training instances per class, the start's warnings
    (``start``: ``Diagnosis.to_json`` objects) and the training set's size."""
    rows = producer_rows(getattr(model, "module", model), optimizer, loss_weights or {}) \
        if model is not None and optimizer is not None else []
    return RunContext(
        producer_lrs={r.module: r.lr for r in rows if r.lr is not None},
        lr_keys={r.module: lr_config_key(r.groups[0]) for r in rows if r.groups},
        class_counts=class_counts,
        start_findings=frozenset((f["kind"], f["subject"]) for f in start if f["severity"] == "warning"),
        train_images=train_images,
    )


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def cite_images(finding: Diagnosis, per_image: Mapping[str, Any], limit: int = 12) -> Diagnosis:
    """``finding`` with the images whose per-image loss of its components stands far above the rest
    (``engine.per_image``: "annotations to check") named in its message and ``image_ids``."""
    outliers = per_image.get("outliers") or {}
    ids: list[Any] = []
    for c in finding.components:
        ids += [o["image_id"] for o in outliers.get(c, []) if o["image_id"] not in ids]
    if not ids:
        return finding
    sheet = per_image.get("sheet")
    where = f" ({Path(sheet).name})" if sheet else ""
    shown = ", ".join(str(i) for i in ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
    return dataclasses.replace(finding, image_ids=tuple(ids[:limit]),
                               message=f"{finding.message} Annotations to check: images {shown}{where}.")


class ConfusionWriter(Hook):
    """``confusion_epoch_NNN.json`` and ``.png`` in the run folder after each evaluation: ground-truth
    class x predicted class of matched detections (``maskrcnn_coco.evaluation.per_class``)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        confusion = (result.record.get("metrics") or {}).get(CONFUSION_KEY)
        if confusion:
            save_confusion(confusion, self.run_dir / f"confusion_epoch_{result.epoch:03d}", title=f"epoch {result.epoch}")


SHORT_NAMES = {
    "loss_classifier": "cls",
    "loss_box_reg": "box",
    "loss_mask": "mask",
    "loss_objectness": "obj",
    "loss_rpn_box_reg": "rpn",
}


class ProgressBar(Hook):
    """The epoch's progress (``engine.progress.Progress``: a bar in a terminal, a log line elsewhere),
    with the running mean of each component and the weighted total (read back by the
    ``IterationLog``: ``state.latest["losses"]``, the same host copy as the ``iter/`` scalars), the
    first group's lr and the iteration times (``state.latest["time"]``) at every read-back. Without an
    ``IterationLog`` among the hooks the line has no losses (said once)."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self._warned = False

    def before_epoch(self, state: TrainingState) -> None:
        self.bar = Progress(None, f"Epoch {state.epoch}", start=state.iteration, total=state.epoch_length)
        if not self._warned and state.hooks is not None and state.hooks.find(IterationLog) is None:
            self._warned = True
            log.warning("ProgressBar without an IterationLog hook: the progress line shows no losses")

    def after_step(self, state: TrainingState) -> None:
        self.bar.advance()

    def at_read_back(self, state: TrainingState) -> None:
        if state.epoch_end:
            return
        losses: LossReadBack | None = state.latest.get(LOSSES_KEY)
        postfix = {}
        if losses is not None and losses.step == state.global_step:  # read back at this point, not before
            postfix = {SHORT_NAMES[k]: f"{v:.3f}" for k, v in losses.running.items()}
            postfix["total"] = f"{losses.running_total:.3f}"
        times = {k: f"{1e3 * v:.0f}ms" for k, v in state.latest.get("time", {}).items()}
        lr = state.optimizer.param_groups[0]["lr"]
        self.bar.update({**postfix, "lr": f"{lr:.4g}", **times}, state.iteration + 1)

    def at_boundary(self, state: TrainingState) -> None:
        self.bar.close()

    def after_train_epoch(self, state: TrainingState) -> None:
        self.bar.close()


def default_hooks(
    run_dir: str | Path | None,
    settings: FitSettings | None = None,
    tracker: ExperimentTracker | None = None,
    *,
    grad_norm_every: int = 1,
    divergence: DivergenceGuard | None = None,
    checkpoint: Checkpointer | None = None,
    checkpoint_every_n_iters: int | None = None,
    diagnostics: DiagnosticsConfig | None = None,
    audit: Sequence[Diagnosis] = (),
    train_dataset: Any = None,
    seed: int = 0,
    val_dataset: Any = None,
    vis: VisConfig | None = None,
) -> list[Hook]:
    """The instruments of a training run, in their order (``engine.hooks``): gradient norms, the
    iteration timer, the iteration log (the read-back's losses, ``iter/`` scalars: with a progress line
    or a ``run_dir``), the spike monitor (with diagnostics), the divergence guard, periodic step-boundary
    checkpoints, the progress line, then, with a ``run_dir``: checkpoints (``checkpoint``, default:
    every epoch under ``<run_dir>/checkpoints``), the console block, diagnostics (``audit``: the
    start-of-run findings), the per-image losses and the label check (with ``train_dataset`` and
    ``val_dataset``), confusion matrices, the prediction images (``vis``, with ``val_dataset``), the
    tracker and ``metrics.jsonl``.

    ``diagnostics.enabled=false`` leaves out the spike monitor and the diagnostics writer.
    """
    settings = settings if settings is not None else FitSettings()
    enabled = diagnostics is None or diagnostics.enabled
    cfg = diagnostics if diagnostics is not None else DiagnosticsConfig()
    hooks: list[Hook] = [GradNormMeter(every=grad_norm_every), IterationTimer(),
                         divergence if divergence is not None else DivergenceGuard()]
    if settings.progress or run_dir is not None:  # someone shows or writes what it reads back
        hooks.append(IterationLog())
    if enabled:
        hooks.append(SpikeMonitor(diagnostics))
    if checkpoint_every_n_iters:
        hooks.append(PeriodicCheckpoint(checkpoint_every_n_iters))
    if settings.progress:
        hooks.append(ProgressBar())
    if run_dir is not None:
        run_dir = Path(run_dir)
        vis_cfg = vis if vis is not None else VisConfig()
        hooks += [
            checkpoint if checkpoint is not None else Checkpointer(run_dir / CHECKPOINT_DIR),
            ConsoleSummary(),
            *([DiagnosticsWriter(run_dir, diagnostics, start=audit, tracker=tracker,
                                 class_counts=class_instance_counts(train_dataset), train_images=_length(train_dataset))]
              if enabled else []),
            *([PerImageLosses(run_dir, train_dataset, num_images=cfg.per_image_images, seed=seed, k=cfg.per_image_k_mad,
                              min_ratio=cfg.per_image_min_ratio)]
              if enabled and train_dataset is not None and cfg.per_image_images > 0 else []),
            *([LabelCheck(run_dir, train_dataset, val_dataset, num_images=cfg.label_check_images, seed=seed)]
              if enabled and train_dataset is not None and val_dataset is not None and cfg.label_check_images > 0 else []),
            ConfusionWriter(run_dir),
            # Images of predictions (vis.num_images=0: off); before TrackerWriter, whose flush sends them.
            *([PredictionImages(run_dir, val_dataset, tracker, num_images=vis_cfg.num_images, seed=seed,
                                score_threshold=vis_cfg.score_threshold, max_detections=vis_cfg.max_detections)]
              if val_dataset is not None and vis_cfg.num_images > 0 else []),
            TrackerWriter(tracker),
            HistoryWriter(run_dir),
        ]
    return hooks
