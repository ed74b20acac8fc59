"""Resume continuity of every tracker backend: after any number of stops and resumes, into the same run
folder or a new one, each tag is ONE curve: every step once, in order, per-epoch and per-iteration tags.

A scripted training (``train``) stands for ``fit``: iterations log ``iter/x`` at the global step, each
epoch's end writes the checkpoint first, then the epoch's scalars (``Checkpointer`` runs before
``TrackerWriter``). Two kinds of stop: a crash after some iterations (the iteration scalars logged
after the last checkpoint are orphans) and a stop between an epoch's checkpoint and its scalars (the
checkpoint's history holds an epoch the tracker never got). Each backend is read back as a user sees it:
TensorBoard through ``EventAccumulator`` (the Python loader, ``--load_fast=false``) and through a model
of the default Rust loader, CSV as rows, MLflow through ``MlflowClient.get_metric_history``.
The end-to-end run (``run_training`` stopped twice and resumed into the same folder) is at the bottom.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import signal
import time
from collections import defaultdict

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util.tensor_util import make_ndarray

from maskrcnn_coco.tracking import CSVTracker, GuardedTracker, TensorBoardTracker, log_scalars, resume_tracker
from maskrcnn_coco.tracking.backends import CompositeTracker, NullTracker

ITERS, EVERY = 4, 2  # iterations per epoch, an iter/ scalar every EVERY iterations


def value(attempt: int, step: int) -> float:
    """What attempt ``attempt`` logs at ``step``: which attempt a point came from is readable from it."""
    return 1000.0 * attempt + step


def train(tracker, attempt: int, epochs: int, start=None, stop=None, iters: int = ITERS, every: int = EVERY):
    """Train ``attempt`` from checkpoint ``start`` (epoch, global step, history; None: from scratch) up to
    ``epochs``, or until ``stop``: ``("iteration", g)`` crashes after iteration g was logged,
    ``("before_log", e)`` stops after epoch e's checkpoint, before its scalars. Returns the last checkpoint."""
    epoch, step, history = start if start is not None else (0, 0, [])
    history = [dict(r) for r in history]
    if start is not None:
        # TensorBoard orders a run's event files by name, whose first field is the second they were
        # opened in: a real attempt lasts longer than that, these scripted ones do not.
        time.sleep(1.01 - time.time() % 1)
        resume_tracker(tracker, epoch, step, history)
    checkpoint = (epoch, step, [dict(r) for r in history])
    try:
        for e in range(epoch + 1, epochs + 1):
            for _ in range(iters):
                step += 1
                if step % every == 0:
                    log_scalars(tracker, {"iter/x": value(attempt, step)}, step)
                if stop == ("iteration", step):
                    return checkpoint
            record = {"epoch": e, "loss/train_loss_mask": value(attempt, e), "loss/val_loss_mask": value(attempt, e) + 0.5}
            history.append(record)
            checkpoint = (e, step, [dict(r) for r in history])
            if stop == ("before_log", e):
                return checkpoint
            log_scalars(tracker, {k: v for k, v in record.items() if k != "epoch"}, e)
        return checkpoint
    finally:
        tracker.close()


def three_attempts(make_tracker, folders=("run", "run", "run")):
    """Attempt 1 crashes in epoch 3 (iteration 11, orphan iter/x at 10); attempt 2 resumes epoch 2 and
    stops between epoch 4's checkpoint and its scalars; attempt 3 resumes epoch 4 and ends at 5."""
    ckpt = train(make_tracker(folders[0]), 1, 5, stop=("iteration", 11))
    assert ckpt[:2] == (2, 8)
    ckpt = train(make_tracker(folders[1]), 2, 5, start=ckpt, stop=("before_log", 4))
    assert ckpt[:2] == (4, 16)
    train(make_tracker(folders[2]), 3, 5, start=ckpt)


# What one continuous curve holds, point by point, after three_attempts into one folder.
EXPECTED = {
    "iter/x": [(s, value(1 if s <= 8 else 2 if s <= 16 else 3, s)) for s in range(2, 21, 2)],
    "loss/train_loss_mask": [(e, value(1 if e <= 2 else 2 if e <= 4 else 3, e)) for e in range(1, 6)],
}


def assert_points(points, expected, what=""):
    """Same steps, same values (float32 in event files)."""
    assert [s for s, _ in points] == [s for s, _ in expected], what
    assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-6), what


def assert_one_curve(points, tag):
    steps = [s for s, _ in points]
    assert steps == sorted(set(steps)), f"{tag}: steps {steps} repeat or go back"


def tensorboard_python(log_dir):
    """What the Python loader shows (it obeys the restart marker)."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_rust(log_dir):
    """What the default (Rust) loader shows: event files in name order, and per tag a point at step s
    preempts the points at steps >= s (``data/server/reservoir.rs``); restart markers are ignored."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value if event.HasField("summary") else ():
                if v.metadata.plugin_data.plugin_name == "scalars":  # the loader gives scalars as tensors
                    kept = [p for p in series[v.tag] if p[0] < event.step]
                    series[v.tag] = [*kept, (event.step, make_ndarray(v.tensor).item())]
    return dict(series)


@pytest.mark.parametrize("loader", [tensorboard_python, tensorboard_rust])
def test_tensorboard_same_folder_three_attempts_one_curve_per_tag(tmp_path, loader):
    three_attempts(lambda name: TensorBoardTracker(tmp_path / name))
    scalars = loader(tmp_path / "run")
    for tag, points in scalars.items():
        assert_one_curve(points, tag)
    for tag, expected in EXPECTED.items():
        assert_points(scalars[tag], expected, tag)
    assert [s for s, _ in scalars["loss/val_loss_mask"]] == [1, 2, 3, 4, 5]  # epoch 4 filled in from the history
    compare = loader(tmp_path / "run" / "val")
    assert [s for s, _ in compare["compare/loss_mask"]] == [1, 2, 3, 4, 5]


def test_tensorboard_new_folder_gets_the_carried_history_once(tmp_path):
    three_attempts(lambda name: TensorBoardTracker(tmp_path / name), folders=("a", "b", "c"))
    last = tensorboard_python(tmp_path / "c")
    assert_points(last["loss/train_loss_mask"], EXPECTED["loss/train_loss_mask"])  # 1..4 carried, 5 new
    assert [s for s, _ in last["iter/x"]] == [18, 20]  # iterations are not carried: after the checkpoint
    assert [s for s, _ in tensorboard_python(tmp_path / "c" / "train")["compare/loss_mask"]] == [1, 2, 3, 4, 5]
    middle = tensorboard_python(tmp_path / "b")
    assert [s for s, _ in middle["loss/train_loss_mask"]] == [1, 2, 3]  # carried 1-2, logged 3 (4: stopped first)


def test_tensorboard_one_iteration_per_epoch_keeps_the_epoch_points(tmp_path):
    """epoch == global_step: the marker at global_step + 1 drops the orphan iteration point (step 3),
    never a checkpointed epoch's point (steps <= 2)."""
    ckpt = train(TensorBoardTracker(tmp_path), 1, 4, stop=("iteration", 3), iters=1, every=1)
    assert ckpt[:2] == (2, 2)
    train(TensorBoardTracker(tmp_path), 2, 4, start=ckpt, iters=1, every=1)
    for loader in (tensorboard_python, tensorboard_rust):
        scalars = loader(tmp_path)
        assert_points(scalars["iter/x"], [(1, 1001), (2, 1002), (3, 2003), (4, 2004)])
        assert_points(scalars["loss/train_loss_mask"], [(1, 1001), (2, 1002), (3, 2003), (4, 2004)])


def test_tensorboard_warns_when_an_older_checkpoint_is_resumed_into_its_folder(tmp_path, caplog):
    ckpt = train(TensorBoardTracker(tmp_path), 1, 3, stop=("before_log", 1))
    train(TensorBoardTracker(tmp_path), 2, 3, start=ckpt)  # epochs 1-3 logged
    with caplog.at_level(logging.WARNING):
        train(TensorBoardTracker(tmp_path), 3, 3, start=ckpt)  # back to epoch 1
    assert "already holds epochs [2, 3]" in caplog.text
    # The default loader shows the new values from epoch 2 on.
    assert_points(tensorboard_rust(tmp_path)["loss/train_loss_mask"], [(1, 1001), (2, 3002), (3, 3003)])


def csv_scalars(log_dir):
    with (log_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    series = defaultdict(list)
    for row in rows:
        series[row["tag"]].append((int(row["step"]), float(row["value"])))
    return dict(series)


def test_csv_same_folder_drops_the_orphans_and_fills_the_gap(tmp_path):
    three_attempts(lambda name: CSVTracker(tmp_path / name))
    scalars = csv_scalars(tmp_path / "run")
    for tag, expected in EXPECTED.items():
        assert_points(scalars[tag], expected, tag)
    assert [s for s, _ in scalars["loss/val_loss_mask"]] == [1, 2, 3, 4, 5]


def test_csv_new_folder_gets_the_carried_history_once(tmp_path):
    three_attempts(lambda name: CSVTracker(tmp_path / name), folders=("a", "b", "c"))
    assert_points(csv_scalars(tmp_path / "c")["loss/train_loss_mask"], EXPECTED["loss/train_loss_mask"])


class ListTracker(NullTracker):
    """A backend that knows nothing of resumes (the four protocol methods)."""

    def __init__(self):
        self.scalars = []

    def log_scalar(self, tag, value, step):
        self.scalars.append((tag, step))


def test_a_tracker_without_resume_gets_the_history_once_also_composed_and_guarded():
    history = [{"epoch": 1, "loss/val": 2.0, "mAP/segm_AP": float("nan")}, {"epoch": 2, "loss/val": 1.5}]
    plain, composed, guarded = ListTracker(), ListTracker(), ListTracker()
    resume_tracker(plain, 2, 8, history)
    resume_tracker(CompositeTracker([composed, GuardedTracker(guarded)]), 2, 8, history)
    for tracker in (plain, composed, guarded):
        assert tracker.scalars == [("loss/val", 1), ("loss/val", 2)]  # non-finite values are no points


def test_tracker_writer_resumes_its_tracker_only_after_a_checkpoint():
    from types import SimpleNamespace

    from maskrcnn_coco.engine.writers import TrackerWriter

    fresh, mid_epoch, resumed = ListTracker(), ListTracker(), ListTracker()
    TrackerWriter(fresh).before_fit(SimpleNamespace(epoch=0, global_step=0, history=[]))
    TrackerWriter(mid_epoch).before_fit(SimpleNamespace(epoch=0, global_step=3, history=[]))  # inside epoch 1
    TrackerWriter(resumed).before_fit(SimpleNamespace(epoch=1, global_step=4, history=[{"epoch": 1, "loss/val": 2.0}]))
    assert fresh.scalars == [] and mid_epoch.scalars == [] and resumed.scalars == [("loss/val", 1)]


# ------------------------------------------------------------------------------------------ MLflow
def mlflow_client(root):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")
def test_mlflow_same_folder_continues_one_run_one_point_per_step(mlflow_store):
    from maskrcnn_coco.tracking.mlflow_tracker import MLflowTracker

    attempts = iter([None, "last.pth", "last.pth"])

    def make(name):
        tracker = MLflowTracker(mlflow_store / name, store_dir=mlflow_store)
        tracker.log_hyperparams({"epochs": 5, "resume": next(attempts)})
        return tracker

    three_attempts(make)
    client = mlflow_client(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("maskrcnn").experiment_id])
    assert run.info.status == "FINISHED"
    assert "resume: None -> last.pth" in run.data.tags["changed_on_resume"]
    for tag in ("iter/x", "loss/train_loss_mask", "loss/val_loss_mask"):
        points = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)]
        assert_one_curve(sorted(points), tag)
        assert len(points) == len({s for s, _ in points}), tag
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "iter/x"))
    # MLflow cannot delete a point: the crashed attempt's orphan (step 10) stays, the resumed one skips it.
    assert_points(history, [(s, value(1 if s <= 10 else 2 if s <= 16 else 3, s)) for s in range(2, 21, 2)])
    epochs = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss/train_loss_mask"))
    assert_points(epochs, EXPECTED["loss/train_loss_mask"])


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")
def test_mlflow_new_folder_is_a_new_run_with_the_carried_history(mlflow_store):
    from maskrcnn_coco.tracking.mlflow_tracker import MLflowTracker

    three_attempts(lambda name: MLflowTracker(mlflow_store / name, store_dir=mlflow_store), folders=("a", "b", "c"))
    client = mlflow_client(mlflow_store)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("maskrcnn").experiment_id])}
    assert set(runs) == {"a", "b", "c"}
    points = sorted((m.step, m.value) for m in client.get_metric_history(runs["c"].info.run_id, "loss/train_loss_mask"))
    assert_points(points, EXPECTED["loss/train_loss_mask"])


# ------------------------------------------------------------------------------ a real run, stopped twice
@pytest.mark.slow
def test_a_run_stopped_twice_and_resumed_into_its_folder_has_one_curve_per_tag(tmp_path, monkeypatch):
    """run_training with TensorBoard and CSV: a crash after a periodic checkpoint (orphan iterations),
    a SIGTERM mid-epoch, then to the end, all in one run folder. Every tag of the event files (run and
    compare sub-runs) and of metrics.csv is one curve; epoch tags hold the history's values."""
    import torch
    from helpers import compose_cfg

    import maskrcnn_coco.engine.loop as loop
    from maskrcnn_coco.cli.experiment import run_training
    from maskrcnn_coco.engine.fit import RunInterrupted

    run_dir = tmp_path / "run"
    overrides = ("tracker=all", "epochs=3", "checkpoint.every_n_iters=3", "print_freq=1", f"runs_dir={tmp_path}")
    real, calls = loop.move_to_device, {"n": 0, "stop": None}

    def stopping(images, targets, device):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            if calls["kind"] == "crash":
                raise RuntimeError("simulated crash")
            signal.raise_signal(signal.SIGTERM)
        return real(images, targets, device)

    monkeypatch.setattr(loop, "move_to_device", stopping)
    calls.update(stop=8, kind="crash")  # before step 8: last.pth at step 6, step 7 logged after it
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(compose_cfg(*overrides), run_dir)
    assert torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["global_step"] == 6
    orphans = {s for t, points in tensorboard_python(run_dir).items() if t.startswith("iter/") for s, _ in points if s > 6}
    assert orphans == {7}  # logged after the checkpoint the next attempt resumes
    calls.update(n=0, stop=4, kind="signal")  # resumed at step 6: the 4th batch is step 10, epoch 3
    with pytest.raises(RunInterrupted):
        run_training(compose_cfg(*overrides, f"resume={run_dir / 'checkpoints' / 'last.pth'}"), run_dir)
    calls.update(stop=None)
    run_training(compose_cfg(*overrides, f"resume={run_dir / 'checkpoints' / 'interrupted.pth'}"), run_dir)

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for loader in (tensorboard_python, tensorboard_rust):
        scalars = loader(run_dir)
        for tag, points in scalars.items():
            assert_one_curve(points, tag)
        for record in history:
            for tag, v in record.items():
                if tag != "epoch" and not tag.startswith("time/") and isinstance(v, float) and math.isfinite(v):
                    assert (record["epoch"], pytest.approx(v, rel=1e-5)) in scalars[tag], (tag, record["epoch"])
        assert [s for s, _ in scalars["loss/train_total"]] == [1, 2, 3]
        for split in ("train", "val"):
            compare = loader(run_dir / split)
            assert [s for s, _ in compare["compare/loss_mask"]] == [1, 2, 3], split
        iteration_tags = [t for t in scalars if t.startswith("iter/loss")]
        assert iteration_tags
        for tag in iteration_tags:  # every iteration logged (print_freq=1), each once, 12 in all
            assert [s for s, _ in scalars[tag]] == list(range(1, 13)), tag
    for tag, points in csv_scalars(run_dir).items():
        assert_one_curve(points, tag)
