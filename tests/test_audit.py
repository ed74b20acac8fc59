"""The start-of-run audit: what trains each loss component, and whether the anchors fit the objects."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator

from maskrcnn_coco.analysis.audit import (
    LOSS_MODULES,
    anchor_fit,
    anchor_shapes,
    anchor_warning,
    audit_run,
    best_centred_iou,
    object_sizes,
)
from maskrcnn_coco.config import DiagnosticsConfig
from maskrcnn_coco.data.coco import build_data
from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.solver.param_groups import get_parameter_groups

from conftest import tiny_data_cfg, tiny_model_cfg

WEIGHTS = dict.fromkeys(["loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"], 1.0)
HEADS_SPLIT = {
    "backbone": {"prefixes": ["backbone"], "lr_mult": 1.0},
    "rpn": {"prefixes": ["rpn"], "lr_mult": 1.0},
    "heads": {"prefixes": ["roi_heads.box_head", "roi_heads.mask_head", "roi_heads.mask_predictor"], "lr_mult": 1.0},
    "box_pred": {"prefixes": ["roi_heads.box_predictor"], "lr_mult": 0.0},
}


def sgd(model, **kwargs):
    return torch.optim.SGD(get_parameter_groups(model, lr=0.02, **kwargs), lr=0.02, momentum=0.9)


def summary(report):
    return sorted((w.kind, w.subject, w.components) for w in report.warnings)


def test_every_loss_producer_with_its_parameters_lr_and_weights(tiny_model, tiny_data):
    optimizer = sgd(tiny_model, head_lr_multiplier=10.0, no_weight_decay_norm_bias=True)
    # The warmup factor a scheduler applies at construction must not read as the lr.
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.001)
    report = audit_run(tiny_model, optimizer, {**WEIGHTS, "loss_mask": 2.0}, train_dataset=tiny_data.train_loader.dataset)
    rows = {r.module: r for r in report.producers}
    assert list(rows) == list(LOSS_MODULES)
    for name, row in rows.items():
        module = tiny_model.get_submodule(name)
        assert row.trainable == row.parameters == sum(p.numel() for p in module.parameters())
        assert row.lr == pytest.approx(0.02 if name == "rpn.head" else 0.2)
    assert rows["rpn.head"].components == ("loss_objectness", "loss_rpn_box_reg")
    assert rows["roi_heads.box_predictor"].components == ("loss_classifier", "loss_box_reg")
    assert rows["roi_heads.mask_head"].weights == {"loss_mask": 2.0}
    assert report.warnings == []
    text = report.format()
    assert "Loss audit:" in text and "roi_heads.mask_predictor" in text and "Anchor fit:" in text


def test_a_box_predictor_at_lr_mult_0_is_named_with_its_key(tiny_model):
    report = audit_run(tiny_model, sgd(tiny_model, groups=HEADS_SPLIT), WEIGHTS)
    assert summary(report) == [("frozen_producer", "roi_heads.box_predictor", ("loss_classifier", "loss_box_reg"))]
    assert report.warnings[0].config_key == "optimizer.groups.box_pred.lr_mult"
    assert "(see docs/LOSS_BREAKDOWN.md#frozen-producer)" in report.warnings[0].text()


def test_a_frozen_rpn_group(tiny_model):
    groups = {"backbone": {"prefixes": ["backbone"]}, "rpn": {"prefixes": ["rpn"], "lr_mult": 0.0}, "heads": {"prefixes": ["roi_heads"]}}
    report = audit_run(tiny_model, sgd(tiny_model, groups=groups), WEIGHTS)
    assert summary(report) == [("frozen_producer", "rpn.head", ("loss_objectness", "loss_rpn_box_reg"))]
    assert report.warnings[0].config_key == "optimizer.groups.rpn.lr_mult"


def test_a_far_too_low_head_multiplier_leaves_the_heads_practically_frozen(tiny_model):
    report = audit_run(tiny_model, sgd(tiny_model, head_lr_multiplier=0.001), WEIGHTS)
    assert {w.kind for w in report.warnings} == {"slow_producer"}
    assert {w.subject for w in report.warnings} == {m for m in LOSS_MODULES if m.startswith("roi_heads")}
    assert {c for w in report.warnings for c in w.components} == {"loss_classifier", "loss_box_reg", "loss_mask"}
    assert {w.config_key for w in report.warnings} == {"optimizer.head_lr_multiplier"}
    assert "1000x below" in report.warnings[0].text()
    # 0.1 is a deliberate choice, not a frozen head.
    assert audit_run(tiny_model, sgd(tiny_model, head_lr_multiplier=0.1), WEIGHTS).warnings == []


def test_parameters_frozen_in_code(tiny_model):
    for p in tiny_model.roi_heads.mask_predictor.parameters():
        p.requires_grad_(False)
    report = audit_run(tiny_model, sgd(tiny_model), WEIGHTS)
    assert summary(report) == [("frozen_producer", "roi_heads.mask_predictor", ("loss_mask",))]
    assert "requires_grad" in report.warnings[0].config_key


def test_a_zero_weight_is_named_and_its_producers_are_not(tiny_model):
    report = audit_run(tiny_model, sgd(tiny_model, head_lr_multiplier=0.0), {**WEIGHTS, "loss_mask": 0.0})
    kinds = summary(report)
    assert ("zero_weight", None, ("loss_mask",)) in kinds
    # The heads at lr 0 are reported for the weighted components only.
    assert {c for k, _, comps in kinds if k == "frozen_producer" for c in comps} == {"loss_classifier", "loss_box_reg"}
    zero = next(w for w in report.warnings if w.kind == "zero_weight")
    assert zero.config_key == "loss.weights.loss_mask" and "not optimised" in zero.text()


# ------------------------------------------------------------------------------------ anchor fit
def test_centred_iou_and_anchor_shapes_match_torchvision():
    boxes = np.array([[32.0, 32.0], [16.0, 16.0], [20.0, 40.0]])
    assert best_centred_iou(boxes[:2], np.array([[32.0, 32.0]])).tolist() == [1.0, 0.25]
    # ratio = height / width: a 2:1 tall box fits the ratio-2 anchor of the same area exactly.
    assert best_centred_iou(boxes[2:], anchor_shapes([[math.sqrt(800)]], [[0.5, 1.0, 2.0]]))[0] == pytest.approx(1.0)
    gen = AnchorGenerator(sizes=((24,), (48,)), aspect_ratios=((0.5, 1.0, 2.0),) * 2)
    template = torch.cat([gen.generate_anchors(s, r) for s, r in zip(gen.sizes, gen.aspect_ratios)])
    wh = (template[:, 2:] - template[:, :2]).numpy()
    assert np.allclose(sorted(map(tuple, wh)), sorted(map(tuple, anchor_shapes(gen.sizes, gen.aspect_ratios))), atol=1.0)


def test_object_sizes_scale_like_the_model_transform():
    coco = SimpleNamespace(
        imgs={1: {"id": 1, "height": 100, "width": 200}, 2: {"id": 2, "height": 50, "width": 50}},
        anns={1: {"id": 1, "image_id": 1, "bbox": [0, 0, 10, 20], "iscrowd": 0},
              2: {"id": 2, "image_id": 1, "bbox": [0, 0, 10, 20], "iscrowd": 1},
              3: {"id": 3, "image_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 0}},
    )
    # Image 1: min(50/100, 80/200) = 0.4; image 2: min(50/50, 80/50) = 1; the crowd box is left out.
    sizes = object_sizes(coco, min_size=50, max_size=80)
    assert sizes.tolist() == [[4.0, 8.0], [5.0, 5.0]]
    assert object_sizes(coco, ann_ids=[3], min_size=50, max_size=80).tolist() == [[5.0, 5.0]]


def shapes_dataset(**overrides):
    return build_data(tiny_data_cfg(**overrides), seed=0, progress=False).train_loader.dataset


def test_the_default_preset_fits_the_shapes_and_far_too_small_anchors_do_not():
    """128 px shapes with the small preset's 24-192 px anchors: no warning (README: 16 px anchors
    found no positive on level 0; 2-8 px anchors cannot reach the positive IoU at all)."""
    dataset = shapes_dataset(num_train=60, image_size=128)
    config = DiagnosticsConfig()

    def check(sizes):
        model = build_model(tiny_model_cfg(returned_layers=[2, 3, 4], anchor_sizes=sizes, min_size=128, max_size=128), 4)
        return audit_run(model, sgd(model), WEIGHTS, train_dataset=dataset, config=config, arch="small", has_anchor_key=True)

    healthy = check([24, 48, 96, 192])
    assert healthy.warnings == [] and healthy.anchor_fit.unreachable_share < config.anchor_unreachable_share
    assert healthy.anchor_fit.best_iou_median > 0.7
    assert check([16, 32, 64, 128]).warnings  # the README's first preset: level 0 got no positive anchor
    bad = check([2, 4, 8, 16])
    assert summary(bad) == [("anchor_fit", "rpn.anchor_generator", ("loss_objectness", "loss_rpn_box_reg"))]
    fit = bad.anchor_fit
    assert fit.unreachable_share == 1.0 and fit.best_iou_median < 0.3
    assert fit.suggested_sizes[0] >= 10 and len(fit.suggested_sizes) == 4
    key = bad.warnings[0].config_key
    assert key.startswith(f"model.anchor_sizes=[{','.join(map(str, fit.suggested_sizes))}]")


def test_the_r50_presets_are_told_they_need_a_custom_anchor_generator():
    boxes = np.full((50, 2), 8.0)
    fit = anchor_fit(boxes, ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5, 0.7)
    warning = anchor_warning(fit, DiagnosticsConfig(), "maskrcnn_r50_fpn", has_anchor_key=False)
    assert "custom anchor generator" in warning.config_key and "((32,), (64,), (128,), (256,), (512,))" in warning.config_key
    assert "model.min_size" in warning.config_key
