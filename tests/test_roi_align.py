"""The sparse RoIAlign used for CPU training gives torchvision's values and gradients."""

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from maskrcnn_coco.modeling.roi_align import SparseMultiScaleRoIAlign, sparse_roi_align, use_roi_align
from maskrcnn_coco.utils.errors import ConfigError


def random_rois(n, batch, extent, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(n, 4, generator=g) * extent * 1.2 - 0.1 * extent  # some partly or wholly outside the map
    boxes[:, 2:] = boxes[:, :2] + torch.rand(n, 2, generator=g) * extent * 0.6
    boxes[:3, 2:] = boxes[:3, :2] + 0.01  # degenerate: below one feature pixel
    return torch.cat([torch.randint(0, batch, (n, 1), generator=g).float(), boxes], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2])
@pytest.mark.parametrize("output_size", [(7, 7), (14, 14), (3, 5)])
def test_values_and_gradients_equal_torchvision_per_level(aligned, sampling_ratio, output_size):
    torch.manual_seed(0)
    features = [torch.randn(2, 8, 16, 20, requires_grad=True), torch.randn(2, 8, 8, 10, requires_grad=True)]
    scales = [0.25, 0.125]
    rois = random_rois(200, 2, 80)
    levels = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(1))
    ours = sparse_roi_align(features, rois, levels, scales, output_size, sampling_ratio, aligned)
    ref = torch.zeros_like(ours)
    for level in range(2):
        chosen = levels == level
        ref[chosen] = roi_align(features[level], rois[chosen], output_size, scales[level], sampling_ratio, aligned)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, features, upstream), torch.autograd.grad(ref, features, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def pools(sampling_ratio=1):
    names = ["0", "1", "2"]
    return (MultiScaleRoIAlign(names, output_size=7, sampling_ratio=sampling_ratio),
            SparseMultiScaleRoIAlign(names, output_size=7, sampling_ratio=sampling_ratio))


def fpn_inputs(seed=0):
    torch.manual_seed(seed)
    x = OrderedDict((str(i), torch.randn(2, 16, 32 // 2**i, 48 // 2**i, requires_grad=True)) for i in range(3))
    boxes = [random_rois(60, 1, 180, seed=s)[:, 1:].clamp(min=0) + torch.tensor([0, 0, 1, 1]) for s in (1, 2)]
    return x, boxes, [(128, 192), (128, 192)]


def test_the_pooler_maps_levels_as_torchvision_and_trains_the_same_features():
    ref_pool, our_pool = pools()
    x, boxes, shapes = fpn_inputs()
    ours, ref = our_pool(x, boxes, shapes), ref_pool(x, boxes, shapes)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, list(x.values()), upstream), torch.autograd.grad(ref, list(x.values()), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_inference_and_adaptive_sampling_use_torchvision_bit_for_bit():
    x, boxes, shapes = fpn_inputs()
    ref_pool, our_pool = pools()
    with torch.no_grad():  # evaluation: torchvision's (faster) forward kernel, identical values
        assert torch.equal(our_pool(x, boxes, shapes), ref_pool(x, boxes, shapes))
    ref_pool, our_pool = pools(sampling_ratio=0)  # adaptive sampling: per-RoI sample counts, torchvision's
    assert torch.equal(our_pool(x, boxes, shapes), ref_pool(x, boxes, shapes))


def test_under_bf16_autocast_it_computes_in_float32_and_returns_the_features_dtype():
    ref_pool, our_pool = pools()
    x, boxes, shapes = fpn_inputs()
    x16 = OrderedDict((k, v.detach().bfloat16().requires_grad_()) for k, v in x.items())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = our_pool(x16, boxes, shapes), ref_pool(x16, boxes, shapes)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_use_roi_align_swaps_the_poolers_of_a_built_model(tiny_model):
    assert type(tiny_model.roi_heads.box_roi_pool) is SparseMultiScaleRoIAlign  # model.roi_align=auto, the default
    assert type(tiny_model.roi_heads.mask_roi_pool) is SparseMultiScaleRoIAlign
    # No parameters or buffers in the poolers: checkpoints are the same with either choice.
    assert not any(k.startswith(("roi_heads.box_roi_pool", "roi_heads.mask_roi_pool")) for k in tiny_model.state_dict())
    with pytest.raises(ConfigError, match=r"model.roi_align='fast': use one of auto, torchvision"):
        use_roi_align(tiny_model, "fast")
