import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskrcnn_coco.data.shapes import CATEGORIES, ShapesParams, ensure_shapes_dataset
from maskrcnn_coco.utils.errors import ConfigError

PARAMS = ShapesParams(num_train=12, num_val=4, image_size=64, seed=3, min_objects=2, max_objects=4)


def test_generation_is_deterministic(tmp_path):
    a = ensure_shapes_dataset(PARAMS, tmp_path / "a", progress=False)
    b = ensure_shapes_dataset(PARAMS, tmp_path / "b", progress=False)
    assert a.train_annotations.read_bytes() == b.train_annotations.read_bytes()
    for name in ("000000.png", "000011.png"):
        assert (a.train_images / name).read_bytes() == (b.train_images / name).read_bytes()
    other = ensure_shapes_dataset(ShapesParams(**{**PARAMS.__dict__, "seed": 4}), tmp_path / "a", progress=False)
    assert other.root != a.root
    assert other.train_annotations.read_bytes() != a.train_annotations.read_bytes()


def test_cached_set_is_reused(tmp_path):
    first = ensure_shapes_dataset(PARAMS, tmp_path, progress=False)
    stamp = first.train_annotations.stat().st_mtime_ns
    again = ensure_shapes_dataset(PARAMS, tmp_path, progress=False)
    assert again.root == first.root
    assert again.train_annotations.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name]  # no scratch folders left


def test_coco_file_is_valid_for_pycocotools(tmp_path):
    paths = ensure_shapes_dataset(PARAMS, tmp_path, progress=False)
    for ann_file, img_dir, count in ((paths.train_annotations, paths.train_images, 12), (paths.val_annotations, paths.val_images, 4)):
        coco = COCO(str(ann_file))
        assert len(coco.imgs) == count
        assert sorted(c["name"] for c in coco.cats.values()) == ["circle", "square", "triangle"]
        for img in coco.imgs.values():
            pixels = np.asarray(Image.open(img_dir / img["file_name"]))
            assert pixels.shape == (64, 64, 3)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            assert 2 <= len(anns) <= 4
            masks = []
            for ann in anns:
                m = coco.annToMask(ann)
                assert m.shape == (64, 64)
                assert m.sum() == ann["area"] > 0
                x, y, w, h = ann["bbox"]
                ys, xs = np.nonzero(m)
                assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                assert ann["iscrowd"] == 0
                masks.append(m.astype(bool))
            # Occlusion: each pixel belongs to at most one instance.
            assert np.stack(masks).sum(axis=0).max() <= 1


def test_all_classes_and_overlaps_occur(tmp_path):
    params = ShapesParams(num_train=40, num_val=1, image_size=64, seed=0, min_objects=3, max_objects=4)
    paths = ensure_shapes_dataset(params, tmp_path, progress=False)
    data = json.loads(paths.train_annotations.read_text())
    assert {a["category_id"] for a in data["annotations"]} == {c["id"] for c in CATEGORIES}
    # Some instance was partly covered: its mask is smaller than the drawn shape's bounding box fill
    # would suggest, and its RLE differs from its own convex region. Check via box overlap.
    boxes_by_image = {}
    for a in data["annotations"]:
        boxes_by_image.setdefault(a["image_id"], []).append(a["bbox"])
    overlaps = 0
    for boxes in boxes_by_image.values():
        ious = mask_utils.iou(boxes, boxes, [0] * len(boxes))
        overlaps += int((np.triu(ious, 1) > 0).sum())
    assert overlaps > 0


def test_bad_parameters_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="min_objects"):
        ensure_shapes_dataset(ShapesParams(4, 1, 64, 0, min_objects=3, max_objects=2), tmp_path, progress=False)
