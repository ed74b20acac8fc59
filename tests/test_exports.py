"""Real annotation tools' COCO exports (issue #22), generated here in each tool's style: they train,
score perfect predictions at exactly 1.000, or are refused / adjusted with one line naming the file,
image id, annotation id or key (``data/exports.py``, ``data/exif.py``, ``evaluation/ground_truth.py``).

Styles (what the tools write; ids and layouts as their exporters produce them):

* labelme (``labelme2coco.py``): ``annotations.json`` beside ``JPEGImages/``, file names with that
  folder, image and annotation ids from 0, a ``_background_`` category with id 0;
* CVAT "COCO 1.0": ``annotations/instances_default.json`` + ``images/``, ids from 1, polygons as
  ``iscrowd: 0`` and brush masks as uncompressed RLE with ``iscrowd: 1``, ``attributes``;
* Label Studio: ids from 0 (images, annotations, categories), ``file_name`` as its storage path
  (``/data/upload/1/<name>``) while the image sits in the export's folder;
* Roboflow "COCO": ``train/_annotations.coco.json`` beside its images, ids from 0, category 0 the
  dataset's name and the supercategory of all the others, ``segmentation: []`` for boxes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_coco.config import AugmentConfig, CocoDataConfig
from maskrcnn_coco.data.coco import DataError, build_coco_dataset, build_data
from maskrcnn_coco.data.exports import has_mask
from maskrcnn_coco.evaluation.coco_eval import coco_metrics

from conftest import tiny_model_cfg

NO_AUG = AugmentConfig(hflip_prob=0.0)
W, H = 64, 48
NAMES = ["circle", "square"]


def canvas(objects: list[tuple[int, int, int]]) -> Image.Image:
    """A dark image with a bright square per ``(x, y, size)``: a mask on the right pixels sees them."""
    pixels = np.full((H, W, 3), 20, np.uint8)
    for x, y, s in objects:
        pixels[y:y + s, x:x + s] = 230
    return Image.fromarray(pixels)


def square(x: float, y: float, s: float) -> list[list[float]]:
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def uncompressed_rle(x: int, y: int, s: int) -> dict:
    """CVAT's brush mask: an uncompressed (column-major counts) RLE of the whole image."""
    mask = np.zeros((H, W), np.uint8)
    mask[y:y + s, x:x + s] = 1
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": [H, W]}


LAYOUT = [[(4, 4, 12, 0), (30, 20, 14, 1)], [(10, 10, 16, 1), (40, 6, 10, 0)], [(6, 24, 12, 0), (44, 28, 12, 1)]]


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, objects in zip(names, LAYOUT):
        canvas([(x, y, s) for x, y, s, _ in objects]).save(folder / name, quality=95)


def labelme(root: Path) -> tuple[Path, Path]:
    write_images(root / "JPEGImages", [f"{i}.jpg" for i in range(3)])
    cats = [{"supercategory": None, "id": 0, "name": "_background_"}] + [{"supercategory": None, "id": i + 1, "name": n} for i, n in enumerate(NAMES)]
    images, anns = [], []
    for i, objects in enumerate(LAYOUT):
        images.append({"license": 0, "url": None, "file_name": f"JPEGImages/{i}.jpg", "height": H, "width": W, "date_captured": None, "id": i})
        for x, y, s, c in objects:
            anns.append({"id": len(anns), "image_id": i, "category_id": c + 1, "segmentation": square(x, y, s), "area": float(s * s),
                         "bbox": [x, y, s, s], "iscrowd": 0})
    path = root / "annotations.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "type": "instances", "annotations": anns, "categories": cats}))
    return root, path


def cvat(root: Path, masks_for: int = 1) -> tuple[Path, Path]:
    """Class ``masks_for`` drawn with the brush only (crowd RLE), the other with polygons."""
    write_images(root / "images", [f"frame_{i:06d}.jpg" for i in range(3)])
    cats = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(NAMES)]
    images, anns = [], []
    for i, objects in enumerate(LAYOUT):
        images.append({"id": i + 1, "width": W, "height": H, "file_name": f"frame_{i:06d}.jpg", "license": 0, "flickr_url": "",
                       "coco_url": "", "date_captured": 0})
        for x, y, s, c in objects:
            crowd = c == masks_for
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1,
                         "segmentation": uncompressed_rle(x, y, s) if crowd else square(x, y, s),
                         "area": float(s * s), "bbox": [x, y, s, s], "iscrowd": int(crowd), "attributes": {"occluded": False}})
    path = root / "annotations" / "instances_default.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"licenses": [{"name": "", "id": 0, "url": ""}], "info": {}, "categories": cats, "images": images,
                                "annotations": anns}))
    return root / "images", path


def label_studio(root: Path) -> tuple[Path, Path]:
    write_images(root / "images", [f"{i}-photo.jpg" for i in range(3)])
    cats = [{"id": i, "name": n} for i, n in enumerate(NAMES)]
    images, anns = [], []
    for i, objects in enumerate(LAYOUT):
        images.append({"width": W, "height": H, "id": i, "file_name": f"/data/upload/1/{i}-photo.jpg"})
        for x, y, s, c in objects:
            anns.append({"id": len(anns), "image_id": i, "category_id": c, "segmentation": square(x, y, s), "bbox": [x, y, s, s],
                         "ignore": 0, "iscrowd": 0, "area": float(s * s)})
    path = root / "result.json"
    path.write_text(json.dumps({"images": images, "categories": cats, "annotations": anns,
                                "info": {"year": 2026, "version": "1.0", "contributor": "Label Studio"}}))
    return root / "images", path


def roboflow(root: Path, boxes_only: bool = False) -> tuple[Path, Path]:
    folder = root / "train"
    write_images(folder, [f"{i}_jpg.rf.abc{i}.jpg" for i in range(3)])
    cats = [{"id": 0, "name": "shapes", "supercategory": "none"}] + [{"id": i + 1, "name": n, "supercategory": "shapes"} for i, n in enumerate(NAMES)]
    images, anns = [], []
    for i, objects in enumerate(LAYOUT):
        images.append({"id": i, "license": 1, "file_name": f"{i}_jpg.rf.abc{i}.jpg", "height": H, "width": W,
                       "date_captured": "2026-12-06T07:00:00+00:00"})
        for x, y, s, c in objects:
            anns.append({"id": len(anns), "image_id": i, "category_id": c + 1, "bbox": [x, y, s, s], "area": float(s * s),
                         "segmentation": [] if boxes_only else square(x, y, s), "iscrowd": 0})
    path = folder / "_annotations.coco.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "categories": cats, "images": images, "annotations": anns}))
    return folder, path


TOOLS = {"labelme": labelme, "cvat": cvat, "label_studio": label_studio, "roboflow": roboflow}


def perfect_results(path: Path, crowd: str = "ignore") -> list[dict]:
    """Every non-crowd object of the file (every object with ``crowd="train"``) as one detection: its
    class, score 1, its box and mask."""
    data = json.loads(path.read_text())
    out = []
    for ann in data["annotations"]:
        if ann.get("iscrowd") and crowd != "train":
            continue
        x, y, w, _h = ann["bbox"]
        seg = ann["segmentation"] if has_mask(ann) else square(x, y, w)
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, H, W)) if isinstance(seg, list) else mask_utils.frPyObjects(seg, H, W)
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 1.0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return out


def data_cfg(images: Path, annotations: Path, **overrides) -> CocoDataConfig:
    base = {"root": str(images), "train_images": str(images), "val_images": str(images), "train_annotations": str(annotations),
                "val_annotations": str(annotations), "batch_size": 2, "num_workers": 0, "augment": NO_AUG}
    base.update(overrides)
    return OmegaConf.structured(CocoDataConfig(**base))


def one_epoch(cfg) -> dict[str, float]:
    from maskrcnn_coco.engine import FitSettings, train_one_epoch
    from maskrcnn_coco.modeling.build import build_model

    data = build_data(cfg, seed=0, progress=False)
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(), data.mapping.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return train_one_epoch(model, optimizer, data.train_loader, "cpu", 1, settings=FitSettings(print_freq=1))


@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_each_tools_export_scores_perfect_predictions_at_one(tool, backend, tmp_path):
    images, path = TOOLS[tool](tmp_path)
    crowd = "train" if tool == "cvat" else "ignore"
    for train in (True, False):
        ds = build_coco_dataset(images, path, train=train, augment=NO_AUG, drop_empty=train, crowd=crowd)
        metrics = coco_metrics(ds.coco, perfect_results(path, crowd), ds.ids, backend=backend)
        for iou_type in ("bbox", "segm"):
            assert metrics[iou_type]["AP"] == 1.0, (tool, iou_type, metrics[iou_type])
            assert [metrics[iou_type][f"AP_class_{n}"] for n in NAMES] == [1.0, 1.0]


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_each_tools_export_trains_one_epoch(tool, tmp_path):
    images, path = TOOLS[tool](tmp_path)
    losses = one_epoch(data_cfg(images, path, crowd="train"))
    assert all(math.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0


def test_labelme_background_placeholder_is_left_out_and_said(tmp_path, caplog):
    images, path = labelme(tmp_path)
    with caplog.at_level(logging.INFO):
        ds = build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)
    assert ds.mapping.names == NAMES and ds.mapping.num_classes == 3
    assert ("1 category of annotations.json left out of the classes: '_background_' (id 0: a background placeholder); "
            "no annotation uses it") in caplog.text


def test_roboflow_supercategory_placeholder_is_left_out(tmp_path, caplog):
    images, path = roboflow(tmp_path)
    with caplog.at_level(logging.INFO):
        ds = build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)
    assert ds.mapping.names == NAMES
    assert "'shapes' (id 0: Roboflow's id-0 category, the supercategory of all the others)" in caplog.text


def test_a_used_placeholder_like_category_stays(tmp_path):
    images, path = labelme(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 0  # someone really labelled "_background_" objects
    path.write_text(json.dumps(data))
    ds = build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)
    assert ds.mapping.names == ["_background_", *NAMES]


def test_cvat_crowd_masks_are_counted_with_the_classes_they_empty(tmp_path, caplog):
    images, path = cvat(tmp_path)
    with caplog.at_level(logging.INFO):
        ds = build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)
    assert ("3 annotations in instances_default.json are iscrowd=1 (crowd regions): COCO semantics leave them out of training "
            "(COCOeval ignores detections on them); 1 class has only crowd instances and so nothing to learn: 'square'; "
            "data.crowd=train trains on them") in caplog.text
    assert len(ds.ids) == 3 and sum(len(ds.coco.imgToAnns[i]) for i in ds.ids) == 6  # crowd regions stay for COCOeval
    assert sorted({int(t["labels"][k]) for _, t in ds for k in range(len(t["labels"]))}) == [1]  # only circles train
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ds = build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True, crowd="train")
    assert "3 annotations in instances_default.json are iscrowd=1: trained and scored as ordinary instances (data.crowd=train)" in caplog.text
    _, target = ds[0]
    assert target["labels"].tolist() == [1, 2] and [int(m.sum()) for m in target["masks"]] == [144, 196]


def test_label_studio_storage_paths_resolve_to_the_image_folder(tmp_path, caplog):
    images, path = label_studio(tmp_path)
    with caplog.at_level(logging.INFO):
        ds = build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)
    assert len(ds) == 3
    assert ("3 file_names in result.json do not exist as written but the file is in " + str(images) +
            ": used from there, e.g. image 0 (/data/upload/1/0-photo.jpg -> 0-photo.jpg)") in caplog.text
    image, _ = ds[0]
    assert image.shape == (3, H, W)


def test_a_path_whose_basename_is_absent_too_is_still_missing(tmp_path):
    images, path = label_studio(tmp_path)
    (images / "1-photo.jpg").unlink()
    with pytest.raises(DataError, match=r"image 1 \(/data/upload/1/1-photo.jpg\): not found in"):
        build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)


def test_merged_exports_with_one_image_id_twice_are_named(tmp_path, caplog):
    images, path = labelme(tmp_path)
    data = json.loads(path.read_text())
    data["images"][1]["id"] = 0  # a second export's first image, merged
    for ann in data["annotations"]:
        ann["image_id"] = 0 if ann["image_id"] == 1 else ann["image_id"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"duplicate image id: 1\), e.g. image 0 \(JPEGImages/1.jpg\): image id 0 is used by 2 image "
                                        r"records \(JPEGImages/0.jpg, JPEGImages/1.jpg\): their annotations cannot be told apart"):
        build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)
    with caplog.at_level(logging.WARNING):
        ds = build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True, on_invalid="drop")
    assert ds.ids == [2] and "1 images listed in annotations.json are dropped (duplicate image id: 1)" in caplog.text


def test_negatives_are_counted_with_the_key_that_keeps_them(tmp_path, caplog):
    images, path = labelme(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO):
        ds = build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)
    assert ds.ids == [0, 1]
    assert ("1 image of 3 in annotations.json has no annotation (negatives): left out of training "
            "(data.drop_empty_train_images=false trains on them as negatives)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ds = build_coco_dataset(images, path, train=False, augment=NO_AUG, drop_empty=False)
    assert ds.ids == [0, 1, 2] and "1 image of 3 in annotations.json has no annotation (negatives): kept for evaluation" in caplog.text


def test_box_only_export_trains_boxes_and_reports_bbox_only(tmp_path, caplog):
    images, path = roboflow(tmp_path, boxes_only=True)
    with caplog.at_level(logging.INFO):
        ds = build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)
    assert ("No annotation in _annotations.coco.json has a segmentation (6 box-only annotations): the box branches train, "
            "the mask loss is 0 and masks are not evaluated (bbox AP only)") in caplog.text
    _, target = ds[0]
    assert target["boxes"].shape == (2, 4) and int(target["masks"].sum()) == 0
    metrics = coco_metrics(ds.coco, perfect_results(path), ds.ids)
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AP"] == 1.0
    losses = one_epoch(data_cfg(images, path))
    assert losses["loss_mask"] == 0.0 and losses["loss_box_reg"] > 0 and math.isfinite(losses["loss_classifier"])


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_missing_area_and_iscrowd_train_and_score_in_both_splits(tmp_path, backend):
    images, path = label_studio(tmp_path)
    data = json.loads(path.read_text())
    for ann in data["annotations"]:
        del ann["area"], ann["iscrowd"]
    path.write_text(json.dumps(data))
    for train in (True, False):
        ds = build_coco_dataset(images, path, train=train, augment=NO_AUG, drop_empty=train)
        metrics = coco_metrics(ds.coco, perfect_results(path), ds.ids, backend=backend)
        assert metrics["bbox"]["AP"] == 1.0 and metrics["segm"]["AP"] == 1.0


# ----------------------------------------------------------------------------------- EXIF photos
# What a viewer does to the stored pixels (ImageOps.exif_transpose), and its inverse: stored = inverse(displayed).
SHOWN = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
STORED = {**SHOWN, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
OBJECTS = [(6, 4, 14), (36, 22, 18)]  # (x, y, size) in the displayed frame, as the annotation tool shows it


def phone_photos(root: Path, json_frame: str = "displayed") -> tuple[Path, Path]:
    """One JPEG per EXIF orientation 1-8, annotated (sizes, polygons) in the displayed frame."""
    folder = root / "images"
    folder.mkdir(parents=True)
    images, anns = [], []
    for k in range(1, 9):
        displayed = canvas(OBJECTS)
        stored = displayed.transpose(STORED[k]) if k in STORED else displayed
        exif = Image.Exif()
        exif[274] = k
        stored.save(folder / f"IMG_{k}.jpg", quality=95, exif=exif.tobytes())
        w, h = displayed.size if json_frame == "displayed" else stored.size
        images.append({"id": k, "file_name": f"IMG_{k}.jpg", "width": w, "height": h})
        for x, y, s in OBJECTS:
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": 1, "bbox": [x, y, s, s], "segmentation": square(x, y, s),
                         "area": float(s * s), "iscrowd": 0})
    path = root / "photos.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}))
    return folder, path


def test_phone_photos_load_as_displayed_so_masks_sit_on_their_objects(tmp_path, caplog):
    images, path = phone_photos(tmp_path)
    with caplog.at_level(logging.INFO):
        ds = build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)
    assert ("7 images in photos.json carry an EXIF rotation: loaded as displayed (as annotation tools show them; "
            "data.exif=ignore loads raw pixels)") in caplog.text
    for index, image_id in enumerate(ds.ids):
        image, target = ds[index]
        assert image.shape == (3, H, W), image_id
        for mask in target["masks"]:
            assert image[0][mask.bool()].mean() > 0.8, f"orientation {image_id}: mask on background"


def test_photos_annotated_in_their_raw_frame_load_raw_with_one_line(tmp_path, caplog):
    images, path = phone_photos(tmp_path, json_frame="raw")
    with caplog.at_level(logging.INFO):
        ds = build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)
    # 90-degree orientations (5-8) on a 64x48 photo: only the raw size matches, so the raw frame is used.
    assert "4 images in photos.json are annotated in their raw frame" in caplog.text
    assert "e.g. image 5 (IMG_5.jpg, orientation 5), image 6 (IMG_6.jpg, orientation 6), image 7 (IMG_7.jpg, orientation 7), ..." in caplog.text
    image, _ = ds[ds.ids.index(6)]
    assert image.shape == (3, W, H)


def test_a_photo_whose_size_matches_neither_frame_names_its_orientation(tmp_path):
    images, path = phone_photos(tmp_path)
    data = json.loads(path.read_text())
    data["images"][5].update(width=100, height=80)  # IMG_6.jpg
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"image 6 \(IMG_6.jpg\): is 48x64 pixels \(EXIF orientation 6, rotated 90° clockwise: "
                                        r"displayed 64x48\) but the annotation file says 100x80"):
        build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True)


def test_exif_ignore_loads_raw_pixels_and_says_why_displayed_sizes_fail(tmp_path):
    images, path = phone_photos(tmp_path)
    with pytest.raises(DataError, match=r"data.exif=ignore loads the stored pixels, data.exif=apply loads it as displayed"):
        build_coco_dataset(images, path, train=True, augment=NO_AUG, drop_empty=True, exif="ignore")


# ------------------------------------------------------------------------------- a real run, end to end
def roboflow_unsplit(root: Path, n: int = 9) -> None:
    """A Roboflow export with only ``train/`` (no ``valid/``), classes named as a user wrote them."""
    folder = root / "train"
    folder.mkdir(parents=True)
    names = ["café", "自転車"]
    cats = [{"id": 0, "name": "objects", "supercategory": "none"}] + [{"id": i + 1, "name": n_, "supercategory": "objects"} for i, n_ in enumerate(names)]
    images, anns = [], []
    for i in range(n):
        objects = LAYOUT[i % len(LAYOUT)]
        canvas([(x, y, s) for x, y, s, _ in objects]).save(folder / f"{i}.jpg", quality=95)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": W, "height": H})
        for x, y, s, c in objects:
            anns.append({"id": len(anns), "image_id": i, "category_id": c + 1, "bbox": [x, y, s, s], "area": float(s * s),
                         "segmentation": square(x, y, s), "iscrowd": 0})
    (folder / "_annotations.coco.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}), encoding="utf-8")


@pytest.mark.slow
def test_a_roboflow_export_without_a_split_trains_from_data_root_alone(tmp_path, monkeypatch):
    """``data=coco data.root=<export> data.val_fraction=...``: the layout recognised, the split cut and
    recorded, the placeholder left out, unicode class names as keys in tags and as written on the console."""
    from conftest import TINY_MODEL_OVERRIDES, run_entry

    roboflow_unsplit(tmp_path / "export")
    cache = tmp_path / "cache"
    args = ["data=coco", f"data.root={tmp_path / 'export'}", "data.val_fraction=0.34", "data.batch_size=2", "data.num_workers=0",
            "model.min_size=64", "model.max_size=64", "epochs=1", f"runs_dir={tmp_path / 'runs'}", *TINY_MODEL_OVERRIDES]
    monkeypatch.setenv("MASKRCNN_COCO_CACHE", str(cache))  # the split files go there
    proc = run_entry(args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "maskrcnn").iterdir()
    log = (run / "train.log").read_text(encoding="utf-8")
    root = tmp_path / "export"
    assert f"Data layout: roboflow (recognised from data.root={root}): train {root}/train/_annotations.coco.json + {root}/train, " \
           "val cut from it by data.val_fraction=0.34 (same images folder)" in log
    assert "Split _annotations.coco.json (9 images) into 6 train / 3 val images (data.val_fraction=0.34, data.split_seed=0)" in log
    assert "'objects' (id 0: Roboflow's id-0 category, the supercategory of all the others)" in log
    split = json.loads((run / "split.json").read_text())
    assert len(split["train_image_ids"]) == 6 and sorted(split["train_image_ids"] + split["val_image_ids"]) == list(range(9))
    classes = json.loads((run / "classes.json").read_text(encoding="utf-8"))
    assert classes == [{"id": 1, "name": "café", "key": "cafe"}, {"id": 2, "name": "自転車", "key": "u81ea_u8ee2_u8eca"}]
    record = json.loads((run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert {"mAP/segm_AP_class_cafe", "mAP/bbox_AP_class_u81ea_u8ee2_u8eca"} <= set(record)
    assert "AP per class (segm): café " in log and " | 自転車 " in log
    assert "Glyph" not in proc.stderr
    assert sorted(p.name for p in next((cache / "splits").iterdir()).iterdir()) == [".maskrcnn_coco_index", "split.json", "train_split.json", "val_split.json"]  # + the splits' index


@pytest.mark.slow
def test_a_box_only_export_trains_and_reports_bbox_only_end_to_end(tmp_path, monkeypatch):
    """Detection-only data through the real entry: the box branches train, loss_mask is 0, the epoch
    block and metrics carry bbox AP only, and nothing crashes on the missing segm metrics."""
    from conftest import TINY_MODEL_OVERRIDES, run_entry

    images, path = roboflow(tmp_path / "export", boxes_only=True)
    monkeypatch.setenv("MASKRCNN_COCO_CACHE", str(tmp_path / "cache"))
    args = ["data=coco", f"data.root={tmp_path / 'export'}", "data.val_annotations=" + str(path), f"data.val_images={images}",
            "data.batch_size=2", "data.num_workers=0", "model.min_size=64", "model.max_size=64", "epochs=2",
            f"runs_dir={tmp_path / 'runs'}", *TINY_MODEL_OVERRIDES]
    proc = run_entry(args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "maskrcnn").iterdir()
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "No annotation in _annotations.coco.json has a segmentation (6 box-only annotations)" in log
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/train_loss_mask"] == 0.0 and r["loss/train_loss_box_reg"] > 0 for r in records)
    assert "mAP/bbox_AP" in records[-1] and not any(k.startswith("mAP/segm") for k in records[-1])
