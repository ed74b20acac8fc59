import logging

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn_coco.config import ModelConfig
from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.modeling.weights import WeightsError, read_state_dict
from maskrcnn_coco.utils.errors import ConfigError

from conftest import tiny_model_cfg


def r50_cfg(**kw):
    return OmegaConf.structured(ModelConfig(arch="maskrcnn_r50_fpn", min_size=64, max_size=64, **kw))


def test_small_model_trains_and_predicts_for_the_datasets_classes():
    model = build_model(tiny_model_cfg(), num_classes=5)
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 5
    model.train()
    images = [torch.rand(3, 64, 64)]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:30] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10, 30, 40]]), "labels": torch.tensor([2]), "masks": masks}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    model.eval()
    (out,) = model(images)
    assert set(out) == {"boxes", "labels", "scores", "masks"}


def test_the_roi_sampler_takes_the_configured_size_and_positive_share():
    sampler = build_model(tiny_model_cfg(box_batch_size_per_image=96, box_positive_fraction=0.125), 3).roi_heads.fg_bg_sampler
    assert (sampler.batch_size_per_image, sampler.positive_fraction) == (96, 0.125)
    r50 = build_model(r50_cfg(), 3).roi_heads.fg_bg_sampler
    assert (r50.batch_size_per_image, r50.positive_fraction) == (512, 0.25)  # torchvision's defaults


def test_bad_small_model_configs_are_named():
    with pytest.raises(ConfigError, match="anchor_sizes has 2 sizes but the FPN has 3 levels"):
        build_model(tiny_model_cfg(anchor_sizes=[16, 32]), 3)
    with pytest.raises(ConfigError, match="torchvision has no weights for the small preset"):
        build_model(tiny_model_cfg(weights="DEFAULT"), 3)
    with pytest.raises(ConfigError, match=r"Unknown model\.arch='resnet'"):
        build_model(OmegaConf.structured(ModelConfig(arch="resnet")), 3)


def test_local_weights_for_another_class_count_replace_the_predictors(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="maskrcnn_coco")
    source = build_model(tiny_model_cfg(), num_classes=91)
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    model = build_model(tiny_model_cfg(weights=str(tmp_path / "ckpt.pth")), num_classes=4)
    assert "Replaced box and mask predictors: ckpt.pth was trained for 91 classes, the dataset has 4" in caplog.text
    assert torch.equal(model.backbone.body.conv1.weight, source.backbone.body.conv1.weight)
    assert torch.equal(model.roi_heads.box_head.fc6.weight, source.roi_heads.box_head.fc6.weight)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4

    same = build_model(tiny_model_cfg(weights=str(tmp_path / "ckpt.pth")), num_classes=91)
    assert torch.equal(same.roi_heads.box_predictor.cls_score.weight, source.roi_heads.box_predictor.cls_score.weight)


def test_weights_that_do_not_fit_fail_clearly(tmp_path):
    torch.save(build_model(tiny_model_cfg(fpn_channels=8), 4).state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="does not fit this model architecture"):
        build_model(tiny_model_cfg(weights=str(tmp_path / "other.pth")), 4)
    torch.save({"not": "weights"}, tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match="Weights file not found"):
        read_state_dict(tmp_path / "missing.pth")


def test_local_backbone_weights_load_into_the_body(tmp_path):
    import torchvision

    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = build_model(tiny_model_cfg(backbone_weights=str(tmp_path / "resnet18.pth")), 4)
    assert torch.equal(model.backbone.body.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)


def test_r50_builds_and_freezes_batchnorm_for_local_weights(tmp_path):
    plain = build_model(r50_cfg(), 4)
    assert all(p.requires_grad for p in plain.backbone.body.parameters())
    torch.save(plain.state_dict(), tmp_path / "r50.pth")
    tuned = build_model(r50_cfg(weights=str(tmp_path / "r50.pth")), 4)
    assert isinstance(tuned.backbone.body.bn1, FrozenBatchNorm2d)
    # torchvision's fine-tuning default: 3 trainable stages, conv1 and layer1 frozen.
    assert not tuned.backbone.body.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in tuned.backbone.body.layer1.parameters())
    assert all(p.requires_grad for p in tuned.backbone.body.layer2.parameters())
    assert torch.equal(tuned.backbone.body.layer2[0].conv1.weight, plain.backbone.body.layer2[0].conv1.weight)


def test_named_torchvision_weights_replace_predictors(monkeypatch, caplog):
    """The named-weights path, with the download replaced by a COCO-shaped (91-class) state dict."""
    import torchvision

    coco_model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda *a, **k: coco_model.state_dict())
    caplog.set_level(logging.INFO, logger="maskrcnn_coco")
    model = build_model(r50_cfg(weights="DEFAULT"), num_classes=3)
    out = caplog.text
    assert "Replaced box and mask predictors: torchvision MaskRCNN_ResNet50_FPN_Weights.COCO_V1 has 91 classes" in out
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert torch.equal(model.backbone.body.layer4[0].conv1.weight, coco_model.backbone.body.layer4[0].conv1.weight)


def test_named_weights_without_network_give_a_clear_error(monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"Could not fetch maskrcnn_r50_fpn weights 'DEFAULT'.*pass its path instead"):
        build_model(r50_cfg(weights="DEFAULT"), 3)
    with pytest.raises(WeightsError, match="'COCO_V9' is neither a local file nor a MaskRCNN_ResNet50_FPN_Weights name"):
        build_model(r50_cfg(weights="COCO_V9"), 3)


def test_fresh_small_model_starts_loss_mask_at_chance(tiny_data):
    """detectron2's init of the mask logits: a fresh model's loss_mask is ln 2, not ~3.6 (Kaiming)."""
    import math

    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(), tiny_data.mapping.num_classes)
    assert float(model.roi_heads.mask_predictor.mask_fcn_logits.weight.detach().std()) < 0.002
    model.train()
    images, targets = next(iter(tiny_data.train_loader))
    with torch.no_grad():
        losses = model(images, targets)
    assert float(losses["loss_mask"]) == pytest.approx(math.log(2), abs=0.01)
