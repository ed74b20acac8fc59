"""``evaluate``: validation losses per component and COCO metrics, as a plain function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader, Subset

from maskrcnn_coco.data.coco import CategoryMapping, make_loader
from maskrcnn_coco.engine.eval_step import evaluate_batch
from maskrcnn_coco.engine.loop import move_to_device, stack_losses
from maskrcnn_coco.engine.per_image import choose_subset
from maskrcnn_coco.engine.progress import Progress
from maskrcnn_coco.evaluation.coco_eval import coco_metrics, predictions_to_coco
from maskrcnn_coco.evaluation.per_class import CONFUSION_KEY, confusion_matrix
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS
from maskrcnn_coco.utils.dist import (
    all_reduce_sum,
    broadcast_object,
    gather_objects_to_main,
    is_main_process,
    world_size,
)


@dataclass
class EvalObserver:
    """What a caller sees of ``evaluate`` as it runs. ``mark(stage)``: called as each stage ends
    (``evaluate_batch``'s, then ``"to COCO"`` per batch and ``"COCOeval"``), so a benchmark can time
    them. ``results(results, image_ids)``: on rank 0, the COCO results the metrics are computed from
    (all ranks' detections, in image-id order) and the evaluated image ids, so the evaluate command
    writes them without a second pass."""

    mark: Callable[[str], None] | None = None
    results: Callable[[list[dict[str, Any]], list[int]], None] | None = None


def evaluate(
    model: nn.Module,
    data_loader: DataLoader,
    device: torch.device | str,
    *,
    mapping: CategoryMapping,
    coco_gt: COCO | None = None,
    compute_losses: bool = True,
    compute_metrics: bool = True,
    mask_threshold: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    backend: str = "auto",
    observer: EvalObserver | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Validation losses (per component) and COCO metrics for ``bbox`` and ``segm``.

    For the losses the model runs in training mode without gradients with every BatchNorm in eval
    mode; the RPN and RoI samplers draw from a forked RNG seeded with ``seed``, so the value is
    reproducible and the caller's RNG stream is untouched. A torchvision ``GeneralizedRCNN`` runs the
    transform and the backbone once per batch for both losses and detections (``eval_step``). The
    model's parameters, buffers and train/eval modes are the same afterwards; its masks are encoded
    within their boxes, never pasted at image size (``paste_masks=False``), one image at a time. In
    distributed evaluation rank 0 alone gathers the detections and runs COCOeval; every rank gets
    the metrics. The components are raw (unweighted). ``backend``: COCOeval's implementation
    (``coco_eval.BACKENDS``). ``observer`` (``EvalObserver``) sees the evaluation as it runs: its
    stages (a benchmark times them) and, on rank 0, the results the metrics come from.
    """
    mark = observer.mark if observer is not None else None
    device = torch.device(device)
    sums = torch.zeros(len(LOSS_COMPONENTS), device=device)
    n_images = 0
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # evaluate_batch restores the model's modes
        torch.manual_seed(seed)
        bar = Progress(data_loader, "Evaluating", enabled=progress and is_main_process())
        for images, targets in bar:
            images, targets = move_to_device(images, targets, device)
            # Masks left over their boxes: encoded per image without image-sized arrays (coco_eval.box_mask_rles).
            loss_dict, outputs = evaluate_batch(model, images, targets, losses=compute_losses, detections=compute_metrics,
                                                paste_masks=False, mark=mark)
            if loss_dict is not None:
                # Weighted by images, so the mean does not depend on how batches (or ranks) split the set.
                sums += stack_losses(loss_dict) * len(images)
                n_images += len(images)
            if outputs is not None:
                ids = [int(t["image_id"]) for t in targets]
                image_ids.extend(ids)
                results.extend(predictions_to_coco(outputs, ids, mapping, mask_threshold))
                if mark is not None:
                    mark("to COCO")
    if world_size() > 1:
        # Each rank evaluated its own shard: sum the losses by image, gather the detections.
        totals = all_reduce_sum(torch.cat([sums, torch.full((1,), float(n_images), device=device)]))
        sums, n_images = totals[:-1], int(totals[-1])
        # Rank 0 alone receives the detections (it alone runs COCOeval); the others drop theirs.
        shards = gather_objects_to_main((results, image_ids))
        results, image_ids = [], []
        if shards is not None:
            # In image-id order, as one process would have produced them: COCOeval breaks score ties
            # by the order of the results, so the metrics then equal a single-process evaluation.
            results = sorted((r for shard, _ in shards for r in shard), key=lambda r: r["image_id"])
            image_ids = sorted(i for _, ids in shards for i in ids)
    val_losses = dict(zip(LOSS_COMPONENTS, (sums / max(n_images, 1)).tolist())) if compute_losses else {}
    if observer is not None and observer.results is not None and compute_metrics and is_main_process():
        observer.results(results, image_ids)
    metrics: dict[str, dict[str, float]] = {}
    if compute_metrics:
        # COCOeval once over the whole set, on rank 0; every rank gets its numbers. The confusion
        # matrix rides along under metrics["confusion"] (not a scalar: epoch_scalars skips it).
        # Only rank 0 reads the ground truth: a dataset from a cached index loads it on first use,
        # so the other ranks never hold it.
        if is_main_process():
            coco_gt = coco_gt if coco_gt is not None else getattr(data_loader.dataset, "coco", None)
            if coco_gt is None:
                raise ValueError("evaluate needs coco_gt (or a data_loader.dataset with .coco) for COCO metrics")
            metrics = coco_metrics(coco_gt, results, image_ids, backend=backend)
            if mark is not None:
                mark("COCOeval")
            metrics[CONFUSION_KEY] = confusion_matrix(coco_gt, results, image_ids)  # type: ignore[assignment]
        metrics = broadcast_object(metrics)
    return val_losses, metrics


def subset_loader(loader: DataLoader, num_images: int, seed: int) -> DataLoader | None:
    """A validation loader over ``num_images`` of ``loader``'s images, the same ones at every call with
    the same ``seed`` (``per_image.choose_subset``: the first ``num_images`` of a permutation drawn
    from ``seed``, in dataset order, as the prediction images and the label check choose theirs), built
    like ``loader`` (batch size, workers, pinned memory; ``make_loader``: sharded over the ranks as the
    full set is). None when ``num_images`` covers the whole set. The subset dataset is a ``Subset``:
    pass the full set's ``coco`` to ``evaluate`` as ``coco_gt``."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise ValueError(f"subset_loader needs a DataLoader over a dataset, not a {type(loader).__name__}")
    if num_images >= len(dataset):
        return None
    return make_loader(Subset(dataset, choose_subset(len(dataset), num_images, seed)), loader.batch_size or 1,
                       shuffle=False, num_workers=loader.num_workers, seed=seed, pin_memory=loader.pin_memory)
