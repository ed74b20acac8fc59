"""The start-of-run audit: what trains each loss component, whether the anchors fit the objects, and
whether the optimizer's settings are in the usual ranges."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from maskrcnn_coco.analysis.audit import (
    FAR_FACTORS,
    LOSS_MODULES,
    USUAL_RANGES,
    anchor_fit,
    anchor_misfit,
    anchor_shapes,
    anchor_warning,
    audit_run,
    best_centred_iou,
    object_sizes,
    optimizer_audit,
    optimizer_settings,
)
from maskrcnn_coco.config import LOSS_COMPONENTS, DiagnosticsConfig, register_configs
from maskrcnn_coco.data.coco import build_data
from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.solver.param_groups import build_optimizer, get_parameter_groups

from conftest import REPO, tiny_data_cfg, tiny_model_cfg

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
    assert "Optimizer:" not in text  # no batch size given: no optimizer audit


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
    found no positive on level 0; 2-8 px anchors cannot reach the positive IoU at all). 100 images:
    255 objects, above diagnostics.anchor_min_objects."""
    dataset = shapes_dataset(num_train=100, image_size=128)
    config = DiagnosticsConfig()

    def check(sizes):
        model = build_model(tiny_model_cfg(returned_layers=[2, 3, 4], anchor_sizes=sizes, min_size=128, max_size=128), 4)
        return audit_run(model, sgd(model), WEIGHTS, train_dataset=dataset, config=config, arch="small", has_anchor_key=True)

    healthy = check([24, 48, 96, 192])
    assert healthy.warnings == [] and healthy.anchor_fit.unreachable_share < config.anchor_unreachable_share
    assert healthy.anchor_fit.best_iou_median > 0.7
    assert f"Anchor fit: on {healthy.anchor_fit.num_objects} training objects, size" in healthy.format()
    assert check([16, 32, 64, 128]).warnings  # the README's first preset: level 0 got no positive anchor
    bad = check([2, 4, 8, 16])
    assert summary(bad) == [("anchor_fit", "rpn.anchor_generator", ("loss_objectness", "loss_rpn_box_reg"))]
    fit = bad.anchor_fit
    assert fit.unreachable_share == 1.0 and fit.best_iou_median < 0.3
    assert fit.suggested_sizes[0] >= 10 and len(fit.suggested_sizes) == 4
    key = bad.warnings[0].config_key
    assert key.startswith(f"model.anchor_sizes=[{','.join(map(str, fit.suggested_sizes))}]")
    assert f"(judged on {fit.num_objects} training objects): 100% of them" in bad.warnings[0].message


def test_a_small_training_set_is_not_judged():
    """24 images of the shapes at the shipped anchors: 65 objects, 52 % of them below 0.7, which the rule
    alone calls a misfit; 100 and 400 images of the same objects (43-46 %) do not. The audit says so."""
    dataset = shapes_dataset(num_train=24, image_size=128)
    model = build_model(tiny_model_cfg(returned_layers=[2, 3, 4], anchor_sizes=[24, 48, 96, 192], min_size=128, max_size=128), 4)
    report = audit_run(model, sgd(model), WEIGHTS, train_dataset=dataset, arch="small", has_anchor_key=True)
    fit = report.anchor_fit
    assert fit.num_objects == 65 and anchor_misfit(fit, DiagnosticsConfig())  # the rule without a minimum
    assert report.warnings == []
    assert "Anchor fit: not judged (65 objects, fewer than diagnostics.anchor_min_objects=200)" in report.format()
    # The minimum is the config's.
    judged = audit_run(model, sgd(model), WEIGHTS, train_dataset=dataset, config=DiagnosticsConfig(anchor_min_objects=50),
                       arch="small", has_anchor_key=True)
    assert summary(judged) == [("anchor_fit", "rpn.anchor_generator", ("loss_objectness", "loss_rpn_box_reg"))]
    assert "judged on 65 training objects" in judged.warnings[0].message


@pytest.mark.parametrize("count, warns", [(199, False), (200, True)])
def test_the_anchor_warning_needs_anchor_min_objects(count, warns):
    fit = anchor_fit(np.full((count, 2), 8.0), ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5, 0.7)
    assert fit.unreachable_share == 1.0
    warning = anchor_warning(fit, DiagnosticsConfig(), "maskrcnn_r50_fpn", has_anchor_key=False)
    assert (warning is not None) == warns
    # anchor_misfit itself takes no minimum unless given one: the loss probe's call is unchanged.
    assert anchor_misfit(fit, DiagnosticsConfig())
    assert anchor_misfit(fit, DiagnosticsConfig(), min_objects=200) == warns


def test_the_r50_presets_are_told_they_need_a_custom_anchor_generator():
    boxes = np.full((300, 2), 8.0)
    fit = anchor_fit(boxes, ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5, 0.7)
    warning = anchor_warning(fit, DiagnosticsConfig(), "maskrcnn_r50_fpn", has_anchor_key=False)
    assert "custom anchor generator" in warning.config_key and "((32,), (64,), (128,), (256,), (512,))" in warning.config_key
    assert "model.min_size" in warning.config_key
    assert "(judged on 300 training objects): 100% of them cannot reach" in warning.message


# ------------------------------------------------------------------------------------- optimizer
def linear():
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def found(optimizer, batch_size=4, warmup_iters=100, world_size=1):
    return {f.subject: f for f in optimizer_audit(optimizer, batch_size=batch_size, world_size=world_size, warmup_iters=warmup_iters)}


def check_common(finding, subject, severity, key):
    assert (finding.kind, finding.subject, finding.severity) == ("optimizer_range", subject, severity)
    assert finding.components == LOSS_COMPONENTS and finding.epoch == 0 and finding.config_key == key
    assert finding.section == "optimizer-out-of-range" and "docs/LOSS_BREAKDOWN.md#optimizer-out-of-range" in finding.text()


def compose_config(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("choice", ["sgd", "adamw"])
def test_the_shipped_optimizers_are_within_the_usual_ranges(tiny_model, choice):
    cfg = compose_config(f"optimizer={choice}")
    optimizer = build_optimizer(cfg.optimizer, tiny_model, verbose=False)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.001)  # a warmup factor is not the lr
    assert any(pg["name"].endswith("_no_wd") and pg["weight_decay"] == 0 for pg in optimizer.param_groups)
    report = audit_run(tiny_model, optimizer, WEIGHTS, batch_size=cfg.data.batch_size, warmup_iters=cfg.scheduler.warmup_iters)
    assert report.warnings == []  # not even an info
    line = next(line for line in report.format().splitlines() if line.startswith("Optimizer:"))
    if choice == "sgd":
        assert line == "Optimizer: SGD lr 0.02 (batch 4), weight decay 1e-4, momentum 0.9, warmup 250 it: within the usual ranges"
    else:
        assert line == ("Optimizer: AdamW lr 1e-4 (batch 4), weight decay 0.05, betas (0.9, 0.999), warmup 250 it: "
                        "within the usual ranges")
    assert report.to_json()["optimizer"]["total_batch"] == 4


@pytest.mark.parametrize("choice", ["sgd", "adamw"])
def test_the_shipped_optimizers_on_coco_raise_no_warning(tiny_model, choice):
    """data=coco has batch 2: SGD's 0.02 is 8x the linear-scaling 0.0025 there (worth knowing, no fault)."""
    cfg = compose_config("data=coco", f"optimizer={choice}")
    optimizer = build_optimizer(cfg.optimizer, tiny_model, verbose=False)
    findings = optimizer_audit(optimizer, batch_size=cfg.data.batch_size, warmup_iters=cfg.scheduler.warmup_iters)
    assert [(f.subject, f.severity) for f in findings] == ([("lr", "info")] if choice == "sgd" else [])


def test_sgd_weight_decay_far_above_the_usual_is_a_warning_with_the_measured_runs():
    optimizer = torch.optim.SGD(linear().parameters(), lr=0.02, momentum=0.9, weight_decay=0.05)
    (finding,) = found(optimizer).values()
    check_common(finding, "weight_decay", "warning", "optimizer.weight_decay")
    assert "SGD weight decay 0.05 is far outside the usual range for SGD, 1e-5..1e-3, 500x the typical 1e-4" in finding.message
    assert "detectron2 and torchvision detection references: 1e-4" in finding.message
    assert "segm AP50 0.256 vs ~0.43" in finding.cause and "loss_mask at its chance value (0.667)" in finding.cause
    assert finding.evidence["value"] == 0.05 and finding.evidence["usual_range"] == [1e-5, 1e-3]


@pytest.mark.parametrize("wd, severity", [(0.2, "warning"), (1e-2, "warning"), (5e-3, "info"), (1e-3, None), (1e-5, None),
                                          (1e-6, "info"), (0.0, "info")])
def test_sgd_weight_decay_bands(wd, severity):
    finding = found(torch.optim.SGD(linear().parameters(), lr=0.02, momentum=0.9, weight_decay=wd)).get("weight_decay")
    assert (finding and finding.severity) == severity
    if wd == 0.0:
        assert "SGD weight decay 0 (no group decays) is outside" in finding.message and "weakens" in finding.cause


def test_groups_without_weight_decay_by_design_are_not_judged(tiny_model):
    """The *_no_wd groups (norm weights, biases) are at 0 on purpose; a group's own weight decay is judged."""
    groups = get_parameter_groups(tiny_model, lr=0.02, head_lr_multiplier=1.0, weight_decay=1e-4, no_weight_decay_norm_bias=True)
    assert found(torch.optim.SGD(groups, lr=0.02, momentum=0.9)) == {}
    heads = {"backbone": {"prefixes": ["backbone", "rpn"]}, "heads": {"prefixes": ["roi_heads"], "weight_decay": 0.05}}
    groups = get_parameter_groups(tiny_model, lr=0.02, weight_decay=1e-4, groups=heads, no_weight_decay_norm_bias=True)
    finding = found(torch.optim.SGD(groups, lr=0.02, momentum=0.9))["weight_decay"]
    assert finding.severity == "warning" and "weight decay 0.05 (groups at 1e-4/0.05)" in finding.message


def test_sgd_momentum():
    far = found(torch.optim.SGD(linear().parameters(), lr=0.02, momentum=0.999, weight_decay=1e-4))["momentum"]
    check_common(far, "momentum", "warning", "optimizer.factory.momentum")
    assert "SGD momentum 0.999 is far outside the usual range, 0.8..0.99 (typical 0.9" in far.message
    assert "1/(1-m) = 1000 steps" in far.cause
    none = found(torch.optim.SGD(linear().parameters(), lr=0.02, momentum=0.0, weight_decay=1e-4))["momentum"]
    assert none.severity == "info" and "SGD momentum 0 is outside the usual range" in none.message
    assert "momentum" not in found(torch.optim.SGD(linear().parameters(), lr=0.02, momentum=0.95, nesterov=True, weight_decay=1e-4))


@pytest.mark.parametrize("lr, batch, severity, times", [
    (0.02, 16, None, None), (0.02, 4, None, None),  # 4x the linear-scaling 0.005: the shipped preset
    (0.02, 2, "info", "8x"), (0.05, 4, "warning", "10x"), (0.2, 16, "warning", "10x"),
    (0.001, 16, "info", "1/20"), (1e-4, 16, "warning", "1/200"),
])
def test_sgd_lr_against_the_linear_scaling_rule(lr, batch, severity, times):
    finding = found(torch.optim.SGD(linear().parameters(), lr=lr, momentum=0.9, weight_decay=1e-4), batch_size=batch).get("lr")
    assert (finding and finding.severity) == severity
    if finding:
        check_common(finding, "lr", severity, "optimizer.lr")
        scaled = 0.02 * batch / 16
        assert f"at total batch {batch} is {times} the linear-scaling value {scaled:g}" in finding.message
        assert finding.evidence["usual_range"] == pytest.approx([scaled / 10, scaled * 5])


def test_the_lr_is_judged_on_the_total_batch_and_the_base_groups(tiny_model):
    # 8 processes x 2 images: lr 0.02 is the references' own setting.
    assert "lr" not in found(torch.optim.SGD(linear().parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4), batch_size=2, world_size=8)
    # A 30x head multiplier is the producer audit's business: lr is optimizer.lr, the backbone's.
    optimizer = torch.optim.SGD(get_parameter_groups(tiny_model, lr=0.02, head_lr_multiplier=30.0), lr=0.02, momentum=0.9)
    settings = optimizer_settings(optimizer, batch_size=4)
    assert (settings.lr, settings.largest_lr) == pytest.approx((0.02, 0.6))
    assert found(optimizer) == {}


def test_no_warmup_with_sgd_at_a_high_lr_is_worth_knowing():
    finding = found(torch.optim.SGD(linear().parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4), warmup_iters=0)["warmup"]
    check_common(finding, "warmup", "info", "scheduler.warmup_iters")
    assert "SGD at lr 0.02 starts without warmup (scheduler.warmup_iters=0)" in finding.message
    assert "warmup" not in found(torch.optim.SGD(linear().parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4), warmup_iters=0)
    # Unknown warmup (not given): nothing said.
    assert "warmup" not in found(torch.optim.SGD(linear().parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4), warmup_iters=None)


def test_adamw_faults():
    optimizer = torch.optim.AdamW(linear().parameters(), lr=1e-3, weight_decay=5.0, betas=(0.999, 0.5))
    findings = found(optimizer)
    assert set(findings) == {"lr", "weight_decay", "betas"}
    check_common(findings["weight_decay"], "weight_decay", "warning", "optimizer.weight_decay")
    assert "AdamW weight decay 5 is far outside the usual range for AdamW, 1e-4..0.2, 100x the typical 0.05" in findings["weight_decay"].message
    check_common(findings["betas"], "betas", "warning", "optimizer.factory.betas")
    assert ("AdamW betas (0.999, 0.5): beta1 0.999 far outside 0.8..0.95; beta2 0.5 far outside 0.95..0.9999"
            in findings["betas"].message)
    # lr 1e-3 at batch 4 is 20x the square-root-scaled 5e-5 (1e-4 per 16 images).
    check_common(findings["lr"], "lr", "warning", "optimizer.lr")
    assert "AdamW lr 1e-3 at total batch 4 is 20x the square-root-scaling value 5e-5" in findings["lr"].message
    mild = found(torch.optim.AdamW(linear().parameters(), lr=1e-4, weight_decay=0.05, betas=(0.99, 0.999)))
    assert {s: f.severity for s, f in mild.items()} == {"betas": "info"}
    assert "beta1 0.99 outside 0.8..0.95" in mild["betas"].message


def test_adam_weight_decay_is_l2():
    l2 = found(torch.optim.Adam(linear().parameters(), lr=1e-4, weight_decay=1e-4))["weight_decay"]
    check_common(l2, "weight_decay", "info", "optimizer.weight_decay")
    assert "Adam weight decay 1e-4 is within the usual range for Adam" in l2.message and "use AdamW" in l2.cause
    # AdamW's 0.05 given to Adam: far outside Adam's range, and the cause says why it differs.
    wrong = found(torch.optim.Adam(linear().parameters(), lr=1e-4, weight_decay=0.05))["weight_decay"]
    assert wrong.severity == "warning" and "Adam (not AdamW) adds weight_decay x weight to the gradient" in wrong.cause
    assert found(torch.optim.Adam(linear().parameters(), lr=1e-4)) == {}
    # Adam with decoupled decay is AdamW.
    assert found(torch.optim.Adam(linear().parameters(), lr=1e-4, weight_decay=0.05, decoupled_weight_decay=True)) == {}


def test_other_optimizers_have_no_usual_ranges(tiny_model):
    optimizer = torch.optim.RMSprop(tiny_model.parameters(), lr=0.5, weight_decay=0.5)
    assert found(optimizer) == {}
    line = audit_run(tiny_model, optimizer, WEIGHTS, batch_size=4).format().splitlines()[-1]
    assert line.startswith("Optimizer: RMSprop lr 0.5 (batch 4)") and "no usual ranges known for RMSprop" in line


def test_the_audit_line_lists_what_is_outside(tiny_model):
    optimizer = torch.optim.SGD(get_parameter_groups(tiny_model, lr=0.02, head_lr_multiplier=1.0, weight_decay=0.05,
                                                     no_weight_decay_norm_bias=True), lr=0.02, momentum=0.9)
    report = audit_run(tiny_model, optimizer, WEIGHTS, batch_size=2, world_size=2, warmup_iters=0)
    assert [(w.subject, w.severity) for w in report.warnings] == [("weight_decay", "warning"), ("warmup", "info")]
    line = next(line for line in report.format().splitlines() if line.startswith("Optimizer:"))
    assert line == ("Optimizer: SGD lr 0.02 (total batch 4 = 2 x 2 processes), weight decay 0.05, momentum 0.9, warmup 0 it: "
                    "outside the usual ranges: weight decay 0.05 far outside 1e-5..1e-3; no warmup at lr 0.02")


def test_usual_ranges_are_ordered_and_cover_the_far_factors():
    for name, params in USUAL_RANGES.items():
        for param, (low, typical, high, source) in params.items():
            assert low <= typical <= high and source, (name, param)
            assert param in FAR_FACTORS
