"""``evaluation/coco_eval.py``: COCO results and metrics, cleaned ground truth, mask-area size ranges, backends."""

import math

import numpy as np
import pytest
import torch
from helpers import Oracle
from pycocotools import mask as mask_utils

from maskrcnn_coco.config import AugmentConfig
from maskrcnn_coco.data.coco import CategoryMapping, build_coco_dataset, load_coco, make_loader
from maskrcnn_coco.engine import evaluate
from maskrcnn_coco.evaluation.coco_eval import coco_metrics, predictions_to_coco, resolve_backend, results_for_loadres

from conftest import square_ann, write_coco_dataset


def test_coco_metrics_from_ground_truth_results(tiny_data):
    coco = tiny_data.val_loader.dataset.coco
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


def nan_box_val_set(tmp_path):
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (1, 2, 3)]
    anns = [
        square_ann(1, 1, 1, 4, 4, 20),
        square_ann(2, 1, 2, 30, 30, 24),
        {**square_ann(3, 2, 1, 10, 12, 24), "bbox": [10.0, float("nan"), 24.0, 24.0]},  # skipped as invalid
        square_ann(4, 2, 2, 40, 40, 14),
        square_ann(5, 3, 1, 0, 0, 30, iscrowd=1),
    ]
    return write_coco_dataset(tmp_path, cats, images, anns, split="val")


def test_annotations_skipped_for_training_are_not_scored(tmp_path):
    img_dir, ann_file = nan_box_val_set(tmp_path)
    ds = build_coco_dataset(img_dir, ann_file, train=False, augment=AugmentConfig(hflip_prob=0.0), drop_empty=False)
    loader = make_loader(ds, 2, shuffle=False, num_workers=0, seed=0)
    _, metrics = evaluate(Oracle(loader), loader, "cpu", mapping=ds.mapping, progress=False)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)  # was 0.944: the NaN box counted as a miss
    assert 5 in ds.coco.anns and 3 not in ds.coco.anns  # crowd kept for COCOeval, invalid removed

    # A COCO object that no dataset cleaned: coco_metrics scores against a cleaned copy.
    raw = load_coco(ann_file)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in raw.anns.values() if a["id"] in (1, 2, 4)]
    metrics = coco_metrics(raw, results, [1, 2, 3])
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert 3 in raw.anns  # the caller's object is left alone


def l_shape(x, y, size=40, width=4):
    """An L of ``width`` px strokes in a ``size`` box: mask area small (< 32^2), box area medium."""
    return [[x, y, x + width, y, x + width, y + size - width, x + size, y + size - width,
             x + size, y + size, x, y + size]]


def test_segm_size_ranges_use_mask_areas(tmp_path):
    cats = [{"id": 1, "name": "a"}]
    images = [{"id": 1, "file_name": "1.png", "height": 128, "width": 128}]
    seg = l_shape(10, 10)
    gt = {**square_ann(1, 1, 1, 10, 10, 40), "segmentation": seg, "area": 304.0}
    _, ann_file = write_coco_dataset(tmp_path, cats, images, [gt], split="val")
    coco = load_coco(ann_file)
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, 128, 128))
    assert 16**2 < mask_utils.area(rle) < 32**2 < 40 * 40 < 96**2
    hit = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9, "segmentation": seg}
    # A false positive of the same shape elsewhere, scored higher: it belongs to the small range.
    miss = {**hit, "bbox": [70, 70, 40, 40], "score": 0.95, "segmentation": l_shape(70, 70)}
    prepared = results_for_loadres(coco, [hit, miss], "segm")
    assert all("bbox" not in r for r in prepared) and all(isinstance(r["segmentation"], dict) for r in prepared)
    coco_dt = coco.loadRes(prepared)
    assert [a["area"] for a in coco_dt.anns.values()] == [mask_utils.area(rle)] * 2  # not 1600, the box's
    metrics = coco_metrics(coco, [hit, miss], [1], iou_types=("segm",))["segm"]
    # With box areas the false positive would be "medium" and APs a perfect 1.0.
    assert metrics["APs"] == pytest.approx(metrics["AP"]) and metrics["APs"] < 0.6
    assert math.isnan(metrics["APm"])


# ------------------------------------------------------------ batched host copies, COCOeval backends
def per_image_reference(outputs, image_ids, mapping, mask_threshold=0.5):
    """predictions_to_coco before batching: four copies per image."""
    from pycocotools import mask as mask_utils

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        masks = out["masks"].detach()
        masks = (masks[:, 0] if masks.dim() == 4 else masks) > mask_threshold
        rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
        for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            results.append({"image_id": int(image_id), "category_id": mapping.to_coco_id(label), "bbox": box, "score": score,
                            "segmentation": {"size": rles[i]["size"], "counts": rles[i]["counts"].decode("ascii")}})
    return results


def random_outputs(sizes, counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = []
    for (h, w), n in zip(sizes, counts):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])], dim=1)
        outs.append({"boxes": boxes, "scores": torch.rand(n, generator=g), "labels": torch.randint(1, 4, (n,), generator=g),
                     "masks": torch.rand(n, 1, h, w, generator=g)})
    return outs


def test_predictions_to_coco_per_batch_equals_per_image_copies(tiny_data):
    outputs = random_outputs([(20, 30), (17, 9), (20, 30), (5, 40)], [3, 0, 5, 1])
    ids = [11, 12, 13, 14]
    assert predictions_to_coco(outputs, ids, tiny_data.mapping) == per_image_reference(outputs, ids, tiny_data.mapping)


def test_cocoeval_backends_give_identical_metrics(tiny_data):
    if resolve_backend("auto") != "faster_coco_eval":
        pytest.skip("faster-coco-eval is not installed")
    coco = tiny_data.val_loader.dataset.coco
    g = torch.Generator().manual_seed(1)
    results = []
    for ann in coco.anns.values():  # every object found, jittered, with a random score; some false positives
        x, y, w, h = ann["bbox"]
        jitter = (torch.rand(4, generator=g) - 0.5).tolist()
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": float(torch.rand(1, generator=g)),
                        "bbox": [x + 3 * jitter[0], y + 3 * jitter[1], w + 4 * jitter[2], h + 4 * jitter[3]],
                        "segmentation": ann["segmentation"]})
        results.append({**results[-1], "category_id": 1 + ann["category_id"] % 3, "score": 0.3 * results[-1]["score"]})
    ids = sorted(coco.imgs)
    a = coco_metrics(coco, results, ids, backend="pycocotools")
    b = coco_metrics(coco, results, ids, backend="faster_coco_eval")
    assert a.keys() == b.keys() == {"bbox", "segm"}
    for iou_type in a:
        assert a[iou_type].keys() == b[iou_type].keys()
        for k, v in a[iou_type].items():
            assert (math.isnan(v) and math.isnan(b[iou_type][k])) or v == b[iou_type][k], (iou_type, k)
    assert 0 < a["segm"]["AP"] < 1
