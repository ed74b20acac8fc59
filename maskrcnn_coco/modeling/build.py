"""Mask R-CNN builders: torchvision's ResNet-50 FPN models and a small CPU-sized preset.

Weights come from a torchvision weights name (``DEFAULT``, ``COCO_V1``, ...) or a local file
(``maskrcnn_coco.modeling.weights``). Every model's RoI heads leave box-only instances (all-zero
masks) out of the mask loss (``maskrcnn_coco.modeling.mask_loss``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from maskrcnn_coco.config import ModelConfig, SmallModelConfig
from maskrcnn_coco.modeling.mask_loss import use_masked_mask_loss
from maskrcnn_coco.modeling.roi_align import use_roi_align
from maskrcnn_coco.modeling.weights import (
    backbone_state_dict,
    download,
    enum_member,
    is_local_path,
    load_backbone_body,
    load_model_weights,
    replace_predictors,
)
from maskrcnn_coco.utils.errors import ConfigError

log = logging.getLogger(__name__)

TORCHVISION_ARCHS: dict[str, tuple[Callable[..., MaskRCNN], Any, Any]] = {
    "maskrcnn_r50_fpn": (
        torchvision.models.detection.maskrcnn_resnet50_fpn,
        torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights,
        torchvision.models.ResNet50_Weights,
    ),
    "maskrcnn_r50_fpn_v2": (
        torchvision.models.detection.maskrcnn_resnet50_fpn_v2,
        torchvision.models.detection.MaskRCNN_ResNet50_FPN_V2_Weights,
        torchvision.models.ResNet50_Weights,
    ),
}
SMALL_BACKBONES: dict[str, Any] = {
    "resnet18": torchvision.models.ResNet18_Weights,
    "resnet34": torchvision.models.ResNet34_Weights,
    "resnet50": torchvision.models.ResNet50_Weights,
}
def build_model(cfg: ModelConfig, num_classes: int) -> MaskRCNN:
    """Build the Mask R-CNN named by ``cfg.arch`` for ``num_classes`` (background included)."""
    if cfg.arch == "small":
        if cfg.weights is not None and not is_local_path(cfg.weights):
            raise ConfigError(
                f"model.weights={cfg.weights!r}: torchvision has no weights for the small preset; pass a local "
                "file (e.g. runs/maskrcnn/<run>/checkpoints/last.pth), or model.backbone_weights=DEFAULT for ImageNet ResNet weights"
            )
        model = _build_small(cfg, num_classes)  # type: ignore[arg-type]
    elif cfg.arch in TORCHVISION_ARCHS:
        model = _build_torchvision(cfg, num_classes)
    else:
        known = ", ".join(["small", *TORCHVISION_ARCHS])
        raise ConfigError(f"Unknown model.arch={cfg.arch!r}; choose one of: {known}")
    if cfg.weights is not None and is_local_path(cfg.weights):
        load_model_weights(model, cfg.weights, num_classes)
    use_roi_align(model, cfg.roi_align)
    use_masked_mask_loss(model)  # box-only instances (all-zero masks) do not train the mask head
    return model


# ------------------------------------------------------------------------------ small preset
def _build_small(cfg: SmallModelConfig, num_classes: int) -> MaskRCNN:
    if cfg.backbone not in SMALL_BACKBONES:
        raise ConfigError(f"model.backbone={cfg.backbone!r} is not one of {sorted(SMALL_BACKBONES)}")
    levels = len(cfg.returned_layers) + 1  # + the max-pool level
    if len(cfg.anchor_sizes) != levels:
        raise ConfigError(
            f"model.anchor_sizes has {len(cfg.anchor_sizes)} sizes but the FPN has {levels} levels "
            f"(returned_layers={list(cfg.returned_layers)} + max-pool): give one size per level"
        )
    if cfg.norm not in ("batchnorm", "frozen"):
        raise ConfigError(f"model.norm={cfg.norm!r}: use 'batchnorm' or 'frozen'")

    norm_layer = nn.BatchNorm2d if cfg.norm == "batchnorm" else FrozenBatchNorm2d
    body = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=norm_layer)
    if cfg.backbone_weights is not None:
        state = backbone_state_dict(cfg.backbone_weights, SMALL_BACKBONES[cfg.backbone], cfg.backbone)
        load_backbone_body(body, state, cfg.backbone_weights)
    _freeze_stages(body, cfg.trainable_backbone_layers if cfg.trainable_backbone_layers is not None else 5)

    stage2_channels = body.inplanes // 8  # channels of layer1 (64 for resnet18/34, 256 for 50)
    in_channels = [stage2_channels * 2 ** (i - 1) for i in cfg.returned_layers]
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(cfg.returned_layers)},
        in_channels_list=in_channels,
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    featmaps = [str(i) for i in range(len(cfg.returned_layers))]
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in cfg.anchor_sizes),
        aspect_ratios=(tuple(cfg.aspect_ratios),) * levels,
    )
    mask_dims = list(cfg.mask_head_layers)
    return MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(featmaps, output_size=7, sampling_ratio=cfg.roi_sampling_ratio),
        box_head=TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(featmaps, output_size=14, sampling_ratio=cfg.roi_sampling_ratio),
        mask_head=MaskRCNNHeads(cfg.fpn_channels, mask_dims, dilation=1),
        mask_predictor=_mask_predictor(mask_dims[-1], cfg.mask_predictor_dim, num_classes),
        **_common_kwargs(cfg),
    )


def _mask_predictor(in_channels: int, dim: int, num_classes: int) -> MaskRCNNPredictor:
    """torchvision's predictor with detectron2's init of the logits layer (normal, std 0.001; bias 0).

    torchvision's Kaiming init gives mask logits of several units at the start, so a fresh model's
    loss_mask is ~3.6, far above chance (ln 2 = 0.69): a probe at init then cannot tell a fault
    from a healthy model. With small logits loss_mask starts at ln 2.
    """
    predictor = MaskRCNNPredictor(in_channels, dim, num_classes)
    nn.init.normal_(predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(predictor.mask_fcn_logits.bias)
    return predictor


def _common_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "min_size": cfg.min_size,
        "max_size": cfg.max_size,
        "rpn_pre_nms_top_n_train": cfg.rpn_pre_nms_top_n_train,
        "rpn_post_nms_top_n_train": cfg.rpn_post_nms_top_n_train,
        "rpn_pre_nms_top_n_test": cfg.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": cfg.rpn_post_nms_top_n_test,
        "rpn_batch_size_per_image": cfg.rpn_batch_size_per_image,
        "box_batch_size_per_image": cfg.box_batch_size_per_image,
        "box_positive_fraction": cfg.box_positive_fraction,
        "box_detections_per_img": cfg.box_detections_per_img,
        "box_score_thresh": cfg.box_score_thresh,
    }


# -------------------------------------------------------------------------- torchvision R-50
def _build_torchvision(cfg: ModelConfig, num_classes: int) -> MaskRCNN:
    builder, weights_enum, backbone_enum = TORCHVISION_ARCHS[cfg.arch]
    named = cfg.weights is not None and not is_local_path(cfg.weights)
    named_backbone = not named and cfg.backbone_weights is not None and not is_local_path(cfg.backbone_weights)
    kwargs = _common_kwargs(cfg)
    if named:
        weights = enum_member(weights_enum, cfg.weights, "model.weights")
        model = download(
            lambda: builder(weights=weights, trainable_backbone_layers=cfg.trainable_backbone_layers, **kwargs),
            f"{cfg.arch} weights {cfg.weights!r}",
        )
        replace_predictors(model, num_classes, source=f"torchvision {weights_enum.__name__}.{weights.name}")
        return model
    if named_backbone:
        bb = enum_member(backbone_enum, cfg.backbone_weights, "model.backbone_weights")
        return download(
            lambda: builder(
                weights_backbone=bb,
                num_classes=num_classes,
                trainable_backbone_layers=cfg.trainable_backbone_layers,
                **kwargs,
            ),
            f"backbone weights {cfg.backbone_weights!r}",
        )

    model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    pretrained = cfg.weights is not None or cfg.backbone_weights is not None
    if pretrained and cfg.arch == "maskrcnn_r50_fpn":
        # torchvision freezes BatchNorm whenever it loads weights into the v1 model; do the same for
        # local files so a fine-tune behaves identically to the named-weights path.
        model.backbone.body = _to_frozen_bn(model.backbone.body)
    if cfg.backbone_weights is not None:
        state = backbone_state_dict(cfg.backbone_weights, backbone_enum, "resnet50")
        load_backbone_body(model.backbone.body, state, cfg.backbone_weights)
    default_layers = 3 if pretrained else 5
    layers = cfg.trainable_backbone_layers if cfg.trainable_backbone_layers is not None else default_layers
    _freeze_stages(model.backbone.body, layers)
    return model


def _freeze_stages(body: nn.Module, trainable_layers: int) -> None:
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"model.trainable_backbone_layers must be in 0..5, got {trainable_layers}")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, param in body.named_parameters():
        if not any(name.startswith(layer) for layer in trainable):
            param.requires_grad_(False)


def _to_frozen_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` with a FrozenBatchNorm2d holding its statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(module, name).detach())
        return frozen
    for name, child in module.named_children():
        setattr(module, name, _to_frozen_bn(child))
    return module
