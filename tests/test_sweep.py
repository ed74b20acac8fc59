"""``analysis/sweep.py``: multirun sweeps, one run folder and event file per job, job folder names, and a
summary when the sweep ends."""

import csv

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_OVERRIDES, run_entry


@pytest.mark.slow
def test_two_job_head_lr_multirun(tmp_path):
    proc = run_entry(["-m", *TINY_OVERRIDES, "epochs=1", f"runs_dir={tmp_path}", "optimizer.head_lr_multiplier=1,3"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "maskrcnn" / "multirun").iterdir()
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0_optimizer.head_lr_multiplier=1", "1_optimizer.head_lr_multiplier=3"]
    for job, multiplier in zip(jobs, (1, 3)):
        events = list(job.glob("events.out.tfevents.*"))
        assert len(events) == 1
        acc = EventAccumulator(str(job))
        acc.Reload()
        lr = acc.Scalars("lr")[-1].value
        heads = acc.Scalars("lr/heads")[-1].value
        assert heads / lr == pytest.approx(multiplier, rel=1e-5)
        assert acc.Scalars("lr/backbone")[-1].value == pytest.approx(lr)

    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [r["overrides"].split()[-1] for r in rows] == ["optimizer.head_lr_multiplier=1", "optimizer.head_lr_multiplier=3"]
    for r in rows:
        assert float(r["loss/train_loss_mask"]) > 0 and r["best_epoch"] == "1"
        assert 0.0 <= float(r["mAP/segm_AP"]) <= 1.0 and float(r["loss/val"]) > 0
    png = (sweep_dir / "sweep_summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert md.count("\n| ") == 3  # header + 2 jobs
    assert "Sweep summary" in proc.stdout and "| 1_optimizer.head_lr_multiplier=3 |" in proc.stdout


@pytest.mark.slow
def test_submitit_local_sweep_runs_each_job_in_its_own_process(tmp_path):
    """The SLURM path's launcher, run locally: jobs are separate processes that still get folders
    named by the swept key, and the sweep summary is written."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from conftest import run_entry

    proc = run_entry(["-m", "hydra/launcher=submitit_local", *TINY_OVERRIDES, "epochs=1", "tracker=none",
                      f"runs_dir={tmp_path}", "optimizer.head_lr_multiplier=1,3"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "maskrcnn" / "multirun").iterdir()
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0_optimizer.head_lr_multiplier=1", "1_optimizer.head_lr_multiplier=3"]
    assert (sweep_dir / ".submitit").is_dir()  # submitted through submitit, not run in-process
    for job in jobs:
        assert (sweep_dir / job / "checkpoints" / "last.pth").is_file()
    assert (sweep_dir / "sweep_summary.csv").read_text().count("\n") == 3


def test_job_dirname_names_only_the_swept_keys(monkeypatch):
    from maskrcnn_coco.analysis.sweep import MAX_DIRNAME, job_dirname

    monkeypatch.setattr("sys.argv", ["main_mlops.py", "-m", "optimizer.lr=0.1,0.2", "epochs=3", "model.anchor_sizes=[16,32]"])
    assert job_dirname(["optimizer.lr=0.2", "epochs=3", "model.anchor_sizes=[16,32]"]) == "optimizer.lr=0.2"
    # A shipped sweep config: the keys come from hydra.sweeper.params.
    monkeypatch.setattr("sys.argv", ["main_mlops.py", "+sweep=head_lr", "epochs=3"])
    assert job_dirname(["+sweep=head_lr", "epochs=3", "optimizer.head_lr_multiplier=30"],
                       {"optimizer.head_lr_multiplier": "1,3,10,30"}) == "optimizer.head_lr_multiplier=30"
    long = [f"key{i}=value/{i}" for i in range(40)]
    monkeypatch.setattr("sys.argv", ["main_mlops.py", "-m", *[f"key{i}=a,b" for i in range(40)]])
    name = job_dirname(long)
    assert len(name) <= MAX_DIRNAME and "/" not in name and name.startswith("key0=value_0,key1=")
