"""engine/hooks.py: the events, their order, ranks, failure policy and checkpointed hook state; the
README's worked example (a hook that logs one scalar every read-back, added by one config entry)."""

import logging

import pytest
import torch
from helpers import ScriptedLosses, scripted_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine import (
    Checkpointer,
    DivergenceGuard,
    FitSettings,
    Hook,
    HookList,
    TrackerWriter,
    TrainingState,
    fit,
    train_one_epoch,
)
from maskrcnn_coco.engine.checkpoint import restore_training_state
from maskrcnn_coco.engine.hooks import CHECKPOINT, GUARD, MEASURE, OUTPUT
from maskrcnn_coco.tracking.backends import TensorBoardTracker

MAPPING = CategoryMapping([{"id": 1, "name": "a"}])


def batches(n, value=1.0):
    return scripted_loader([[value] * 5] * n)


def setup(lr=0.01):
    model = ScriptedLosses()
    return model, torch.optim.SGD([{"params": [model.w], "name": "heads"}], lr=lr)


# ------------------------------------------------------------------------------ the README's worked example
class HeadsLr(Hook):
    """Logs the ``heads`` group's lr at every read-back (a host value: no device sync)."""

    def at_read_back(self, state):
        for group in state.optimizer.param_groups:
            if group.get("name") == "heads":
                state.put_scalar("lr_iter/heads", group["lr"])


def test_the_worked_example_logs_its_scalar_at_every_read_back(tmp_path):
    model, opt = setup(lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1))
    tracker = TensorBoardTracker(tmp_path)
    fit(model, opt, batches(4), None, FitSettings(epochs=2, print_freq=2, progress=False),
        [HeadsLr(), TrackerWriter(tracker)], mapping=MAPPING, lr_scheduler=sched)
    tracker.close()
    acc = EventAccumulator(str(tmp_path)).Reload()
    events = acc.Scalars("lr_iter/heads")
    # Read-backs after iterations 2 and 4 of each epoch, at step = global step; lr = 0.5 / (step + 1).
    assert [e.step for e in events] == [2, 4, 6, 8]
    assert [e.value for e in events] == pytest.approx([0.5 / 3, 0.5 / 5, 0.5 / 7, 0.5 / 9])
    assert "lr/heads" in acc.Tags()["scalars"]  # the epoch scalars are still written beside it


def test_a_new_instrument_is_one_config_entry(tmp_path):
    from hydra import compose, initialize_config_dir

    from maskrcnn_coco.analysis.sweep import register_resolvers
    from maskrcnn_coco.cli.experiment import build_hooks
    from maskrcnn_coco.config import config_dir, register_configs
    from maskrcnn_coco.engine.settings import FitSettings as Settings
    from maskrcnn_coco.tracking.backends import NullTracker
    from maskrcnn_coco.utils.errors import ConfigError

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["+hooks.heads_lr={_target_: test_hooks.HeadsLr}"])
        default = compose("config")
        bad = compose("config", overrides=["+hooks.oops={_target_: collections.OrderedDict}"])
    hooks = build_hooks(cfg, tmp_path, Settings(progress=False), NullTracker(), [], {})
    plain = build_hooks(default, tmp_path, Settings(progress=False), NullTracker(), [], {})
    assert isinstance(hooks[-1], HeadsLr) and len(hooks) == len(plain) + 1
    with pytest.raises(ConfigError, match=r"hooks\.oops: collections\.OrderedDict made a OrderedDict, not a"):
        build_hooks(bad, tmp_path, Settings(progress=False), NullTracker(), [], {})


# ------------------------------------------------------------------------------ events and order
class Recorder(Hook):
    def __init__(self, name, calls, priority=OUTPUT, main_process_only=True):
        self.name, self.calls, self.priority, self.main_process_only = name, calls, priority, main_process_only

    def before_fit(self, state):
        self.calls.append((self.name, "before_fit"))

    def before_epoch(self, state):
        self.calls.append((self.name, "before_epoch", state.epoch, state.iteration))

    def after_backward(self, state):
        self.calls.append((self.name, "after_backward", state.iteration))

    def after_step(self, state):
        self.calls.append((self.name, "after_step", state.iteration, state.global_step))

    def at_read_back(self, state):
        self.calls.append((self.name, "at_read_back", state.iteration, state.epoch_end))

    def after_train_epoch(self, state):
        self.calls.append((self.name, "after_train_epoch", state.epoch))

    def after_epoch(self, state, result):
        self.calls.append((self.name, "after_epoch", result.epoch))

    def after_fit(self, state):
        self.calls.append((self.name, "after_fit"))


def test_events_arrive_in_the_documented_order_and_by_priority():
    calls = []
    late, early = Recorder("output", calls), Recorder("measure", calls, priority=MEASURE)
    model, opt = setup()
    fit(model, opt, batches(3), None, FitSettings(epochs=1, print_freq=2, progress=False), [late, early], mapping=MAPPING)
    events = [c[1:] for c in calls if c[0] == "measure"]
    assert events == [
        ("before_fit",), ("before_epoch", 1, 0),
        ("after_backward", 0), ("after_step", 0, 1),
        ("after_backward", 1), ("after_step", 1, 2), ("at_read_back", 1, False),
        ("after_backward", 2), ("after_step", 2, 3),
        ("at_read_back", 2, True), ("after_train_epoch", 1), ("after_epoch", 1), ("after_fit",),
    ]
    # Every event reaches the MEASURE hook first, whatever the list's order.
    assert [c for c in calls if c[0] == "measure"] == calls[0::2]
    assert [c[1:] for c in calls if c[0] == "output"] == events


def test_only_overridden_events_are_dispatched():
    class OnlyReadBack(Hook):
        def at_read_back(self, state):
            pass

    runner = HookList([OnlyReadBack()])
    assert runner.listens("at_read_back")
    assert not runner.listens("after_step") and not runner.listens("after_backward")


def test_a_nan_only_guard_is_added_when_none_is_given():
    model, opt = setup(lr=0.0)
    rows = batches(3)[:1] + batches(1, float("nan"))
    with pytest.raises(FloatingPointError, match=r"iteration 1: .*image ids \[0\]"):
        train_one_epoch(model, opt, rows, "cpu", 1, [])
    model, opt = setup(lr=0.0)  # the NaN step made w NaN
    runner = HookList([DivergenceGuard(max_loss=10.0)])
    train_one_epoch(model, opt, batches(1), "cpu", 1, runner)
    assert sum(isinstance(h, DivergenceGuard) for h in runner) == 1  # the given guard is kept, none added


# ------------------------------------------------------------------------------ failures
class Broken(Hook):
    def __init__(self, critical=False, priority=OUTPUT):
        self.critical, self.priority, self.calls = critical, priority, 0

    def at_read_back(self, state):
        self.calls += 1
        raise OSError("disk full")


def test_a_failing_output_hook_is_reported_once_and_training_goes_on(caplog):
    caplog.set_level(logging.WARNING, logger="maskrcnn_coco")
    broken, calls = Broken(), []
    model, opt = setup()
    history = fit(model, opt, batches(4), None, FitSettings(epochs=2, print_freq=1, progress=False),
                  [broken, Recorder("after", calls)], mapping=MAPPING)
    assert [r["epoch"] for r in history] == [1, 2] and broken.calls == 1
    warnings = [r.getMessage() for r in caplog.records if "Hook Broken failed" in r.getMessage()]
    assert warnings == ["Hook Broken failed in at_read_back (OSError: disk full); training goes on without it."]
    assert sum(1 for c in calls if c[1] == "at_read_back") == 8  # the hooks after it still ran, at every read-back


def test_a_failing_critical_hook_stops_training():
    model, opt = setup()
    with pytest.raises(OSError, match="disk full"):
        fit(model, opt, batches(4), None, FitSettings(epochs=2, print_freq=1, progress=False),
            [Broken(critical=True, priority=GUARD)], mapping=MAPPING)


# ------------------------------------------------------------------------------ state through the checkpoint
class CountingHook(Hook):
    """Keeps a count of optimizer steps across epochs (state a resumed run must not lose)."""

    priority = MEASURE

    def __init__(self):
        self.steps, self.per_epoch = 0, []

    def after_step(self, state):
        self.steps += 1

    def after_train_epoch(self, state):
        self.per_epoch.append(self.steps)

    def state_dict(self):
        return {"steps": self.steps, "per_epoch": list(self.per_epoch)}

    def load_state_dict(self, state):
        self.steps, self.per_epoch = state["steps"], list(state["per_epoch"])


def test_a_stateful_hook_resumes_through_the_checkpoint_with_no_special_case(tmp_path):
    model, opt = setup()
    straight = CountingHook()
    fit(model, opt, batches(3), None, FitSettings(epochs=3, progress=False), [straight], mapping=MAPPING)

    model, opt = setup()
    first = CountingHook()
    fit(model, opt, batches(3), None, FitSettings(epochs=1, progress=False), [first, Checkpointer(tmp_path)], mapping=MAPPING)
    saved = torch.load(tmp_path / "last.pth", weights_only=True)
    assert saved["hooks"]["CountingHook"] == {"steps": 3, "per_epoch": [3]}

    model, opt = setup()
    state = TrainingState(model, opt, None, None, MAPPING, 3)
    restore_training_state(tmp_path / "last.pth", state)
    resumed = CountingHook()
    fit(model, opt, batches(3), None, FitSettings(epochs=3, progress=False), [resumed], mapping=MAPPING, state=state)
    assert resumed.state_dict() == straight.state_dict() == {"steps": 9, "per_epoch": [3, 6, 9]}


def test_main_process_only_hooks_are_left_out_on_other_ranks(monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("maskrcnn_coco.engine.hooks"), "is_main_process", lambda: False)
    writer, everywhere = Hook(), DivergenceGuard()
    runner = HookList([writer, everywhere])
    assert list(runner) == [everywhere]
    assert writer.main_process_only and not everywhere.main_process_only and everywhere.priority < CHECKPOINT
