import importlib
import json
import math

import pytest
import torch
from torch import nn

from maskrcnn_coco.config import LOSS_COMPONENTS
from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine import FitSettings, GradNormMeter, Hook, evaluate, format_epoch_summary, train_one_epoch
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
    result = train_one_epoch(model, opt, tiny_data.train_loader, "cpu", 1, settings=FitSettings(print_freq=1))
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
    result = train_one_epoch(model, opt, scripted_loader(rows), "cpu", 1, settings=FitSettings(loss_weights=weights))
    assert result == {"loss_classifier": 2.0, "loss_box_reg": 1.0, "loss_mask": 2.0, "loss_objectness": 2.0, "loss_rpn_box_reg": 3.0}
    # The last step's gradient is d/dw of the weighted sum for the last batch: 3 + 0 + 2*1 + 0.5*0 + 1.
    assert float(model.w.grad) == pytest.approx(6.0)


def test_non_finite_loss_names_iteration_component_and_images():
    rows = [[1.0] * 5, [1.0, 1.0, float("nan"), 1.0, 1.0], [1.0] * 5]
    model = ScriptedLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(FloatingPointError) as err:
        train_one_epoch(model, opt, scripted_loader(rows), "cpu", 3, settings=FitSettings(print_freq=2))
    message = str(err.value)
    assert "epoch 3, iteration 1" in message and "loss_mask" in message and "image ids [1]" in message
    # One component failed: the images' annotations come first, the learning rate second.
    assert "Only this component failed" in message
    assert message.index("annotations") < message.index("optimizer.lr")


def test_every_component_non_finite_points_at_the_learning_rate_first():
    rows = [[1.0] * 5, [float("inf")] * 5]
    model = ScriptedLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(FloatingPointError) as err:
        train_one_epoch(model, opt, scripted_loader(rows), "cpu", 1, settings=FitSettings(print_freq=1))
    message = str(err.value)
    assert "Every component failed at once" in message
    assert message.index("optimizer.lr") < message.index("annotations")


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
    assert {"bbox", "segm"} <= set(metrics)  # plus the confusion matrix
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics["segm"])  # plus AP_class_<name>
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
        fit(model, opt, loader, None, FitSettings(epochs=2, progress=False), run_dir=tmp_path, mapping=mapping)
    state = torch.load(tmp_path / "checkpoints" / "interrupted.pth", weights_only=True)
    assert state["epoch"] == 0 and float(state["model"]["w"]) == pytest.approx(1.0 - 0.1 * 5)


# ------------------------------------------------------------------------------ fit and its sinks
HEADS_COMPONENTS = LOSS_COMPONENTS[:3]  # driven by the `heads` parameter, the rest by `backbone`


class TwoGroupLosses(nn.Module):
    """loss_k = c_k with d loss_k / d param = c_k: values and gradients known whatever the lr.

    The first three components depend on ``heads``, the last two on ``backbone``.
    """

    def __init__(self):
        super().__init__()
        self.backbone = nn.Parameter(torch.zeros(()))
        self.heads = nn.Parameter(torch.zeros(()))

    def forward(self, images, targets=None):
        c = targets[0]["scripted"]
        out = {}
        for i, k in enumerate(LOSS_COMPONENTS):
            p = self.heads if k in HEADS_COMPONENTS else self.backbone
            out[k] = c[i] + (p - p.detach()) * c[i]
        return out


class CountingLoader(list):
    """A list of batches that counts how often it was iterated (one pass per epoch)."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


ROWS = [[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 0.0, 1.0, -2.0, 1.0]]
WEIGHTS = {"loss_mask": 2.0, "loss_objectness": 0.5}
VAL_LOSSES = {"loss_classifier": 0.5, "loss_box_reg": 0.25, "loss_mask": 1.0, "loss_objectness": 0.125, "loss_rpn_box_reg": 0.0625}
METRICS = {"bbox": {"AP": 0.5, "AP50": 0.75, "AP75": 0.25, "APs": 0.5, "APm": 0.5, "APl": float("nan")},
           "segm": {"AP": 0.25, "AP50": 0.5, "AP75": 0.125, "APs": 0.25, "APm": 0.25, "APl": float("nan")}}


def two_group_setup():
    model = TwoGroupLosses()
    # heads listed first: the `lr` tag must still be the backbone group's.
    opt = torch.optim.SGD([{"params": [model.heads], "lr": 0.1, "name": "heads"},
                           {"params": [model.backbone], "lr": 0.01, "name": "backbone"}], lr=0.01)
    return model, opt


@pytest.fixture
def stub_evaluate(monkeypatch):
    """Replace fit's evaluate: record the epoch (train passes so far) of each call, return fixed results."""

    class Stub:
        def __init__(self):
            self.calls = []
            self.val_losses = dict(VAL_LOSSES)
            self.train_loader = None  # set by run_fit: its pass count is the epoch being evaluated

        def __call__(self, model, loader, device, **kwargs):
            self.calls.append((self.train_loader.passes if self.train_loader else None, loader, kwargs))
            return dict(self.val_losses), {k: dict(v) for k, v in METRICS.items()}

    stub = Stub()
    # By module: the package's `fit` attribute is the function, which shadows the module name.
    monkeypatch.setattr(importlib.import_module("maskrcnn_coco.engine.fit"), "evaluate", stub)
    return stub


MAPPING = CategoryMapping([{"id": 1, "name": "a"}])


def run_fit(stub, *, epochs, eval_every=1, hooks=(), run_dir=None, **kwargs):
    from maskrcnn_coco.engine import fit

    model, opt = two_group_setup()
    train = CountingLoader(scripted_loader(ROWS))
    stub.train_loader = train
    val = ["val batches"]
    settings = FitSettings(epochs=epochs, eval_every=eval_every, loss_weights=WEIGHTS, progress=False, **kwargs)
    history = fit(model, opt, train, val, settings, None if run_dir is not None else [GradNormMeter(), *hooks],
                  run_dir=run_dir, mapping=MAPPING)
    return history, train, val


def test_fit_evaluates_every_n_epochs_and_at_the_last(stub_evaluate):
    history, train, val = run_fit(stub_evaluate, epochs=3, eval_every=2, compute_val_loss=False, mask_threshold=0.3)
    assert train.passes == 3
    assert [epoch for epoch, _, _ in stub_evaluate.calls] == [2, 3]  # not 1; 3 because it is the last
    assert all(loader is val for _, loader, _ in stub_evaluate.calls)
    assert stub_evaluate.calls[0][2]["compute_losses"] is False and stub_evaluate.calls[0][2]["mask_threshold"] == 0.3
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for record in history:
        evaluated = record["epoch"] in (2, 3)
        assert ("loss/val" in record) is evaluated
        assert ("mAP/bbox_AP" in record) is evaluated and ("mAP/segm_AP50" in record) is evaluated
    assert history[1]["mAP/bbox_AP50"] == 0.75 and history[2]["mAP/segm_AP"] == 0.25
    assert "mAP/bbox_APl" not in history[1]  # undefined (NaN) metrics are left out
    assert history[1]["loss/val"] == pytest.approx(sum(VAL_LOSSES.values()) + 1.0 - 0.0625)  # mask x2, objectness x0.5


def test_fit_without_val_loader_never_evaluates(stub_evaluate):
    from maskrcnn_coco.engine import fit

    model, opt = two_group_setup()
    history = fit(model, opt, scripted_loader(ROWS), None, FitSettings(epochs=2, progress=False), [], mapping=MAPPING)
    assert stub_evaluate.calls == []
    assert not any(k.startswith(("loss/val", "mAP/")) for r in history for k in r)


def test_history_shape_and_weighted_train_total(stub_evaluate):
    from maskrcnn_coco.engine import fit

    model, opt = two_group_setup()
    history = fit(model, opt, scripted_loader(ROWS), None, FitSettings(epochs=2, loss_weights=WEIGHTS, progress=False),
                  [GradNormMeter()], mapping=MAPPING)
    assert isinstance(history, list) and [r["epoch"] for r in history] == [1, 2]
    means = {k: (ROWS[0][i] + ROWS[1][i]) / 2 for i, k in enumerate(LOSS_COMPONENTS)}
    # d total / d heads = sum of the weighted heads components of the batch; likewise backbone.
    heads_grads = [sum(WEIGHTS.get(k, 1.0) * row[i] for i, k in enumerate(LOSS_COMPONENTS) if k in HEADS_COMPONENTS)
                   for row in ROWS]
    backbone_grads = [sum(WEIGHTS.get(k, 1.0) * row[i] for i, k in enumerate(LOSS_COMPONENTS) if k not in HEADS_COMPONENTS)
                      for row in ROWS]
    assert heads_grads == [9.0, 5.0] and backbone_grads == [7.0, 0.0]
    for record in history:
        assert set(record) == {
            "epoch", "loss/train_total", *(f"loss/train_{k}" for k in LOSS_COMPONENTS), "lr", "lr/heads", "lr/backbone",
            "grad_norm/heads", "grad_norm/backbone", "time/train_s", "time/eval_s",
        }
        for k in LOSS_COMPONENTS:
            assert record[f"loss/train_{k}"] == pytest.approx(means[k])
        expected_total = sum(WEIGHTS.get(k, 1.0) * means[k] for k in LOSS_COMPONENTS)
        assert expected_total == pytest.approx(2.0 + 1.0 + 2 * 2.0 + 0.5 * 1.0 + 3.0)
        assert record["loss/train_total"] == pytest.approx(expected_total)
        assert record["lr"] == 0.01 and record["lr/backbone"] == 0.01 and record["lr/heads"] == 0.1
        assert record["grad_norm/heads"] == pytest.approx(7.0)  # mean of |9| and |5|
        assert record["grad_norm/backbone"] == pytest.approx(3.5)  # mean of |7| and |0|
        assert record["time/train_s"] >= 0.0 and record["time/eval_s"] >= 0.0
        assert all(isinstance(v, float) for k, v in record.items() if k != "epoch")


def test_checkpoint_cadence_and_contents(stub_evaluate, tmp_path):
    from maskrcnn_coco.engine import Checkpointer
    from maskrcnn_coco.engine.checkpoint import FORMAT_VERSION

    directory = tmp_path / "ckpt"
    history, _, _ = run_fit(stub_evaluate, epochs=3, hooks=[Checkpointer(directory, every_n_epochs=2)])
    assert sorted(p.name for p in directory.iterdir()) == ["epoch_002.pth", "last.pth"]  # no epoch_001/003, no temp files
    last = torch.load(directory / "last.pth", weights_only=True)
    assert last["epoch"] == 3 and last["format_version"] == FORMAT_VERSION
    assert last["history"] == history
    assert last["categories"] == MAPPING.state_dict() and last["num_classes"] == MAPPING.num_classes
    assert float(last["model"]["heads"]) == pytest.approx(-0.1 * 3 * (9.0 + 5.0))  # 3 epochs of SGD at lr 0.1
    second = torch.load(directory / "epoch_002.pth", weights_only=True)
    assert second["epoch"] == 2 and second["history"] == history[:2]


def test_metrics_jsonl_has_one_object_per_epoch_and_nan_as_null(stub_evaluate, tmp_path):
    stub_evaluate.val_losses = {**VAL_LOSSES, "loss_mask": float("nan")}
    history, _, _ = run_fit(stub_evaluate, epochs=2, run_dir=tmp_path)  # the default hooks
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text

    def no_constants(name):
        raise AssertionError(f"non-JSON constant {name} in metrics.jsonl")

    lines = [json.loads(line, parse_constant=no_constants) for line in text.splitlines()]
    assert len(lines) == 2 == len(history)
    for line, record in zip(lines, history):
        assert next(iter(line)) == "epoch" and set(line) == set(record)
        assert math.isnan(record["loss/val_loss_mask"]) and math.isnan(record["loss/val"])
        assert line["loss/val_loss_mask"] is None and line["loss/val"] is None
        assert line["loss/val_loss_box_reg"] == 0.25 and line["mAP/bbox_AP50"] == 0.75
        assert {k: v for k, v in line.items() if v is not None} == {
            k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))
        }
    assert [line["epoch"] for line in lines] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_001.pth", "epoch_002.pth", "last.pth"]


class RecordingHook(Hook):
    def __init__(self, main_process_only=True):
        self.main_process_only = main_process_only
        self.calls = []

    def before_fit(self, state):
        self.calls.append(("before_fit", len(state.history)))

    def after_epoch(self, state, result):
        self.calls.append(("after_epoch", result.epoch, dict(result.scalars), dict(state.history[-1])))

    def after_fit(self, state):
        self.calls.append(("after_fit", len(state.history)))


def test_custom_sink_sees_every_epoch(stub_evaluate):
    sink = RecordingHook()
    history, _, _ = run_fit(stub_evaluate, epochs=2, hooks=[sink])
    assert [c[0] for c in sink.calls] == ["before_fit", "after_epoch", "after_epoch", "after_fit"]
    assert sink.calls[0] == ("before_fit", 0) and sink.calls[-1] == ("after_fit", 2)
    for (_, epoch, scalars, entry), record in zip(sink.calls[1:3], history):
        assert epoch == record["epoch"] == entry["epoch"]
        assert scalars == {k: v for k, v in record.items() if k != "epoch"}
        assert entry == record


def test_main_process_only_sinks_are_skipped_on_other_ranks(stub_evaluate, monkeypatch):
    monkeypatch.setattr(importlib.import_module("maskrcnn_coco.engine.hooks"), "is_main_process", lambda: False)
    writer, everywhere = RecordingHook(main_process_only=True), RecordingHook(main_process_only=False)
    run_fit(stub_evaluate, epochs=2, hooks=[writer, everywhere])
    assert writer.calls == []
    assert [c[0] for c in everywhere.calls] == ["before_fit", "after_epoch", "after_epoch", "after_fit"]


# ------------------------------------------------------------------------------ gradient norms and clipping
def test_grad_norm_meter_means_per_group_norms():
    p1, p2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    q, r = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))
    meter = GradNormMeter({"a": [p1, p2], "b": [q], "c": [r], "empty": []})
    assert list(meter.groups) == ["a", "b", "c"]  # a group without parameters is dropped
    assert meter.compute() == {}

    p1.grad, p2.grad, q.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0]), torch.tensor([1.0, 2.0, 2.0])
    meter.update()  # a: ||(3, 0, 4)|| = 5, b: ||(1, 2, 2)|| = 3, c: no grad
    p1.grad, p2.grad, q.grad = torch.tensor([0.0, 0.0]), torch.tensor([-1.0]), None
    meter.update()  # a: 1, b: no grad any more
    assert meter.compute() == pytest.approx({"a": 3.0, "b": 1.5, "c": 0.0})

    meter.reset()
    assert meter.compute() == {} and meter.count == 0
    q.grad = torch.tensor([0.0, 6.0, 8.0])
    meter.update()
    assert meter.compute() == pytest.approx({"a": 1.0, "b": 10.0, "c": 0.0})


def test_grad_norm_meter_merges_the_no_weight_decay_half_of_a_group():
    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a], "name": "heads", "group": "heads"},
                           {"params": [b], "name": "heads_no_wd", "group": "heads"},
                           {"params": [c], "name": "backbone"}], lr=0.1)
    meter = GradNormMeter.from_optimizer(opt)
    a.grad, b.grad, c.grad = torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([2.0])
    meter.update()
    assert meter.compute() == pytest.approx({"heads": 5.0, "backbone": 2.0})


class LinearLosses(nn.Module):
    """loss_classifier = 3 a, loss_box_reg = 4 b (the rest 0): gradient (3, 4), global norm 5."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, images, targets=None):
        zero = 0.0 * (self.a + self.b)
        return {"loss_classifier": 3.0 * self.a, "loss_box_reg": 4.0 * self.b,
                "loss_mask": zero, "loss_objectness": zero, "loss_rpn_box_reg": zero}


@pytest.mark.parametrize("clip, expected_step", [(None, (3.0, 4.0)), (2.5, (1.5, 2.0)), (100.0, (3.0, 4.0))])
def test_clipping_bounds_the_global_norm_and_norms_are_recorded_before(clip, expected_step):
    model = LinearLosses()
    opt = torch.optim.SGD([{"params": [model.a], "name": "a"}, {"params": [model.b], "name": "b"}], lr=1.0, momentum=0.0)
    meter = GradNormMeter.from_optimizer(opt)
    train_one_epoch(model, opt, scripted_loader([[0.0] * 5]), "cpu", 1, [meter], settings=FitSettings(clip_grad_norm=clip))
    # One SGD step at lr 1 moves each parameter by minus its (clipped) gradient: the global norm
    # (3, 4) -> 5 is scaled to `clip`, not each group to `clip` on its own.
    after = (float(model.a.detach()), float(model.b.detach()))
    assert after == pytest.approx((-expected_step[0], -expected_step[1]), rel=1e-5)
    assert (float(model.a.grad), float(model.b.grad)) == pytest.approx(expected_step, rel=1e-5)
    assert meter.compute() == pytest.approx({"a": 3.0, "b": 4.0})  # before clipping
