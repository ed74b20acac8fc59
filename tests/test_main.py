"""End-to-end: the real entry point in a subprocess with tiny overrides, read back like a user would."""

import json
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskrcnn_coco.analysis.history import read_history
from maskrcnn_coco.config import LOSS_COMPONENTS

from conftest import TINY_MODEL_OVERRIDES, TINY_OVERRIDES, run_entry


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
    # The same tags and values as the event file: one vocabulary.
    assert set(history[-1]) - {"epoch"} == tags
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
