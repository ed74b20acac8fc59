"""MLflow and W&B backends, composed from config, next to TensorBoard; a failing backend never stops training.

One tiny in-process run (``run_training``, as tests/test_experiment.py) logs to TensorBoard, MLflow, W&B
(offline) and a backend that raises; each is read back through its own library.
"""

import glob
import logging
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from maskrcnn_coco.analysis import read_scalars
from maskrcnn_coco.analysis.sweep import register_resolvers
from maskrcnn_coco.cli.experiment import build_tracker, run_training
from maskrcnn_coco.config import register_configs
from maskrcnn_coco.tracking import GuardedTracker, NullTracker

from conftest import REPO, TINY_OVERRIDES

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")

# MLflow's SQLAlchemy store with SQLAlchemy 2.1: a deprecation inside MLflow, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def compose_cfg(*overrides):
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*TINY_OVERRIDES, *overrides])


class ExplodingTracker:
    """A backend whose server is down: every call raises."""

    def __init__(self, log_dir):
        self.calls = 0

    def log_scalar(self, tag, value, step):
        raise ConnectionError("tracking server at 127.0.0.1:9 refused the connection")

    def log_hyperparams(self, params):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_tracker_files_compose_as_a_list_of_the_group():
    cfg = compose_cfg("tracker=[tensorboard,csv,mlflow,wandb]", "runs_dir=/data/runs")
    assert list(cfg.tracker.backends) == ["tensorboard", "csv", "mlflow", "wandb"]
    assert cfg.tracker.backends.mlflow.store_dir == "/data/runs"  # one MLflow store for all runs
    assert cfg.tracker.backends.wandb.mode == "offline"
    assert OmegaConf.to_container(compose_cfg("tracker=all").tracker) == OmegaConf.to_container(
        compose_cfg("tracker=[tensorboard,csv]").tracker
    )
    one_off = compose_cfg("tracker=all", "tracker.backends.csv=null",
                          "+tracker.backends.mlflow={_target_:maskrcnn_coco.tracking.mlflow_tracker.MLflowTracker,"
                          "_partial_:true,experiment_name:x}")
    assert one_off.tracker.backends.csv is None and one_off.tracker.backends.mlflow.experiment_name == "x"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One epoch logged to TensorBoard, MLflow, W&B (offline) and an exploding backend."""
    root = tmp_path_factory.mktemp("tracked")
    cache = tmp_path_factory.getbasetemp() / "shapes_cache" / "shapes"
    run_dir = root / "maskrcnn" / "run1"
    records = Records()
    logger = logging.getLogger("maskrcnn_coco")
    logger.addHandler(records)
    env = {"WANDB_CACHE_DIR": root / "wandb_cache", "WANDB_CONFIG_DIR": root / "wandb_config", "WANDB_DATA_DIR": root / "wandb_data"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, str(value))
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            cfg = compose_cfg(
                "tracker=[tensorboard,mlflow,wandb]", f"runs_dir={root}", f"data.cache_dir={cache}", "epochs=1",
                "scheduler.milestones=[0.9]", "data.augment.hflip_prob=0.25",
                "+tracker.backends.broken={_target_:test_tracking_backends.ExplodingTracker,_partial_:true}",
            )
            run_training(cfg, run_dir)
    finally:
        logger.removeHandler(records)
    return root, run_dir, records.records


def mlflow_run(root):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("maskrcnn")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


@pytest.mark.slow
def test_tensorboard_and_mlflow_log_the_same_tags_and_values(tracked_run):
    root, run_dir, _ = tracked_run
    tensorboard = read_scalars(run_dir)
    client, run = mlflow_run(root)
    assert set(run.data.metrics) == set(tensorboard)
    assert {"loss/train_total", "loss/val_loss_mask", "mAP/segm_AP", "lr/heads", "grad_norm/backbone"} <= set(tensorboard)
    for tag, points in tensorboard.items():
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)]
        assert history == [(step, pytest.approx(value, rel=1e-6, abs=1e-9)) for step, value in points], tag
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run1"


@pytest.mark.slow
def test_mlflow_gets_the_whole_config_as_params_and_the_summary_files(tracked_run):
    root, _, _ = tracked_run
    client, run = mlflow_run(root)
    params = run.data.params
    assert params["optimizer.lr"] == str(OmegaConf.select(compose_cfg(), "optimizer.lr"))
    assert params["data.augment.hflip_prob"] == "0.25"
    assert params["tracker.backends.mlflow.experiment_name"] == "maskrcnn"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "metrics.jsonl" in artifacts
    assert not any("checkpoint" in a or a.endswith(".pth") for a in artifacts)
    assert (root / "mlflow.db").is_file() and (root / "mlartifacts").is_dir()  # the store beside the runs


@pytest.mark.slow
def test_wandb_offline_writes_its_run_folder(tracked_run):
    _, run_dir, _ = tracked_run
    (folder,) = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    (log_file,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    data = open(log_file, "rb").read()  # noqa: SIM115 - one read of a binary log
    for tag in ("loss/train_total", "loss/val_loss_mask", "mAP/segm_AP"):
        assert tag.encode() in data, tag
    assert b"hflip_prob" in data  # the config


@pytest.mark.slow
def test_a_failing_backend_warns_once_and_training_goes_on(tracked_run):
    _, run_dir, records = tracked_run
    warnings = [r for r in records if r.levelno >= logging.WARNING and "Tracker" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "'broken'" in message and "ConnectionError" in message and "127.0.0.1:9 refused" in message
    assert (run_dir / "checkpoints" / "last.pth").is_file()
    assert "mAP/segm_AP" in read_scalars(run_dir)  # the trackers after it kept logging


def test_mlflow_server_down_is_one_warning(tmp_path, monkeypatch, caplog):
    from maskrcnn_coco.tracking.mlflow_tracker import MLflowTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    tracker = GuardedTracker(MLflowTracker(tmp_path, tracking_uri="http://127.0.0.1:9"), name="mlflow")
    tracker.log_hyperparams({"seed": 0})
    for step in (1, 2):
        tracker.log_scalar("loss/val", 1.0, step)
        tracker.flush()
    tracker.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "'mlflow' failed in log_hyperparams" in warnings[0].getMessage()


def test_mlflow_names_respect_mlflows_rules():
    from mlflow.utils.validation import _validate_metric_name

    from maskrcnn_coco.tracking.mlflow_tracker import mlflow_key

    for tag in ("loss/val_loss_mask", "mAP/segm_AP50", "lr/heads", "lr/head@1 (x)", "grad_norm/roi[0]"):
        _validate_metric_name(mlflow_key(tag))
    assert mlflow_key("loss/val_loss_mask") == "loss/val_loss_mask"


def test_other_ranks_create_no_tracker_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    cfg = compose_cfg("tracker=[tensorboard,mlflow,wandb]", f"runs_dir={tmp_path}")
    assert isinstance(build_tracker(cfg.tracker, tmp_path / "run"), NullTracker)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_library_is_a_config_error_at_start(tmp_path, monkeypatch):
    from maskrcnn_coco.tracking.wandb_tracker import WandbTracker
    from maskrcnn_coco.utils.errors import ConfigError

    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'maskrcnn_coco\[wandb\]'"):
        WandbTracker(tmp_path)
