"""COCO-format datasets and loaders, for real COCO data and the built-in shapes set alike.

Built on ``torchvision.datasets.CocoDetection`` wrapped for ``transforms.v2``, so boxes and masks
follow every geometric augmentation. Choices made here:

* COCO's category ids (non-contiguous in COCO itself) map to labels ``1..K`` in id order, 0 being
  background; ``CategoryMapping`` maps predictions back for evaluation.
* Crowd annotations (``iscrowd=1``) never become training targets; COCOeval still uses them from
  the annotation file to ignore matching detections.
* Invalid annotations (non-finite bbox, non-positive width/height, box outside the image, unknown
  category) are reported once when the dataset is built and skipped.
* Images left without annotations are dropped from training when ``drop_empty_train_images`` is
  set (torchvision's reference recipe), and always kept for validation so metrics cover the split.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from maskrcnn_coco.config import AugmentConfig, DataConfig
from maskrcnn_coco.data.shapes import ShapesParams, ensure_shapes_dataset
from maskrcnn_coco.utils.errors import ConfigError, UserError

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A dataset that cannot be used as configured (missing files, no usable images, ...)."""


class CategoryMapping:
    """COCO category ids <-> contiguous labels 1..K (0 is background)."""

    def __init__(self, categories: Sequence[dict[str, Any]]):
        cats = sorted(categories, key=lambda c: int(c["id"]))
        if not cats:
            raise DataError("The annotation file defines no categories")
        self.coco_ids: list[int] = [int(c["id"]) for c in cats]
        self.names: list[str] = [str(c.get("name", c["id"])) for c in cats]
        self._to_label = {cid: i + 1 for i, cid in enumerate(self.coco_ids)}

    @property
    def num_classes(self) -> int:
        """Classes the model predicts, background included."""
        return len(self.coco_ids) + 1

    def to_label(self, category_id: int) -> int:
        try:
            return self._to_label[int(category_id)]
        except KeyError:
            raise DataError(f"category_id {category_id} is not among the annotation file's categories") from None

    def to_coco_id(self, label: int) -> int:
        if not 1 <= int(label) <= len(self.coco_ids):
            raise ValueError(f"label {label} is outside 1..{len(self.coco_ids)}")
        return self.coco_ids[int(label) - 1]

    def state_dict(self) -> dict[str, list]:
        return {"coco_ids": list(self.coco_ids), "names": list(self.names)}

    @classmethod
    def from_state_dict(cls, state: dict[str, list]) -> CategoryMapping:
        return cls([{"id": i, "name": n} for i, n in zip(state["coco_ids"], state["names"])])


def annotation_problem(ann: dict[str, Any], image: dict[str, Any] | None, known_ids: Iterable[int]) -> str | None:
    """Why a COCO annotation cannot be a training target, or None if it can."""
    bbox = ann.get("bbox")
    if image is None:
        return f"image_id {ann.get('image_id')} is not in the images list"
    if int(ann.get("category_id", -1)) not in known_ids:
        return f"unknown category_id {ann.get('category_id')}"
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox {bbox!r} is not [x, y, width, height]"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return f"bbox {bbox} has NaN/Inf"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has non-positive width/height"
    if x >= image["width"] or y >= image["height"] or x + w <= 0 or y + h <= 0:
        return f"bbox {bbox} lies outside the {image['width']}x{image['height']} image"
    if "segmentation" not in ann:
        return "no segmentation"
    return None


def find_invalid_annotations(coco: COCO, image_ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """Problems of the non-crowd annotations (of ``image_ids``, or all), one record each."""
    known = set(coco.cats)
    ann_ids = coco.getAnnIds(imgIds=list(image_ids)) if image_ids is not None else list(coco.anns)
    problems = []
    for ann_id in ann_ids:
        ann = coco.anns[ann_id]
        if ann.get("iscrowd", 0):
            continue
        reason = annotation_problem(ann, coco.imgs.get(ann.get("image_id")), known)
        if reason:
            problems.append({"annotation_id": ann_id, "image_id": ann.get("image_id"), "problem": reason})
    return problems


class CocoInstances(CocoDetection):
    """``CocoDetection`` that yields only usable targets: no crowd, no invalid annotations."""

    def __init__(self, root: str, coco: COCO, usable_ann_ids: set[int], transforms: Any = None):
        # CocoDetection's own __init__ would load the annotation file a second time.
        super(CocoDetection, self).__init__(root, transforms=transforms)
        self.coco = coco
        self.ids = sorted(coco.imgs)
        self.usable_ann_ids = usable_ann_ids

    def _load_target(self, id: int) -> list[Any]:
        return [a for a in self.coco.imgToAnns.get(id, []) if a["id"] in self.usable_ann_ids]


class PrepareTargets:
    """First step of every pipeline: maps category ids to labels and gives images without
    annotations empty ``boxes``/``masks``/``labels`` of the right shapes."""

    def __init__(self, mapping: CategoryMapping):
        self.mapping = mapping

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if "boxes" not in target:  # the v2 wrapper's output for an image without annotations
            height, width = v2.functional.get_size(image)
            target = {
                "image_id": target["image_id"],
                "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)),
                "masks": tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8)),
                "labels": torch.zeros(0, dtype=torch.int64),
            }
            return image, target
        labels = torch.tensor([self.mapping.to_label(c) for c in target["labels"].tolist()], dtype=torch.int64)
        # COCO files may hold integer boxes; the model's box arithmetic needs floats.
        return image, {**target, "boxes": target["boxes"].to(torch.float32), "labels": labels}


def _plain_tensors(image: Any, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Strip tv_tensor subclasses: the model only needs plain tensors, and they are cheaper."""
    plain = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
    return image.as_subclass(torch.Tensor), plain


def build_transforms(train: bool, augment: AugmentConfig, mapping: CategoryMapping) -> v2.Compose:
    """The full per-sample pipeline: target preparation, augmentation, dtype, sanitising."""
    steps: list[Any] = [PrepareTargets(mapping), v2.ToImage()]
    if train:
        if augment.photometric:
            steps.append(v2.RandomPhotometricDistort(p=0.5))
        if augment.scale_range is not None:
            lo, hi = augment.scale_range
            steps.append(v2.RandomAffine(degrees=0.0, scale=(lo, hi)))
        if augment.hflip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(p=augment.hflip_prob))
        if augment.vflip_prob > 0:
            steps.append(v2.RandomVerticalFlip(p=augment.vflip_prob))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(),
        _plain_tensors,
    ]
    return v2.Compose(steps)


def load_coco(annotations: str | Path) -> COCO:
    """pycocotools' COCO, quietly (it prints progress lines to stdout)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotations))


def build_coco_dataset(
    images: str | Path,
    annotations: str | Path,
    *,
    train: bool,
    augment: AugmentConfig,
    drop_empty: bool,
    max_images: int | None = None,
    mapping: CategoryMapping | None = None,
    key: str = "data",
) -> Dataset:
    """A ``CocoDetection`` over ``images`` and ``annotations`` yielding Mask R-CNN samples.

    The returned dataset has ``.coco`` (pycocotools COCO), ``.ids`` (image ids in order) and
    ``.mapping`` (the ``CategoryMapping``).
    """
    images, annotations = Path(images).expanduser(), Path(annotations).expanduser()
    if not annotations.is_file():
        raise DataError(f"Annotation file not found: {annotations} (set {key} annotations path)")
    if not images.is_dir():
        raise DataError(f"Image folder not found: {images} (set {key} images path)")
    try:
        coco = load_coco(annotations)
    except Exception as err:
        raise DataError(f"Could not read COCO annotations {annotations}: {err}") from err
    mapping = mapping or CategoryMapping(list(coco.cats.values()))

    invalid = find_invalid_annotations(coco)
    if invalid:
        examples = "; ".join(f"ann {p['annotation_id']} (image {p['image_id']}): {p['problem']}" for p in invalid[:3])
        log.warning("%d invalid annotations in %s are skipped, e.g. %s", len(invalid), annotations.name, examples)
    invalid_ids = {p["annotation_id"] for p in invalid}
    usable = {a["id"] for a in coco.anns.values() if not a.get("iscrowd", 0) and a["id"] not in invalid_ids}

    base = CocoInstances(str(images), coco, usable, transforms=build_transforms(train, augment, mapping))
    ids = base.ids
    if train and drop_empty:
        ids = [i for i in ids if any(a["id"] in usable for a in coco.imgToAnns.get(i, []))]
    if max_images is not None:
        ids = ids[:max_images]
    if not ids:
        raise DataError(f"No usable images in {annotations} (after dropping images without valid annotations)")
    missing = [coco.imgs[i]["file_name"] for i in ids[:50] if not (images / coco.imgs[i]["file_name"]).is_file()]
    if missing:
        raise DataError(f"Images listed in {annotations.name} are missing from {images}: {missing[:3]}")
    base.ids = ids
    dataset = wrap_dataset_for_transforms_v2(base, target_keys={"image_id", "boxes", "masks", "labels"})
    dataset.mapping = mapping
    return dataset


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Detection batches are lists: images differ in size and carry different instance counts."""
    images, targets = zip(*batch)
    return list(images), list(targets)


@dataclass
class DataBundle:
    train_loader: DataLoader
    val_loader: DataLoader
    mapping: CategoryMapping

    @property
    def val_coco(self) -> COCO:
        return self.val_loader.dataset.coco


def resolve_paths(cfg: DataConfig, progress: bool = True) -> dict[str, Path]:
    """Image folders and annotation files for ``cfg``; generates the shapes set if needed.

    Dispatches on ``cfg.name`` (``shapes`` or ``coco``): a DictConfig is never an instance of its schema.
    """
    if cfg.name == "shapes":
        params = ShapesParams(
            num_train=cfg.num_train,
            num_val=cfg.num_val,
            image_size=cfg.image_size,
            seed=cfg.seed,
            min_objects=cfg.min_objects,
            max_objects=cfg.max_objects,
        )
        paths = asdict(ensure_shapes_dataset(params, cfg.cache_dir, progress=progress))
        return {k: v for k, v in paths.items() if k != "root"}
    if cfg.name != "coco":
        raise ConfigError(f"data.name={cfg.name!r}: use data=shapes (built-in synthetic set) or data=coco (COCO-format files)")
    return {k: Path(os.path.expanduser(str(getattr(cfg, k)))) for k in ("train_images", "val_images", "train_annotations", "val_annotations")}


def build_datasets(cfg: DataConfig, splits: Sequence[str] = ("train", "val"), progress: bool = True) -> dict[str, Dataset]:
    """The requested splits as datasets, sharing one category mapping."""
    paths = resolve_paths(cfg, progress)
    out: dict[str, Dataset] = {}
    mapping: CategoryMapping | None = None
    for split in splits:
        ds = build_coco_dataset(
            paths[f"{split}_images"],
            paths[f"{split}_annotations"],
            train=split == "train",
            augment=cfg.augment,
            drop_empty=cfg.drop_empty_train_images and split == "train",
            max_images=cfg.max_train_images if split == "train" else cfg.max_val_images,
            mapping=mapping,
            key=f"data.{split}_images / data.{split}_annotations",
        )
        if mapping is not None and sorted(ds.coco.cats) != mapping.coco_ids:
            raise DataError(f"The {split} annotations define other categories than the train annotations")
        mapping = ds.mapping
        out[split] = ds
    return out


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, num_workers: int, seed: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        drop_last=False,
    )


def build_data(cfg: DataConfig, seed: int = 0, progress: bool = True, pin_memory: bool = False) -> DataBundle:
    """Train and val loaders for ``cfg`` (``data=shapes`` or ``data=coco``); pin memory for CUDA."""
    datasets = build_datasets(cfg, progress=progress)
    val_bs = cfg.val_batch_size or cfg.batch_size
    loader = {"num_workers": cfg.num_workers, "seed": seed, "pin_memory": pin_memory}
    return DataBundle(
        train_loader=make_loader(datasets["train"], cfg.batch_size, shuffle=True, **loader),
        val_loader=make_loader(datasets["val"], val_bs, shuffle=False, **loader),
        mapping=datasets["train"].mapping,
    )
