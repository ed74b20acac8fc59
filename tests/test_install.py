"""A broken torch/torchvision pairing (CPU torch with a CUDA torchvision) must fail loudly here."""

import torch
import torchvision


def test_torchvision_ops_nms_runs():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = torchvision.ops.nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_torchvision_roi_align_runs():
    feats = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = torchvision.ops.roi_align(feats, [torch.tensor([[0.0, 0.0, 3.0, 3.0]])], output_size=2, aligned=True)
    assert out.shape == (1, 1, 2, 2)
    assert torch.isfinite(out).all()


def test_public_api_importable_from_package_root():
    import maskrcnn_coco

    for name in ("train_one_epoch", "evaluate", "fit", "ExperimentTracker", "TensorBoardTracker",
                 "log_training_metrics", "get_parameter_groups"):
        assert hasattr(maskrcnn_coco, name), name
