"""COCO-format datasets and loaders, for real COCO data and the built-in shapes set alike.

Samples are what ``torchvision.datasets.CocoDetection`` wrapped for ``transforms.v2`` yields (boxes
and masks follow every geometric augmentation), read from a compact serialised index
(``data.index``) rather than from pycocotools' objects, so loader workers' memory stays flat.
Choices made here:

* COCO's category ids (non-contiguous in COCO itself) map to labels ``1..K`` in id order, 0 being
  background; ``CategoryMapping`` maps predictions back for evaluation.
* Crowd annotations (``iscrowd=1``) never become training targets; COCOeval still uses them from
  the annotation file to ignore matching detections.
* Invalid annotations (non-finite bbox, non-positive width/height, box outside the image, unknown
  category, a segmentation that does not decode or lies elsewhere than its box; see
  ``data.validate``) are reported once when the dataset is built and skipped. They are also
  removed from the dataset's ``coco``, so COCOeval does not score them either.
* Every image file the split uses must exist (checked at build). An image that cannot be decoded or
  whose size differs from the annotation file stops training with its file and image id when it is
  first loaded (``data.on_invalid=error``), or is dropped at build (``data.on_invalid=drop``, which
  decodes every image once when the dataset is built).
* Images of any PIL mode (16-bit, float, palette, alpha, CMYK, ...) become 8-bit RGB with the
  intensities the file means (``validate.to_rgb``).
* Images left without annotations are dropped from training when ``drop_empty_train_images`` is
  set (torchvision's reference recipe), and always kept for validation so metrics cover the split.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from maskrcnn_coco.config import AugmentConfig, DataConfig
from maskrcnn_coco.data.exif import Frame, load_oriented
from maskrcnn_coco.data.exports import (
    apply_crowd_policy,
    box_only_line,
    drop_categories,
    has_mask,
    negatives_line,
    placeholder_categories,
    placeholder_line,
    relocated_line,
)
from maskrcnn_coco.data.index import SerializedRecords, SplitIndex, has_ground_truth, memoized
from maskrcnn_coco.data.index_cache import IndexCache, node_first
from maskrcnn_coco.data.layouts import ResolvedPaths, resolve_layout
from maskrcnn_coco.data.samplers import SeededSamples, ShardSampler, TrainSampler, aspect_ratio_groups
from maskrcnn_coco.data.shapes import ShapesParams, ensure_shapes_dataset
from maskrcnn_coco.data.split import SplitInfo
from maskrcnn_coco.data.validate import (
    ON_INVALID,
    check_split,
    describe_error,
    segmentation_rle,
    summarize,
    validate_annotations,
)
from maskrcnn_coco.utils import dist
from maskrcnn_coco.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)


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


def find_invalid_annotations(coco: COCO, image_ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """Problems of the annotations (of ``image_ids``, or all), one record each: ``annotation_id``,
    ``image_id``, ``file``, ``kind``, ``problem``, ``iscrowd``.

    For a dataset's ``coco`` (already cleaned when the dataset was built) these are the records of
    the annotations that were removed from it.
    """
    skipped = getattr(coco, "skipped_annotations", None)
    problems = skipped if skipped is not None else validate_annotations(coco).invalid
    if image_ids is None:
        return list(problems)
    wanted = set(image_ids)
    return [p for p in problems if p["image_id"] in wanted]


def _hint() -> str:
    return "fix or remove it, or set data.on_invalid=drop to skip such images (python scripts/check_dataset.py lists them all)"


def _mask(segmentation: Any, height: int, width: int) -> torch.Tensor:
    """An annotation's mask as ``H x W`` uint8 (as torchvision's COCO wrapper decodes it); box-only
    (None): all zero, which the mask loss skips (``modeling.mask_loss``)."""
    if segmentation is None:
        return torch.zeros((height, width), dtype=torch.uint8)
    return torch.from_numpy(mask_utils.decode(segmentation_rle(segmentation, height, width)))


class CocoInstances(Dataset):
    """The usable targets of a COCO-format split (no crowd, no invalid annotation) with RGB images of
    the size the annotation file gives (in their EXIF frame), or a ``DataError`` naming the file and
    image id; samples are ``(image, {"image_id", "boxes" (XYXY), "masks", "labels"})`` through
    ``transforms``, as torchvision's ``CocoDetection`` wrapped for ``transforms.v2`` gives them.

    What a sample needs lives in the split's ``SplitIndex`` (``data.index``): one serialised record
    per image, so loader workers never touch the ``COCO`` object and its lists (whose pages they would
    otherwise copy, image after image). ``coco`` (loaded on first use when the index came from the
    cache), ``ids``, ``usable_ann_ids`` and ``frames`` are for the main process's analyses (label
    check, per-image losses, split statistics).
    """

    def __init__(self, root: str, index: SplitIndex, transforms: Any = None, source: str = "the annotation file"):
        self.root = root
        self.index = index
        self.ids = list(index.ids)
        self.transforms = transforms
        self.source = source

    @property
    def records(self) -> SerializedRecords:
        return self.index.records

    @property
    def coco(self) -> COCO:
        return self.index.coco

    @property
    def usable_ann_ids(self) -> set[int]:
        return self.index.usable_ann_ids

    @property
    def frames(self) -> dict[int, Frame]:
        return self.index.frames

    def annotation_ids(self, image_id: int) -> list[int] | None:
        """Ids of the annotations of ``image_id``'s target, in its order (from the index: no ``coco``
        needed); None for an image not in the split."""
        if self.index.positions is None:
            self.index.positions = {i: n for n, i in enumerate(self.ids)}
        n = self.index.positions.get(image_id)
        return None if n is None else [ann[0] for ann in self.records[n][5]]

    def with_transforms(self, transforms: Any) -> CocoInstances:
        """The same images and targets (the same index) through other ``transforms``."""
        view = CocoInstances(self.root, self.index, transforms, self.source)
        view.mapping = getattr(self, "mapping", None)
        return view

    def __len__(self) -> int:
        return len(self.records)

    def _load_image(self, image_id: int, file_name: str, width: int, height: int, frame: Frame | None) -> Image.Image:
        path = os.path.join(self.root, file_name)
        try:
            image = load_oriented(path, frame)
        except FileNotFoundError:
            raise DataError(f"Image file not found: {path} (image id {image_id} in {self.source}); {_hint()}") from None
        except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib errors...
            raise DataError(f"Cannot decode image {path} (image id {image_id} in {self.source}): {describe_error(err)}; {_hint()}") from None
        if image.size != (width, height):
            raise DataError(
                f"Image {path} (image id {image_id}) is {image.size[0]}x{image.size[1]} pixels but {self.source} says "
                f"{width}x{height}, so its boxes and masks would not fit; {_hint()}"
            )
        return image

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id, file_name, width, height, frame, anns = self.records[index]
        image = self._load_image(image_id, file_name, width, height, frame)
        target: dict[str, Any] = {"image_id": image_id}
        if anns:  # an image without annotations: image_id alone (PrepareTargets adds the empty fields)
            _, categories, boxes, segmentations = zip(*anns)
            target["boxes"] = v2.functional.convert_bounding_box_format(
                tv_tensors.BoundingBoxes(list(boxes), format=tv_tensors.BoundingBoxFormat.XYWH, canvas_size=(height, width)),
                new_format=tv_tensors.BoundingBoxFormat.XYXY,
            )
            target["masks"] = tv_tensors.Mask(torch.stack([_mask(seg, height, width) for seg in segmentations]))
            target["labels"] = torch.tensor(categories)
        return self.transforms(image, target) if self.transforms is not None else (image, target)


def category_counts(coco: COCO, image_ids: Iterable[int], usable_ann_ids: Iterable[int] | None = None) -> dict[str, int]:
    """Usable instances per category name (every category, 0 included, in category id order) of the
    images ``image_ids``; ``usable_ann_ids`` None: the non-crowd annotations."""
    usable = None if usable_ann_ids is None else set(usable_ann_ids)
    names = {int(cid): str(c.get("name", cid)) for cid, c in sorted(coco.cats.items())}
    counts = dict.fromkeys(names.values(), 0)
    for image_id in image_ids:
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0) if usable is None else ann["id"] not in usable:
                continue
            name = names.get(int(ann["category_id"]))
            if name is not None:
                counts[name] += 1
    return counts


def class_instance_counts(dataset: Any) -> dict[str, int]:
    """``category_counts`` of a ``CocoInstances``-like dataset (``coco``, ``ids``, ``usable_ann_ids``);
    empty for anything else. A subset (e.g. ``data.max_train_images``) counts its own images only."""
    if getattr(dataset, "ids", None) is None or not has_ground_truth(dataset):
        return {}
    return memoized(dataset, "class_counts", lambda: category_counts(dataset.coco, dataset.ids, getattr(dataset, "usable_ann_ids", None)))


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


def prepare_export(coco: COCO, source: str, crowd: str) -> tuple[list[str], list[tuple[int, str, str]]]:
    """What an export's conventions change before its split is checked (``data.exports``), in place:
    the ``data.crowd`` policy and the placeholder categories left out. The lines that say so, and
    the categories left out (``(id, name, why)``)."""
    said = [apply_crowd_policy(coco, crowd, source)]
    placeholders = placeholder_categories(coco)
    if placeholders:
        drop_categories(coco, [cid for cid, _, _ in placeholders])
        said.append(placeholder_line(placeholders, source))
    return [line for line in said if line], placeholders


def export_lines(check: Any, coco: COCO, source: str, images: str | Path, *, train: bool, drop_empty: bool) -> list[str]:
    """The lines a checked split prints at start: files found by their basename, EXIF frames,
    negatives, box-only annotations (``data.exports``, ``data.exif``)."""
    said = [relocated_line(check.relocated, source, images) if check.relocated else None]
    said += check.frames.summary_lines(source)
    said.append(negatives_line(check.negatives, len(coco.imgs), source, train=train, dropped=drop_empty))
    said.append(box_only_line([a for a in coco.dataset["annotations"] if a["id"] in check.usable_ann_ids], source))
    return [line for line in said if line]


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
    on_invalid: str = "error",
    progress: bool = False,
    exif: str = "apply",
    crowd: str = "ignore",
    index_cache: str = "off",
) -> Dataset:
    """A ``CocoInstances`` over ``images`` and ``annotations`` yielding Mask R-CNN samples.

    The returned dataset has ``.coco`` (pycocotools COCO, without the invalid annotations),
    ``.ids`` (image ids in order) and ``.mapping`` (the ``CategoryMapping``). ``on_invalid``
    (``error`` or ``drop``): what becomes of images that are missing, cannot be decoded or differ in
    size from the annotation file (see the module doc). ``index_cache`` (``data.index_cache``: ``off``,
    ``auto`` or a folder): the validated index is built once and read back while the files and
    these settings are unchanged (``data.index_cache``); the lines the build said are said again.
    """
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"data.on_invalid={on_invalid!r}: use one of {', '.join(ON_INVALID)}")
    images, annotations = Path(images).expanduser(), Path(annotations).expanduser()
    if not annotations.is_file():
        raise DataError(f"Annotation file not found: {annotations} (set {key} annotations path)")
    if not images.is_dir():
        raise DataError(f"Image folder not found: {images} (set {key} images path)")
    settings = {"train": train, "drop_empty": drop_empty, "max_images": max_images, "on_invalid": on_invalid,
                "exif": exif, "crowd": crowd}
    cache = IndexCache.for_split(index_cache, annotations, images, settings)

    def build() -> SplitIndex:
        index = index_split(images, annotations, progress=progress, **settings)
        if cache is not None:
            cache.save(index)
        return index

    def load() -> SplitIndex | None:
        index = cache.load() if cache is not None else None
        if index is not None:
            index.replay(log)
        return index

    index = node_first(build, load)
    mapping = mapping or CategoryMapping(index.categories)
    dataset = CocoInstances(str(images), index, transforms=build_transforms(train, augment, mapping), source=annotations.name)
    dataset.mapping = mapping
    return dataset


def index_split(images: Path, annotations: Path, *, train: bool, drop_empty: bool, max_images: int | None,
                on_invalid: str, exif: str, crowd: str, progress: bool = False) -> SplitIndex:
    """Read, check and index one split (``build_coco_dataset``'s work when no cached index stands);
    its lines are logged as they come and kept in the index, or a ``DataError`` for an unusable split."""
    lines: list[tuple[int, str]] = []

    def say(level: int, message: str, *args: Any) -> None:
        lines.append((level, message % args if args else message))
        log.log(level, "%s", lines[-1][1])

    try:
        coco = load_coco(annotations)
    except Exception as err:
        raise DataError(f"Could not read COCO annotations {annotations}: {err}") from err
    said, _ = prepare_export(coco, annotations.name, crowd)
    check = check_split(
        coco, images, train=train, drop_empty=drop_empty, max_images=max_images, on_invalid=on_invalid,
        decode=on_invalid == "drop", progress=progress, desc=f"Checking {annotations.name} images", exif=exif,
    )
    for line in said + export_lines(check, coco, annotations.name, images, train=train, drop_empty=drop_empty):
        say(logging.INFO, line)
    report = check.annotations
    if report.invalid:
        say(logging.WARNING, "%d invalid annotations in %s are skipped %s", len(report.invalid), annotations.name, summarize(report.invalid))
    if report.repaired:
        say(logging.WARNING, "%d annotations in %s had polygon parts with fewer than 3 points, removed %s",
            len(report.repaired), annotations.name, summarize(report.repaired))
    if check.bad_images:
        if on_invalid == "error":
            raise DataError(
                f"{len(check.bad_images)} images listed in {annotations.name} cannot be used {summarize(check.bad_images)}; "
                "fix them or set data.on_invalid=drop to skip them (python scripts/check_dataset.py lists them all)"
            )
        say(logging.WARNING, "%d images listed in %s are dropped %s", len(check.bad_images), annotations.name, summarize(check.bad_images))
    if not check.ids:
        raise DataError(f"No usable images in {annotations} (after dropping images without valid annotations)")
    if check.empty_categories:
        names = ", ".join(f"{name!r} (id {cid})" for cid, name in check.empty_categories)
        say(logging.WARNING, "No training instance of %d categories in %s: %s; the model cannot learn them",
            len(check.empty_categories), annotations.name, names)
    usable, frames = check.usable_ann_ids, check.frames.frames

    def record(image_id: int) -> tuple:
        info = coco.imgs[image_id]
        anns = [(a["id"], a["category_id"], list(a["bbox"]), a.get("segmentation") if has_mask(a) else None)
                for a in coco.imgToAnns.get(image_id, []) if a["id"] in usable]
        return image_id, info["file_name"], int(info["width"]), int(info["height"]), frames.get(image_id), anns

    sizes = np.array([(int(coco.imgs[i]["width"]), int(coco.imgs[i]["height"])) for i in check.ids], dtype=np.int64).reshape(-1, 2)
    return SplitIndex(records=SerializedRecords(record(i) for i in check.ids), ids=list(check.ids), sizes=sizes,
                      categories=list(coco.cats.values()), lines=lines, _coco=coco, _usable=usable, _frames=frames)


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Detection batches are lists: images differ in size and carry different instance counts."""
    images, targets = zip(*batch)
    return list(images), list(targets)


@dataclass
class DataBundle:
    train_loader: DataLoader
    val_loader: DataLoader
    mapping: CategoryMapping
    split: SplitInfo | None = None  # data.val_fraction's split of one export (written to the run folder)


def split_cache_dir(cfg: Any) -> Path:
    """Where ``data.val_fraction`` writes its two split files: the cache folder (beside the shapes
    sets), one subfolder per annotation file, so datasets and concurrent runs never share one."""
    cache = Path(os.path.expanduser(os.environ.get("MASKRCNN_COCO_CACHE", "~/.cache/maskrcnn_coco")))
    key = "|".join(os.path.abspath(os.path.expanduser(str(v))) for v in (cfg.root, cfg.train_annotations)) + f"|{cfg.layout}"
    return cache / "splits" / hashlib.sha1(key.encode()).hexdigest()[:16]


def resolve_data_paths(cfg: DataConfig, progress: bool = True) -> ResolvedPaths:
    """Image folders and annotation files for ``cfg`` (the layout and split lines said once, by the
    main process); generates the shapes set if needed.

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
        return ResolvedPaths(**{k: paths[k] for k in ("train_images", "val_images", "train_annotations", "val_annotations")},
                             layout="shapes")
    if cfg.name != "coco":
        raise ConfigError(f"data.name={cfg.name!r}: use data=shapes (built-in synthetic set) or data=coco (COCO-format files)")
    resolved = resolve_layout(cfg, split_cache_dir(cfg))
    if dist.is_main_process():
        for line in resolved.lines:
            log.info("%s", line)
    return resolved


def resolve_paths(cfg: DataConfig, progress: bool = True) -> dict[str, Path]:
    """``resolve_data_paths`` as ``{train_images, val_images, train_annotations, val_annotations}``."""
    return resolve_data_paths(cfg, progress).as_dict()


def build_datasets(cfg: DataConfig, splits: Sequence[str] = ("train", "val"), progress: bool = True,
                   paths: dict[str, Path] | None = None) -> dict[str, Dataset]:
    """The requested splits as datasets, sharing one category mapping (``paths``: from ``resolve_paths``)."""
    paths = paths or resolve_paths(cfg, progress)
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
            on_invalid=getattr(cfg, "on_invalid", "error"),
            progress=progress,
            exif=getattr(cfg, "exif", "apply"),
            crowd=getattr(cfg, "crowd", "ignore"),
            index_cache=getattr(cfg, "index_cache", "off"),
        )
        if mapping is not None and sorted(int(c["id"]) for c in ds.index.categories) != mapping.coco_ids:
            raise DataError(f"The {split} annotations define other categories than the train annotations")
        mapping = ds.mapping
        out[split] = ds
    return out


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int | str,
    seed: int,
    pin_memory: bool = False,
    aspect_ratio_group_factor: int = -1,
) -> DataLoader:
    """Training (``shuffle``): a resumable ``TrainSampler`` (order from seed and epoch, augmentation
    seeded per sample), in batches of one aspect-ratio group when ``aspect_ratio_group_factor >= 0``
    (from the annotation file's image sizes); validation: the dataset in order. Both sharded over
    the ranks of a distributed run (``maskrcnn_coco.utils.dist``). ``num_workers``: a count or
    ``auto`` (``resolve_num_workers``); training workers persist across epochs, validation workers
    live through one evaluation (``ForkingLoader``)."""
    rank, size = dist.rank(), dist.world_size()
    num_workers = resolve_num_workers(num_workers)
    if shuffle:
        groups = image_aspect_groups(dataset, aspect_ratio_group_factor) if aspect_ratio_group_factor >= 0 else None
        sampler: Sampler = TrainSampler(len(dataset), seed, shuffle=True, rank=rank, world_size=size,
                                        group_ids=groups, batch_size=batch_size)
        dataset = SeededSamples(dataset)
    else:
        sampler = ShardSampler(len(dataset), rank=rank, world_size=size)
    return ForkingLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        # Worker base seeds come from here, not from the global RNG (which the model's samplers use).
        generator=torch.Generator().manual_seed(seed),
        # Training workers live through the run; validation workers only through an evaluation, so
        # they hold no memory between evaluations (a node's 8 ranks x W workers would otherwise).
        persistent_workers=num_workers > 0 and shuffle,
        pin_memory=pin_memory,
        drop_last=False,
    )


class ForkingLoader(DataLoader):
    """A ``DataLoader`` that freezes the garbage collector's view of the main process before its
    workers fork: the GC's passes in a worker would otherwise write to (and so copy) every page of
    the objects it inherited, the ``COCO`` index included (Python's ``gc.freeze`` documentation
    recommends it for this). Objects alive at that moment are not collected afterwards, as they
    would not be anyway (the datasets, the model)."""

    def __iter__(self):
        if self.num_workers > 0 and not getattr(self, "_frozen", False):
            gc.freeze()
            self._frozen = True
        return super().__iter__()


def resolve_num_workers(value: int | str) -> int:
    """``data.num_workers``: a count, or ``auto``: half the CPUs this process may use, split over the
    processes of this node, at most 8 (the other half computes; one CPU core per worker is plenty
    for a Mask R-CNN batch)."""
    if value != "auto":
        return int(value)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cpus // (2 * per_node)))


def image_aspect_groups(dataset: Dataset, factor: int) -> list[int] | None:
    """Aspect-ratio group of each sample of a COCO-format dataset (the annotation file's image sizes,
    from its index; no image is decoded); None for a dataset without them."""
    index = getattr(dataset, "index", None)
    if index is None or len(index.ids) != len(dataset):
        return None
    return aspect_ratio_groups([(int(w), int(h)) for w, h in index.sizes], factor)


def build_data(cfg: DataConfig, seed: int = 0, progress: bool = True, pin_memory: bool = False) -> DataBundle:
    """Train and val loaders for ``cfg`` (``data=shapes`` or ``data=coco``); pin memory for CUDA."""
    resolved = resolve_data_paths(cfg, progress)
    datasets = build_datasets(cfg, progress=progress, paths=resolved.as_dict())
    val_bs = cfg.val_batch_size or cfg.batch_size
    loader = {"num_workers": cfg.num_workers, "seed": seed, "pin_memory": pin_memory}
    groups = cfg.aspect_ratio_group_factor
    return DataBundle(
        train_loader=make_loader(datasets["train"], cfg.batch_size, shuffle=True, aspect_ratio_group_factor=groups, **loader),
        val_loader=make_loader(datasets["val"], val_bs, shuffle=False, **loader),
        mapping=datasets["train"].mapping,
        split=resolved.split,
    )
