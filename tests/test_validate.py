"""``data/validate.py``: messy COCO data named and skipped or dropped (annotations, image records, files,
sizes, categories), and every PIL mode converted to the RGB the file means."""

import contextlib
import copy
import io
import json
import logging
import re

import numpy as np
import pytest
import torch
from helpers import CATS, NO_AUG, noise_png, simple_dataset, truncate
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskrcnn_coco.analysis.fault_bank import jitter_boxes, shift_masks
from maskrcnn_coco.data.coco import DataError, build_coco_dataset, find_invalid_annotations, load_coco
from maskrcnn_coco.data.shapes import ShapesParams, ensure_shapes_dataset
from maskrcnn_coco.data.validate import load_rgb, mask_box_agreement, to_rgb
from maskrcnn_coco.utils.errors import ConfigError

from conftest import square_ann, write_coco_dataset


def test_degenerate_polygons_are_named_and_skipped(tmp_path, caplog):
    images = [{"id": 1, "file_name": "1.png", "height": 48, "width": 64}]
    anns = [
        square_ann(1, 1, 3, 4, 4, 10),
        {**square_ann(2, 1, 3, 20, 4, 10), "segmentation": []},  # box-only (Roboflow's detection export): usable
        {**square_ann(3, 1, 7, 20, 20, 10), "segmentation": [[20, 20]]},  # 1 point
        {**square_ann(4, 1, 7, 40, 20, 10), "segmentation": [[40, 20, 50, 30]]},  # 2 points (pycocotools: a box!)
        {**square_ann(5, 1, 90, 40, 4, 8), "segmentation": [[40, 4, 48, 4, float("nan"), 12]]},
        # One usable part and one degenerate part: kept, without the degenerate part.
        {**square_ann(6, 1, 90, 30, 30, 10), "segmentation": [[30, 30, 40, 30, 40, 40, 30, 40], [1, 1, 2, 2]]},
        {**square_ann(7, 1, 90, 4, 30, 8), "segmentation": [[50, 2, 60, 2, 60, 10, 50, 10]]},  # elsewhere than its box
    ]
    img_dir, ann_file = write_coco_dataset(tmp_path, CATS, images, anns)
    problems = {p["annotation_id"]: p for p in find_invalid_annotations(load_coco(ann_file))}
    assert set(problems) == {3, 4, 5, 7}
    assert "polygon with 1 point" in problems[3]["problem"] and "polygon with 2 points" in problems[4]["problem"]
    assert "NaN" in problems[5]["problem"] and "IoU 0.00" in problems[7]["problem"]
    assert all(p["image_id"] == 1 and p["file"] == "1.png" for p in problems.values())
    with caplog.at_level(logging.INFO):
        ds = build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=True)
    assert "4 invalid annotations in instances_train.json are skipped" in caplog.text
    assert "1 annotations in instances_train.json had polygon parts with fewer than 3 points" in caplog.text
    assert ("1 annotation of 3 in instances_train.json has no segmentation (box-only): they train the box branches, "
            "the mask loss skips them") in caplog.text
    _, target = ds[0]
    assert target["labels"].tolist() == [1, 1, 3]  # annotations 1, 2 (box-only) and 6
    assert target["masks"].shape == (3, 48, 64)
    assert [int(m.sum()) for m in target["masks"]] == [100, 0, 100]  # the box-only one: an empty mask
    assert torch.allclose(target["boxes"], torch.tensor([[4.0, 4, 14, 14], [20, 4, 30, 14], [30, 30, 40, 40]]))
    # The skipped ones are gone from the dataset's ground truth too; the probe still finds them.
    assert sorted(ds.coco.anns) == [1, 2, 6]
    assert {p["annotation_id"] for p in find_invalid_annotations(ds.coco, [1])} == {3, 4, 5, 7}


def test_rle_size_must_match_the_image(tmp_path):
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 30:50] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    good = {"size": [48, 64], "counts": rle["counts"].decode("ascii")}
    images = [{"id": 1, "file_name": "1.png", "height": 48, "width": 64}]
    anns = [
        {**square_ann(1, 1, 3, 30, 10, 20), "bbox": [30, 10, 20, 10], "segmentation": good},
        {**square_ann(2, 1, 3, 30, 10, 20), "bbox": [30, 10, 20, 10], "segmentation": {**good, "size": [64, 48]}},
        {**square_ann(3, 1, 7, 0, 0, 4), "segmentation": {"size": [48, 64], "counts": [5, 3]}},  # too few pixels
    ]
    img_dir, ann_file = write_coco_dataset(tmp_path, CATS, images, anns)
    problems = {p["annotation_id"]: p["problem"] for p in find_invalid_annotations(load_coco(ann_file))}
    assert problems == {
        2: "RLE size [64, 48] differs from the image's [height, width] [48, 64]",
        3: "RLE counts cover 8 pixels, not 48x64",
    }
    ds = build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=True)
    _, target = ds[0]
    assert target["labels"].tolist() == [1] and torch.equal(target["masks"][0], torch.from_numpy(mask))


@pytest.mark.slow
def test_missing_image_beyond_the_first_fifty_is_reported_at_build(tmp_path, caplog):
    img_dir, ann_file = simple_dataset(tmp_path, n=60)
    (img_dir / "55.png").unlink()
    with pytest.raises(DataError) as err:
        build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=True)
    message = str(err.value)
    assert "1 images listed in instances_train.json cannot be used (missing file: 1)" in message
    assert f"image 55 (55.png): not found in {img_dir}" in message and "data.on_invalid=drop" in message
    with caplog.at_level(logging.WARNING):
        ds = build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=True, on_invalid="drop")
    assert len(ds) == 59 and 55 not in ds.ids
    assert "1 images listed in instances_train.json are dropped (missing file: 1), e.g. image 55 (55.png)" in caplog.text
    with pytest.raises(ConfigError, match=re.escape("data.on_invalid='skip'")):
        build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=True, on_invalid="skip")


def test_real_size_must_match_the_annotation_file(tmp_path, caplog):
    img_dir, ann_file = simple_dataset(tmp_path, n=3)
    Image.new("RGB", (48, 64)).save(img_dir / "2.png")  # transposed: 48 wide, 64 high
    # Sizes come from the headers at build (read for the EXIF frame anyway): the error comes before training.
    with pytest.raises(DataError, match=re.escape("1 images listed in instances_train.json cannot be used (image size "
                                                  "mismatch: 1), e.g. image 2 (2.png): is 48x64 pixels but the annotation file says 64x48")):
        build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=True)
    # A file replaced after the build: named when loaded.
    Image.new("RGB", (64, 48)).save(img_dir / "2.png")
    ds = build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=True)
    Image.new("RGB", (48, 64)).save(img_dir / "2.png")
    with pytest.raises(DataError, match=re.escape(f"Image {img_dir / '2.png'} (image id 2) is 48x64 pixels but "
                                                  "instances_train.json says 64x48")):
        ds[1]
    # on_invalid=drop decodes every image at build and drops the bad ones (here: also a truncated one).
    noise_png(img_dir / "3.png")
    truncate(img_dir / "3.png")
    with caplog.at_level(logging.WARNING):
        ds = build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=True, on_invalid="drop")
    assert ds.ids == [1]
    assert "2 images listed in instances_train.json are dropped (image size mismatch: 1, undecodable image: 1)" in caplog.text
    assert "image 2 (2.png): is 48x64 pixels but the annotation file says 64x48" in caplog.text
    image, _ = ds[0]
    assert image.shape == (3, 48, 64)


def test_category_without_training_instance_is_warned(tmp_path, caplog):
    anns = [square_ann(1, 1, 3, 4, 4, 10), {**square_ann(2, 2, 90, 4, 4, 10), "bbox": [4, 4, 0, 10]}]
    img_dir, ann_file = simple_dataset(tmp_path, anns=anns)
    with caplog.at_level(logging.WARNING):
        build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=True)
    assert ("No training instance of 2 categories in instances_train.json: 'train' (id 7), 'toothbrush' (id 90); "
            "the model cannot learn them") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_coco_dataset(img_dir, ann_file, train=False, augment=NO_AUG, drop_empty=False)
    assert "No training instance" not in caplog.text  # a validation split need not cover every category


# 8-bit grey levels 0..255 over a 16 x 16 image, and the same ramp in each mode's own range.
RAMP = np.arange(256, dtype=np.uint8).reshape(16, 16)


def mode_image(mode):
    """(PIL image in ``mode``, suffix to save it with, expected RGB array)."""
    grey = np.repeat(RAMP[..., None], 3, axis=2)
    if mode == "L":
        return Image.fromarray(RAMP, "L"), "png", grey
    if mode == "1":
        bits = RAMP >= 128
        return Image.fromarray(bits), "png", np.repeat((bits * 255).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "I;16":
        return Image.fromarray(RAMP.astype(np.uint16) * 257), "png", grey  # the full 16-bit range
    if mode == "I":
        return Image.fromarray(RAMP.astype(np.int32) * 257), "tif", grey
    if mode == "F":
        return Image.fromarray(RAMP.astype(np.float32) / 255), "tif", grey
    rgb = np.stack([RAMP, RAMP[::-1], np.full_like(RAMP, 40)], axis=2)
    if mode in ("RGBA", "LA"):  # alpha dropped, whatever it is
        alpha = np.full_like(RAMP, 7)
        if mode == "LA":
            return Image.fromarray(np.stack([RAMP, alpha], axis=2), "LA"), "png", grey
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "png", rgb
    if mode == "P":
        palette_image = Image.fromarray(RAMP, "L").convert("P")  # a grey palette
        palette_image.putpalette([v for i in range(256) for v in (255 - i, i, 9)])
        return palette_image, "png", np.stack([255 - RAMP, RAMP, np.full_like(RAMP, 9)], axis=2)
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK"), "tif", rgb
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "I", "F", "CMYK", "1"])
def test_every_pil_mode_becomes_the_right_rgb(tmp_path, mode):
    image, suffix, expected = mode_image(mode)
    path = tmp_path / f"image.{suffix}"
    image.save(path)
    assert Image.open(path).mode == mode  # the file really holds that mode
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    assert np.array_equal(np.asarray(rgb), expected)


def test_float_and_int_images_outside_their_usual_range_are_stretched():
    assert np.asarray(to_rgb(Image.fromarray(np.array([[-1.0, 0.5, 3.0]], np.float32))))[0, :, 0].tolist() == [0, 96, 255]
    assert np.asarray(to_rgb(Image.fromarray(np.array([[-5, 0, 95]], np.int32))))[0, :, 0].tolist() == [0, 13, 255]


def test_16bit_png_through_the_dataset(tmp_path):
    img_dir, ann_file = simple_dataset(tmp_path, n=1)
    values = np.full((48, 64), 65535, np.uint16)
    values[:, :32] = 257 * 100
    Image.fromarray(values).save(img_dir / "1.png")
    ds = build_coco_dataset(img_dir, ann_file, train=False, augment=NO_AUG, drop_empty=False)
    image, _ = ds[0]
    assert image.shape == (3, 48, 64)
    assert torch.allclose(image[:, :, :32], torch.tensor(100 / 255)) and torch.allclose(image[:, :, 32:], torch.tensor(1.0))


def test_duplicate_ids_and_bad_image_records(tmp_path):
    images = [{"id": 1, "file_name": "1.png", "height": 48, "width": 64}, {"id": 2, "file_name": "2.png", "height": 48, "width": 64}]
    anns = [
        square_ann(1, 1, 3, 4, 4, 10),
        square_ann(1, 1, 7, 30, 20, 12),  # the same id again: scored twice by COCOeval otherwise
        square_ann(2, 2, 3, 4, 4, 10),
        {**square_ann(3, 1, 3, 0, 0, 30, iscrowd=1), "segmentation": {"size": [10, 10], "counts": [100]}},
    ]
    img_dir, ann_file = write_coco_dataset(tmp_path, CATS, images, anns)
    problems = find_invalid_annotations(load_coco(ann_file))
    assert [(p["annotation_id"], p["kind"], p["iscrowd"]) for p in problems] == [
        (1, "duplicate annotation id", 0), (3, "bad segmentation", 1)]
    ds = build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=True)
    assert len(ds.coco.dataset["annotations"]) == 2 and ds.coco.anns[1]["category_id"] == 3
    _, target = ds[0]
    assert target["labels"].tolist() == [1]

    data = json.loads(ann_file.read_text())
    del data["images"][1]["width"]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=re.escape("image 2 (2.png): width=None, height=48: not positive integers")):
        build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=False)
    assert build_coco_dataset(img_dir, ann_file, train=True, augment=NO_AUG, drop_empty=False, on_invalid="drop").ids == [1]


# ------------------------------------------------------------------ masks against their boxes, graded
def in_memory_coco(dataset):
    """A pycocotools COCO of ``dataset`` without a file (createIndex prints)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.fixture(scope="module")
def shapes_dict(tmp_path_factory):
    """The training annotations of a small generated shapes set (RLE masks, exact tight boxes)."""
    params = ShapesParams(num_train=40, num_val=10, image_size=64, seed=0, min_objects=1, max_objects=4)
    paths = ensure_shapes_dataset(params, tmp_path_factory.mktemp("shapes"), progress=False)
    return json.loads(paths.train_annotations.read_text())


def expected_agreement(dataset):
    """Annotation id -> (in-box pixel share, bbox IoU with the mask's tight box), from the decoded
    masks: the reference the fast computation must match."""
    out = {}
    for ann in dataset["annotations"]:
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        mask = mask_utils.decode(rle)
        x, y, w, h = ann["bbox"]
        c0, c1, r0, r1 = (int(np.floor(v + 0.5)) for v in (x, x + w, y, y + h))
        inside = mask[max(r0, 0):r1, max(c0, 0):c1].sum() / mask.sum()
        tight = mask_utils.toBbox(rle)
        iou = mask_utils.iou([list(tight)], [ann["bbox"]], [0])[0, 0]
        out[ann["id"]] = (float(inside), float(iou))
    return out


def test_healthy_shapes_masks_lie_on_their_boxes(shapes_dict):
    coco = in_memory_coco(shapes_dict)
    for pixels in (False, True):
        agreement = mask_box_agreement(coco, pixels=pixels, source="instances_train.json")
        assert agreement.measured == len(shapes_dict["annotations"]) > 60
        assert agreement.below == {0.8: 0, 0.7: 0} and agreement.bad_ids == () and not agreement.warns
        assert agreement.warning() is None
        assert agreement.worst[0].iou == pytest.approx(1.0) and agreement.worst[0].inside == (1.0 if pixels else None)
    lines = agreement.format()
    assert lines == [f"  masks on their boxes (in-box share of the mask and box/mask-box IoU, {agreement.measured} annotations): "
                     "0 below 0.8, 0 below 0.7 (warns above 3% below 0.7)"]


@pytest.mark.parametrize(("plant", "strength"), [(shift_masks, 0.6), (jitter_boxes, 0.35)])
def test_masks_off_their_boxes_are_counted_and_named(shapes_dict, plant, strength):
    planted = copy.deepcopy(shapes_dict)
    plant(planted, strength, np.random.default_rng(0))
    reference = expected_agreement(planted)
    coco = in_memory_coco(planted)

    cheap = mask_box_agreement(coco, source="train.json")  # the start of a run: the IoU only
    assert set(cheap.bad_ids) == {a for a, (_, iou) in reference.items() if iou < 0.7}
    assert cheap.below[0.8] == sum(iou < 0.8 for _, iou in reference.values())
    assert cheap.worst[0].inside is None and cheap.worst[0].iou == pytest.approx(min(iou for _, iou in reference.values()))

    full = mask_box_agreement(coco, pixels=True, source="train.json")
    bad = {a for a, (inside, iou) in reference.items() if min(inside, iou) < 0.7}
    assert set(full.bad_ids) == bad and full.bad == len(bad) and full.masks_off + full.boxes_loose == len(bad)
    assert full.share_bad > 0.5 and full.warns
    worst = full.worst[0]
    assert (worst.inside, worst.iou) == pytest.approx(reference[worst.annotation_id])
    assert [r.score for r in full.worst] == sorted(r.score for r in full.worst) and len(full.worst) == 10
    image_of = {a["id"]: a["image_id"] for a in planted["annotations"]}
    assert all(image_of[r.annotation_id] == r.image_id for r in full.worst)
    warning = full.warning()
    assert warning.startswith(f"train.json: masks that do not lie on their boxes: {len(bad)} of {full.measured} annotations (")
    assert "have less than 70% of their mask inside their box or a box/mask-box IoU" in warning
    assert f"worst, in-box share / IoU: image {worst.image_id} ann {worst.annotation_id}: {worst.inside:.2f} / {worst.iou:.2f}" in warning
    assert "Likely cause: masks or boxes shifted or scaled by the exporter" in warning
    assert full.format(examples=3)[1] == "    worst (in-box share / IoU): " + "; ".join(r.format() for r in full.worst[:3])


def test_polygons_and_boxes_too_large():
    images = [{"id": 1, "file_name": "1.png", "height": 60, "width": 80}]
    anns = [
        square_ann(1, 1, 1, 10, 10, 20),  # box = mask
        {**square_ann(2, 1, 1, 10, 10, 20), "bbox": [20, 10, 20, 20]},  # box moved by half its width
        {**square_ann(3, 1, 1, 40, 10, 10), "bbox": [35, 5, 20, 20]},  # box twice the mask's size
        # two parts: the tight box spans both
        {**square_ann(4, 1, 1, 50, 40, 10), "segmentation": [[50, 40, 55, 40, 55, 50], [55, 40, 60, 40, 60, 50, 55, 50]]},
        {**square_ann(5, 1, 1, 0, 40, 10), "iscrowd": 1},  # crowd: not measured
    ]
    coco = in_memory_coco({"images": images, "annotations": anns, "categories": CATS})
    agreement = mask_box_agreement(coco, pixels=True)
    assert agreement.measured == 4 and agreement.bad_ids == (2, 3)
    assert (agreement.masks_off, agreement.boxes_loose) == (1, 1)
    by_id = {r.annotation_id: r for r in agreement.worst}
    assert by_id[1].iou == pytest.approx(1.0) and by_id[1].inside == 1.0 and by_id[4].iou == pytest.approx(1.0)
    assert by_id[2].iou == pytest.approx(1 / 3) and by_id[2].inside == pytest.approx(0.5, abs=0.06)
    assert by_id[2].extent_inside == pytest.approx(0.5) and by_id[2].mask_off
    assert by_id[3].iou == pytest.approx(0.25) and by_id[3].inside == 1.0 and not by_id[3].mask_off
    assert [r.annotation_id for r in agreement.worst[:2]] == [3, 2] and agreement.named() == agreement.worst[:2]
    assert "2 of 4 annotations (50.0%)" in agreement.describe() and "(1 with the mask shifted against a box of its size, 1 with box edges that miss" in agreement.describe()
    assert agreement.describe().endswith("worst, in-box share / IoU: image 1 ann 3: 1.00 / 0.25; image 1 ann 2: 0.50 / 0.33)")
    # Only the usable annotations of the images asked for.
    assert mask_box_agreement(coco, [1], {1, 3}).bad_ids == (3,)
    assert mask_box_agreement(coco, [], None).measured == 0


def test_unchecked_annotations_are_left_out():
    images = [{"id": 1, "file_name": "1.png", "height": 60, "width": 80}]
    anns = [
        square_ann(1, 1, 1, 10, 10, 20),
        {**square_ann(2, 1, 1, 10, 10, 20), "segmentation": [[10, None, 30, 10, 30, 30]]},
        {**square_ann(3, 1, 1, 10, 10, 20), "bbox": ["a", 1, 2, 3]},
        {**square_ann(4, 1, 1, 10, 10, 20), "segmentation": [[1, 2]]},
        {**square_ann(5, 1, 1, 10, 10, 20), "bbox": [float("nan"), 10, 20, 20]},
        {**square_ann(6, 1, 1, 10, 10, 20), "bbox": [40, 10, 20, 20]},
    ]
    agreement = mask_box_agreement(in_memory_coco({"images": images, "annotations": anns, "categories": CATS}))
    assert agreement.measured == 2 and agreement.bad_ids == (6,)
