"""The ground truth COCOeval scores against (evaluation/ground_truth.py): perfect predictions score
exactly 1.000 whatever the export's conventions (ids from 0, no area/iscrowd, box-only objects,
crowd-only classes), in both backends."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskrcnn_coco.data.exports import has_mask
from maskrcnn_coco.evaluation.coco_eval import coco_metrics
from maskrcnn_coco.evaluation.ground_truth import scoring_ground_truth

BACKENDS = ("pycocotools", "faster_coco_eval")
CATS = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "crowd_only"}]


def polygon(x: float, y: float, w: float, h: float) -> list[list[float]]:
    """An L-shaped polygon inside the box (a mask that is not its box)."""
    return [[x, y, x + w, y, x + w, y + h / 2, x + w / 2, y + h / 2, x + w / 2, y + h, x, y + h]]


def export(first_id: int = 0, area: bool = False, iscrowd: bool = False, box_only: int = 0, images: int = 3) -> dict:
    """A small export as labelme / Label Studio / Roboflow write it: annotation ids from ``first_id``,
    no ``area``/``iscrowd`` unless asked; the first ``box_only`` objects without a segmentation;
    a crowd-only class (3) on the first image."""
    imgs = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 160} for i in range(1, images + 1)]
    anns, next_id = [], first_id
    for image in imgs:
        for k, (x, y) in enumerate([(10, 10), (80, 20), (30, 90)]):
            ann = {"id": next_id, "image_id": image["id"], "category_id": 1 + (k + image["id"]) % 2,
                   "bbox": [x, y, 50, 40], "segmentation": polygon(x, y, 50, 40)}
            if area:
                ann["area"] = 1500.0
            if iscrowd:
                ann["iscrowd"] = 0
            anns.append(ann)
            next_id += 1
    for ann in anns[:box_only]:
        del ann["segmentation"]
    anns.append({"id": next_id, "image_id": 1, "category_id": 3, "bbox": [120, 100, 60, 50], "iscrowd": 1,
                 "segmentation": polygon(120, 100, 60, 50), "area": 1500.0})
    return {"images": imgs, "annotations": anns, "categories": CATS}


def load(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    coco.createIndex()
    return coco


def perfect_results(dataset: dict) -> list[dict]:
    """Every non-crowd object as one detection of its class, score 1, its own box and mask (a
    box-only object's mask: its box, what a model would predict)."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in dataset["images"]}
    out = []
    for ann in dataset["annotations"]:
        if ann.get("iscrowd"):
            continue
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        seg = ann["segmentation"] if has_mask(ann) else [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": list(ann["bbox"]), "score": 1.0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_id", [0, 1, 7])
def test_perfect_predictions_score_one_whatever_the_first_annotation_id(backend, first_id):
    data = export(first_id=first_id)
    metrics = coco_metrics(load(data), perfect_results(data), [1, 2, 3], backend=backend)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == 1.0, (iou_type, metrics[iou_type])
        assert metrics[iou_type]["AP50"] == 1.0
        assert metrics[iou_type]["AP_class_circle"] == 1.0 and metrics[iou_type]["AP_class_square"] == 1.0
        assert math.isnan(metrics[iou_type]["AP_class_crowd_only"])  # only crowd instances: n/a, not 0


def test_without_the_renumbering_cocoeval_misses_the_id_0_match():
    """The bug being fixed, shown on pycocotools directly: annotation id 0 counts as unmatched."""
    from pycocotools.cocoeval import COCOeval

    data = export(first_id=0, area=True, iscrowd=True)
    gt = load(data)
    ev = COCOeval(gt, gt.loadRes(perfect_results(data)), iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] < 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_area_and_iscrowd_are_filled_and_score_one(backend):
    data = export(first_id=1)
    assert all("area" not in a for a in data["annotations"][:-1])
    metrics = coco_metrics(load(data), perfect_results(data), [1, 2, 3], backend=backend)
    assert metrics["bbox"]["AP"] == 1.0 and metrics["segm"]["AP"] == 1.0
    truth = scoring_ground_truth(load(data))["segm"]
    # COCO's area is the mask's pixel count (the L-shape: 3/4 of its 50x40 box), not the box's.
    area = truth.anns[1]["area"]
    assert 0.7 * 2000 < area < 0.8 * 2000 and truth.anns[1]["iscrowd"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_only_objects_score_bbox_and_are_ignored_in_segm(backend):
    data = export(first_id=0, box_only=2)
    metrics = coco_metrics(load(data), perfect_results(data), [1, 2, 3], backend=backend)
    assert metrics["bbox"]["AP"] == 1.0 and metrics["segm"]["AP"] == 1.0
    truth = scoring_ground_truth(load(data))
    assert sum(a["iscrowd"] for a in truth["segm"].anns.values()) == 3  # two box-only regions + the crowd
    assert sum(a["iscrowd"] for a in truth["bbox"].anns.values()) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_box_only_export_reports_bbox_only(backend):
    data = export(first_id=0, box_only=9)
    data["annotations"][-1].pop("segmentation")
    metrics = coco_metrics(load(data), perfect_results(data), [1, 2, 3], backend=backend)
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AP"] == 1.0


def test_coco_conventions_pass_through_without_a_copy():
    data = export(first_id=1, area=True, iscrowd=True)
    coco = load(data)
    truth = scoring_ground_truth(coco)
    assert truth["bbox"] is coco and truth["segm"] is coco


def test_renumbered_ground_truth_keeps_the_files_ids():
    data = export(first_id=0)
    truth = scoring_ground_truth(load(data))["bbox"]
    assert sorted(truth.anns) == list(range(1, len(data["annotations"]) + 1))
    assert [truth.anns[k]["orig_id"] for k in (1, 2, 3)] == [0, 1, 2]
    assert np.isclose(truth.anns[1]["area"], mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(polygon(10, 10, 50, 40), 160, 200))))
    # A merged export's duplicate annotation id: the second is skipped as invalid (named when the
    # dataset is built, validate.DUPLICATE_ID), the rest renumbered.
    data["annotations"][1]["id"] = 0
    truth = scoring_ground_truth(load(data))["bbox"]
    assert [truth.anns[k]["orig_id"] for k in (1, 2)] == [0, 2] and len(truth.anns) == len(data["annotations"]) - 1
