"""Shared fixtures: tiny generated datasets and tiny models, so the suite stays fast on 2 cores."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "maskrcnn_coco" / "main_mlops.py"

# Overrides for a model and dataset small enough for a subprocess run in a few seconds.
TINY_MODEL_OVERRIDES = [
    "model.returned_layers=[3,4]",
    "model.anchor_sizes=[16,32,64]",
    "model.fpn_channels=16",
    "model.box_head_dim=32",
    "model.mask_head_layers=[16]",
    "model.mask_predictor_dim=16",
    "scheduler.warmup_iters=2",
    "progress=false",
]
TINY_OVERRIDES = ["data.num_train=8", "data.num_val=4", "data.image_size=64", "data.batch_size=2", "data.num_workers=0", *TINY_MODEL_OVERRIDES]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated shapes sets go to a per-session temp folder, never the user's cache."""
    cache = tmp_path_factory.getbasetemp() / "shapes_cache"
    monkeypatch.setenv("MASKRCNN_COCO_CACHE", str(cache))
    torch.manual_seed(0)


def run_entry(args: list[str], cwd: Path, timeout: int = 300):
    """Run ``python maskrcnn_coco/main_mlops.py`` in a subprocess; returns CompletedProcess."""
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ENTRY), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def write_coco_dataset(root: Path, categories: list[dict], images: list[dict], annotations: list[dict], split: str = "train") -> tuple[Path, Path]:
    """Write a COCO annotation file and blank PNGs for ``images``; returns (image folder, ann file)."""
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    for im in images:
        Image.fromarray(np.full((im["height"], im["width"], 3), 127, np.uint8)).save(img_dir / im["file_name"])
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return img_dir, ann_file


def square_ann(ann_id: int, image_id: int, category_id: int, x: float, y: float, s: float, **extra) -> dict:
    """A square annotation with a polygon segmentation."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x, y, s, s],
        "area": s * s,
        "iscrowd": 0,
        "segmentation": [[x, y, x + s, y, x + s, y + s, x, y + s]],
        **extra,
    }


def tiny_model_cfg(**overrides):
    """A SmallModelConfig a few hundred kB in size, for 64 px images."""
    from omegaconf import OmegaConf

    from maskrcnn_coco.config import SmallModelConfig

    base = dict(
        returned_layers=[3, 4],
        anchor_sizes=[16, 32, 64],
        fpn_channels=16,
        box_head_dim=32,
        mask_head_layers=[16],
        mask_predictor_dim=16,
        min_size=64,
        max_size=64,
        rpn_pre_nms_top_n_train=100,
        rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=32,
    )
    base.update(overrides)
    return OmegaConf.structured(SmallModelConfig(**base))


def tiny_data_cfg(**overrides):
    from omegaconf import OmegaConf

    from maskrcnn_coco.config import ShapesDataConfig

    base = dict(num_train=8, num_val=4, image_size=64, batch_size=2, cache_dir=os.environ["MASKRCNN_COCO_CACHE"])
    base.update(overrides)
    return OmegaConf.structured(ShapesDataConfig(**base))


@pytest.fixture
def tiny_data():
    from maskrcnn_coco.data.coco import build_data

    return build_data(tiny_data_cfg(), seed=0, progress=False)


@pytest.fixture
def tiny_model(tiny_data):
    from maskrcnn_coco.modeling.build import build_model

    torch.manual_seed(0)
    return build_model(tiny_model_cfg(), tiny_data.mapping.num_classes)


@pytest.fixture
def stub_evaluate(monkeypatch):
    """Replace fit's evaluate: record the epoch (train passes so far) of each call, return fixed results."""

    class Stub:
        def __init__(self):
            self.calls = []
            self.val_losses = dict(VAL_LOSSES)
            self.train_loader = None  # set by run_fit: its pass count is the epoch being evaluated

        def __call__(self, model, loader, device, **kwargs):
            self.calls.append((self.train_loader.passes if self.train_loader else None, loader, kwargs))
            return dict(self.val_losses), {k: dict(v) for k, v in METRICS.items()}

    from helpers import METRICS, VAL_LOSSES

    stub = Stub()
    # By module: the package's `fit` attribute is the function, which shadows the module name.
    monkeypatch.setattr(importlib.import_module("maskrcnn_coco.engine.fit"), "evaluate", stub)
    return stub
