"""``engine/evaluate.py``: validation losses and COCO metrics, leaving the model as it was."""

import math

import pytest
import torch
from helpers import Oracle

from maskrcnn_coco.config import LOSS_COMPONENTS
from maskrcnn_coco.engine import evaluate


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_evaluate_leaves_model_state_and_modes_unchanged(tiny_model, tiny_data):
    model = tiny_model
    model.train()
    model.backbone.eval()  # an unusual mix of modes must be restored as it was
    modes = {name: m.training for name, m in model.named_modules()}
    before = state_copy(model)
    assert any("running_mean" in k for k in before)
    rng_before = torch.random.get_rng_state()
    val_losses, metrics = evaluate(model, tiny_data.val_loader, "cpu", mapping=tiny_data.mapping, progress=False)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed"
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert list(val_losses) == list(LOSS_COMPONENTS) and all(math.isfinite(v) for v in val_losses.values())
    assert {"bbox", "segm"} <= set(metrics)  # plus the confusion matrix
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics["segm"])  # plus AP_class_<name>
    # Reproducible: the samplers draw from a fixed seed.
    again, _ = evaluate(model, tiny_data.val_loader, "cpu", mapping=tiny_data.mapping, progress=False, compute_metrics=False)
    assert again == val_losses


def test_evaluate_gives_ap_one_on_perfect_predictions(tiny_data):
    oracle = Oracle(tiny_data.val_loader)
    val_losses, metrics = evaluate(oracle, tiny_data.val_loader, "cpu", mapping=tiny_data.mapping, progress=False)
    assert val_losses == dict.fromkeys(LOSS_COMPONENTS, 0.5)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(1.0)
    assert math.isnan(metrics["segm"]["APl"])  # no large objects at 64 px: COCO leaves it undefined


def test_only_rank_0_reads_the_ground_truth(tiny_data, tiny_model, monkeypatch):
    """A dataset from a cached index loads its ground truth on first use: the other ranks, which do
    not score, must never ask for it."""
    import importlib

    from maskrcnn_coco.engine import evaluate

    evaluate_module = importlib.import_module("maskrcnn_coco.engine.evaluate")  # the package's name is the function

    class NoGroundTruth(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.dataset[i]

        @property
        def coco(self):
            raise AssertionError("a rank other than 0 read the ground truth")

    monkeypatch.setattr(evaluate_module, "is_main_process", lambda: False)
    monkeypatch.setattr(evaluate_module, "broadcast_object", lambda obj: {"segm": {"AP": 0.5}})
    loader = torch.utils.data.DataLoader(NoGroundTruth(tiny_data.val_loader.dataset), batch_size=2,
                                         collate_fn=tiny_data.val_loader.collate_fn)
    losses, metrics = evaluate(tiny_model, loader, "cpu", mapping=tiny_data.mapping, progress=False)
    assert metrics == {"segm": {"AP": 0.5}} and set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask",
                                                               "loss_objectness", "loss_rpn_box_reg"}
