"""``engine/eval_step.py``: evaluation from one backbone pass, equal to the two-pass losses and detections."""

import pytest
import torch
from helpers import batches_of
from torch import nn

from maskrcnn_coco.config import LOSS_COMPONENTS
from maskrcnn_coco.engine.eval_step import STAGES, evaluate_batch, loss_mode, restored_modes, shares_features
from maskrcnn_coco.engine.evaluate import evaluate
from maskrcnn_coco.engine.loop import stack_losses


def two_pass(model, batches, seed=0):
    """The implementation before the shared pass: model(images, targets) under loss_mode, then model(images)."""
    sums, n, outputs = torch.zeros(len(LOSS_COMPONENTS)), 0, []
    with torch.random.fork_rng(devices=[]), restored_modes(model):
        torch.manual_seed(seed)
        for images, targets in batches:
            with loss_mode(model), torch.no_grad():
                sums += stack_losses(model(images, targets)) * len(images)
            n += len(images)
            model.eval()
            with torch.inference_mode():
                outputs.append(model(images))
    return dict(zip(LOSS_COMPONENTS, (sums / n).tolist())), outputs


@pytest.mark.slow
@pytest.mark.parametrize("multi_scale", [False, True])
def test_evaluation_losses_and_detections_equal_the_two_pass_computation(tiny_model, tiny_data, multi_scale):
    model, batches = tiny_model, batches_of(tiny_data.val_loader)
    if multi_scale:  # a training-mode transform would pick one of these at random: two passes then
        model.transform.min_size = (56, 64)
    assert shares_features(model) is not multi_scale
    expected_losses, expected_outputs = two_pass(model, batches)

    val_losses, _ = evaluate(model, tiny_data.val_loader, "cpu", mapping=tiny_data.mapping, progress=False, compute_metrics=False)
    assert val_losses == expected_losses  # bit for bit
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for (images, targets), expected in zip(batches, expected_outputs):
            marks: list[str] = []  # the benchmark times these stages
            _, outputs = evaluate_batch(model, images, targets, mark=marks.append)
            assert marks == (["losses", "detections"] if multi_scale else list(STAGES))
            assert len(outputs) == len(expected) and sum(len(o["boxes"]) for o in outputs) > 0
            for got, want in zip(outputs, expected):
                assert got.keys() == want.keys()
                assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_rpn_head_runs_once_for_both_settings_unless_a_layer_depends_on_the_mode(tiny_model, tiny_data):
    model = tiny_model
    (images, targets), = batches_of(tiny_data.val_loader, 1)
    calls = []  # cls_logits runs once per FPN level each time the head really computes
    model.rpn.head.cls_logits.register_forward_pre_hook(lambda module, args: calls.append(1))
    evaluate_batch(model, images, targets, losses=False)
    once = len(calls)
    calls.clear()
    with torch.random.fork_rng(devices=[]):
        losses, outputs = evaluate_batch(model, images, targets)
    assert once > 0 and len(calls) == once and losses and outputs
    assert "forward" not in model.rpn.head.__dict__  # the cache is gone afterwards

    # A Dropout in the head acts differently in the loss setting (train mode): computed per setting.
    model.rpn.head.conv.append(nn.Dropout(0.5))
    calls.clear()
    with torch.random.fork_rng(devices=[]):
        evaluate_batch(model, images, targets)
    assert len(calls) == 2 * once


def test_torchvision_rpn_heads_are_shared(tiny_model):
    import torchvision

    from maskrcnn_coco.engine.eval_step import MODE_FREE_LAYERS

    for builder in (torchvision.models.detection.maskrcnn_resnet50_fpn, torchvision.models.detection.maskrcnn_resnet50_fpn_v2):
        head = builder(weights=None, weights_backbone=None, num_classes=3).rpn.head
        assert all(isinstance(m, MODE_FREE_LAYERS) for m in head.modules()), builder.__name__
    assert all(isinstance(m, MODE_FREE_LAYERS) for m in tiny_model.rpn.head.modules())


@pytest.mark.parametrize("losses", [True, False])  # the shared pass, or detections alone
def test_unpasted_detections_are_the_models_with_each_mask_over_its_box(tiny_model, tiny_data, losses):
    """paste_masks=False: the boxes, scores and labels of model(images) bit for bit, each mask over
    its box; torchvision's paste of those is model(images)'s masks, and the COCO results are equal."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from maskrcnn_coco.evaluation.coco_eval import predictions_to_coco

    model = tiny_model
    found = 0
    for images, targets in batches_of(tiny_data.val_loader, 1):
        with torch.random.fork_rng(devices=[]):
            _, boxed = evaluate_batch(model, images, targets, losses=losses, paste_masks=False)
        model.eval()
        with torch.inference_mode():
            expected = model(images)
        for got, want, image in zip(boxed, expected, images):
            assert got.keys() == {"boxes", "scores", "labels", "box_masks", "image_size"}
            assert all(torch.equal(got[k], want[k]) for k in ("boxes", "scores", "labels"))
            assert got["box_masks"].shape[1:] == (1, 28, 28) and got["image_size"] == tuple(image.shape[-2:])
            assert torch.equal(paste_masks_in_image(got["box_masks"], got["boxes"], got["image_size"]), want["masks"])
            found += len(got["boxes"])
        ids = [int(t["image_id"]) for t in targets]
        assert predictions_to_coco(boxed, ids, tiny_data.mapping) == predictions_to_coco(expected, ids, tiny_data.mapping)
    assert found > 0
