import math

import pytest
import torch
from torch import nn

from maskrcnn_coco.config import LOSS_COMPONENTS
from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine import evaluate, format_epoch_summary, train_one_epoch
from maskrcnn_coco.tracking.scalars import epoch_scalars


class Recorder(nn.Module):
    """Wraps a model and keeps every loss dict it returns in training mode."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seen = []

    def forward(self, images, targets=None):
        out = self.model(images, targets)
        if self.training:
            self.seen.append({k: float(v.detach()) for k, v in out.items()})
        return out


class ScriptedLosses(nn.Module):
    """Returns loss_k = w * c_k with c_k taken from the batch, so means and gradients are known."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, images, targets=None):
        values = targets[0]["scripted"]
        return {k: self.w * values[i] for i, k in enumerate(LOSS_COMPONENTS)}


def scripted_loader(rows):
    return [([torch.zeros(3, 4, 4)], [{"image_id": i, "scripted": torch.tensor(row)}]) for i, row in enumerate(rows)]


def test_train_one_epoch_returns_the_mean_of_each_component(tiny_model, tiny_data):
    model = Recorder(tiny_model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    result = train_one_epoch(model, opt, tiny_data.train_loader, "cpu", 1, progress=False, print_freq=1)
    assert list(result) == list(LOSS_COMPONENTS)  # exactly the five, no total
    assert len(model.seen) == len(tiny_data.train_loader) == 4
    for name in LOSS_COMPONENTS:
        expected = sum(batch[name] for batch in model.seen) / len(model.seen)
        assert result[name] == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_scripted_means_and_weighted_gradient():
    rows = [[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 0.0, 1.0, 0.0, 1.0]]
    model = ScriptedLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: w stays 1, gradients still computed
    weights = {"loss_mask": 2.0, "loss_objectness": 0.5}
    result = train_one_epoch(model, opt, scripted_loader(rows), "cpu", 1, loss_weights=weights, progress=False)
    assert result == {"loss_classifier": 2.0, "loss_box_reg": 1.0, "loss_mask": 2.0, "loss_objectness": 2.0, "loss_rpn_box_reg": 3.0}
    # The last step's gradient is d/dw of the weighted sum for the last batch: 3 + 0 + 2*1 + 0.5*0 + 1.
    assert float(model.w.grad) == pytest.approx(6.0)


def test_non_finite_loss_names_iteration_component_and_images():
    rows = [[1.0] * 5, [1.0, 1.0, float("nan"), 1.0, 1.0], [1.0] * 5]
    model = ScriptedLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(FloatingPointError) as err:
        train_one_epoch(model, opt, scripted_loader(rows), "cpu", 3, progress=False, print_freq=2)
    message = str(err.value)
    assert "epoch 3, iteration 1" in message and "loss_mask" in message and "image ids [1]" in message


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


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
    assert set(metrics) == {"bbox", "segm"}
    assert set(metrics["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    # Reproducible: the samplers draw from a fixed seed.
    again, _ = evaluate(model, tiny_data.val_loader, "cpu", mapping=tiny_data.mapping, progress=False, compute_metrics=False)
    assert again == val_losses


class Oracle(nn.Module):
    """Returns the ground truth as detections (eval) and fixed losses (train).

    ``evaluate`` calls ``model(images)`` without targets in eval mode, so the oracle is told the
    image ids in loader order up front (the validation loader does not shuffle).
    """

    def __init__(self, loader):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.batches = [targets for _, targets in loader]

    def forward(self, images, targets=None):
        if self.training:
            return dict.fromkeys(LOSS_COMPONENTS, self.p + 0.5)
        truth = self.batches.pop(0)
        return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                 "masks": t["masks"][:, None].float()} for t in truth]


def test_evaluate_gives_ap_one_on_perfect_predictions(tiny_data):
    oracle = Oracle(tiny_data.val_loader)
    val_losses, metrics = evaluate(oracle, tiny_data.val_loader, "cpu", mapping=tiny_data.mapping, progress=False)
    assert val_losses == dict.fromkeys(LOSS_COMPONENTS, 0.5)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(1.0)
    assert math.isnan(metrics["segm"]["APl"])  # no large objects at 64 px: COCO leaves it undefined


def test_console_block_matches_the_documented_format():
    train = {"loss_classifier": 0.1456, "loss_box_reg": 0.1234, "loss_mask": 0.3890, "loss_objectness": 0.0567, "loss_rpn_box_reg": 0.1087}
    val = {"loss_classifier": 0.2, "loss_box_reg": 0.2, "loss_mask": 0.3123, "loss_objectness": 0.1, "loss_rpn_box_reg": 0.1}
    metrics = {"bbox": {"AP": 0.6543, "AP50": 0.8901}, "segm": {"AP": 0.2134, "AP50": 0.4567}}
    scalars = epoch_scalars({"train_loss": train, "val_loss": val, "metrics": metrics})
    text = format_epoch_summary(5, 20, scalars, "runs/maskrcnn/x/checkpoints/epoch_005.pth")
    assert text == (
        "Epoch 5/20\n"
        "📊 Training Losses:\n"
        "   Total: 0.8234\n"
        "   loss_box_reg: 0.1234\n"
        "   loss_classifier: 0.1456\n"
        "   loss_mask: 0.3890\n"
        "   loss_objectness: 0.0567\n"
        "   loss_rpn_box_reg: 0.1087\n"
        "📈 Validation Loss: 0.9123\n"
        "📦 Box mAP: 0.6543 (AP50: 0.8901)\n"
        "🎭 Mask mAP: 0.2134 (AP50: 0.4567)\n"
        "💾 Saved checkpoint: runs/maskrcnn/x/checkpoints/epoch_005.pth"
    )
    weighted = format_epoch_summary(1, 1, epoch_scalars({"train_loss": train, "loss_weights": {"loss_mask": 2.0}}))
    assert weighted.splitlines()[2] == "   Total: 1.2124"  # 0.8234 + 0.3890


def test_interrupt_saves_a_checkpoint(tmp_path):
    from maskrcnn_coco.engine import fit

    class Interrupting(list):
        def __iter__(self):
            yield from self[:1]
            raise KeyboardInterrupt

    model = ScriptedLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = Interrupting(scripted_loader([[1.0] * 5, [1.0] * 5]))
    mapping = CategoryMapping([{"id": 1, "name": "a"}])
    with pytest.raises(KeyboardInterrupt):
        fit(model, opt, loader, None, epochs=2, device="cpu", run_dir=tmp_path, mapping=mapping, progress=False)
    state = torch.load(tmp_path / "checkpoints" / "interrupted.pth", weights_only=True)
    assert state["epoch"] == 0 and float(state["model"]["w"]) == pytest.approx(1.0 - 0.1 * 5)
