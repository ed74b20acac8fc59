"""``engine/monitors.py``: gradient norms (per group, per module, every N iterations), the timer, and the
spike monitor (a loss or gradient norm jumping inside an epoch, said before it becomes a NaN)."""

import json
import logging

import pytest
import torch
from helpers import ScriptedLosses, scripted_loader, sgd_config
from torch import nn

from maskrcnn_coco.analysis.diagnostics import DIAGNOSTICS_FILE
from maskrcnn_coco.config import LOSS_COMPONENTS, DiagnosticsConfig
from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine import FitSettings, GradNormMeter, SpikeMonitor, train_one_epoch
from maskrcnn_coco.engine.monitors import IterationTimer
from maskrcnn_coco.solver.param_groups import build_optimizer


# ------------------------------------------------------------------------------------ gradient norms
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


def test_grad_norms_are_the_mean_over_the_sampled_iterations():
    weight = nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([{"params": [weight], "name": "all"}], lr=0.0)

    class Scripted(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = weight

        def forward(self, images, targets):
            c = targets[0]["c"]
            return {k: self.w * c if k == "loss_mask" else self.w * 0.0 for k in LOSS_COMPONENTS}

    batches = [([torch.zeros(1)], [{"image_id": i, "c": torch.tensor(float(c))}]) for i, c in enumerate([1, 2, 3, 4, 5])]
    meter = GradNormMeter.from_optimizer(optimizer, every=2)
    train_one_epoch(Scripted(), optimizer, batches, "cpu", 1, [meter])
    assert meter.count == 3 and meter.compute() == pytest.approx({"all": (1 + 3 + 5) / 3})


@pytest.mark.slow
def test_fit_records_module_grad_norms_lrs_and_loader_times(tiny_model, tiny_data):
    from maskrcnn_coco.engine import fit

    optimizer = build_optimizer(sgd_config(), tiny_model, verbose=False)
    history = fit(tiny_model, optimizer, tiny_data.train_loader, None, FitSettings(progress=False),
                  [GradNormMeter(every=2), IterationTimer()], mapping=tiny_data.mapping)
    (record,) = history
    modules = ["rpn_head", "roi_heads_box_head", "roi_heads_box_predictor", "roi_heads_mask_head", "roi_heads_mask_predictor"]
    for m in modules:
        assert record[f"grad_norm/module.{m}"] > 0
        assert record[f"lr/module.{m}"] == record["lr/rpn" if m == "rpn_head" else "lr/heads"]
    assert record["time/iter"] >= record["time/data"] >= 0


# ---------------------------------------------------------------------------- iteration-level spikes
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
