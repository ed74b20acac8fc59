"""The classifier's verdict on each annotated object, on a training and a validation subset (issue #20:
"half the training labels wrong").

A model agrees more with the objects it trained on than with unseen ones: on healthy short runs the
box classifier gives the training subset's annotated objects their own class 0.04-0.13 more often than
the validation subset's (docs/LOSS_BREAKDOWN.md, *training-labels*). When a share of the training
labels is wrong, the classifier still learns each class from the majority, and the training labels
then agree with it *less* often than validation's: that reversal is what
``analysis.diagnostics.training_labels_disagree`` looks for. Both splits are measured the same way
(``classify_annotations``: eval mode, each ground-truth box classified as a detection would be,
no sampling), so the two shares differ only by the labels and by what the model fitted.

``LabelCheck`` is the hook: at each evaluation, ``num_images`` training images (through the
validation pipeline, ``per_image.unaugmented``) and as many validation images, both chosen once from
the run's seed; it writes ``label_check_epoch_NNN.json`` (both shares, per class, and the training
annotations the classifier most confidently gives another class: the ones to look at first).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskrcnn_coco.analysis.diagnostics import json_safe
from maskrcnn_coco.engine.eval_step import restored_modes
from maskrcnn_coco.engine.hooks import MONITOR, EpochResult, Hook
from maskrcnn_coco.engine.loop import move_to_device
from maskrcnn_coco.engine.per_image import _image_id, annotation_ids, choose_subset, unaugmented
from maskrcnn_coco.engine.state import TrainingState

log = logging.getLogger(__name__)

FILE_PATTERN = "label_check_epoch_{:03d}.json"
LATEST_KEY = "label_check"  # state.latest[LATEST_KEY]: the hook's latest result


def classify_annotations(model: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]],
                         device: torch.device | str | None = None, batch_size: int = 8) -> list[dict[str, Any]]:
    """One row per annotated object: ``image_id``, ``index`` (its place in the target), ``given`` (its
    label), ``predicted`` (the box classifier's best object class for its own box), ``p_given`` and
    ``p_predicted`` (softmax over the object classes only: whether it is an object is the RPN's
    question). Eval mode, no gradients, modes restored; one read-back for all objects. A model without
    torchvision's ``transform``/``backbone``/``roi_heads`` gives no rows."""
    heads = getattr(model, "roi_heads", None)
    if heads is None or not hasattr(model, "transform") or not hasattr(model, "backbone"):
        return []
    device = torch.device(device) if device is not None else next(model.parameters()).device
    keys: list[tuple[Any, int, int]] = []
    probs: list[torch.Tensor] = []
    with torch.no_grad(), restored_modes(model):
        model.eval()
        for start in range(0, len(images), batch_size):
            chunk_images, chunk_targets = move_to_device(images[start:start + batch_size],
                                                         [dict(t) for t in targets[start:start + batch_size]], device)
            keep = [i for i, t in enumerate(chunk_targets) if len(t["boxes"])]
            if not keep:
                continue
            batch, resized = model.transform([chunk_images[i] for i in keep],
                                             [{"boxes": chunk_targets[i]["boxes"].float(), "labels": chunk_targets[i]["labels"]}
                                              for i in keep])
            features = model.backbone(batch.tensors)
            boxes = [t["boxes"] for t in resized]
            pooled = heads.box_roi_pool(features, boxes, batch.image_sizes)
            logits, _ = heads.box_predictor(heads.box_head(pooled))
            probs.append(logits[:, 1:].float().softmax(dim=1))
            for i, t in zip(keep, resized):
                image_id = _image_id(chunk_targets[i].get("image_id"))
                keys += [(image_id, j, int(label)) for j, label in enumerate(t["labels"].tolist())]
    if not probs:
        return []
    table = torch.cat(probs).cpu()
    rows = []
    for (image_id, index, given), p in zip(keys, table):
        predicted = int(p.argmax()) + 1
        rows.append({"image_id": image_id, "index": index, "given": given, "predicted": predicted,
                     "p_given": float(p[given - 1]) if 0 < given <= len(p) else math.nan,
                     "p_predicted": float(p[predicted - 1])})
    return rows


def agreement(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The share of objects the classifier gives their own label, overall and per given label
    (``per_class``: ``{label: [agree, objects]}``); None without objects."""
    if not rows:
        return None
    per_class: dict[int, list[int]] = {}
    for r in rows:
        counts = per_class.setdefault(int(r["given"]), [0, 0])
        counts[0] += int(r["predicted"] == r["given"])
        counts[1] += 1
    agree = sum(a for a, _ in per_class.values())
    return {"share": agree / len(rows), "agree": agree, "objects": len(rows),
            "images": len({r["image_id"] for r in rows}), "per_class": {k: per_class[k] for k in sorted(per_class)}}


def standardised_share(train: Mapping[str, Any], val: Mapping[str, Any]) -> float | None:
    """The training share re-weighted to the validation subset's class mix (each class's training
    agreement weighted by its share of the validation objects), so that a validation subset richer in
    an easy class does not look like disagreeing training labels. None when no class is in both."""
    tc = {int(k): v for k, v in train["per_class"].items()}
    vc = {int(k): v for k, v in val["per_class"].items()}
    common = [k for k in vc if tc.get(k, [0, 0])[1]]
    weight = sum(vc[k][1] for k in common)
    if not weight:
        return None
    return sum(vc[k][1] / weight * tc[k][0] / tc[k][1] for k in common)


def most_confident_disagreements(rows: Sequence[Mapping[str, Any]], dataset: Any = None, most: int = 12) -> list[dict[str, Any]]:
    """The objects given another class than their label, most confident first, with their annotation
    id when ``dataset`` can name it."""
    off = sorted((r for r in rows if r["predicted"] != r["given"]), key=lambda r: -r["p_predicted"])[:most]
    objects = Counter(r["image_id"] for r in rows)
    out = []
    for r in off:
        entry = dict(r)
        ids = annotation_ids(dataset, r["image_id"], objects[r["image_id"]]) if dataset is not None else None
        if ids is not None:
            entry["annotation_id"] = ids[r["index"]]
        out.append(entry)
    return out


def rule_input(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What ``training_labels_disagree`` reads of a summary (or of a saved ``label_check_epoch_NNN.json``),
    JSON-safe: the shares, the standardised share and the disagreements, without the rows."""
    return json_safe({k: summary.get(k) for k in ("train", "val", "standardised", "disagreements")})


def saved_checks(run_dir: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(epoch, rule_input)`` of every ``label_check_epoch_NNN.json`` in ``run_dir``, in epoch order."""
    out = []
    for path in sorted(Path(run_dir).glob(FILE_PATTERN.replace("{:03d}", "[0-9][0-9][0-9]"))):
        summary = json.loads(path.read_text())
        out.append((int(summary["epoch"]), rule_input(summary)))
    return out


class LabelCheck(Hook):
    """At each evaluated epoch: ``classify_annotations`` on ``num_images`` training images (validation
    pipeline, no augmentation) and as many validation images, both chosen once from ``seed``; writes
    ``<run_dir>/label_check_epoch_NNN.json`` and puts the result in ``state.latest["label_check"]``
    (``epoch``, ``train`` and ``val`` agreements, ``standardised`` training share, the training
    objects most confidently given another class, ``seconds``). Cost: one eval-mode backbone forward per
    image, batched (measured in docs/LOSS_BREAKDOWN.md, *training-labels*). After evaluation, on the
    main process, priority ``MONITOR`` (before the diagnostics writer of the same epoch)."""

    priority = MONITOR
    main_process_only = True

    def __init__(self, run_dir: str | Path, train_dataset: Any, val_dataset: Any, *, num_images: int = 64,
                 seed: int = 0, batch_size: int = 8):
        self.run_dir = Path(run_dir)
        self.train = unaugmented(train_dataset)
        self.val = val_dataset
        self.indices = {"train": choose_subset(len(self.train), num_images, seed),
                        "val": choose_subset(len(self.val), num_images, seed)}
        self.batch_size = batch_size
        self.latest: dict[str, Any] | None = None

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        record = result.record
        if not (record.get("metrics") or record.get("val_loss")):
            return  # not an evaluated epoch
        self.latest = self.compute(state.model, result.epoch)
        state.latest[LATEST_KEY] = self.latest

    def compute(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """Both subsets classified with ``model``, written for ``epoch``; returns the summary."""
        t0 = time.perf_counter()
        rows = {}
        for split, dataset in (("train", self.train), ("val", self.val)):
            samples = [dataset[i] for i in self.indices[split]]
            rows[split] = classify_annotations(model, [s[0] for s in samples], [s[1] for s in samples],
                                               batch_size=self.batch_size)
        train, val = agreement(rows["train"]), agreement(rows["val"])
        summary = {
            "epoch": epoch,
            "train": train,
            "val": val,
            "standardised": standardised_share(train, val) if train and val else None,
            "disagreements": most_confident_disagreements(rows["train"], self.train),
            "seconds": time.perf_counter() - t0,
        }
        path = self.run_dir / FILE_PATTERN.format(epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe({**summary, "rows": rows}), indent=1))
        return {**summary, "path": path}
