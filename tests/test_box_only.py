"""Box-only annotations (all-zero ground-truth masks): the mask loss skips them, everything else is
torchvision's (``maskrcnn_coco.modeling.mask_loss``)."""

import copy

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.roi_heads import RoIHeads

from maskrcnn_coco.config import ModelConfig
from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.modeling.mask_loss import (
    TORCHVISION_MASKRCNN_LOSS,
    MaskedRoIHeads,
    masked_maskrcnn_loss,
    positive_has_mask,
    use_masked_mask_loss,
)

from conftest import tiny_model_cfg

NUM_CLASSES = 3
BOX_LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


def _batch(box_only: set[tuple[int, int]] = frozenset()) -> tuple[list[torch.Tensor], list[dict]]:
    """Two 64 px images with three rectangles each; ``box_only`` holds (image, instance) pairs whose mask
    is all zero, as the data side gives an annotation without a segmentation."""
    g = torch.Generator().manual_seed(0)
    layouts = [[(4, 6, 30, 28), (34, 8, 60, 40), (10, 36, 40, 60)], [(2, 2, 24, 50), (28, 30, 62, 62), (30, 4, 58, 24)]]
    images, targets = [], []
    for i, boxes in enumerate(layouts):
        masks = torch.zeros(len(boxes), 64, 64, dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes):
            if (i, j) not in box_only:
                masks[j, y1 + 2 : y2 - 2, x1 + 1 : x2 - 3] = 1
        images.append(torch.rand(3, 64, 64, generator=g))
        targets.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor([1 + (i + j) % (NUM_CLASSES - 1) for j in range(len(boxes))]),
            "masks": masks,
        })
    return images, targets


def _ours_and_torchvisions() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = build_model(tiny_model_cfg(), NUM_CLASSES)
    reference = copy.deepcopy(ours)
    reference.roi_heads.__class__ = RoIHeads
    return ours.train(), reference.train()


def _losses(model: torch.nn.Module, images, targets) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the samplers draw from the global RNG: the same draws for both models
    return model(images, copy.deepcopy(targets))


@pytest.fixture
def recorded_mask_inputs(monkeypatch) -> list[tuple]:
    """What ``roi_heads.maskrcnn_loss`` receives, recorded as the probe does (wrapping the module
    attribute): our heads must still call through it."""
    calls: list[tuple] = []
    inner = tv_roi_heads.maskrcnn_loss

    def recording(*args):
        calls.append(args)
        return inner(*args)

    monkeypatch.setattr(tv_roi_heads, "maskrcnn_loss", recording)
    return calls


def test_every_instance_masked_is_torchvisions_loss_and_gradients_bit_for_bit():
    ours, reference = _ours_and_torchvisions()
    assert isinstance(ours.roi_heads, MaskedRoIHeads)
    images, targets = _batch()
    got, want = _losses(ours, images, targets), _losses(reference, images, targets)
    assert list(got) == list(want) == ["loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"]
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert got["loss_mask"] > 0
    got["loss_mask"].backward()
    want["loss_mask"].backward()
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
    assert int(ours.roi_heads.last_mask_skipped) == 0


def test_box_only_instances_are_left_out_of_the_mask_mean(recorded_mask_inputs):
    ours, reference = _ours_and_torchvisions()
    images, targets = _batch(box_only={(0, 1), (1, 0), (1, 2)})
    got = _losses(ours, images, targets)
    mask_logits, proposals, gt_masks, gt_labels, matched = recorded_mask_inputs[-1]

    # The reference: torchvision's own function on the positives whose instance has a mask.
    keep = [m.flatten(1).any(dim=1).bool()[idx] for m, idx in zip(gt_masks, matched)]
    flat_keep = torch.cat(keep)
    assert 0 < flat_keep.sum() < flat_keep.numel()  # both kinds of positive in the batch
    want = TORCHVISION_MASKRCNN_LOSS(
        mask_logits[flat_keep], [p[k] for p, k in zip(proposals, keep)], gt_masks, gt_labels, [i[k] for i, k in zip(matched, keep)]
    )
    torch.testing.assert_close(got["loss_mask"], want, rtol=1e-6, atol=0)
    assert int(ours.roi_heads.last_mask_skipped) == int((~flat_keep).sum())
    assert torch.equal(positive_has_mask(gt_masks, matched), flat_keep)

    # The box branches and the RPN train on every instance, exactly as torchvision's.
    torchvisions = _losses(reference, images, targets)
    for k in BOX_LOSSES:
        assert torch.equal(got[k], torchvisions[k]), k
    assert not torch.equal(got["loss_mask"], torchvisions["loss_mask"])


def test_no_masked_positive_gives_an_exact_zero_that_reaches_the_mask_head():
    ours, reference = _ours_and_torchvisions()
    images, targets = _batch(box_only={(i, j) for i in range(2) for j in range(3)})
    got, want = _losses(ours, images, targets), _losses(reference, images, targets)
    assert set(got) == set(want)
    assert got["loss_mask"].item() == 0.0 and got["loss_mask"].requires_grad
    assert want["loss_mask"] > 0  # torchvision would train these masks towards background
    for k in BOX_LOSSES:
        assert torch.equal(got[k], want[k]), k
    got["loss_mask"].backward()
    for name, p in ours.roi_heads.named_parameters():
        if name.startswith(("mask_head.", "mask_predictor.")):
            assert p.grad is not None and not p.grad.any(), name
    assert int(ours.roi_heads.last_mask_skipped) > 0


def test_loss_without_positives_is_torchvisions_zero():
    logits = torch.randn(0, NUM_CLASSES, 14, 14, requires_grad=True)
    empty = [torch.zeros(0, 4)], [torch.zeros(2, 64, 64, dtype=torch.uint8)], [torch.tensor([1, 2])], [torch.zeros(0, dtype=torch.long)]
    loss, skipped = masked_maskrcnn_loss(logits, *empty)
    assert torch.equal(loss, TORCHVISION_MASKRCNN_LOSS(logits, *empty)) and int(skipped) == 0
    loss.backward()
    assert logits.grad is not None


def test_small_model_trains_two_steps_on_box_only_targets():
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(), NUM_CLASSES).train()
    mask_head_before = copy.deepcopy(model.roi_heads.mask_predictor.state_dict())
    box_head_before = copy.deepcopy(model.roi_heads.box_predictor.state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    images, targets = _batch(box_only={(i, j) for i in range(2) for j in range(3)})
    for _ in range(2):
        losses = model(images, copy.deepcopy(targets))
        total = sum(losses.values())
        assert torch.isfinite(total) and losses["loss_mask"].item() == 0.0
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    # Zero gradients (no momentum, no decay): the mask head is untouched, the box head learnt.
    for k, v in model.roi_heads.mask_predictor.state_dict().items():
        assert torch.equal(v, mask_head_before[k]), k
    assert any(not torch.equal(v, box_head_before[k]) for k, v in model.roi_heads.box_predictor.state_dict().items())


@pytest.mark.parametrize("arch", ["small", "maskrcnn_r50_fpn", "maskrcnn_r50_fpn_v2"])
def test_state_dict_keys_are_torchvisions(arch):
    if arch == "small":
        model = build_model(tiny_model_cfg(), NUM_CLASSES)
        plain = copy.deepcopy(model)
        plain.roi_heads.__class__ = RoIHeads
    else:
        model = build_model(OmegaConf.structured(ModelConfig(arch=arch, min_size=64, max_size=64)), NUM_CLASSES)
        builder = getattr(torchvision.models.detection, arch.replace("maskrcnn_r50_fpn", "maskrcnn_resnet50_fpn"))
        plain = builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    assert isinstance(model.roi_heads, MaskedRoIHeads) and type(plain.roi_heads) is RoIHeads
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())  # strict: checkpoints of either load into the other


def test_eval_outputs_are_unchanged():
    ours, reference = _ours_and_torchvisions()
    images, _ = _batch()
    with torch.no_grad():
        got, want = ours.eval()(images), reference.eval()(images)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert list(g) == list(w) == ["boxes", "labels", "scores", "masks"]
        for k in w:
            assert torch.equal(g[k], w[k]), k


def test_plain_roi_heads_and_other_heads_are_left_alone():
    # Outside a MaskedRoIHeads forward the module attribute is torchvision's function.
    logits = torch.randn(2, NUM_CLASSES, 14, 14)
    args = ([torch.tensor([[0.0, 0, 20, 20], [5, 5, 30, 30]])], [torch.zeros(1, 64, 64, dtype=torch.uint8)],
            [torch.tensor([1])], [torch.tensor([0, 0])])
    assert torch.equal(tv_roi_heads.maskrcnn_loss(logits, *args), TORCHVISION_MASKRCNN_LOSS(logits, *args))
    assert TORCHVISION_MASKRCNN_LOSS.__module__ == "torchvision.models.detection.roi_heads"

    class Custom(RoIHeads):
        pass

    model = build_model(tiny_model_cfg(), NUM_CLASSES)
    use_masked_mask_loss(model)  # idempotent
    model.roi_heads.__class__ = Custom
    with pytest.raises(TypeError, match=r"model\.roi_heads is a .*Custom"):
        use_masked_mask_loss(model)
