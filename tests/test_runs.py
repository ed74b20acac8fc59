"""``read_scalars``: a run's TensorBoard scalars back in Python, as a dict or a DataFrame."""

import math

import pytest

from maskrcnn_coco.analysis import read_scalars
from maskrcnn_coco.tracking import TensorBoardTracker, log_training_metrics


@pytest.fixture
def run_dir(tmp_path):
    tb = TensorBoardTracker(tmp_path)
    for epoch in (1, 2, 3):
        metrics = {"segm": {"AP": 0.1 * epoch}} if epoch != 2 else None  # epoch 2 not evaluated
        log_training_metrics(tb, epoch, {"loss_mask": 1.0 / epoch}, None, metrics, {"backbone": 0.02, "heads": 0.04})
    tb.close()
    return tmp_path


def test_read_scalars_gives_every_tag_as_step_value_pairs(run_dir):
    scalars = read_scalars(run_dir)
    assert list(scalars) == sorted(scalars)
    assert {"loss/train_total", "loss/train_loss_mask", "mAP/segm_AP", "lr", "lr/backbone", "lr/heads"} == set(scalars)
    assert scalars["loss/train_loss_mask"] == [(1, 1.0), (2, pytest.approx(0.5)), (3, pytest.approx(1 / 3))]
    assert scalars["mAP/segm_AP"] == [(1, pytest.approx(0.1)), (3, pytest.approx(0.3))]


def test_a_repeated_step_keeps_the_last_value(tmp_path):
    tb = TensorBoardTracker(tmp_path)
    tb.log_scalar("loss/val", 2.0, 1)
    tb.log_scalar("loss/val", 1.5, 1)  # e.g. an epoch logged again after a resume
    tb.log_scalar("loss/val", 1.0, 2)
    tb.close()
    assert read_scalars(tmp_path)["loss/val"] == [(1, 1.5), (2, 1.0)]


def test_read_scalars_as_a_dataframe(run_dir):
    pd = pytest.importorskip("pandas")
    frame = read_scalars(run_dir, as_dataframe=True)
    assert isinstance(frame, pd.DataFrame)
    assert frame.index.name == "step" and list(frame.index) == [1, 2, 3]
    assert list(frame.columns) == sorted(frame.columns)
    assert frame.loc[3, "mAP/segm_AP"] == pytest.approx(0.3)
    assert math.isnan(frame.loc[2, "mAP/segm_AP"])
    assert frame["lr/heads"].tolist() == pytest.approx([0.04] * 3)


def test_a_missing_run_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_scalars(tmp_path / "nope")
