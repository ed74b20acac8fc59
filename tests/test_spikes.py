"""Iteration-level spikes: the loss or a gradient norm jumping inside an epoch, said before it becomes a NaN."""

import json
import logging

import pytest
import torch
from test_engine import ScriptedLosses, scripted_loader  # loss_k = w * c_k, c_k scripted per batch

from maskrcnn_coco.analysis.diagnostics import DIAGNOSTICS_FILE, iteration_spikes
from maskrcnn_coco.config import LOSS_COMPONENTS, DiagnosticsConfig
from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine import FitSettings, GradNormMeter, SpikeMonitor, train_one_epoch

PARTS = dict.fromkeys(LOSS_COMPONENTS, 0.2)


def test_a_loss_spike_names_the_component_that_rose():
    parts = PARTS | {"loss_mask": 4.2}
    found = iteration_spikes(3, loss=(5.0, 57, parts), loss_reference=(1.0, PARTS), grad_norms={}, grad_references={},
                             window=20)
    assert [(f.kind, f.components, f.epoch) for f in found] == [("loss_spike", ("loss_mask",), 3)]
    text = found[0].text()
    assert "iteration 57" in text and "5.0x the run's lowest mean over 20 iterations" in text and "loss_mask 4.2 (21.0x)" in text
    assert "optimizer.lr" in text and "optimizer.clip_grad_norm" in text and "#iteration-spikes" in text
    assert found[0].evidence["ratio"] == 5.0


def test_below_the_factor_or_switched_off_nothing_is_said():
    kwargs = {"loss_reference": (1.0, PARTS), "grad_norms": {"heads": (19.9, 3)}, "grad_references": {"heads": 1.0}, "window": 20}
    assert iteration_spikes(1, loss=(4.9, 3, PARTS), **kwargs) == []
    off = DiagnosticsConfig(spike_loss_factor=0, spike_grad_factor=0)
    assert iteration_spikes(1, loss=(50.0, 3, PARTS), **(kwargs | {"grad_norms": {"heads": (99.0, 3)}}), config=off) == []
    # No reference yet (the run's first window): nothing to compare with.
    assert iteration_spikes(1, loss=(50.0, 3, PARTS), loss_reference=None, grad_norms={}, grad_references={}, window=20) == []


def test_a_gradient_norm_spike_names_the_components_of_its_module():
    found = iteration_spikes(2, loss=None, loss_reference=None,
                             grad_norms={"module.rpn_head": (50.0, 40), "backbone": (1.0, 40)},
                             grad_references={"module.rpn_head": 2.0, "backbone": 1.0}, window=20)
    assert [(f.kind, f.subject, f.components) for f in found] == [
        ("grad_norm_spike", "module.rpn_head", ("loss_objectness", "loss_rpn_box_reg"))]
    assert "grad_norm/module.rpn_head 50 is 25.0x its recent mean (2)" in found[0].text()


def noisy_rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A falling loss with +-30 % batch-to-batch noise: healthy.
    return [[float(v) for v in 0.2 * (1 - 0.5 * i / n) * (1 + 0.6 * (torch.rand(5, generator=g) - 0.5))] for i in range(n)]


def run(rows, print_freq=10, config=None):
    model = ScriptedLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # w stays 1: the scripted values are the losses
    meter = GradNormMeter({"heads": [model.w]}, every=1)
    found = []
    monitor = SpikeMonitor(config, on_spike=found.append)
    try:
        train_one_epoch(model, opt, scripted_loader(rows), "cpu", 1, [meter, monitor], settings=FitSettings(print_freq=print_freq))
    except FloatingPointError as err:
        return found, monitor, err
    return found, monitor, None


def test_a_healthy_noisy_epoch_raises_no_spike():
    found, monitor, err = run(noisy_rows(100))
    assert err is None and found == []
    peaks = monitor.pop_peaks()
    assert 1.0 < peaks["loss"] < 2.0 and peaks["grad_norm"] < 2.0  # the tags spike/loss, spike/grad_norm


def test_a_spike_is_said_before_the_nan_that_follows_it():
    rows = noisy_rows(60)
    rows[33] = [0.2, 0.2, 20.0, 0.2, 0.2]  # loss_mask jumps at iteration 33 ...
    rows[47] = [float("nan")] * 5  # ... and the run goes NaN 14 iterations later
    found, _, err = run(rows)
    assert isinstance(err, FloatingPointError) and "iteration 47" in str(err)
    by_kind = {f.kind: f for f in found}
    assert set(by_kind) == {"loss_spike", "grad_norm_spike"}
    assert by_kind["loss_spike"].components == ("loss_mask",)
    assert by_kind["loss_spike"].evidence["iteration"] == 33
    assert by_kind["grad_norm_spike"].subject == "heads" and by_kind["grad_norm_spike"].evidence["iteration"] == 33


def test_the_monitor_costs_no_host_sync_between_read_backs(monkeypatch):
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or original(self))
    monitor = SpikeMonitor(on_spike=lambda f: None)
    it = torch.zeros((), dtype=torch.long)
    for _ in range(50):
        monitor.update_loss(torch.tensor(1.0), torch.ones(5), it)
        monitor.update_grad(torch.ones(3), it)
        it += 1
    assert calls == []
    monitor.read(1, ["a", "b", "c"])
    assert len(calls) == 1


def test_fit_writes_spikes_to_diagnostics_jsonl_and_tensorboard_text(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from maskrcnn_coco.engine import default_hooks, fit
    from maskrcnn_coco.tracking.backends import TensorBoardTracker

    caplog.set_level(logging.WARNING, logger="maskrcnn_coco")
    rows = noisy_rows(40)
    rows[25] = [0.2, 0.2, 0.2, 0.2, 8.0]
    model = ScriptedLosses()
    opt = torch.optim.SGD([{"params": [model.w], "lr": 0.0, "name": "heads"}])
    tracker = TensorBoardTracker(tmp_path / "tb")
    settings = FitSettings(print_freq=10, progress=False)
    hooks = default_hooks(tmp_path, settings, tracker, diagnostics=DiagnosticsConfig())
    spikes = next(h for h in hooks if isinstance(h, SpikeMonitor))
    history = fit(model, opt, scripted_loader(rows), None, settings, hooks, mapping=CategoryMapping([{"id": 1, "name": "a"}]))
    tracker.close()
    assert history[0]["spike/loss"] == pytest.approx(8.8 / 1.0, rel=0.3)  # the peak's ratio is a tag
    lines = [json.loads(line) for line in (tmp_path / DIAGNOSTICS_FILE).read_text().splitlines()]
    loss_lines = [line for line in lines if line["kind"] == "loss_spike"]
    assert len(loss_lines) == 1 and loss_lines[0]["components"] == ["loss_rpn_box_reg"]
    assert loss_lines[0]["evidence"]["iteration"] == 25
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("Loss spike in epoch 1 at iteration 25") for m in warned)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    tag = "diagnostics/loss_spike/loss/text_summary"  # SummaryWriter.add_text's suffix
    assert tag in acc.Tags()["tensors"]
    text = acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
    assert "Loss spike in epoch 1 at iteration 25" in text
    # The references survive a checkpoint: a resumed run judges by the same lowest mean.
    resumed = SpikeMonitor()
    resumed.load_state_dict(spikes.state_dict())
    assert resumed.state_dict() == spikes.state_dict() and resumed.loss_reference is not None


def test_a_spike_is_reported_once_per_epoch_and_subject(tmp_path):
    from maskrcnn_coco.engine.writers import DiagnosticsWriter

    def spike(epoch, component):
        return iteration_spikes(epoch, loss=(9.0, 5, PARTS | {component: 8.2}), loss_reference=(1.0, PARTS),
                                grad_norms={}, grad_references={}, window=1)[0]

    sink = DiagnosticsWriter(tmp_path)
    for finding in (spike(1, "loss_mask"), spike(1, "loss_classifier"), spike(2, "loss_mask")):
        sink.on_finding(None, finding)
    lines = [json.loads(line) for line in (tmp_path / DIAGNOSTICS_FILE).read_text().splitlines()]
    assert [(line["epoch"], line["components"]) for line in lines] == [(1, ["loss_mask"]), (2, ["loss_mask"])]
