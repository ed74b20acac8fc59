"""``cli/experiment.py``: ``run_training`` in process. Never lose a trained epoch, resume exactly:
checkpoints, signals, divergence, config checks."""

import importlib
import json
import math
import os
import signal

import pytest
import torch
from helpers import assert_same_weights, compose_cfg, weights

from maskrcnn_coco.cli.experiment import run_training
from maskrcnn_coco.engine.fit import RunInterrupted
from maskrcnn_coco.modeling.weights import WeightsError
from maskrcnn_coco.utils.errors import ConfigError


def train(tmp_path, name, *overrides):
    run_dir = tmp_path / name
    cfg = compose_cfg(f"runs_dir={tmp_path}", *overrides)
    run_training(cfg, run_dir)
    return run_dir


def history(run_dir):
    """metrics.jsonl without the wall-clock tags."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [["scheduler.name=multistep", "scheduler.milestones=[1.5]"], ["scheduler.name=cosine"]])
def test_resume_at_an_epoch_boundary_is_bit_identical(tmp_path, schedule):
    """2 epochs straight vs epoch 1 + resume: same weights, same logged losses and metrics."""
    straight = train(tmp_path, "straight", "epochs=2", *schedule)
    resumed = train(tmp_path, "resumed", "epochs=2", *schedule, f"resume={straight / 'checkpoints' / 'epoch_001.pth'}")
    assert_same_weights(weights(straight / "checkpoints" / "last.pth"), weights(resumed / "checkpoints" / "last.pth"))
    assert history(resumed) == history(straight)
    assert [h["epoch"] for h in history(resumed)] == [1, 2]


@pytest.mark.slow
def test_resume_with_more_epochs_rebuilds_the_cosine_schedule(tmp_path, caplog):
    caplog.set_level("INFO", logger="maskrcnn_coco")
    first = train(tmp_path, "first", "epochs=1", "scheduler.name=cosine")
    # The finished run's cosine reached lr 0; three epochs must train at the 3-epoch schedule's lr.
    more = train(tmp_path, "more", "epochs=3", "scheduler.name=cosine", f"resume={first / 'checkpoints' / 'last.pth'}")
    assert "Schedule rebuilt" in caplog.text and "total_iters 4 -> 12" in caplog.text
    lrs = [h["lr"] for h in history(more)]
    assert lrs[0] == pytest.approx(0.0, abs=1e-12)  # epoch 1: the first run's own schedule
    base = compose_cfg().optimizer.lr
    expected = base * 0.5 * (1 + math.cos(math.pi * 8 / 12))  # after 8 of 12 iterations
    assert lrs[1] == pytest.approx(expected, rel=1e-6) and lrs[1] > 0


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """In process: a SIGTERM during iteration 2 of epoch 1 finishes that iteration, writes a resumable
    interrupted.pth; resuming from it ends with the uninterrupted run's weights and history."""
    straight = train(tmp_path, "straight", "epochs=2")

    import maskrcnn_coco.engine.loop as loop

    calls = {"n": 0}
    real = loop.move_to_device

    def signalling(images, targets, device):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(images, targets, device)

    monkeypatch.setattr(loop, "move_to_device", signalling)
    with pytest.raises(RunInterrupted) as stop:
        train(tmp_path, "stopped", "epochs=2")
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert "Stopped by SIGTERM in epoch 1, iteration 2" in str(stop.value)
    interrupted = tmp_path / "stopped" / "checkpoints" / "interrupted.pth"
    state = torch.load(interrupted, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["epoch_progress"]["iterations"] == 2 and state["global_step"] == 2
    monkeypatch.setattr(loop, "move_to_device", real)

    resumed = train(tmp_path, "resumed", "epochs=2", f"resume={interrupted}")
    assert_same_weights(weights(straight / "checkpoints" / "last.pth"), weights(resumed / "checkpoints" / "last.pth"))
    assert history(resumed) == history(straight)


@pytest.mark.slow
def test_checkpoints_every_n_iters_do_not_change_training(tmp_path):
    """Step-boundary checkpoints inside epochs (the loader restarted after each) train identically."""
    plain = train(tmp_path, "plain", "epochs=2")
    split = train(tmp_path, "split", "epochs=2", "checkpoint.every_n_iters=3")
    assert_same_weights(weights(plain / "checkpoints" / "last.pth"), weights(split / "checkpoints" / "last.pth"))
    assert history(split) == history(plain)


@pytest.mark.slow
def test_resume_auto_picks_the_newest_checkpoint_and_starts_fresh_without_one(tmp_path, caplog):
    caplog.set_level("INFO", logger="maskrcnn_coco")
    fresh = train(tmp_path, "maskrcnn/a", "epochs=1", "resume=auto")
    assert "resume=auto: no checkpoint" in caplog.text
    later = train(tmp_path, "maskrcnn/b", "epochs=2", "resume=auto")
    assert f"Resumed from {fresh / 'checkpoints' / 'last.pth'} (epoch 1)" in caplog.text
    assert [h["epoch"] for h in history(later)] == [1, 2]


@pytest.mark.slow
def test_a_finished_run_is_not_resumed_silently(tmp_path):
    done = train(tmp_path, "done", "epochs=1")
    with pytest.raises(ConfigError, match=r"already finished epoch 1; set epochs above 1"):
        train(tmp_path, "again", "epochs=1", f"resume={done / 'checkpoints' / 'last.pth'}")


def test_a_checkpoint_from_inside_an_iteration_is_refused(tmp_path):
    path = tmp_path / "interrupted.pth"
    torch.save({"model": {}, "epoch": 0, "interrupted_mid_iteration": True}, path)
    with pytest.raises(WeightsError, match="inside an iteration"):
        train(tmp_path, "run", "epochs=1", f"resume={path}")


@pytest.mark.slow
def test_a_failing_evaluation_keeps_the_trained_epoch(tmp_path, monkeypatch):
    fit_module = importlib.import_module("maskrcnn_coco.engine.fit")  # the package exports the function `fit`

    def broken(*args, **kwargs):
        raise OSError("image file is truncated (val/000003.png)")

    monkeypatch.setattr(fit_module, "evaluate", broken)
    with pytest.raises(fit_module.EvaluationFailed, match=r"Evaluation after epoch 1 failed \(OSError: image file is truncated"):
        train(tmp_path, "run", "epochs=1")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 4


@pytest.mark.slow
def test_divergence_stops_before_any_checkpoint(tmp_path):
    """A finite but exploding loss (huge lr, clipped gradients) stops like a NaN, nothing is saved."""
    with pytest.raises(FloatingPointError) as err:
        train(tmp_path, "run", "epochs=2", "optimizer.lr=1e4", "optimizer.clip_grad_norm=10", "scheduler.warmup_iters=0",
              "train.max_loss_factor=100", "print_freq=1")
    message = str(err.value)
    assert "lower optimizer.lr" in message and "epoch 1, iteration" in message
    if "check_dataset" in message:  # the learning rate is named first: the whole batch exploded
        assert message.index("optimizer.lr") < message.index("scripts/check_dataset.py")
    assert not list((tmp_path / "run").rglob("*.pth"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-1", "optimizer.lr=-1.0: must be positive"),
        ("data.batch_size=0", "data.batch_size=0: must be at least 1"),
        ("print_freq=0", "print_freq=0: must be at least 1"),
        ("eval.every_n_epochs=0", "eval.every_n_epochs=0: must be at least 1"),
        ("epochs=0", "epochs=0: must be at least 1"),
        ("data.num_workers=-1", "data.num_workers=-1: must be 0 or more"),
        ("data.augment.scale_range=[1.2,0.8]", "data.augment.scale_range=[1.2, 0.8]: must be [min, max]"),
    ],
)
def test_bad_values_fail_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        train(tmp_path, "run", override)
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fp16_resume_restores_the_grad_scaler(tmp_path, monkeypatch):
    """train.amp=fp16 trains with a GradScaler whose state (scale, growth tracker) is checkpointed and
    restored on resume; the resumed run ends bit-identical to the straight one."""
    straight = train(tmp_path, "straight", "epochs=2", "train.amp=fp16")
    saved = torch.load(straight / "checkpoints" / "epoch_001.pth", map_location="cpu", weights_only=True)["scaler"]
    assert saved is not None and saved["scale"] > 0 and "_growth_tracker" in saved
    loaded = []
    original = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", lambda self, state: loaded.append(dict(state)) or original(self, state))
    resumed = train(tmp_path, "resumed", "epochs=2", "train.amp=fp16", f"resume={straight / 'checkpoints' / 'epoch_001.pth'}")
    assert loaded == [saved]
    assert_same_weights(weights(straight / "checkpoints" / "last.pth"), weights(resumed / "checkpoints" / "last.pth"))
