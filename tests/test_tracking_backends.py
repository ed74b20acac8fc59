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


class ExplodingTracker(NullTracker):
    """A backend whose server is down: every call raises."""

    def __init__(self, log_dir):
        self.calls = 0

    def log_scalar(self, tag, value, step):
        raise ConnectionError("tracking server at 127.0.0.1:9 refused the connection")


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
    assert {"metrics.jsonl", "diagnostics.jsonl", "confusion_epoch_001.png", "vis"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "vis")} >= {"vis/predictions_epoch_001.png"}
    assert not any("checkpoint" in a or a.endswith(".pth") for a in artifacts)
    assert (root / "mlflow.db").is_file() and (root / "mlartifacts").is_dir()  # the store beside the runs


@pytest.mark.slow
def test_wandb_offline_writes_its_run_folder(tracked_run):
    _, run_dir, _ = tracked_run
    (folder,) = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    (log_file,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    wandb_records(run_dir)  # waits for W&B's service to finish writing the file
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


# ------------------------------------------------------------------ two step axes, images, text, files
def wandb_records(run_dir, timeout=60.0):
    """The records of the offline run under ``run_dir/wandb``, once its ``exit`` record is on disk (W&B's
    service process may still be writing when ``run.finish`` returns). The ``.wandb`` file is a
    LevelDB-style log (``:W&B`` header, 32 KiB blocks of records with a 7-byte header, full/first/middle/
    last chunks) of ``wandb_internal_pb2.Record`` protos; ``wandb sync`` uploads the same records."""
    import time

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        records = list(_read_wandb_log(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _read_wandb_log(path):
    import struct

    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()  # noqa: SIM115 - one read of a binary log
    assert data[:4] == b":W&B"
    block, pos, chunks = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def wandb_rows(run_dir):
    """The history rows: ``{key: value}`` (``nested/key/parts`` joined, values JSON-decoded)."""
    import json

    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            yield {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}


def interleaved(tracker):
    """Iteration points every 20 steps between epoch points, as a run logs them: iter/x at 20..100, loss/train_x at 1..5."""
    for epoch in range(1, 6):
        tracker.log_scalar("iter/x", 1000.0 + 20 * epoch, 20 * epoch)
        tracker.flush()
        tracker.log_scalar("loss/train_x", 0.1 * epoch, epoch)
        tracker.flush()


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    return tmp_path


def test_wandb_keeps_every_point_of_interleaved_iteration_and_epoch_axes(wandb_env):
    import torch

    from maskrcnn_coco.tracking.wandb_tracker import WandbTracker

    run_dir = wandb_env / "run"
    tracker = WandbTracker(run_dir)
    tracker.log_hyperparams({"seed": 0})
    interleaved(tracker)
    tracker.log_image("images/predictions/7", torch.full((3, 8, 6), 255, dtype=torch.uint8), 5)
    tracker.log_text("diagnostics/summary", "no <findings>", 5)
    (run_dir / "vis").mkdir()
    (run_dir / "vis" / "a.png").write_bytes(b"png")
    tracker.log_artifact(run_dir / "vis", "pictures")
    (run_dir / "diagnostics.jsonl").write_text("{}\n")
    tracker.close()  # uploads the run folder's summary files

    rows = list(wandb_rows(run_dir))
    iteration = [(r["iter"], r["iter/x"]) for r in rows if "iter/x" in r]
    epoch = [(r["epoch"], r["loss/train_x"]) for r in rows if "loss/train_x" in r]
    assert iteration == [(20 * e, 1000.0 + 20 * e) for e in range(1, 6)]
    assert epoch == [(e, pytest.approx(0.1 * e)) for e in range(1, 6)]
    assert [r["_step"] for r in rows] == list(range(len(rows)))  # no step= given: W&B's own counter, none dropped
    (media,) = [r for r in rows if "images/predictions/7/_type" in r]
    assert media["epoch"] == 5 and media["images/predictions/7/_type"] == "image-file"
    assert media["diagnostics/summary/_type"] == "html-file"
    metrics = {(m.metric.name or m.metric.glob_name): m.metric for m in wandb_records(run_dir) if m.HasField("metric")}
    assert metrics["iter"].options.hidden and metrics["iter/*"].step_metric == metrics["iter/x"].step_metric == "iter"
    assert metrics["loss/train_x"].step_metric == "epoch" and metrics["images/predictions/7"].step_metric == "epoch"
    files = {f.path for r in wandb_records(run_dir) if r.HasField("files") for f in r.files.files}
    assert {"pictures/a.png", "diagnostics.jsonl"} <= files


def test_wandb_resumed_run_starts_with_the_carried_history(wandb_env):
    from maskrcnn_coco.tracking.wandb_tracker import WandbTracker

    tracker = WandbTracker(wandb_env / "run")
    tracker.resume(2, 40, [{"epoch": 1, "loss/val": 2.0}, {"epoch": 2, "loss/val": 1.5}])
    tracker.log_scalar("iter/x", 1.0, 60)
    tracker.log_scalar("loss/val", 1.0, 3)
    tracker.close()
    rows = list(wandb_rows(wandb_env / "run"))
    assert [(r["epoch"], r["loss/val"]) for r in rows if "loss/val" in r] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert [r["iter"] for r in rows if "iter/x" in r] == [60]


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")
def test_mlflow_keeps_both_axes_images_text_and_the_run_folders_files(tmp_path, monkeypatch):
    import torch

    from maskrcnn_coco.tracking.mlflow_tracker import MLflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "maskrcnn" / "run1"
    for name in ("confusion_epoch_001.png", "confusion_epoch_002.png", "diagnostics.jsonl", "label_check_epoch_002.json",
                 "per_image_losses_epoch_002.json", "vis/epoch_002/image_7.png", "vis/predictions_epoch_002.png",
                 "checkpoints/last.pth", ".hydra/config.yaml", "diagnostics_last_found.json"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(b"x")
    tracker = MLflowTracker(run_dir, store_dir=tmp_path)
    tracker.log_hyperparams({"seed": 0})
    tracker.log_text("provenance", "# where", 0)  # before the run exists: it waits for it
    interleaved(tracker)
    tracker.log_image("images/predictions/7", torch.zeros(3, 8, 6, dtype=torch.uint8), 5)
    tracker.log_text("diagnostics/summary", "no findings", 5)
    tracker.close()

    client, run = mlflow_run(tmp_path)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "iter/x")] == \
        [(20 * e, 1000.0 + 20 * e) for e in range(1, 6)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/train_x")] == [1, 2, 3, 4, 5]

    def walk(path=None):
        for a in client.list_artifacts(run.info.run_id, path):
            yield from walk(a.path) if a.is_dir else [a.path]

    artifacts = set(walk())
    assert {"confusion_epoch_001.png", "confusion_epoch_002.png", "diagnostics.jsonl", "label_check_epoch_002.json",
            "per_image_losses_epoch_002.json", "vis/epoch_002/image_7.png", "vis/predictions_epoch_002.png",
            ".hydra/config.yaml", "text/provenance_0.md", "text/diagnostics/summary_5.md",
            "diagnostics_last_found.json"} <= artifacts
    assert any(a.startswith("images/") and "predictions" in a and a.endswith(".png") for a in artifacts)
    assert not any("checkpoint" in a or a.endswith(".pth") for a in artifacts)
