"""Progress outside a terminal: no bar frames, one plain log line per ``print_freq`` iterations."""

import os
import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from maskrcnn_coco.config import LOSS_COMPONENTS
from maskrcnn_coco.data.coco import build_data
from maskrcnn_coco.engine.progress import Progress, interactive
from maskrcnn_coco.tracking import KEY_HPARAMS

from conftest import TINY_OVERRIDES, run_entry, tiny_data_cfg

LINE = re.compile(
    r"^Epoch (\d+) \[(\d+)/(\d+)\] cls=[\d.]+ box=[\d.]+ mask=[\d.]+ obj=[\d.]+ rpn=[\d.]+ total=[\d.]+ lr=\S+ "
    r"(?:data=\d+ms iter=\d+ms )?\| [\d.]+ s/it \| ETA \d+:\d\d:\d\d$",
    re.MULTILINE,
)


def test_off_a_terminal_update_logs_one_line_and_draws_nothing(caplog, capsys):
    caplog.set_level("INFO", logger="maskrcnn_coco")
    assert not interactive()  # pytest captures stdout
    progress = Progress(range(10), "Epoch 3")
    assert not progress.use_bar
    for i in progress:
        if (i + 1) % 5 == 0:
            progress.update({"cls": "0.412", "total": "1.137", "lr": "0.02"}, i + 1)
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert re.fullmatch(r"Epoch 3 \[5/10\] cls=0\.412 total=1\.137 lr=0\.02 \| [\d.]+ s/it \| ETA \d:\d\d:\d\d", lines[0])
    assert lines[1].startswith("Epoch 3 [10/10]") and lines[1].endswith("ETA 0:00:00")
    assert "\r" not in capsys.readouterr().err


def test_line_gives_seconds_per_iteration_and_eta_of_a_resumed_epoch():
    progress = Progress(range(100), "Epoch 2", start=40, bar=False)
    assert progress.line({"total": "1.0"}, 60, elapsed=10.0) == "Epoch 2 [60/100] total=1.0 | 0.50 s/it | ETA 0:00:20"
    assert Progress(iter(range(3)), "Evaluating", bar=False).line({}, 2, 1.0) == "Evaluating [2]  | 0.50 s/it"


def test_disabled_or_bar_mode_logs_nothing(caplog):
    caplog.set_level("INFO", logger="maskrcnn_coco")
    for progress in (Progress(range(4), "Epoch 1", enabled=False), Progress(range(4), "Epoch 1", bar=True)):
        progress.update({"total": "1.0"}, 2)
        progress.close()
    assert caplog.records == []


@pytest.mark.slow
def test_a_run_written_to_a_file_has_no_bar_frames_and_one_line_per_print_freq(tmp_path):
    # The shapes set generated beforehand: its generation bar is the data package's, not the loop's.
    build_data(tiny_data_cfg(cache_dir=os.path.join(os.environ["MASKRCNN_COCO_CACHE"], "shapes")), seed=0, progress=False)
    args = [*TINY_OVERRIDES, "epochs=2", f"runs_dir={tmp_path}", "progress=true", "print_freq=2", "tracker=tensorboard",
            "scheduler.milestones=[1.5]", "eval.every_n_epochs=2", "data.augment.vflip_prob=0.25"]
    proc = run_entry(args, cwd=tmp_path)  # stdout and stderr are pipes: not terminals
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    lines = LINE.findall(proc.stdout)
    # 8 images / batch 2 = 4 iterations per epoch; print_freq=2: iterations 2 and 4 of each epoch.
    assert [(int(e), int(i), int(n)) for e, i, n in lines] == [(1, 2, 4), (1, 4, 4), (2, 2, 4), (2, 4, 4)], proc.stdout
    assert "Evaluating" not in proc.stdout
    for epoch in (1, 2):
        assert f"Epoch {epoch}/2\n📊 Training Losses:" in proc.stdout  # the epoch block as before
    run_dir = next((tmp_path / "maskrcnn").iterdir())
    assert len(LINE.findall((run_dir / "train.log").read_text().replace("[INFO] ", "\n"))) == 4

    # The run's HParams: the curated keys plus the hyperparameters the command line overrode (not
    # where or how the run executes: print_freq, tracker, progress, runs_dir).
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert set(KEY_HPARAMS) <= set(start.hparams)
    assert start.hparams["data.augment.vflip_prob"].number_value == pytest.approx(0.25)
    assert not {"print_freq", "tracker", "progress", "runs_dir"} & set(start.hparams)
    assert "data.augment.hflip_prob" not in start.hparams
    assert all(f"loss.weights.{k}" in start.hparams for k in LOSS_COMPONENTS)
