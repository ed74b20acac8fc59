"""Per-image losses: equal to torchvision's own forward of one image, the model and the RNG untouched,
the outlier rule on known numbers, an image whose masks are off their boxes ranked first, and the
hook's files at evaluated epochs only."""

import json
import math

import pytest
import torch
from PIL import Image

from maskrcnn_coco.config import LOSS_COMPONENTS, AugmentConfig
from maskrcnn_coco.data.coco import build_coco_dataset
from maskrcnn_coco.engine import EpochResult, TrainingState
from maskrcnn_coco.engine.eval_step import loss_mode
from maskrcnn_coco.engine.per_image import (
    FILE_PATTERN,
    LATEST_KEY,
    SHEET_PATTERN,
    PerImageLosses,
    annotations_sheet,
    caption,
    images_to_check,
    outlier_images,
    per_image_losses,
    rank_outliers,
    unaugmented,
)
from maskrcnn_coco.modeling.build import build_model

from conftest import square_ann, tiny_model_cfg, write_coco_dataset

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "box"}]
BAD_IMAGE = 13


def batch(loader, n=None):
    images, targets = next(iter(loader))
    return images[:n], targets[:n]


def trained_statistics(model, loader, steps=2):
    """Running statistics away from their init (mean 0, var 1), as after some training."""
    model.train()
    with torch.no_grad():
        for _, (images, targets) in zip(range(steps), loader):
            model(images, targets)


def test_one_image_equals_torchvisions_forward_of_that_image(tiny_model, tiny_data):
    trained_statistics(tiny_model, tiny_data.train_loader)
    images, targets = batch(tiny_data.train_loader)
    rows = per_image_losses(tiny_model, images, targets, seed=7)
    for i, (image, target, row) in enumerate(zip(images, targets, rows)):
        # Running statistics: exactly what the run's evaluation computes for a batch of this one image.
        with torch.no_grad(), loss_mode(tiny_model):
            torch.manual_seed(7 + i)
            expected = tiny_model([image], [target])
        assert [row[k] for k in LOSS_COMPONENTS] == [float(expected[k]) for k in LOSS_COMPONENTS]
        assert row["image_id"] == target["image_id"] and row["num_objects"] == len(target["boxes"])
        assert 0 < row["roi_positive"] <= row["roi_sampled"] and 0 < row["rpn_positive"] <= row["rpn_sampled"]
    # A row is the same whatever else is in the call: each image is its own forward.
    (alone,) = per_image_losses(tiny_model, images[1:], targets[1:], seed=8)
    assert alone == rows[1]

    # Batch statistics of a one-image batch: torchvision's training forward of that image, to rounding.
    (row,) = per_image_losses(tiny_model, images[:1], targets[:1], seed=3, statistics="batch")
    tiny_model.train()
    with torch.no_grad():
        torch.manual_seed(3)
        expected = tiny_model(images[:1], targets[:1])
    for k in LOSS_COMPONENTS:
        assert row[k] == pytest.approx(float(expected[k]), rel=1e-4, abs=1e-6), k


def test_model_buffers_modes_and_rng_are_untouched(tiny_model, tiny_data):
    trained_statistics(tiny_model, tiny_data.train_loader, steps=1)
    tiny_model.train()
    tiny_model.roi_heads.eval()  # a mixed state must come back as it was
    modes = [m.training for m in tiny_model.modules()]
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    images, targets = batch(tiny_data.train_loader)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    for statistics in ("running", "batch"):
        per_image_losses(tiny_model, images, targets, statistics=statistics)
    assert torch.equal(torch.get_rng_state(), rng)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in tiny_model.modules()] == modes


def rows_of(values, component="loss_mask", objects=1):
    return [{"image_id": i, "num_objects": objects, **dict.fromkeys(LOSS_COMPONENTS, 0.5), component: v}
            for i, v in enumerate(values)]


def test_the_outlier_rule_on_known_numbers():
    # Median 0.21, MAD 0.02: above 0.31 (median + 5 MAD) and at least 0.42 (2x the median).
    rows = rows_of([0.19, 0.2, 0.21, 0.2, 0.19, 0.21, 0.35, 2.31, 0.9])
    (first, second) = outlier_images(rows, "loss_mask")
    assert (first["image_id"], first["value"], first["median"]) == (7, 2.31, 0.21)
    assert first["ratio"] == pytest.approx(2.31 / 0.21) and first["mad"] == pytest.approx(0.02)
    assert second["image_id"] == 8  # 0.35 is above median + 5 MAD, but not 2x the median
    assert [e["image_id"] for e in outlier_images(rows, "loss_mask", k=100)] == [7]  # above 2.21
    assert outlier_images(rows, "loss_mask", min_ratio=20) == []
    assert outlier_images(rows[:4], "loss_mask") == []  # too few images to judge
    assert caption(7, [("loss_mask", first)]) == "image 7: loss_mask 2.31 (median 0.21)"

    # Images without objects have loss_mask 0 by definition: left out of its ranking, not of the classifier's.
    empty = [{**row, "num_objects": 0, "loss_mask": 0.0} for row in rows_of([0.0] * 6, objects=0)]
    assert outlier_images(rows + empty, "loss_mask")[0]["median"] == 0.21
    assert rank_outliers(rows + empty).keys() == {"loss_mask"}
    # So do images whose objects are all box-only (no mask: the mask loss skips them).
    box_only = [{**row, "num_masked": 0, "loss_mask": 0.0} for row in rows_of([0.0] * 6)]
    assert outlier_images(rows + box_only, "loss_mask")[0]["median"] == 0.21

    # A non-finite loss is listed first; the others are ranked among the finite ones.
    broken = [*rows, {**rows[0], "image_id": 99, "loss_mask": math.nan}]
    assert [e["image_id"] for e in outlier_images(broken, "loss_mask")] == [99, 7, 8]


def test_box_regression_is_ranked_per_positive():
    """loss_box_reg sums over the positives and divides by all sampled: more objects, larger value."""
    rows = [{"image_id": i, "num_objects": n, **dict.fromkeys(LOSS_COMPONENTS, 0.5), "loss_box_reg": 0.05 * n,
             "roi_positive": 4 * n, "roi_sampled": 64, "rpn_positive": 4, "rpn_sampled": 64}
            for i, n in enumerate([1, 1, 2, 1, 2, 8])]
    assert outlier_images(rows, "loss_box_reg") == []  # image 5 has 8 objects, the same error per positive
    rows[2]["loss_box_reg"] = 1.0
    (entry,) = outlier_images(rows, "loss_box_reg")
    assert (entry["image_id"], entry["per_positive"], entry["loss"]) == (2, True, 1.0)
    assert entry["value"] == pytest.approx(1.0 * 64 / 8) and entry["median"] == pytest.approx(0.05 * 64 / 4)
    # Without sampler counts (rows from elsewhere) the raw value is ranked: the 8-object image stands out too.
    plain = [{k: v for k, v in r.items() if "positive" not in k and "sampled" not in k} for r in rows]
    assert [(e["image_id"], e["per_positive"]) for e in outlier_images(plain, "loss_box_reg")] == [(2, False), (5, False)]


def squares_dataset(tmp_path, augment=None):
    """Eight 64-px images with two squares each (square masks fill their boxes); image BAD_IMAGE's masks
    are shifted half a box off their boxes (still within the annotation check's mask/box agreement)."""
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in range(10, 18)]
    anns = []
    for im in images:
        for j, (x, y, s, c) in enumerate([(6, 8, 20, 1), (34, 30, 22, 2)]):
            ann = square_ann(100 * im["id"] + j, im["id"], c, x, y, s)
            if im["id"] == BAD_IMAGE:
                d = s / 2
                ann["segmentation"] = [[x + d, y + d, x + s + d, y + d, x + s + d, y + s + d, x + d, y + s + d]]
            anns.append(ann)
    img_dir, ann_file = write_coco_dataset(tmp_path / "data", CATEGORIES, images, anns)
    return build_coco_dataset(img_dir, ann_file, train=True, augment=augment or AugmentConfig(), drop_empty=False)


def confident_mask_model(num_classes):
    """A tiny model whose mask logits are +10 everywhere ("all object"), with only the ground-truth boxes
    as positive proposals: an image's loss_mask is then ~10 x the share of its boxes its masks leave
    empty, whatever the (untrained) rest of the model does."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(), num_classes)
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.zero_()
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(10.0)
    model.roi_heads.proposal_matcher.high_threshold = 0.95
    return model


def test_an_image_whose_masks_are_off_their_boxes_ranks_first(tmp_path):
    dataset = squares_dataset(tmp_path)
    model = confident_mask_model(dataset.mapping.num_classes)
    view = unaugmented(dataset)
    samples = [view[i] for i in range(len(view))]
    rows = per_image_losses(model, [s[0] for s in samples], [s[1] for s in samples])
    by_id = {r["image_id"]: r["loss_mask"] for r in rows}
    # Half of each box (the off-box part of the mask is cut off by the box) is empty: ~10 x 3/4.
    assert by_id[BAD_IMAGE] == pytest.approx(7.5, abs=1.0)
    assert max(v for k, v in by_id.items() if k != BAD_IMAGE) < 1.0
    (worst, *rest) = outlier_images(rows, "loss_mask")
    assert worst["image_id"] == BAD_IMAGE and rest == []
    assert worst["ratio"] > 10


def test_the_hook_writes_at_evaluated_epochs_only(tmp_path):
    dataset = squares_dataset(tmp_path, augment=AugmentConfig(hflip_prob=1.0))
    model = confident_mask_model(dataset.mapping.num_classes)
    run_dir = tmp_path / "run"
    hook = PerImageLosses(run_dir, dataset, num_images=100, seed=0)
    assert hook.indices == list(range(8))  # the whole (small) set, chosen once
    state = TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.1), None, None, dataset.mapping, epochs=2)
    rng = torch.get_rng_state()

    hook.after_epoch(state, EpochResult(1, {"val_loss": None, "metrics": None}, {}))
    assert not run_dir.exists() and LATEST_KEY not in state.latest

    evaluated = {"val_loss": {"loss_mask": 1.0}, "metrics": {"bbox": {"AP": 0.1}}, "time": {"train_s": 1000.0}}
    hook.after_epoch(state, EpochResult(2, evaluated, {}))
    assert torch.equal(torch.get_rng_state(), rng)
    saved = json.loads((run_dir / FILE_PATTERN.format(2)).read_text())
    assert saved["epoch"] == 2 and saved["num_images"] == len(saved["rows"]) == 8
    assert saved["images_to_check"] == [BAD_IMAGE]
    assert [e["image_id"] for e in saved["outliers"]["loss_mask"]] == [BAD_IMAGE]
    assert saved["sheet"] == SHEET_PATTERN.format(2) and saved["statistics"] == "running"
    assert 0 < saved["seconds"] < 60 and saved["cost_share"] == pytest.approx(saved["seconds"] / 1000.0)
    sheet = Image.open(run_dir / SHEET_PATTERN.format(2))
    assert sheet.size[0] > 200 and sheet.size[1] > 200
    latest = state.latest[LATEST_KEY]
    assert latest is hook.latest and latest["images_to_check"] == [BAD_IMAGE] and latest["epoch"] == 2


def test_the_subset_is_read_without_augmentation(tmp_path):
    flipped = squares_dataset(tmp_path, augment=AugmentConfig(hflip_prob=1.0))
    view = unaugmented(flipped)
    image, target = view[0]
    _, augmented = flipped[0]
    assert target["boxes"][0].tolist() == [6.0, 8.0, 26.0, 28.0]  # as annotated (xywh 6, 8, 20, 20)
    assert augmented["boxes"][0].tolist() == [38.0, 8.0, 58.0, 28.0]  # flipped in training
    assert image.dtype == torch.float32 and view.ids == flipped.ids and view.mapping is flipped.mapping


def test_the_sheet_draws_ground_truth_with_annotation_ids(tmp_path, monkeypatch):
    import maskrcnn_coco.engine.per_image as per_image
    from maskrcnn_coco.utils.draw import to_uint8

    dataset = squares_dataset(tmp_path)
    view = unaugmented(dataset)
    image, target = view[3]  # BAD_IMAGE
    drawn = {}

    def record(image, boxes, names, masks=None, ids=None, **kw):
        drawn.update(names=list(names), ids=ids, masks=masks.shape)
        return to_uint8(image)

    monkeypatch.setattr(per_image, "draw_instances", record)
    entry = {"image_id": BAD_IMAGE, "value": 7.4, "median": 0.2, "ratio": 37.0}
    sheet = annotations_sheet({"loss_mask": [entry]}, {BAD_IMAGE: (image, target)}, dataset.mapping.names,
                              dataset=view)
    assert sheet.dtype == torch.uint8 and sheet.shape[0] == 3
    # Enlarged 4x (to 256 px) so the captions stay legible on the sheet.
    assert drawn == {"names": ["square", "box"], "ids": [1300, 1301], "masks": (2, 256, 256)}
    assert images_to_check({"loss_mask": [entry]}) == [(BAD_IMAGE, [("loss_mask", entry)])]
    assert annotations_sheet({}, {}, dataset.mapping.names) is None


@pytest.mark.slow
def test_training_is_bit_identical_with_the_hook(tmp_path):
    """In a real fit: files at the evaluated epochs only, and the same weights as without the hook (the
    training RNG stream and the BatchNorm statistics are untouched)."""
    from maskrcnn_coco.data.coco import build_data
    from maskrcnn_coco.engine import FitSettings, default_hooks, fit

    from conftest import tiny_data_cfg

    def run(run_dir, with_hook):
        data = build_data(tiny_data_cfg(), seed=0, progress=False)
        torch.manual_seed(0)
        model = build_model(tiny_model_cfg(), data.mapping.num_classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        settings = FitSettings(epochs=2, device="cpu", eval_every=2, progress=False)
        hooks = default_hooks(run_dir, settings)
        if with_hook:
            hooks.append(PerImageLosses(run_dir, data.train_loader.dataset, num_images=6))
        fit(model, optimizer, data.train_loader, data.val_loader, settings, hooks, mapping=data.mapping, run_dir=run_dir)
        return model.state_dict()

    with_hook, without = run(tmp_path / "a", True), run(tmp_path / "b", False)
    assert all(torch.equal(with_hook[k], without[k]) for k in without)
    written = sorted(p.name for p in (tmp_path / "a").glob("per_image_losses_epoch_*.json"))
    assert written == [FILE_PATTERN.format(2)]  # the evaluated epoch only
    assert len(json.loads((tmp_path / "a" / written[0]).read_text())["rows"]) == 6
