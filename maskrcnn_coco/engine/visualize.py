"""Images of predictions (issue #21): what the model detects on a few validation images, beside their
ground truth, at every evaluation, in the run folder and in the trackers' images (TensorBoard's IMAGES tab).

``PredictionImages`` is the hook. It draws the same ``num_images`` validation images at every evaluated
epoch (chosen once from the run's seed with ``per_image.choose_subset``, so a resumed run draws the
same ones), each as the ground truth beside the predictions (masks thresholded at 0.5, boxes, class
names and scores; at most ``max_detections`` detections of score at least ``score_threshold``), from
one batched eval-mode forward under ``torch.inference_mode`` (the model's modes and the RNG are the
same afterwards). It also sends the epoch's confusion matrix (``evaluation.per_class``) to the trackers.

Written, for epoch N (``vis/`` in the run folder):

* ``vis/epoch_NNN/image_<image_id>.png``: one image per validation image (ground truth | predictions);
* ``vis/predictions_epoch_NNN.png``: all of them on one contact sheet;
* ``vis/epoch_NNN/predictions.json``: the image ids, the detections drawn, the seconds it took and
  their share of the epoch's training time (``cost_share``);
* tracker images (``tracking.backends.log_image``, ``step=epoch``): ``images/predictions/<image_id>``
  and ``images/confusion_matrix``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskrcnn_coco.analysis.diagnostics import json_safe
from maskrcnn_coco.engine.eval_step import restored_modes
from maskrcnn_coco.engine.hooks import OUTPUT, EpochResult, Hook
from maskrcnn_coco.engine.per_image import _image_id, choose_subset
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.evaluation.per_class import CONFUSION_KEY, save_confusion
from maskrcnn_coco.tracking.backends import ExperimentTracker, NullTracker, log_image
from maskrcnn_coco.tracking.scalars import class_key
from maskrcnn_coco.utils.draw import contact_sheet, draw_instances, enlarged, read_png, save_png, side_by_side

log = logging.getLogger(__name__)

VIS_DIR = "vis"
IMAGE_PATTERN = VIS_DIR + "/epoch_{:03d}/image_{}.png"
GRID_PATTERN = VIS_DIR + "/predictions_epoch_{:03d}.png"
SUMMARY_PATTERN = VIS_DIR + "/epoch_{:03d}/predictions.json"
PREDICTIONS_TAG = "images/predictions"  # + "/<image_id>"
CONFUSION_TAG = "images/confusion_matrix"
GROUND_TRUTH_TITLE = "ground truth"
LATEST_KEY = "vis"  # state.latest[LATEST_KEY]: the hook's latest summary


def predict(model: nn.Module, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The detections of ``images`` (``boxes``, ``labels``, ``scores``, ``masks`` in each image's own
    frame), on the CPU: one batched forward of the bare ``model`` in eval mode under
    ``torch.inference_mode``, on a forked RNG; the model's train/eval modes are restored afterwards."""
    if not images:
        return []
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(), restored_modes(model):
        model.eval()
        out = model([image.to(device, non_blocking=True) for image in images])
    # Copied outside inference mode (a clone there is a normal tensor): the caller may do anything with them.
    return [{k: v.to("cpu").clone() for k, v in d.items()} for d in out]


def kept(detections: Mapping[str, torch.Tensor], score_threshold: float, max_detections: int) -> dict[str, torch.Tensor]:
    """The detections of score at least ``score_threshold``, the ``max_detections`` best."""
    scores = detections["scores"]
    order = scores.argsort(descending=True)
    order = order[scores[order] >= score_threshold][:max_detections]
    return {k: v[order] for k, v in detections.items()}


def class_names_of(labels: torch.Tensor, class_names: Sequence[str]) -> list[str]:
    """``class_names[label - 1]`` of each label (its number when the mapping does not name it)."""
    return [class_names[label - 1] if 0 < label <= len(class_names) else str(label) for label in labels.tolist()]


def predictions_title(score_threshold: float) -> str:
    return f"predictions (score >= {score_threshold:g})"


def draw_prediction(image: torch.Tensor, target: Mapping[str, Any], detections: Mapping[str, torch.Tensor],
                    class_names: Sequence[str], *, score_threshold: float = 0.5, min_side: int = 256) -> torch.Tensor:
    """The ground truth of ``image`` beside its ``detections`` (already filtered: ``kept``), both
    titled; uint8 ``(3, H, W)``. An image whose longer side is below ``min_side`` is enlarged by an
    integer factor first (``draw.enlarged``), so the captions stay legible (0: original size)."""
    image = image.detach().cpu()
    gt_masks = target.get("masks")
    gt_image, gt_boxes, gt_masks = enlarged(image, target["boxes"].detach().cpu().float(),
                                            gt_masks.detach().cpu().bool() if gt_masks is not None else None, min_side)
    truth = draw_instances(gt_image, gt_boxes, class_names_of(target["labels"].cpu(), class_names), gt_masks)
    masks = detections.get("masks")
    if masks is not None:
        masks = masks[:, 0] > 0.5 if masks.dim() == 4 else masks > 0.5  # (N, 1, H, W) probabilities
    pred_image, pred_boxes, pred_masks = enlarged(image, detections["boxes"].float(), masks, min_side)
    predicted = draw_instances(pred_image, pred_boxes, class_names_of(detections["labels"], class_names), pred_masks,
                               scores=detections["scores"])
    return side_by_side(truth, predicted, titles=(GROUND_TRUTH_TITLE, predictions_title(score_threshold)))


def confusion_image(confusion: Mapping[str, Any], epoch: int) -> torch.Tensor:
    """The confusion matrix as ``ConfusionWriter`` draws it (``per_class.save_confusion``), as a uint8
    ``(3, H, W)`` image. Drawn anew in a temporary folder, so this does not depend on the order of the
    hooks or on the writer's file names."""
    with tempfile.TemporaryDirectory() as tmp:
        _, png = save_confusion(confusion, Path(tmp) / "confusion", title=f"epoch {epoch}")
        return read_png(png)


class PredictionImages(Hook):
    """At each evaluated epoch (the record has metrics or a validation loss): ``num_images`` validation
    images, chosen once from ``seed``, drawn as ground truth | predictions; files and tracker images as
    the module doc says. ``dataset``: the validation dataset (its pipeline has no augmentation).

    Cost: one batched eval-mode forward of the images, their drawing and PNG files, and one more
    drawing of the confusion matrix; written as ``seconds`` and ``cost_share`` (of the epoch's training
    time) in ``predictions.json``. Main process only; after evaluation, priority ``OUTPUT``, placed
    before ``TrackerWriter`` (whose flush then sends the images)."""

    priority = OUTPUT
    main_process_only = True

    def __init__(self, run_dir: str | Path, dataset: Any, tracker: ExperimentTracker | None = None, *,
                 num_images: int = 4, score_threshold: float = 0.5, max_detections: int = 20, seed: int = 0,
                 min_side: int = 256):
        self.run_dir = Path(run_dir)
        self.dataset = dataset
        self.tracker = tracker if tracker is not None else NullTracker()
        self.indices = choose_subset(len(dataset), num_images, seed)
        self.score_threshold, self.max_detections, self.min_side = score_threshold, max_detections, min_side
        self.latest: dict[str, Any] | None = None

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        record = result.record
        if not (record.get("metrics") or record.get("val_loss")):
            return  # not an evaluated epoch
        model = getattr(state.model, "module", state.model)  # the bare model, never a DDP wrapper
        self.latest = self.compute(model, result.epoch, getattr(state.mapping, "names", None) or (),
                                   confusion=(record.get("metrics") or {}).get(CONFUSION_KEY),
                                   train_seconds=(record.get("time") or {}).get("train_s"))
        state.latest[LATEST_KEY] = self.latest

    def compute(self, model: nn.Module, epoch: int, class_names: Sequence[str], *,
                confusion: Mapping[str, Any] | None = None, train_seconds: float | None = None) -> dict[str, Any]:
        """Draw, write and log the images of ``epoch`` with ``model``; returns the summary (also in
        ``predictions.json``)."""
        t0 = time.perf_counter()
        samples = [self.dataset[i] for i in self.indices]  # decoded anew: no image is kept between epochs
        outputs = predict(model, [image for image, _ in samples])
        drawn, ids, shown = [], [], {}
        for (image, target), out in zip(samples, outputs):
            image_id = _image_id(target.get("image_id"))
            best = kept(out, self.score_threshold, self.max_detections)
            picture = draw_prediction(image, target, best, class_names, score_threshold=self.score_threshold,
                                      min_side=self.min_side)
            save_png(picture, self.run_dir / IMAGE_PATTERN.format(epoch, class_key(str(image_id))))
            log_image(self.tracker, f"{PREDICTIONS_TAG}/{class_key(str(image_id))}", picture, epoch)
            drawn.append(picture)
            ids.append(image_id)
            shown[str(image_id)] = [
                {"name": name, "label": int(label), "score": round(float(score), 4),
                 "box": [round(float(v), 1) for v in box]}
                for name, label, score, box in zip(class_names_of(best["labels"], class_names), best["labels"].tolist(),
                                                   best["scores"].tolist(), best["boxes"].tolist())]
        grid = None
        if drawn:
            # Pairs are twice as wide as high: tiles of 512 px keep each frame at 256 px, two per row.
            sheet = contact_sheet(drawn, [f"image {i} (epoch {epoch})" for i in ids], columns=2, tile_size=512)
            grid = save_png(sheet, self.run_dir / GRID_PATTERN.format(epoch))
        if confusion:
            log_image(self.tracker, CONFUSION_TAG, confusion_image(confusion, epoch), epoch)
        if drawn or confusion:
            self.tracker.flush()  # the images reach the event file now, not at the tracker's next timer
        seconds = time.perf_counter() - t0
        summary = {
            "epoch": epoch,
            "image_ids": ids,
            "score_threshold": self.score_threshold,
            "max_detections": self.max_detections,
            "detections": shown,
            "grid": grid.relative_to(self.run_dir).as_posix() if grid is not None else None,
            "seconds": seconds,
            "train_seconds": train_seconds,
            "cost_share": seconds / train_seconds if train_seconds else None,  # of the epoch's training time
        }
        path = self.run_dir / SUMMARY_PATTERN.format(epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(summary), indent=1) + "\n")
        share = f" ({100 * seconds / train_seconds:.2f} % of the epoch's training)" if train_seconds else ""
        log.info("Prediction images (epoch %d, %d validation images): %.2f s%s; see %s", epoch, len(ids), seconds, share,
                 summary["grid"] or path.relative_to(self.run_dir).as_posix())
        return {**summary, "path": path}
