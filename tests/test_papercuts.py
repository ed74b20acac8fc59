"""Issue 13's papercuts: a checkpoint path a sweep wrote works as-is, and a schedule too long for
the run says so at start."""

import json
import logging
import math
import shlex
import shutil

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from maskrcnn_coco.analysis.sweep import register_resolvers
from maskrcnn_coco.cli.probe import main as probe_main
from maskrcnn_coco.cli.probe import quote_override_value
from maskrcnn_coco.config import register_configs
from maskrcnn_coco.solver.schedule import check_schedule

from conftest import REPO, TINY_OVERRIDES, run_entry

SWEEP_JOB = "runs/maskrcnn/multirun/2026-01-01_00-00-00/0_optimizer.head_lr_multiplier=1"
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


def test_quoted_override_values_read_back_exactly():
    parser = OverridesParser.create()
    for value in (f"{SWEEP_JOB}/checkpoints/last.pth", "a,b/[c]/{d} e/it's", "C:\\runs\\x=1\\", "a\\'b", "''", "\\"):
        (override,) = parser.parse_overrides([f"model.weights={quote_override_value(value)}"])
        assert override.value() == value, value


def compose_default(*overrides):
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_default_schedule_fits_the_default_run(caplog):
    cfg = compose_default()
    iters = math.ceil(cfg.data.num_train / cfg.data.batch_size)
    with caplog.at_level(logging.WARNING, logger="maskrcnn_coco"):
        assert check_schedule(cfg.scheduler, iters, cfg.epochs) == []
    assert not caplog.records


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
