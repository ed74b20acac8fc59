"""``engine/fit.py``: epochs of training, evaluation every N epochs, the history, and the hooks' events."""

import importlib

import pytest
from helpers import HEADS_COMPONENTS, MAPPING, ROWS, VAL_LOSSES, WEIGHTS, run_fit, scripted_loader, two_group_setup

from maskrcnn_coco.config import LOSS_COMPONENTS
from maskrcnn_coco.engine import FitSettings, GradNormMeter, Hook


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


# --------------------------------------------------------------------------------------------- hooks
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
