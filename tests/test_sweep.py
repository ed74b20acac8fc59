"""``analysis/sweep.py``: multirun sweeps, one run folder and event file per job, job folder names, and a
summary when the sweep ends."""

import csv
import json

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

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
        # HParams: the swept key first, infrastructure overrides (runs_dir, progress) left out.
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert experiment.hparam_infos[0].name == "optimizer.head_lr_multiplier"
        assert start.hparams["optimizer.head_lr_multiplier"].number_value == multiplier
        assert "runs_dir" not in start.hparams and "progress" not in start.hparams
        assert json.loads((job / "provenance.json").read_text())["world_size"] == 1

    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [r["overrides"].split()[-1] for r in rows] == ["optimizer.head_lr_multiplier=1", "optimizer.head_lr_multiplier=3"]
    for r in rows:
        assert float(r["loss/train_loss_mask"]) > 0 and float(r["loss/val_loss_mask"]) > 0 and r["best_epoch"] == "1"
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


def fake_sweep(sweep_dir, multipliers=(1, 10)):
    """Job folders as a finished multirun leaves them: ``metrics.jsonl`` and ``.hydra/overrides.yaml``.
    The x10 job's val classifier loss rises while every train loss falls (heads overfitting)."""
    from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS

    for j, m in enumerate(multipliers):
        job = sweep_dir / f"{j}_optimizer.head_lr_multiplier={m}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["epochs=3", f"optimizer.head_lr_multiplier={m}"]))
        records = []
        for epoch in (1, 2, 3):
            record = {"epoch": epoch, "loss/train_total": 5 / epoch, "loss/val": 5 / epoch, "mAP/segm_AP": 0.1 * epoch}
            for name in LOSS_COMPONENTS:
                record[f"loss/train_{name}"] = 1 / epoch
                record[f"loss/val_{name}"] = 0.5 * epoch if (m == 10 and name == "loss_classifier") else 1 / epoch
            records.append(json.dumps(record))
        (job / "metrics.jsonl").write_text("\n".join(records) + "\n")
    return sweep_dir


def test_summary_table_has_each_components_final_train_and_val(tmp_path):
    from maskrcnn_coco.analysis.sweep import write_sweep_summary

    table = write_sweep_summary(fake_sweep(tmp_path))
    header = table.splitlines()[0]
    assert "| train_classifier | val_classifier | train_box_reg | val_box_reg | train_mask | val_mask |" in header
    assert "| train_total | val |" in header
    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert [float(r["loss/val_loss_classifier"]) for r in rows] == [pytest.approx(1 / 3), pytest.approx(1.5)]
    assert [float(r["loss/train_loss_classifier"]) for r in rows] == [pytest.approx(1 / 3)] * 2
    assert (tmp_path / "sweep_summary.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_plot_has_one_panel_per_component_with_train_solid_and_val_dashed(tmp_path):
    import matplotlib.pyplot as plt

    from maskrcnn_coco.analysis.sweep import collect_jobs, sweep_figure
    from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS

    rows = collect_jobs(fake_sweep(tmp_path))
    fig = sweep_figure(rows, "sweep")
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert titles[:7] == [*LOSS_COMPONENTS, "total (weighted)", "mAP/segm_AP"]
        for ax in fig.axes[:6]:  # per job: train solid, val dashed, in the job's colour
            assert [(line.get_linestyle(), line.get_color()) for line in ax.get_lines()] == [
                ("-", "C0"), ("--", "C0"), ("-", "C1"), ("--", "C1")]
        rising = fig.axes[0].get_lines()[3]  # the x10 job's val classifier loss
        assert list(rising.get_ydata()) == pytest.approx([0.5, 1.0, 1.5])
        legend = [t.get_text() for t in fig.axes[7].get_legend().get_texts()]
        assert legend == ["optimizer.head_lr_multiplier=1", "optimizer.head_lr_multiplier=10", "train", "val"]
    finally:
        plt.close(fig)


def test_task_swept_keys_outside_a_multirun_is_empty():
    from maskrcnn_coco.analysis.sweep import task_swept_keys

    assert task_swept_keys() == []


def fake_seed_sweep(sweep_dir, finals, settings=("",), lag_job=None):
    """Jobs ``<n>_seed=<s>`` (times each setting): segm AP rising linearly to ``finals[seed]``, train
    total 2/epoch; ``lag_job`` (setting, seed)'s train total 30 % higher from epoch 2 on."""
    n = 0
    for setting in settings:
        for seed, final in finals.items():
            job = sweep_dir / f"{n}_{setting}seed={seed}"
            n += 1
            (job / ".hydra").mkdir(parents=True)
            overrides = ["epochs=3", *([setting.rstrip(",")] if setting else []), f"seed={seed}"]
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
            records = []
            for epoch in (1, 2, 3):
                lag = 1.3 if (setting, seed) == lag_job and epoch >= 2 else 1.0
                records.append(json.dumps({"epoch": epoch, "loss/train_total": 2 / epoch * lag,
                                           "mAP/segm_AP": final * epoch / 3}))
            (job / "metrics.jsonl").write_text("\n".join(records) + "\n")
    return sweep_dir


def test_seed_report_names_the_seed_that_trails_and_the_epoch_it_fell_behind(tmp_path):
    """The fault of the default recipe on seed 2 (0.790 against 0.890 and 0.903, train total behind
    from epoch 2): one line naming the seed, the numbers and the epoch."""
    from maskrcnn_coco.analysis.sweep import write_sweep_summary

    fake_seed_sweep(tmp_path, {0: 0.890, 1: 0.903, 2: 0.790}, lag_job=("", 2))
    seeds = write_sweep_summary(tmp_path).split("## Seeds\n\n")[1].splitlines()
    assert seeds[0] == ("- seeds 0, 1, 2: final mAP/segm_AP 0: 0.8900, 1: 0.9030, 2: 0.7900 "
                        "(mean 0.8610, range 0.1130 = 13.1% of the mean)")
    assert seeds[1].startswith("- seed=2 trails its siblings: mAP/segm_AP 0.7900 against their median 0.8965 "
                               "(11.9% worse, more than 5%); its loss/train_total fell behind at epoch 2 "
                               "(1.300 against 1.000)")
    assert len(seeds) == 2
    assert "## Seeds" in (tmp_path / "sweep_summary.md").read_text()


def test_seed_report_of_a_healthy_recipe_has_its_spread_and_no_trailing_seed(tmp_path):
    from maskrcnn_coco.analysis.sweep import collect_jobs, seed_report

    rows = collect_jobs(fake_seed_sweep(tmp_path, {0: 0.887, 1: 0.888, 2: 0.870}))
    assert seed_report(rows) == ["seeds 0, 1, 2: final mAP/segm_AP 0: 0.8870, 1: 0.8880, 2: 0.8700 "
                                 "(mean 0.8817, range 0.0180 = 2.0% of the mean)"]


def test_seed_report_groups_by_setting_and_compares_losses_the_right_way_round(tmp_path):
    """A head-lr x seed sweep: one spread line per multiplier; for a loss objective the trailing seed
    is the one with the higher value. Jobs without a seed override give no report."""
    from maskrcnn_coco.analysis.sweep import collect_jobs, seed_report

    rows = collect_jobs(fake_seed_sweep(tmp_path, {0: 0.5, 1: 0.51, 2: 0.52},
                                        settings=("optimizer.head_lr_multiplier=1,", "optimizer.head_lr_multiplier=10,"),
                                        lag_job=("optimizer.head_lr_multiplier=10,", 1)))
    lines = seed_report(rows)
    assert [line.split(":")[0] for line in lines] == [
        "seeds 0, 1, 2 of optimizer.head_lr_multiplier=1", "seeds 0, 1, 2 of optimizer.head_lr_multiplier=10"]
    losses = seed_report(rows, "loss/train_total")
    assert len(losses) == 3 and losses[2].startswith(
        "seed=1 trails its siblings: loss/train_total 0.8667 against their median 0.6667 (30.0% worse")
    assert seed_report(collect_jobs(fake_sweep(tmp_path / "lr"))) == []


def test_seed_report_of_two_seeds_says_when_they_disagree_and_marks_an_unfinished_job(tmp_path):
    from maskrcnn_coco.analysis.sweep import collect_jobs, seed_report

    fake_seed_sweep(tmp_path, {0: 0.9, 1: 0.7})
    history = tmp_path / "1_seed=1" / "metrics.jsonl"
    history.write_text("\n".join(history.read_text().splitlines()[:2]) + "\n")  # stopped after epoch 2
    lines = seed_report(collect_jobs(tmp_path))
    assert lines == ["seeds 0, 1: final mAP/segm_AP 0: 0.9000, 1: 0.4667 (epoch 2 of 3) "
                     "(mean 0.6833, range 0.4333 = 63.4% of the mean)",
                     "seeds 0 and 1 differ by more than 5% in mAP/segm_AP: compare settings over 3 seeds or more"]


def test_the_multirun_end_callback_prints_the_seed_report(tmp_path, caplog):
    import logging

    from omegaconf import OmegaConf

    from maskrcnn_coco.analysis.sweep import SweepSummaryCallback

    fake_seed_sweep(tmp_path, {0: 0.890, 1: 0.903, 2: 0.790}, lag_job=("", 2))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "objective": {"metric": "mAP/segm_AP"}})
    with caplog.at_level(logging.INFO, logger="maskrcnn_coco.analysis.sweep"):
        SweepSummaryCallback().on_multirun_end(config)
    assert "## Seeds" in caplog.text and "- seed=2 trails its siblings: mAP/segm_AP 0.7900" in caplog.text
    # An objective no job logged gives no seed report rather than a line of dashes.
    config.objective.metric = "mAP/segm_AP75"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="maskrcnn_coco.analysis.sweep"):
        SweepSummaryCallback().on_multirun_end(config)
    assert "Sweep summary" in caplog.text and "## Seeds" not in caplog.text


def test_seed_report_does_not_flag_near_zero_ap_of_an_untrained_smoke_sweep(tmp_path):
    """AP 0.0000 against 0.0003 is 100 % worse and means nothing: AP needs a 0.02 gap as well."""
    from maskrcnn_coco.analysis.sweep import collect_jobs, seed_report

    lines = seed_report(collect_jobs(fake_seed_sweep(tmp_path, {0: 0.0, 1: 0.0003, 2: 0.0006})))
    assert len(lines) == 1 and lines[0].startswith("seeds 0, 1, 2: final mAP/segm_AP 0: 0.0000, 1: 0.0003, 2: 0.0006")
    assert seed_report(collect_jobs(fake_seed_sweep(tmp_path / "two", {0: 0.0, 1: 0.01}))) == [
        "seeds 0, 1: final mAP/segm_AP 0: 0.0000, 1: 0.0100 (mean 0.0050, range 0.0100 = 200.0% of the mean)"]
