"""The compact dataset index (data/index.py) and the dataset reading it (data/coco.py CocoInstances):
the same samples as torchvision's CocoDetection wrapped for transforms.v2 (what the loader used
before the index), on the shapes data and on a COCO-format root."""

from __future__ import annotations

import gc
import pickle

import numpy as np
import pytest
import torch
from test_exports import NO_AUG, TOOLS
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

from maskrcnn_coco.config import AugmentConfig
from maskrcnn_coco.data.coco import build_coco_dataset, build_data, build_transforms
from maskrcnn_coco.data.index import SerializedRecords

from conftest import tiny_data_cfg


def test_records_round_trip_in_memory_and_memory_mapped(tmp_path):
    records = [(i, f"{i}.jpg", [[1.0, 2.0, 3.0]] * i, {"counts": "abc", "size": [4, 5]}) for i in range(50)]
    index = SerializedRecords(records)
    assert len(index) == 50 and [index[i] for i in range(50)] == records and index[-1] == records[-1]
    assert index.nbytes == sum(len(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)) for r in records) + 50 * 8
    index.save(tmp_path / "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.data.npy", "train.ends.npy"]  # no temporary left
    mapped = SerializedRecords.load(tmp_path / "train")
    assert isinstance(mapped._data, np.memmap) and [mapped[i] for i in range(50)] == records
    assert len(SerializedRecords([])) == 0


class Reference(CocoDetection):
    """Today's loader before the index: CocoDetection over the dataset's cleaned COCO, usable targets only."""

    def __init__(self, dataset):
        super(CocoDetection, self).__init__(dataset.root, transforms=dataset.transforms)
        self.coco, self.ids, self.usable = dataset.coco, list(dataset.ids), dataset.usable_ann_ids

    def _load_image(self, id):
        from maskrcnn_coco.data.validate import load_rgb

        return load_rgb(f"{self.root}/{self.coco.imgs[id]['file_name']}")

    def _load_target(self, id):
        return [a for a in self.coco.imgToAnns.get(id, []) if a["id"] in self.usable]


def assert_same_samples(dataset):
    reference = wrap_dataset_for_transforms_v2(Reference(dataset), target_keys={"image_id", "boxes", "masks", "labels"})
    assert len(dataset) == len(reference) > 0
    for i in range(len(dataset)):
        (image, target), (ref_image, ref_target) = dataset[i], reference[i]
        assert torch.equal(image, ref_image)
        assert target.keys() == ref_target.keys()
        for key in target:
            assert torch.equal(torch.as_tensor(target[key]), torch.as_tensor(ref_target[key])), (i, key)


def test_samples_equal_torchvisions_wrapped_coco_detection_on_shapes():
    data = build_data(tiny_data_cfg(), seed=0, progress=False)
    for dataset in (data.train_loader.dataset.dataset, data.val_loader.dataset):  # SeededSamples wraps train
        assert_same_samples(dataset.with_transforms(build_transforms(False, AugmentConfig(), dataset.mapping)))


@pytest.mark.parametrize("tool", ["labelme", "cvat"])
def test_samples_equal_torchvisions_wrapped_coco_detection_on_a_coco_format_root(tool, tmp_path):
    images, path = TOOLS[tool](tmp_path)
    for train in (True, False):
        dataset = build_coco_dataset(images, path, train=train, augment=NO_AUG, drop_empty=train, crowd="train")
        assert_same_samples(dataset)


def test_an_image_without_annotations_gives_empty_targets(tmp_path):
    images, path = TOOLS["labelme"](tmp_path)
    dataset = build_coco_dataset(images, path, train=False, augment=NO_AUG, drop_empty=False)
    image_id, file_name, width, height, frame, anns = dataset.records[0]
    assert anns and all(len(a) == 4 for a in anns)  # (annotation id, category id, bbox, segmentation)
    dataset.index.records = SerializedRecords([(image_id, file_name, width, height, frame, [])])
    image, target = dataset[0]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, *image.shape[1:]) and target["labels"].numel() == 0


def test_workers_fork_after_the_gc_is_frozen(tmp_path):
    data = build_data(tiny_data_cfg(num_workers=1), seed=0, progress=False)
    assert data.train_loader.persistent_workers and not data.val_loader.persistent_workers
    before = gc.get_freeze_count()
    next(iter(data.train_loader))
    assert gc.get_freeze_count() > before  # what the workers inherited is outside the GC's passes
    gc.unfreeze()
