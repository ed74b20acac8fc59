"""``analysis/split_stats.py``: masks off their boxes and a validation split unlike training, found on
planted faults and never on the healthy shapes set, with both numbers and the ids named; and the
start-of-run audit that logs and returns them."""

import contextlib
import copy
import io
import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf
from pycocotools.coco import COCO

from maskrcnn_coco.analysis import fault_bank
from maskrcnn_coco.analysis.split_stats import (
    SplitStats,
    audit_data,
    compare_splits,
    dataset_mask_box,
    mask_box_finding,
    split_stats,
)
from maskrcnn_coco.cli import experiment
from maskrcnn_coco.config import AugmentConfig
from maskrcnn_coco.data.coco import build_coco_dataset, load_coco
from maskrcnn_coco.data.shapes import ShapesParams, ensure_shapes_dataset
from maskrcnn_coco.data.validate import mask_box_agreement

PARAMS = ShapesParams(num_train=60, num_val=20, image_size=64, seed=0, min_objects=1, max_objects=4)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes_dataset(PARAMS, tmp_path_factory.mktemp("shapes"), progress=False)


def stats_of(paths, split, **kwargs):
    coco = load_coco(getattr(paths, f"{split}_annotations"))
    return split_stats(coco, sorted(coco.imgs), None, getattr(paths, f"{split}_images"), split=split, **kwargs)


def datasets(paths):
    train = build_coco_dataset(paths.train_images, paths.train_annotations, train=True, augment=AugmentConfig(), drop_empty=True)
    val = build_coco_dataset(paths.val_images, paths.val_annotations, train=False, augment=AugmentConfig(), drop_empty=False)
    return train, val


# ------------------------------------------------------------------------------- split statistics
def test_healthy_splits_are_alike(shapes):
    train, val = stats_of(shapes, "train"), stats_of(shapes, "val")
    assert (train.images, train.sampled, val.images, val.sampled) == (60, 60, 20, 20)
    assert train.median_size == val.median_size == (64.0, 64.0)
    coco = load_coco(shapes.train_annotations)
    assert train.instances == len(coco.anns) and sum(train.classes.values()) == train.instances
    assert list(train.classes) == ["circle", "square", "triangle"]
    assert 0.4 < train.brightness < 0.6 and abs(val.brightness - train.brightness) < 0.03
    assert 0.9 < val.contrast / train.contrast < 1.1
    assert compare_splits(train, val) == []
    assert re.fullmatch(r"train: 60 images \(median 64x64 px\), \d\.\d\d objects per image, classes \w+ \d+%, \w+ \d+%, \w+ \d+%; "
                        r"pixel mean 0\.\d\d \(R 0\.\d\d G 0\.\d\d B 0\.\d\d\), std 0\.\d\d \(60 images decoded in \d\.\d\d s\)",
                        train.summary())


def test_pixels_are_sampled_with_a_seed(shapes):
    a, b = stats_of(shapes, "train", sample=10), stats_of(shapes, "train", sample=10)
    assert a.sampled == 10 and a.mean == b.mean and a.std == b.std
    assert stats_of(shapes, "train", sample=10, seed=1).mean != a.mean
    assert stats_of(shapes, "train", sample=0).mean is None


@pytest.mark.parametrize("strength", [0.35, 0.5])
def test_darkened_validation_images_are_named(shapes, tmp_path, strength):
    planted = fault_bank.plant(shapes, tmp_path / "dark", fault_bank.Fault("dark_val", strength, split="val", images=True))
    train, val = stats_of(planted, "train"), stats_of(planted, "val")
    assert val.brightness == pytest.approx(strength * train.brightness, rel=0.1)
    findings = compare_splits(train, val)
    assert [(f.kind, f.subject, f.components, f.severity, f.section) for f in findings] == [
        ("val_unlike_train", "pixel mean", (), "warning", "validation-unlike-training")]
    text = findings[0].text()
    assert text.startswith(f"validation images are much darker than training: mean pixel {val.brightness:.2f} vs {train.brightness:.2f} "
                           f"(per channel R {val.mean[0]:.2f} G {val.mean[1]:.2f} B {val.mean[2]:.2f} vs R {train.mean[0]:.2f}")
    # The std scaled alike: said in the same finding, not a second one.
    assert f"pixel std {val.contrast:.2f} vs {train.contrast:.2f} too: the values look scaled by" in text
    assert "20 validation and 60 training images sampled" in text
    assert findings[0].evidence["val_mean"] == list(val.mean)


def split(name, images=100, instances=250, size=(640.0, 480.0), classes=None, mean=(0.5,) * 3, std=(0.2,) * 3):
    classes = classes or {"a": instances // 2, "b": instances - instances // 2}
    return SplitStats(name, images, instances, size, classes, sampled=images, mean=mean, std=std)


def test_each_difference_is_named_with_both_numbers():
    train = split("train", images=1000, instances=2500, classes={"a": 1200, "b": 1200, "c": 100})
    assert compare_splits(train, split("val", classes={"a": 120, "b": 120, "c": 10})) == []
    val = split("val", instances=600, size=(1280.0, 960.0), classes={"a": 150, "b": 150, "c": 300},
                mean=(0.5, 0.5, 0.8), std=(0.4,) * 3)
    found = {f.subject: f.message for f in compare_splits(train, val)}
    assert set(found) == {"pixel colour", "pixel std", "image size", "objects per image", "class shares"}
    assert "another colour balance than training: mean pixel per channel R 0.50 G 0.50 B 0.80 vs R 0.50 G 0.50 B 0.50 (channel B off" in found["pixel colour"]
    assert "much higher contrast than training: pixel std 0.40 vs 0.20 (x2.00" in found["pixel std"]
    assert found["image size"].startswith("validation images are larger than training: median 1280x960 vs 640x480 px (x2.0)")
    assert found["objects per image"].startswith("validation images hold many more objects than training: 6.00 vs 2.50 per image")
    assert found["class shares"] == ("class shares differ between the splits: c 50.0% of validation instances vs 4.0% of "
                                     "training (x12.5)")


def test_too_few_images_are_not_compared():
    val = split("val", images=19, instances=200, mean=(0.1,) * 3)
    assert compare_splits(split("train"), val) == []
    val.images = val.sampled = 20
    assert {f.subject for f in compare_splits(split("train"), val)} == {"pixel mean", "objects per image"}
    val.sampled = 19
    assert {f.subject for f in compare_splits(split("train"), val)} == {"objects per image"}


def test_thresholds_and_too_few_instances():
    train = split("train", classes={"a": 240, "b": 10})
    # 'b': 4 % of training, 0 of 250 validation instances: 10 expected, too few to judge.
    assert compare_splits(train, split("val", classes={"a": 250, "b": 0})) == []
    # Just inside every threshold.
    val = split("val", images=100, instances=499, size=(950.0, 700.0), mean=(0.64,) * 3, std=(0.125,) * 3,
                classes={"a": 479, "b": 20})
    assert compare_splits(split("train", classes={"a": 240, "b": 10}), val) == []


# ---------------------------------------------------------------------------- masks off their boxes
def test_healthy_shapes_give_no_mask_box_finding(shapes):
    train, val = datasets(shapes)
    agreement = dataset_mask_box(train)
    assert agreement.source == "instances_train.json" and agreement.measured == len(train.usable_ann_ids)
    assert agreement.below == {0.8: 0, 0.7: 0} and mask_box_finding(agreement) is None
    audit = audit_data(train, val)
    assert audit.findings == [] and audit.agreement.measured == agreement.measured
    lines = audit.format().splitlines()
    assert lines[0].startswith("Data at start (") and lines[1].startswith("  train: 60 images") and lines[2].startswith("  val: 20 images")
    assert lines[3] == f"  train masks on their boxes: {agreement.measured} annotations, 0 below 0.8 and 0 below 0.7 (box/mask-box IoU)"


def enlarge_boxes(coco, strength, rng):
    """Boxes ``1 + strength`` times as wide and high around their centre (masks untouched)."""
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x - strength * w / 2, y - strength * h / 2, w * (1 + strength), h * (1 + strength)]


@pytest.mark.parametrize(("plant", "components"), [(fault_bank.shift_masks, ("loss_mask",)), (enlarge_boxes, ("loss_box_reg",))])
def test_mask_box_finding_names_the_component_and_the_ids(shapes, tmp_path, plant, components):
    planted = fault_bank.plant(shapes, tmp_path / "planted", fault_bank.Fault("planted", 0.6, plant=plant))
    train, val = datasets(planted)
    audit = audit_data(train, val, train_source=str(planted.train_annotations))
    [finding] = audit.findings
    agreement = audit.agreement
    assert (finding.kind, finding.components, finding.section, finding.epoch) == ("mask_box_disagree", components, "data-disagrees-with-itself", 0)
    assert finding.config_key == "the training annotations (python scripts/check_dataset.py)"
    assert agreement.share_bad > 0.9 and finding.evidence["share_bad"] == agreement.share_bad
    worst = agreement.worst[0]
    assert finding.image_ids[0] == worst.image_id
    assert finding.evidence["worst"][0] == [worst.image_id, worst.annotation_id, None, worst.iou]
    anns = json.loads(planted.train_annotations.read_text())["annotations"]
    assert any(a["id"] == worst.annotation_id and a["image_id"] == worst.image_id for a in anns)
    text = finding.text()
    assert text.startswith(f"{planted.train_annotations}: masks that do not lie on their boxes: {agreement.bad} of {agreement.measured} annotations")
    assert f"worst, IoU: image {worst.image_id} ann {worst.annotation_id}: {worst.iou:.2f}" in text
    assert "Likely cause: masks or boxes shifted or scaled by the exporter" in text


def test_audit_start_logs_and_returns_the_data_findings(shapes, tmp_path, monkeypatch, caplog):
    planted = fault_bank.plant(shapes, tmp_path / "planted", fault_bank.Fault("masks_off", 0.6, plant=fault_bank.shift_masks))
    fault_bank.darken_images(planted.val_images, json.loads(planted.val_annotations.read_text()), 0.5)
    train, val = datasets(planted)
    report = SimpleNamespace(format=lambda: "audit table", warnings=[])
    monkeypatch.setattr(experiment, "audit_run", lambda *args, **kwargs: report)
    cfg = OmegaConf.create({"diagnostics": {"enabled": True, "ignore": []}, "model": {"arch": "small"},
                            "scheduler": {"warmup_iters": 100},
                            "data": {"train_annotations": str(planted.train_annotations), "batch_size": 4}})
    parts = SimpleNamespace(loss_weights={}, data=SimpleNamespace(train_loader=SimpleNamespace(dataset=train),
                                                                  val_loader=SimpleNamespace(dataset=val)))
    with caplog.at_level(logging.INFO, logger=experiment.log.name):
        findings = experiment.audit_start(cfg, None, None, parts)
    assert [f.kind for f in findings] == ["mask_box_disagree", "val_unlike_train"]
    ours = [r for r in caplog.records if r.name == experiment.log.name]
    warnings = [r.getMessage() for r in ours if r.levelno == logging.WARNING]
    assert warnings == [f.text() for f in findings]
    assert warnings[0].startswith(f"{planted.train_annotations}: masks that do not lie on their boxes")
    assert warnings[1].startswith("validation images are much darker than training")
    info = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    assert any(m.startswith("Data at start (") and "\n  train: 60 images" in m and "\n  val: 20 images" in m for m in info)
    cfg.diagnostics.enabled = False
    assert experiment.audit_start(cfg, None, None, parts) == []


def test_mask_box_finding_names_both_components_when_both_kinds_are_common(shapes):
    coco = json.loads(shapes.train_annotations.read_text())
    half = copy.deepcopy(coco)
    n = len(half["annotations"]) // 2
    enlarge_boxes({"annotations": half["annotations"][:n]}, 0.6, None)
    fault_bank.shift_masks({"annotations": half["annotations"][n:]}, 0.6, np.random.default_rng(0))
    planted = COCO()
    planted.dataset = half
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints
        planted.createIndex()
    agreement = mask_box_agreement(planted)
    assert agreement.masks_off >= 0.25 * agreement.bad and agreement.boxes_loose >= 0.25 * agreement.bad
    assert set(mask_box_finding(agreement).components) == {"loss_mask", "loss_box_reg"}
