"""``data/coco.py``: the category mapping, targets of the train and val splits, flips, config paths, and
one-line errors for images that cannot be decoded (data/validate.py's checks: tests/test_validate.py)."""

import logging
import math
import re

import pytest
import torch
from helpers import CATS, NO_AUG, noise_png, simple_dataset, truncate
from omegaconf import OmegaConf

from maskrcnn_coco.config import AugmentConfig, CocoDataConfig
from maskrcnn_coco.data.coco import (
    CategoryMapping,
    DataError,
    build_coco_dataset,
    build_data,
    find_invalid_annotations,
    load_coco,
    make_loader,
)

from conftest import square_ann, write_coco_dataset


def make_dataset(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 48, "width": 64} for i in (1, 2, 3, 4)]
    anns = [
        square_ann(1, 1, 3, 4, 4, 10),
        square_ann(2, 1, 90, 30, 20, 12),
        square_ann(3, 2, 7, 10, 10, 20, iscrowd=1),  # crowd only: image 2 has no target
        square_ann(4, 3, 7, 8, 8, 16),
        {**square_ann(5, 3, 3, 20, 20, 8), "bbox": [float("nan"), 20, 8, 8]},  # invalid
        {**square_ann(6, 3, 3, 20, 20, 8), "bbox": [20, 20, 0, 8]},  # zero width
        {**square_ann(7, 3, 3, 20, 20, 8), "bbox": [200, 20, 8, 8]},  # outside the image
        # image 4: no annotations at all
    ]
    return write_coco_dataset(tmp_path, CATS, images, anns)


def test_label_mapping_round_trips_non_contiguous_ids():
    mapping = CategoryMapping(CATS)
    assert mapping.num_classes == 4
    assert [mapping.to_label(c) for c in (3, 7, 90)] == [1, 2, 3]
    assert [mapping.to_coco_id(mapping.to_label(c)) for c in (90, 3, 7)] == [90, 3, 7]
    assert mapping.names == ["car", "train", "toothbrush"]
    again = CategoryMapping.from_state_dict(mapping.state_dict())
    assert again.coco_ids == mapping.coco_ids
    with pytest.raises(DataError, match="category_id 5"):
        mapping.to_label(5)


def test_invalid_annotations_are_named(tmp_path):
    _, ann_file = make_dataset(tmp_path)
    problems = {p["annotation_id"]: p for p in find_invalid_annotations(load_coco(ann_file))}
    assert set(problems) == {5, 6, 7}
    assert "NaN" in problems[5]["problem"] and problems[5]["image_id"] == 3
    assert "non-positive" in problems[6]["problem"]
    assert "outside" in problems[7]["problem"]


def test_train_split_targets(tmp_path, caplog):
    img_dir, ann_file = make_dataset(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=True)
    assert "3 invalid annotations" in caplog.text
    # Image 2 (crowd only) and image 4 (nothing) are dropped from training.
    assert ds.ids == [1, 3]
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64) and float(image.max()) <= 1.0
    assert target["image_id"] == 1
    assert target["labels"].tolist() == [1, 3]  # car -> 1, toothbrush -> 3
    assert torch.allclose(target["boxes"], torch.tensor([[4.0, 4, 14, 14], [30, 20, 42, 32]]))
    assert target["masks"].shape == (2, 48, 64) and target["masks"].dtype == torch.uint8
    assert int(target["masks"][0].sum()) == 100
    _, target3 = ds[1]
    assert target3["labels"].tolist() == [2]  # invalid ones skipped, the valid one kept
    assert all(math.isfinite(v) for v in target3["boxes"].flatten().tolist())


def test_val_split_keeps_images_without_targets(tmp_path):
    img_dir, ann_file = make_dataset(tmp_path)
    ds = build_coco_dataset(img_dir, ann_file, train=False, augment=NO_AUG, drop_empty=False)
    assert ds.ids == [1, 2, 3, 4]
    _, crowd_only = ds[1]
    assert crowd_only["boxes"].shape == (0, 4) and crowd_only["masks"].shape == (0, 48, 64)
    assert crowd_only["labels"].dtype == torch.int64 and crowd_only["labels"].numel() == 0


def test_horizontal_flip_moves_boxes_and_masks_together(tmp_path):
    img_dir, ann_file = make_dataset(tmp_path)
    ds = build_coco_dataset(img_dir, ann_file, train=True, augment=AugmentConfig(hflip_prob=1.0), drop_empty=True)
    _, target = ds[0]
    assert torch.allclose(target["boxes"][0], torch.tensor([64 - 14.0, 4, 64 - 4, 14]))
    _, xs = torch.nonzero(target["masks"][0], as_tuple=True)
    assert (int(xs.min()), int(xs.max()) + 1) == (50, 60)


def test_coco_config_paths_and_errors(tmp_path):
    img_dir, ann_file = make_dataset(tmp_path)
    cfg = OmegaConf.structured(CocoDataConfig(root=str(tmp_path), train_images=str(img_dir), val_images=str(img_dir),
                                              train_annotations=str(ann_file), val_annotations=str(ann_file), batch_size=2))
    bundle = build_data(cfg, progress=False)
    assert bundle.mapping.coco_ids == [3, 7, 90]
    assert len(bundle.train_loader.dataset) == 2 and len(bundle.val_loader.dataset) == 4
    images, targets = next(iter(bundle.val_loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2

    default = OmegaConf.structured(CocoDataConfig(root="/nowhere/coco"))
    assert default.train_annotations == "/nowhere/coco/annotations/instances_train2017.json"
    assert default.val_images == "/nowhere/coco/val2017"
    with pytest.raises(DataError, match=re.escape("Annotation file not found: /nowhere/coco/annotations/instances_train2017.json")):
        build_data(default, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val"])
def test_truncated_png_names_file_and_image_id(tmp_path, split):
    img_dir, ann_file = simple_dataset(tmp_path, split)
    noise_png(img_dir / "2.png")
    truncate(img_dir / "2.png")
    train = split == "train"
    ds = build_coco_dataset(img_dir, ann_file, train=train, augment=NO_AUG, drop_empty=train)  # build stays cheap
    ds[0]  # the intact image loads
    with pytest.raises(DataError) as err:
        ds[1]
    message = str(err.value)
    assert f"Cannot decode image {img_dir / '2.png'} (image id 2 in instances_{split}.json)" in message
    assert "truncated" in message and "data.on_invalid=drop" in message and "\n" not in message
    # From a loader worker process the message is still the one line, not the worker's traceback.
    loader = make_loader(ds, 1, shuffle=False, num_workers=1, seed=0)
    with pytest.raises(DataError) as err:
        list(loader)
    assert str(err.value) == message


def test_data_error_from_a_worker_keeps_only_the_message():
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nmaskrcnn_coco.data.coco.DataError: Cannot decode image a.png (image id 3)\n')
    assert str(DataError(wrapped)) == "Cannot decode image a.png (image id 3)"
    assert str(DataError("plain: message")) == "plain: message"
