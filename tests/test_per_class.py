"""Per-class AP from COCOeval and the confusion matrix of matched detections."""

import json
import math

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import nn

from maskrcnn_coco.config import LOSS_COMPONENTS
from maskrcnn_coco.engine import evaluate
from maskrcnn_coco.engine.writers import ConfusionWriter, EpochResult
from maskrcnn_coco.evaluation.coco_eval import coco_metrics
from maskrcnn_coco.evaluation.per_class import (
    CONFUSION_KEY,
    class_metric_names,
    confusion_matrix,
    match_images,
    save_confusion,
)
from maskrcnn_coco.tracking.scalars import epoch_scalars

from conftest import square_ann, write_coco_dataset


def truth_results(coco, relabel=None, score=1.0):
    """The ground truth as detections (``relabel``: category id -> the id to give instead)."""
    relabel = relabel or {}
    return [{"image_id": a["image_id"], "category_id": relabel.get(a["category_id"], a["category_id"]), "bbox": a["bbox"],
             "score": score, "segmentation": a["segmentation"]} for a in coco.anns.values()]


def test_tag_names_are_sanitized_and_unique():
    from maskrcnn_coco.tracking.scalars import class_key

    assert class_key("traffic light") == "traffic_light" and class_key("a/b c") == "a_b_c" and class_key("  ") == "unnamed"
    coco = COCO()
    coco.dataset = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a b"}, {"id": 2, "name": "a_b"}]}
    coco.createIndex()
    assert class_metric_names(coco) == {1: "AP_class_a_b", 2: "AP_class_a_b_2"}


def test_per_class_ap_and_its_tags(tiny_data):
    coco = tiny_data.val_loader.dataset.coco
    ids = list(coco.imgs)
    metrics = coco_metrics(coco, truth_results(coco), ids)
    names = ["circle", "square", "triangle"]
    present = {coco.cats[a["category_id"]]["name"] for a in coco.anns.values()}
    for iou_type in ("bbox", "segm"):
        for name in names:
            value = metrics[iou_type][f"AP_class_{name}"]
            assert (value == pytest.approx(1.0)) if name in present else math.isnan(value)
    # One class's detections missing: that class 0, the others still 1.
    gone = next(iter(present))
    gone_id = next(c for c, cat in coco.cats.items() if cat["name"] == gone)
    partial = coco_metrics(coco, [r for r in truth_results(coco) if r["category_id"] != gone_id], ids)
    assert partial["segm"][f"AP_class_{gone}"] == 0.0
    assert all(partial["segm"][f"AP_class_{n}"] == pytest.approx(1.0) for n in present - {gone})

    tags = epoch_scalars({"metrics": {**metrics, CONFUSION_KEY: confusion_matrix(coco, truth_results(coco), ids)}})
    assert {f"mAP/segm_AP_class_{n}" for n in present} <= set(tags)
    assert not any(t.startswith("mAP/confusion") for t in tags)  # the matrix is no scalar
    assert all(isinstance(v, float) and math.isfinite(v) for v in tags.values())


def test_a_class_without_ground_truth_is_undefined_not_zero(tmp_path):
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "never"}]
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (1, 2)]
    anns = [square_ann(1, 1, 1, 4, 4, 20), square_ann(2, 2, 2, 30, 30, 20)]
    _, ann_file = write_coco_dataset(tmp_path, cats, images, anns, split="val")
    coco = COCO(str(ann_file))
    metrics = coco_metrics(coco, truth_results(coco), [1, 2])
    assert metrics["bbox"]["AP_class_a"] == pytest.approx(1.0) and math.isnan(metrics["bbox"]["AP_class_never"])
    empty = coco_metrics(coco, [], [1, 2])  # no detection at all
    assert empty["segm"]["AP_class_a"] == 0.0 and math.isnan(empty["segm"]["AP_class_never"])


def small_coco(tmp_path):
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    images = [{"id": 1, "file_name": "1.png", "height": 100, "width": 100}]
    anns = [square_ann(1, 1, 1, 0, 0, 20), square_ann(2, 1, 2, 40, 0, 20), square_ann(3, 1, 3, 0, 50, 20),
            square_ann(4, 1, 1, 60, 60, 30, iscrowd=1)]
    _, ann_file = write_coco_dataset(tmp_path, cats, images, anns, split="val")
    return COCO(str(ann_file))


def det(cat, box, score=0.9):
    return {"image_id": 1, "category_id": cat, "bbox": box, "score": score}


def test_confusion_matrix_rows_truth_columns_predicted(tmp_path):
    coco = small_coco(tmp_path)
    results = [
        det(1, [0, 0, 20, 20]),            # a as a: diagonal
        det(3, [41, 0, 20, 20]),           # b as c: off the diagonal
        det(2, [0, 0, 21, 21], 0.8),       # a duplicate: its box is taken -> a false positive (background row)
        det(2, [0, 50, 20, 20], 0.3),      # below the score threshold: left out, so c is missed
        det(1, [60, 60, 30, 30]),          # on a crowd region: ignored
    ]
    cm = confusion_matrix(coco, results, [1])
    assert cm["ground_truth"] == ["a", "b", "c", "background"] and cm["predicted"] == ["a", "b", "c", "missed"]
    assert cm["matrix"] == [
        [1, 0, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
        [0, 1, 0, 0],
    ]
    assert cm["params"] == {"iou_threshold": 0.5, "score_threshold": 0.5}
    assert confusion_matrix(coco, results, [1], score_threshold=0.2)["matrix"][2] == [0, 1, 0, 0]


def test_match_images_is_the_rule_both_the_matrix_and_the_error_list_read(tmp_path):
    from maskrcnn_coco.cli.evaluate import image_errors

    coco = small_coco(tmp_path)
    results = [det(1, [0, 0, 20, 20]), det(3, [41, 0, 20, 20]), det(2, [0, 0, 21, 21], 0.8),
               det(2, [0, 50, 20, 20], 0.3), det(1, [60, 60, 30, 30]), det(99, [0, 0, 20, 20])]
    (match,) = match_images(coco, results, [1])
    # By decreasing score; the unknown category, the low score and the crowd detection are left out.
    assert [(d["category_id"], g and g["category_id"]) for d, g in match.pairs] == [(1, 1), (3, 2), (2, None)]
    assert [g["category_id"] for g in match.missed] == [3]
    (errors,) = image_errors(coco, results, [1])
    assert errors["errors"] == 3 and [e["name"] for e in errors["false_positives"]] == ["b"]
    assert [(e["name"], e["annotated"]) for e in errors["wrong_class"]] == [("c", "b")]
    assert [e["name"] for e in errors["missed"]] == ["c"]
    assert image_errors(coco, [det(1, [0, 0, 20, 20]), det(2, [41, 0, 20, 20]), det(3, [0, 50, 20, 20])], [1]) == []  # healthy


def test_confusion_files(tmp_path):
    cm = {"ground_truth": ["a", "b", "background"], "predicted": ["a", "b", "missed"], "matrix": [[3, 1, 0], [0, 2, 1], [1, 0, 0]],
          "params": {"iou_threshold": 0.5, "score_threshold": 0.5}}
    paths = save_confusion(cm, tmp_path / "confusion_epoch_001", title="epoch 1")
    assert [p.name for p in paths] == ["confusion_epoch_001.json", "confusion_epoch_001.png"]
    assert json.loads(paths[0].read_text())["matrix"] == cm["matrix"]
    assert Image.open(paths[1]).size[0] > 100


class Oracle(nn.Module):
    """The loader's ground truth as detections, optionally relabelled (eval), fixed losses (train)."""

    def __init__(self, loader, relabel=None):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.batches = [targets for _, targets in loader]
        self.relabel = relabel or {}

    def forward(self, images, targets=None):
        if self.training:
            return dict.fromkeys(LOSS_COMPONENTS, self.p + 0.5)
        return [{"boxes": t["boxes"], "labels": torch.tensor([self.relabel.get(int(v), int(v)) for v in t["labels"]]),
                 "scores": torch.ones(len(t["labels"])), "masks": t["masks"][:, None].float()} for t in self.batches.pop(0)]


def test_evaluate_returns_the_confusion_matrix_and_the_sink_writes_it(tiny_data, tmp_path):
    coco = tiny_data.val_loader.dataset.coco
    _, metrics = evaluate(Oracle(tiny_data.val_loader, relabel={1: 2, 2: 3, 3: 1}), tiny_data.val_loader, "cpu",
                          mapping=tiny_data.mapping, progress=False)
    cm = metrics[CONFUSION_KEY]
    counts = {c: sum(a["category_id"] == c for a in coco.anns.values()) for c in coco.cats}
    # Label l is given l % 3 + 1: every object matched, each class in the next one's column.
    for i, cat in enumerate(sorted(coco.cats)):
        assert cm["matrix"][i][(i + 1) % 3] == counts[cat] and sum(cm["matrix"][i]) == counts[cat]
    assert sum(cm["matrix"][3]) == 0
    ConfusionWriter(tmp_path).after_epoch(None, EpochResult(epoch=3, record={"metrics": metrics}, scalars={}))
    assert {p.name for p in tmp_path.iterdir()} == {"confusion_epoch_003.json", "confusion_epoch_003.png"}
