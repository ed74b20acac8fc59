"""``cli/train.py``, end to end: the real entry point in a subprocess with tiny overrides, read back like a
user would (logs, checkpoints, resume, SIGTERM, one-line errors, warnings said at start)."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import SWEEP_JOB, assert_same_weights, weights
from hydra.core.override_parser.overrides_parser import OverridesParser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskrcnn_coco.analysis.history import read_history
from maskrcnn_coco.cli.probe import main as probe_main
from maskrcnn_coco.config import LOSS_COMPONENTS

from conftest import ENTRY, TINY_MODEL_OVERRIDES, TINY_OVERRIDES, run_entry

pytestmark = pytest.mark.slow  # every test here runs the entry point in a subprocess


def only_run_dir(runs_dir):
    runs = sorted((runs_dir / "maskrcnn").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_training_run_logs_every_component(tmp_path):
    proc = run_entry([*TINY_OVERRIDES, "epochs=2", f"runs_dir={tmp_path}", "tracker=all"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for epoch in (1, 2):
        block = re.search(rf"Epoch {epoch}/2\n📊 Training Losses:\n   Total: [\d.]+\n((?:   loss_\w+: [\d.]+\n){{5}})"
                          rf"📈 Validation Loss: [\d.]+\n📦 Box mAP: [\d.]+ \(AP50: [\d.]+\)\n🎭 Mask mAP: [\d.]+ \(AP50: [\d.]+\)\n"
                          rf"💾 Saved checkpoint: \S+epoch_00{epoch}.pth", out)
        assert block, out
        names = re.findall(r"(loss_\w+):", block.group(1))
        assert names == sorted(LOSS_COMPONENTS)
    assert "Parameter groups:" in out

    run_dir = only_run_dir(tmp_path)
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"loss/train_total", "loss/val", "lr", "lr/backbone", "lr/heads", "lr/rpn",
                "mAP/bbox_AP", "mAP/bbox_AP50", "mAP/bbox_AP75", "mAP/segm_AP", "mAP/segm_AP50", "mAP/segm_AP75",
                "grad_norm/backbone", "grad_norm/heads", "grad_norm/rpn"}
    expected |= {f"loss/train_{k}" for k in LOSS_COMPONENTS} | {f"loss/val_{k}" for k in LOSS_COMPONENTS}
    assert expected <= tags, expected - tags
    totals = {e.step: e.value for e in acc.Scalars("loss/train_total")}
    assert sorted(totals) == [1, 2]
    for step, total in totals.items():
        parts = sum(next(e.value for e in acc.Scalars(f"loss/train_{k}") if e.step == step) for k in LOSS_COMPONENTS)
        assert parts == pytest.approx(total, rel=1e-5)
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")

    ckpts = run_dir / "checkpoints"
    assert {p.name for p in ckpts.iterdir()} == {"epoch_001.pth", "epoch_002.pth", "last.pth", "best.pth"}
    best = torch.load(ckpts / "best.pth", map_location="cpu", weights_only=True)
    segm = {h["epoch"]: h.get("mAP/segm_AP", float("nan")) for h in best["history"]}
    assert best["fit"]["best_epoch"] == max(segm, key=lambda e: (segm[e], -e))
    state = torch.load(ckpts / "last.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["num_classes"] == 4
    assert state["categories"]["names"] == ["circle", "square", "triangle"]
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    # The same tags and values as the event file: one vocabulary (the iteration-level iter/ tags are
    # the event file's only, at global steps).
    assert set(history[-1]) - {"epoch"} == {t for t in tags if not t.startswith("iter/")}
    assert {"iter/loss_mask", "iter/loss_total", "iter/lr/heads", "iter/memory/main_rss_mb"} <= tags
    assert history[-1]["loss/train_total"] == pytest.approx(totals[2], rel=1e-6)
    # The run's log file holds the console lines (rank 0 only).
    log_text = (run_dir / "train.log").read_text()
    assert "Epoch 2/2" in log_text and "Parameter groups:" in log_text
    assert (run_dir / "metrics.csv").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()

    # Resume continues at epoch 3 with the history carried over.
    proc = run_entry([*TINY_OVERRIDES, "epochs=3", f"runs_dir={tmp_path / 'resumed'}", f"resume={ckpts / 'last.pth'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Epoch 3/3" in proc.stdout and "Epoch 1/3" not in proc.stdout and "Resumed from" in proc.stdout
    resumed = read_history(only_run_dir(tmp_path / "resumed"))
    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    assert resumed[:2] == history


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lrr=0.1", "Key 'lrr' not in 'OptimizerConfig'"),
        ("epochs=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("data.batchsize=2", "Key 'batchsize' not in 'ShapesDataConfig'"),
        ("model=resnet", "Could not find 'model/resnet'"),
    ],
)
def test_bad_overrides_fail_at_start_with_hydras_message(tmp_path, override, message):
    proc = run_entry([override, f"runs_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "maskrcnn").exists() or not any((tmp_path / "maskrcnn").rglob("*.pth"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data=coco"], "Missing required config value: data.root (e.g. data.root=/data/coco)"),
        (["data=coco", "data.root=/nonexistent/coco"], "Annotation file not found: /nonexistent/coco/annotations/instances_train2017.json"),
        (["model.weights=/nonexistent/w.pth"], "Weights file not found: /nonexistent/w.pth"),
        (["device=cuda:7"] if not torch.cuda.is_available() else ["model.arch=nope"], "device" if not torch.cuda.is_available() else "model.arch"),
    ],
)
def test_bad_input_gives_a_one_line_error(tmp_path, overrides, message):
    tiny = TINY_MODEL_OVERRIDES if "data=coco" in overrides else TINY_OVERRIDES
    proc = run_entry([*tiny, *overrides, f"runs_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_to_the_entry_point_then_resume_auto(tmp_path):
    """The real entry point: SIGTERM mid-epoch -> one line, exit 143, interrupted.pth; resume=auto
    continues from it to the same final weights as an uninterrupted run."""
    common = [*TINY_OVERRIDES, "data.num_train=48", "epochs=2", "tracker=none", "print_freq=1"]
    straight = run_entry([*common, f"runs_dir={tmp_path / 'straight'}"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ENTRY), *common, f"runs_dir={tmp_path / 'pre'}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # training starts right after the run summary line
        if line.startswith("Device:"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().startswith("Stopped by SIGTERM in epoch 1, iteration") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    (interrupted,) = (tmp_path / "pre").rglob("interrupted.pth")

    resumed = run_entry([*common, f"runs_dir={tmp_path / 'pre'}", "resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from {interrupted}" in resumed.stdout
    (final_straight,) = (tmp_path / "straight").rglob("last.pth")
    finals = [p for p in (tmp_path / "pre").rglob("last.pth") if p.parent.parent != interrupted.parent.parent]
    assert len(finals) == 1
    assert_same_weights(weights(final_straight), weights(finals[0]))


# --------------------------------------------------------------- a sweep job's checkpoint (issue 13)
# The README's resume line for a sweep job's checkpoint, as typed in a POSIX shell.
README_RESUME = f"""python maskrcnn_coco/main_mlops.py epochs=2 "resume='{SWEEP_JOB}/checkpoints/last.pth'\""""
README_RESUME_ALT = f"""python maskrcnn_coco/main_mlops.py epochs=2 'resume="{SWEEP_JOB}/checkpoints/last.pth"'"""


def test_resume_and_probe_from_a_sweep_job_checkpoint(tmp_path, monkeypatch, capsys):
    """Job folders are named <n>_<key>=<value>: the '=' needs Hydra quoting, which the README shows
    and the probe's --weights adds itself."""
    first = run_entry([*TINY_OVERRIDES, "epochs=1", "runs_dir=runs"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (last,) = (tmp_path / "runs" / "maskrcnn").glob("*/checkpoints/last.pth")
    ckpt = tmp_path / SWEEP_JOB / "checkpoints" / "last.pth"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(last, ckpt)

    argv = shlex.split(README_RESUME)[2:]  # what the shell hands the entry point, README line as is
    assert argv[-1] == f"resume='{SWEEP_JOB}/checkpoints/last.pth'"
    assert OverridesParser.create().parse_overrides(shlex.split(README_RESUME_ALT)[2:])[1].value() == (
        f"{SWEEP_JOB}/checkpoints/last.pth"
    )
    resumed = run_entry([*TINY_OVERRIDES, "runs_dir=runs", *argv], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {SWEEP_JOB}/checkpoints/last.pth" in resumed.stdout
    (run_dir,) = (p.parent.parent for p in (tmp_path / "runs" / "maskrcnn").glob("*/checkpoints/last.pth") if p != last)
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1] == 2

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "probe"
    probe_args = [a for a in TINY_OVERRIDES if a != "progress=false"]
    assert probe_main(["--weights", f"{SWEEP_JOB}/checkpoints/last.pth", "--num-batches", "1", "--no-progress",
                       "--format", "json", "--output-dir", str(out), *probe_args]) == 0, capsys.readouterr().err
    (record,) = json.loads((out / "loss_components.json").read_text())
    assert record["weights"] == f"{SWEEP_JOB}/checkpoints/last.pth"


def test_a_schedule_longer_than_the_run_is_a_warning_at_start(tmp_path):
    """epochs=2 on a small set: the default warmup (100 iterations) and milestones (3.75, 4.5) never happen."""
    proc = run_entry([*TINY_OVERRIDES, "epochs=2", "scheduler.warmup_iters=100", f"runs_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("WARNING: scheduler.")]
    # 8 training images, batch 2: 4 iterations per epoch.
    assert warnings[0].startswith("WARNING: scheduler.warmup_iters=100 but the run has 8 iterations (epochs=2 x 4 per epoch)")
    assert "lr never reaches optimizer.lr" in warnings[0] and "scheduler.warmup_iters=2" in warnings[0]
    assert warnings[1].startswith("WARNING: scheduler.milestones=[3.75, 4.5] lie at or beyond epochs=2")
    assert "scheduler.milestones=[1.5,1.8]" in warnings[1]
    # Said at start: before the first epoch's lines.
    assert proc.stdout.index(warnings[0]) < proc.stdout.index("Epoch 1")
