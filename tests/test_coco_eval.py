"""``evaluation/coco_eval.py``: COCO results and metrics, cleaned ground truth, mask-area size ranges, backends."""

import contextlib
import io
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


# ------------------------------------------------- masks over their boxes (evaluate's results path)
def random_box_outputs(sizes, counts, seed=0):
    """Detections as the RoI heads give them (28x28 probabilities, boxes inside the image), with the
    awkward boxes among them: the whole image, whole-height columns, slivers at an edge, sub-pixel."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for (h, w), n in zip(sizes, counts):
        a, b = torch.rand(n, 2, generator=g) * torch.tensor([w, h]), torch.rand(n, 2, generator=g) * torch.tensor([w, h])
        boxes = torch.cat([torch.minimum(a, b), torch.maximum(a, b) + 0.02], dim=1).clamp(max=torch.tensor([w, h, w, h]))
        special = [[0.0, 0.0, w, h], [0.0, 0.0, w / 2, h], [w - 0.3, h / 5, w, h * 0.9], [1.2, 1.4, 1.6, 1.9], [0.0, h - 2.5, w, h]]
        if n:
            boxes[: min(n, len(special))] = torch.tensor(special[:n])
        masks = torch.rand(n, 1, 28, 28, generator=g)
        masks[::2] = (masks[::2] > 0.3).float()  # solid blobs: runs across whole columns
        outs.append({"boxes": boxes, "scores": torch.rand(n, generator=g), "labels": torch.randint(1, 4, (n,), generator=g),
                     "box_masks": masks, "image_size": (h, w)})
    return outs


def pasted(outputs):
    """The same detections as ``model(images)`` gives them: masks pasted at image size by torchvision."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    return [{**{k: v for k, v in out.items() if k not in ("box_masks", "image_size")},
             "masks": paste_masks_in_image(out["box_masks"], out["boxes"], out["image_size"])} for out in outputs]


@pytest.mark.parametrize("threshold", [0.5, 0.0, 0.93])
@pytest.mark.parametrize("crop_pixels", [1, 1 << 24])  # every crop its own host copy, or all in one
def test_masks_over_boxes_give_the_rles_of_the_pasted_masks(tiny_data, monkeypatch, threshold, crop_pixels):
    from maskrcnn_coco.evaluation import coco_eval

    monkeypatch.setattr(coco_eval, "CROP_PIXELS_PER_COPY", crop_pixels)
    sizes = [(37, 53), (1, 9), (64, 1), (48, 48), (20, 31), (90, 17)]
    outputs = random_box_outputs(sizes, [9, 3, 4, 0, 7, 12], seed=int(threshold * 100) + crop_pixels)
    ids = list(range(10, 10 + len(sizes)))
    got = predictions_to_coco(outputs, ids, tiny_data.mapping, threshold)
    assert got == per_image_reference(pasted(outputs), ids, tiny_data.mapping, threshold)
    assert len(got) == 35 and sum(mask_utils.area(r["segmentation"]) > 0 for r in got) > 20
    # One image at a time, as evaluate produces them, or mixed with full-size masks: the same.
    assert [r for i, out in zip(ids, outputs) for r in predictions_to_coco([out], [i], tiny_data.mapping, threshold)] == got
    mixed = [out if k % 2 else full for k, (out, full) in enumerate(zip(outputs, pasted(outputs)))]
    assert predictions_to_coco(mixed, ids, tiny_data.mapping, threshold) == got


def test_masks_over_boxes_need_a_threshold_of_at_least_zero(tiny_data):
    (out,) = random_box_outputs([(8, 8)], [1])
    with pytest.raises(ValueError, match=r"eval\.mask_threshold"):
        predictions_to_coco([out], [1], tiny_data.mapping, -0.1)


# ------------------------------------------------------------------ COCOeval: one copy, one index
def test_one_copy_of_the_results_serves_every_iou_type_in_any_order(tiny_data):
    """coco_metrics equals COCOeval on fresh copies per IoU type (what it did before), whatever the
    order of the IoU types, with results with and without masks; the caller's results are untouched."""
    from pycocotools.cocoeval import COCOeval

    coco = tiny_data.val_loader.dataset.coco
    g = torch.Generator().manual_seed(3)
    results = []
    for k, ann in enumerate(coco.anns.values()):
        x, y, w, h = ann["bbox"]
        j = (torch.rand(4, generator=g) - 0.5).tolist()
        r = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": float(torch.rand(1, generator=g)),
             "bbox": [x + 3 * j[0], y + 3 * j[1], w + 4 * j[2], h + 4 * j[3]]}
        if k % 3:
            r["segmentation"] = ann["segmentation"]  # polygons: encoded for loadRes
        results.append(r)
    before = [dict(r) for r in results]
    ids = sorted(coco.imgs)
    fresh = {}
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(coco, coco.loadRes(results_for_loadres(coco, results, iou_type)), iouType=iou_type)
        ev.params.imgIds = ids
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        fresh[iou_type] = [float(v) if v >= 0 else float("nan") for v in ev.stats[:6]]
    backends = ["pycocotools"] + (["faster_coco_eval"] if resolve_backend("auto") == "faster_coco_eval" else [])
    for backend in backends:
        for order in [("bbox", "segm"), ("segm", "bbox")]:
            metrics = coco_metrics(coco, results, ids, iou_types=order, backend=backend)
            for iou_type in order:
                got = [metrics[iou_type][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
                assert np.array_equal(got, fresh[iou_type], equal_nan=True), (backend, order, iou_type)
    assert results == before


def test_the_backends_ground_truth_is_indexed_once_across_calls(tiny_data, monkeypatch):
    if resolve_backend("auto") != "faster_coco_eval":
        pytest.skip("faster-coco-eval is not installed")
    import faster_coco_eval

    built = []

    class Counting(faster_coco_eval.COCO):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(faster_coco_eval, "COCO", Counting)
    coco = tiny_data.val_loader.dataset.coco
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in coco.anns.values()]
    first = coco_metrics(coco, results, list(coco.imgs), backend="faster_coco_eval")
    assert len(built) == 1  # bbox and segm share the scoring ground truth here
    again = coco_metrics(coco, results, list(coco.imgs), backend="faster_coco_eval")
    assert len(built) == 1 and first["segm"]["AP"] == pytest.approx(1.0)
    for iou_type in ("bbox", "segm"):
        assert np.array_equal(list(again[iou_type].values()), list(first[iou_type].values()), equal_nan=True)
