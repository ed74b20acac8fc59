"""The benchmark's setup: the model, training and validation batches (configured or synthetic) and COCO ground truth."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from maskrcnn_coco.cli.experiment import build_components, seed_everything
from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.tracking.scalars import loss_weights_from_config


@dataclass
class Setup:
    cfg: Any
    model: torch.nn.Module
    device: torch.device
    mapping: CategoryMapping
    loss_weights: dict[str, float]
    train_batches: list[Any]
    val_batches: list[Any]
    coco_gt: Any
    train_loader: Any = None  # the configured loader (data section); None for synthetic data
    data: str = "config"


def take(loader: Any, n: int) -> list[Any]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def synthetic_batches(n: int, batch_size: int, size: tuple[int, int], num_classes: int, seed: int, first_id: int = 1) -> list[Any]:
    """Random images with 1-4 rectangular objects each (boxes, masks, labels), COCO-style image ids."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    batches, image_id = [], first_id
    for _ in range(n):
        images, targets = [], []
        for _ in range(batch_size):
            images.append(torch.rand(3, h, w, generator=g))
            k = int(torch.randint(1, 5, (1,), generator=g))
            wh = torch.rand(k, 2, generator=g) * torch.tensor([w / 3, h / 3]) + 16
            xy = torch.rand(k, 2, generator=g) * (torch.tensor([w, h]) - wh)
            boxes = torch.cat([xy, xy + wh], dim=1).floor()
            masks = torch.zeros(k, h, w, dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[j, y0:y1, x0:x1] = 1
            labels = torch.randint(1, num_classes + 1, (k,), generator=g)
            targets.append({"image_id": image_id, "boxes": boxes, "masks": masks, "labels": labels})
            image_id += 1
        batches.append((images, targets))
    return batches


def coco_from_batches(batches: Sequence[Any], mapping: CategoryMapping) -> Any:
    """A pycocotools COCO holding the targets of ``batches`` as ground truth."""
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    images, anns = [], []
    for batch_images, targets in batches:
        for img, t in zip(batch_images, targets):
            h, w = img.shape[-2:]
            images.append({"id": int(t["image_id"]), "width": int(w), "height": int(h), "file_name": f"{t['image_id']}.png"})
            rles = mask_utils.encode(np.asfortranarray(t["masks"].permute(1, 2, 0).numpy().astype(np.uint8)))
            for box, label, rle in zip(t["boxes"].tolist(), t["labels"].tolist(), rles):
                x0, y0, x1, y1 = box
                anns.append({"id": len(anns) + 1, "image_id": int(t["image_id"]), "category_id": mapping.to_coco_id(int(label)),
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask_utils.area(rle)), "iscrowd": 0,
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": f"class{c}"} for c in mapping.coco_ids]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def pinned(batches: Sequence[Any]) -> list[Any]:
    def pin(v: Any) -> Any:
        return v.pin_memory() if isinstance(v, torch.Tensor) else v

    return [([pin(i) for i in images], [{k: pin(v) for k, v in t.items()} for t in targets]) for images, targets in batches]


def prepare(cfg: Any, args: argparse.Namespace, device: torch.device) -> Setup:
    n_train = args.iters
    if args.data == "synthetic":
        seed_everything(cfg.seed)
        mapping = CategoryMapping([{"id": i, "name": f"class{i}"} for i in range(1, 4)])
        model = build_model(cfg.model, mapping.num_classes).to(device)
        bs = args.batch_size or cfg.data.batch_size
        size = tuple(args.image_size)
        train = synthetic_batches(n_train, bs, size, 3, seed=cfg.seed)
        val = synthetic_batches(args.eval_batches, bs, size, 3, seed=cfg.seed + 1, first_id=10**6)
        coco = coco_from_batches(val, mapping)
        if device.type == "cuda":  # as the loader gives them with pin_memory: copies overlap with compute
            train, val = pinned(train), pinned(val)
        return Setup(cfg, model, device, mapping, loss_weights_from_config(cfg.loss.weights), train, val, coco, data="synthetic")
    parts = build_components(cfg, progress=False)
    train = take(parts.data.train_loader, n_train)
    val = take(parts.data.val_loader, args.eval_batches)
    return Setup(cfg, parts.model, parts.device, parts.mapping, parts.loss_weights, train, val,
                 parts.data.val_loader.dataset.coco, train_loader=parts.data.train_loader)
