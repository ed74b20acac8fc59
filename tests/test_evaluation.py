import pytest
import torch
from pycocotools import mask as mask_utils

from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.evaluation.coco_eval import coco_metrics, predictions_to_coco


def test_coco_metrics_from_ground_truth_results(tiny_data):
    coco = tiny_data.val_coco
    mapping = tiny_data.mapping
    results = []
    for ann in coco.anns.values():
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"],
                        "score": 1.0, "segmentation": ann["segmentation"]})
    metrics = coco_metrics(coco, results, list(coco.imgs))
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    # Wrong class on every detection: AP 0.
    wrong = [{**r, "category_id": mapping.coco_ids[(mapping.coco_ids.index(r["category_id"]) + 1) % 3]} for r in results]
    assert coco_metrics(coco, wrong, list(coco.imgs))["segm"]["AP"] == pytest.approx(0.0)


def test_predictions_to_coco_maps_labels_and_boxes():
    mapping = CategoryMapping([{"id": 5, "name": "a"}, {"id": 9, "name": "b"}])
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, 2:4, 1:5] = 0.9
    out = [{"boxes": torch.tensor([[1.0, 2.0, 5.0, 4.0]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.7]), "masks": masks}]
    (res,) = predictions_to_coco(out, [42], mapping)
    assert res["image_id"] == 42 and res["category_id"] == 9
    assert res["bbox"] == [1.0, 2.0, 4.0, 2.0] and res["score"] == pytest.approx(0.7)
    assert int(mask_utils.area(res["segmentation"])) == 8
