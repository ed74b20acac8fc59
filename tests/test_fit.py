"""``engine/fit.py``: epochs of training, evaluation every N epochs, the history, and the hooks' events."""

import importlib
import json
import re

import pytest
import torch
from helpers import (
    HEADS_COMPONENTS,
    MAPPING,
    ROWS,
    VAL_LOSSES,
    WEIGHTS,
    CountingLoader,
    run_fit,
    scripted_loader,
    two_group_setup,
)

from maskrcnn_coco.config import LOSS_COMPONENTS
from maskrcnn_coco.engine import FitSettings, GradNormMeter, Hook


def test_fit_evaluates_every_n_epochs_and_at_the_last(stub_evaluate):
    history, train, val = run_fit(stub_evaluate, epochs=3, eval_every=2, compute_val_loss=False, mask_threshold=0.3)
    assert train.passes == 3
    assert [epoch for epoch, _, _ in stub_evaluate.calls] == [2, 3]  # not 1; 3 because it is the last
    assert all(loader is val for _, loader, _ in stub_evaluate.calls)
    assert stub_evaluate.calls[0][2]["compute_losses"] is False and stub_evaluate.calls[0][2]["mask_threshold"] == 0.3
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for record in history:
        evaluated = record["epoch"] in (2, 3)
        assert ("loss/val" in record) is evaluated
        assert ("mAP/bbox_AP" in record) is evaluated and ("mAP/segm_AP50" in record) is evaluated
    assert history[1]["mAP/bbox_AP50"] == 0.75 and history[2]["mAP/segm_AP"] == 0.25
    assert "mAP/bbox_APl" not in history[1]  # undefined (NaN) metrics are left out
    assert history[1]["loss/val"] == pytest.approx(sum(VAL_LOSSES.values()) + 1.0 - 0.0625)  # mask x2, objectness x0.5


def test_fit_without_val_loader_never_evaluates(stub_evaluate):
    from maskrcnn_coco.engine import fit

    model, opt = two_group_setup()
    history = fit(model, opt, scripted_loader(ROWS), None, FitSettings(epochs=2, progress=False), [], mapping=MAPPING)
    assert stub_evaluate.calls == []
    assert not any(k.startswith(("loss/val", "mAP/")) for r in history for k in r)


def test_history_shape_and_weighted_train_total(stub_evaluate):
    from maskrcnn_coco.engine import fit

    model, opt = two_group_setup()
    history = fit(model, opt, scripted_loader(ROWS), None, FitSettings(epochs=2, loss_weights=WEIGHTS, progress=False),
                  [GradNormMeter()], mapping=MAPPING)
    assert isinstance(history, list) and [r["epoch"] for r in history] == [1, 2]
    means = {k: (ROWS[0][i] + ROWS[1][i]) / 2 for i, k in enumerate(LOSS_COMPONENTS)}
    # d total / d heads = sum of the weighted heads components of the batch; likewise backbone.
    heads_grads = [sum(WEIGHTS.get(k, 1.0) * row[i] for i, k in enumerate(LOSS_COMPONENTS) if k in HEADS_COMPONENTS)
                   for row in ROWS]
    backbone_grads = [sum(WEIGHTS.get(k, 1.0) * row[i] for i, k in enumerate(LOSS_COMPONENTS) if k not in HEADS_COMPONENTS)
                      for row in ROWS]
    assert heads_grads == [9.0, 5.0] and backbone_grads == [7.0, 0.0]
    for record in history:
        assert set(record) == {
            "epoch", "loss/train_total", *(f"loss/train_{k}" for k in LOSS_COMPONENTS), "lr", "lr/heads", "lr/backbone",
            "grad_norm/heads", "grad_norm/backbone", "time/train_s", "time/eval_s",
        }
        for k in LOSS_COMPONENTS:
            assert record[f"loss/train_{k}"] == pytest.approx(means[k])
        expected_total = sum(WEIGHTS.get(k, 1.0) * means[k] for k in LOSS_COMPONENTS)
        assert expected_total == pytest.approx(2.0 + 1.0 + 2 * 2.0 + 0.5 * 1.0 + 3.0)
        assert record["loss/train_total"] == pytest.approx(expected_total)
        assert record["lr"] == 0.01 and record["lr/backbone"] == 0.01 and record["lr/heads"] == 0.1
        assert record["grad_norm/heads"] == pytest.approx(7.0)  # mean of |9| and |5|
        assert record["grad_norm/backbone"] == pytest.approx(3.5)  # mean of |7| and |0|
        assert record["time/train_s"] >= 0.0 and record["time/eval_s"] >= 0.0
        assert all(isinstance(v, float) for k, v in record.items() if k != "epoch")


# --------------------------------------------------------------------------------------------- hooks
class RecordingHook(Hook):
    def __init__(self, main_process_only=True):
        self.main_process_only = main_process_only
        self.calls = []

    def before_fit(self, state):
        self.calls.append(("before_fit", len(state.history)))

    def after_epoch(self, state, result):
        self.calls.append(("after_epoch", result.epoch, dict(result.scalars), dict(state.history[-1])))

    def after_fit(self, state):
        self.calls.append(("after_fit", len(state.history)))


def test_custom_sink_sees_every_epoch(stub_evaluate):
    sink = RecordingHook()
    history, _, _ = run_fit(stub_evaluate, epochs=2, hooks=[sink])
    assert [c[0] for c in sink.calls] == ["before_fit", "after_epoch", "after_epoch", "after_fit"]
    assert sink.calls[0] == ("before_fit", 0) and sink.calls[-1] == ("after_fit", 2)
    for (_, epoch, scalars, entry), record in zip(sink.calls[1:3], history):
        assert epoch == record["epoch"] == entry["epoch"]
        assert scalars == {k: v for k, v in record.items() if k != "epoch"}
        assert entry == record


def test_main_process_only_sinks_are_skipped_on_other_ranks(stub_evaluate, monkeypatch):
    monkeypatch.setattr(importlib.import_module("maskrcnn_coco.engine.hooks"), "is_main_process", lambda: False)
    writer, everywhere = RecordingHook(main_process_only=True), RecordingHook(main_process_only=False)
    run_fit(stub_evaluate, epochs=2, hooks=[writer, everywhere])
    assert writer.calls == []
    assert [c[0] for c in everywhere.calls] == ["before_fit", "after_epoch", "after_epoch", "after_fit"]


# ------------------------------------------------------------------------------------- eval.subset
class NumberedImages(torch.utils.data.Dataset):
    """``n`` blank images with COCO-style ids 101, 102, ...: enough for a real validation loader."""

    coco = "the full set's ground truth"

    def __init__(self, n):
        self.ids = list(range(101, 101 + n))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return torch.zeros(3, 4, 4), {"image_id": self.ids[index]}


def loader_ids(loader):
    return [int(t["image_id"]) for _, targets in loader for t in targets]


def fit_with_val(stub, val, epochs, **settings):
    from maskrcnn_coco.engine import fit

    model, opt = two_group_setup()
    stub.train_loader = CountingLoader(scripted_loader(ROWS))
    return fit(model, opt, stub.train_loader, val, FitSettings(epochs=epochs, progress=False, **settings), [GradNormMeter()],
               mapping=MAPPING)


def test_eval_subset_is_the_same_images_each_time_and_the_last_epoch_the_full_set(stub_evaluate, caplog):
    from maskrcnn_coco.data.coco import make_loader

    caplog.set_level("INFO", logger="maskrcnn_coco")
    val = make_loader(NumberedImages(7), 2, shuffle=False, num_workers=0, seed=0)
    history = fit_with_val(stub_evaluate, val, 3, eval_subset=3, seed=5)
    loaders = [loader for _, loader, _ in stub_evaluate.calls]
    assert [epoch for epoch, _, _ in stub_evaluate.calls] == [1, 2, 3]
    first, second = loader_ids(loaders[0]), loader_ids(loaders[1])
    assert len(first) == 3 and first == second and set(first) < set(range(101, 108))  # the same 3 images
    assert loaders[2] is val and loader_ids(loaders[2]) == list(range(101, 108))  # the last: the full set
    # The subset's COCOeval scores against the full set's ground truth, restricted to its images.
    # The last (full-set) evaluation takes the loader's own.
    assert [kwargs["coco_gt"] for _, _, kwargs in stub_evaluate.calls] == [NumberedImages.coco] * 2 + [None]
    assert [(r["eval/images"], r["eval/val_images"]) for r in history] == [(3.0, 7.0), (3.0, 7.0), (7.0, 7.0)]
    assert "eval.subset=3: epochs before the last are evaluated on a fixed subset of 3 of the 7 val images" in caplog.text
    # Another seed draws other images (the same ones again for the same seed).
    from maskrcnn_coco.engine.evaluate import subset_loader

    assert loader_ids(subset_loader(val, 3, 5)) == first and loader_ids(subset_loader(val, 3, 6)) != first


def test_eval_subset_is_sharded_over_ranks_like_the_full_set(monkeypatch):
    from maskrcnn_coco.data.coco import make_loader
    from maskrcnn_coco.engine.evaluate import subset_loader
    from maskrcnn_coco.utils import dist

    chosen = loader_ids(subset_loader(make_loader(NumberedImages(9), 2, shuffle=False, num_workers=0, seed=0), 5, 0))
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    shards, full = [], []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        val = make_loader(NumberedImages(9), 2, shuffle=False, num_workers=0, seed=0)
        shards.append(loader_ids(subset_loader(val, 5, 0)))
        full.append(loader_ids(val))
    # Every rank chose the same 5 images and evaluates every other one of them, as with the full set.
    assert shards == [chosen[0::2], chosen[1::2]]
    assert full == [list(range(101, 110))[0::2], list(range(101, 110))[1::2]]


def test_eval_subset_at_least_the_val_size_is_the_full_set_said_once(stub_evaluate, caplog):
    from maskrcnn_coco.data.coco import make_loader

    caplog.set_level("INFO", logger="maskrcnn_coco")
    val = make_loader(NumberedImages(4), 2, shuffle=False, num_workers=0, seed=0)
    history = fit_with_val(stub_evaluate, val, 2, eval_subset=4)
    assert all(loader is val for _, loader, _ in stub_evaluate.calls)
    assert [r["eval/images"] for r in history] == [4.0, 4.0]
    assert caplog.text.count("eval.subset=4: the val set has 4 images, so every evaluation uses the full set") == 1


def test_without_eval_subset_every_evaluation_is_the_full_set(stub_evaluate):
    from maskrcnn_coco.data.coco import make_loader

    val = make_loader(NumberedImages(4), 2, shuffle=False, num_workers=0, seed=0)
    history = fit_with_val(stub_evaluate, val, 2, eval_every=1)
    assert all(loader is val for _, loader, _ in stub_evaluate.calls)
    assert [(r["eval/images"], r["eval/val_images"]) for r in history] == [(4.0, 4.0), (4.0, 4.0)]


def test_eval_subset_zero_is_refused_before_any_work(tmp_path):
    from helpers import compose_cfg

    from maskrcnn_coco.cli.experiment import run_training
    from maskrcnn_coco.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape("eval.subset=0: must be at least 1 (or null: the full set every time)")):
        run_training(compose_cfg(f"runs_dir={tmp_path}", "eval.subset=0"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="eval_subset=0"):
        FitSettings(eval_subset=0)


@pytest.mark.slow  # an in-process run (5 s), as tests/test_experiment.py's
def test_eval_subset_in_a_tiny_run_reads_back_from_metrics_tensorboard_and_console(tmp_path, caplog):
    """``eval.subset=3`` of 5 val images over 2 epochs: epoch 1 measured on 3 images, the last on all 5,
    as metrics.jsonl, the event file and the console block say."""
    from helpers import compose_cfg
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from maskrcnn_coco.cli.experiment import run_training

    caplog.set_level("INFO", logger="maskrcnn_coco")
    run_dir = tmp_path / "run"
    run_training(compose_cfg(f"runs_dir={tmp_path}", "epochs=2", "eval.subset=3", "data.num_val=5", "tracker=tensorboard",
                             "device=cpu", "vis.num_images=0", "diagnostics.enabled=false"), run_dir)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["eval/images"], r["eval/val_images"]) for r in lines] == [(1, 3, 5), (2, 5, 5)]
    assert all("loss/val" in r and "mAP/segm_AP" in r for r in lines)  # the tags stay the same
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/images")] == [(1, 3.0), (2, 5.0)]
    assert [e.step for e in acc.Scalars("loss/val")] == [1, 2]
    assert "🔎 Evaluated on a fixed subset of 3 of 5 val images (eval.subset)" in caplog.text
    assert "🔎 Evaluated on the full val set, 5 images" in caplog.text


def test_with_eval_subset_best_pth_is_an_epoch_measured_on_the_full_set(stub_evaluate, tmp_path):
    """A subset's AP is another measure: a high one on 3 images must not make best.pth (nor the
    objective's best) over the full set's."""
    from maskrcnn_coco.data.coco import make_loader
    from maskrcnn_coco.engine import Checkpointer

    real = type(stub_evaluate).__call__

    def by_size(self, model, loader, device, **kwargs):  # the subset scores 0.9, the full set 0.5
        losses, metrics = real(self, model, loader, device, **kwargs)
        metrics["segm"]["AP"] = 0.9 if len(loader.dataset) < 7 else 0.5
        return losses, metrics

    type(stub_evaluate).__call__ = by_size
    try:
        val = make_loader(NumberedImages(7), 2, shuffle=False, num_workers=0, seed=0)
        from maskrcnn_coco.engine import fit

        model, opt = two_group_setup()
        stub_evaluate.train_loader = CountingLoader(scripted_loader(ROWS))
        fit(model, opt, stub_evaluate.train_loader, val, FitSettings(epochs=2, progress=False, eval_subset=3),
            [GradNormMeter(), Checkpointer(tmp_path, best_metric="mAP/segm_AP")], mapping=MAPPING)
    finally:
        type(stub_evaluate).__call__ = real
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["epoch"] == 2 and best["history"][0]["mAP/segm_AP"] == 0.9
