"""One validation step: the losses and the detections of a batch from one pass through the
transform and the backbone.

torchvision's ``GeneralizedRCNN`` returns losses only in training mode and detections only in eval
mode, so the obvious validation loop runs the model twice per batch. Here the transform and the
backbone (most of the cost) run once; the RPN and the RoI heads then run in their loss setting and
in their inference setting on the same features (they choose by ``self.training``). BatchNorm stays
in eval mode throughout (``loss_mode``), so the losses are the same numbers as
``model(images, targets)`` under ``loss_mode``: the same ops in the same order, the same random
draws (the training-mode transform draws its resize choice from the global RNG, the samplers draw
after it), bit for bit (``tests/test_eval_step.py``).

The RPN head (the 3x3 conv over every FPN level: most of the RPN's time with R50-FPN) is also
computed once and its output given to both settings, when its layers behave alike in train and eval
mode (``MODE_FREE_LAYERS``; BatchNorm counts, being in eval mode in both).

The features can be shared only when the transform resizes alike in both modes: one ``min_size``
(a training-mode transform picks one of several at random) and no ``_skip_resize``. Otherwise, and
for any model that is not a ``GeneralizedRCNN`` (a wrapper, a test double), ``evaluate_batch``
runs the two passes.

``paste_masks=False`` leaves out the last step of torchvision's postprocess, ``paste_masks_in_image``
(every detection's 28x28 mask resized into an image-sized zero array: N x H x W floats per image,
gigabytes for a large image with many detections). The detections then carry each mask over its
box (``box_masks``) and the image's size (``image_size``), which ``coco_eval.box_mask_rles`` turns into
the same RLEs as the pasted masks. Only a ``GeneralizedRCNN`` can do this; any other model's
``model(images)`` is returned as it is.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.misc import Conv2dNormActivation

# Layers whose output does not depend on train/eval mode under ``loss_mode`` (BatchNorm is in eval
# mode there): a head made only of these gives the same output in both settings.
MODE_FREE_LAYERS = (
    RPNHead, Conv2dNormActivation, nn.Sequential, nn.ModuleList, nn.Conv2d, nn.ReLU, nn.Identity,
    nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, nn.GroupNorm,
)


@contextlib.contextmanager
def restored_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Whatever the body does to the train/eval modes of ``model``'s modules is undone afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def loss_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Train mode (torchvision returns losses only then) with every BatchNorm in eval mode, so
    running statistics do not move; the model's previous modes are restored afterwards."""
    with restored_modes(model):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        yield model


def shares_features(model: nn.Module) -> bool:
    """Whether ``evaluate_batch`` can run the transform and backbone once for losses and detections."""
    if not isinstance(model, GeneralizedRCNN):
        return False
    transform = model.transform
    return len(transform.min_size) == 1 and not getattr(transform, "_skip_resize", False)


def evaluate_batch(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    targets: Sequence[Mapping[str, Any]],
    *,
    losses: bool = True,
    detections: bool = True,
    paste_masks: bool = True,
    mark: Callable[[str], None] | None = None,
) -> tuple[dict[str, torch.Tensor] | None, list[dict[str, Any]] | None]:
    """``(loss_dict, detections)`` of one batch, without gradients; either is None when not asked
    for. The losses are ``model(images, targets)`` under ``loss_mode``, the detections
    ``model(images)`` in eval mode; with ``paste_masks=False`` their masks are not pasted into the
    image (module doc: ``box_masks`` and ``image_size`` instead of ``masks``). The model's modes are
    restored afterwards.

    ``mark(stage)``, when given, is called as each stage of the shared pass ends (``STAGES``;
    ``"rpn head"`` only when it is shared), so a benchmark can time them; the separate passes (one
    output asked for, or features that cannot be shared) mark ``"losses"`` and ``"detections"``."""
    mark = mark or _no_mark
    with torch.inference_mode(), restored_modes(model):
        if losses and detections and shares_features(model):
            return _shared_pass(model, images, targets, paste_masks=paste_masks, mark=mark)  # type: ignore[arg-type]
        loss_dict = out = None
        if losses:
            with loss_mode(model):
                loss_dict = model(images, targets)
            mark("losses")
        if detections:
            model.eval()
            out = model(images) if paste_masks or not isinstance(model, GeneralizedRCNN) else _detect(model, images)
            mark("detections")
        return loss_dict, out


def _shared_pass(
    model: GeneralizedRCNN,
    images: Sequence[torch.Tensor],
    targets: Sequence[Mapping[str, Any]],
    *,
    paste_masks: bool = True,
    mark: Callable[[str], None],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """GeneralizedRCNN.forward in the loss setting, then in the inference setting on the same
    features; the RPN head's output is shared too when it can be."""
    original_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
    share_head = all(isinstance(m, MODE_FREE_LAYERS) for m in model.rpn.head.modules())
    with _computed_once(model.rpn.head) if share_head else contextlib.nullcontext():
        # The whole model in loss mode, as model(images, targets) would run: the training-mode
        # transform (resize choice drawn as in training) and the samplers' draws in the same order.
        with loss_mode(model):
            batch, prepared = model.transform(list(images), [dict(t) for t in targets])
            features = _features(model, batch.tensors)
            mark("transform+backbone")
            if share_head:  # computed here, then served from the cache to both settings
                model.rpn.head(list(features.values()))
                mark("rpn head")
            proposals, rpn_losses = model.rpn(batch, features, prepared)
            mark("rpn loss")
            _, roi_losses = model.roi_heads(features, proposals, batch.image_sizes, prepared)
            mark("roi_heads loss")
        model.eval()
        proposals, _ = model.rpn(batch, features)
        mark("rpn inference")
        dets, _ = model.roi_heads(features, proposals, batch.image_sizes)
        mark("roi_heads inference")
        out = _postprocess(model, dets, batch.image_sizes, original_sizes, paste_masks)
        mark("postprocess")
    return {**roi_losses, **rpn_losses}, out


def _detect(model: GeneralizedRCNN, images: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """``GeneralizedRCNN.forward`` in eval mode without pasting the masks (``paste_masks=False``)."""
    original_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
    batch, _ = model.transform(list(images))
    features = _features(model, batch.tensors)
    proposals, _ = model.rpn(batch, features)
    dets, _ = model.roi_heads(features, proposals, batch.image_sizes)
    return _postprocess(model, dets, batch.image_sizes, original_sizes, paste_masks=False)


def _postprocess(
    model: GeneralizedRCNN, dets: list[dict[str, torch.Tensor]], image_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]], paste_masks: bool,
) -> list[dict[str, Any]]:
    """torchvision's ``transform.postprocess``; without ``paste_masks``, the boxes scaled to the
    original image as it scales them, the masks left over their boxes (``box_masks``)."""
    if paste_masks:
        return model.transform.postprocess(dets, image_sizes, original_sizes)
    box_masks = [det.pop("masks", None) for det in dets]
    out = model.transform.postprocess(dets, image_sizes, original_sizes)
    for det, masks, size in zip(out, box_masks, original_sizes):
        if masks is not None:
            det["box_masks"], det["image_size"] = masks, (int(size[0]), int(size[1]))
    return out


STAGES = ("transform+backbone", "rpn head", "rpn loss", "roi_heads loss", "rpn inference", "roi_heads inference", "postprocess")


def _no_mark(stage: str) -> None:
    pass


@contextlib.contextmanager
def _computed_once(module: nn.Module) -> Iterator[None]:
    """While open, ``module`` called again on the very same input tensors returns its first output."""
    forward = module.forward
    own = "forward" in module.__dict__
    cache: dict[str, Any] = {}

    def once(inputs: list[torch.Tensor]) -> Any:
        key = tuple(id(t) for t in inputs)
        if cache.get("key") != key:
            cache["key"], cache["out"] = key, forward(inputs)
        return tuple(list(part) for part in cache["out"])  # fresh lists: a caller may change its own

    module.forward = once  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own:
            module.forward = forward  # type: ignore[method-assign]
        else:
            del module.forward


def _features(model: GeneralizedRCNN, tensors: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    features = model.backbone(tensors)
    return OrderedDict([("0", features)]) if isinstance(features, torch.Tensor) else features
