"""Planted faults in tiny seeded runs: the framework names the failing part by itself, and nothing else.

Each run goes through ``run_training`` like the entry point does; what it found is read back from the
run's ``diagnostics.jsonl`` and the log. Faults that need many epochs to show in the losses (a frozen
head, a zero weight, anchors that do not fit) are caught by the start-of-run audit: one of them runs a
whole one-step run, the others stop after the start. The table of what fires when is in
docs/LOSS_BREAKDOWN.md.
"""

import itertools
import json
import logging
import os
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from torch import nn

from maskrcnn_coco.analysis.diagnostics import DIAGNOSTICS_FILE
from maskrcnn_coco.analysis.sweep import register_resolvers
from maskrcnn_coco.cli import experiment
from maskrcnn_coco.cli.experiment import run_training
from maskrcnn_coco.config import AugmentConfig, register_configs
from maskrcnn_coco.data.coco import build_coco_dataset
from maskrcnn_coco.data.shapes import ShapesParams, ensure_shapes_dataset

from conftest import REPO, TINY_MODEL_OVERRIDES, TINY_OVERRIDES

pytestmark = pytest.mark.slow  # short real training runs

# One optimizer step, one validation image: enough for the audit, cheap on 2 cores.
ONE_STEP = ["epochs=1", "data.num_train=2", "data.num_val=1", "checkpoint.every_n_epochs=0",
            "scheduler.warmup_iters=0", "scheduler.milestones=[]"]
ALL = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def compose_cfg(*overrides, data=TINY_OVERRIDES):
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*data, "tracker=none", *overrides])


def findings(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / DIAGNOSTICS_FILE).read_text().splitlines()]


def start_only(monkeypatch):
    """Stop a run after its start (audit, ``before_fit`` of the hooks): for faults the audit catches."""
    from maskrcnn_coco.engine.hooks import HookList

    def fit(model, optimizer, train_loader, val_loader, settings, hooks, *, state, **kwargs):
        HookList(hooks).call("before_fit", state)
        return []

    monkeypatch.setattr(experiment, "fit", fit)


def run(tmp_path, caplog, *overrides, name="run", data=TINY_OVERRIDES, info=False):
    """The run's findings: its warnings (with ``info``: the info findings too, e.g. an lr outside the
    usual range for batch 2 that is no fault)."""
    caplog.set_level(logging.INFO, logger="maskrcnn_coco")
    run_dir = tmp_path / name
    run_training(compose_cfg(f"runs_dir={tmp_path}", *overrides, data=data), run_dir)
    found = findings(run_dir)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "LOSS_BREAKDOWN" in r.getMessage()]
    # Every warning finding is a logged warning, and every diagnostic warning is in the file (info
    # findings are info lines: a healthy run prints no warning).
    assert sorted(f["message"] for f in found if f["severity"] == "warning") == sorted(warned)
    return found if info else [f for f in found if f["severity"] == "warning"]


def named(found) -> set[str]:
    return {c for f in found for c in f["components"]}


# ------------------------------------------------------------------------- caught at the start
def test_box_predictor_frozen_by_a_zero_lr_mult(tmp_path, caplog):
    """A whole (one-step) run: the audit's finding is in diagnostics.jsonl, training adds nothing."""
    found = run(tmp_path, caplog, *ONE_STEP,
                "+optimizer.groups.box_pred={prefixes:[roi_heads.box_predictor],lr_mult:0}",
                "optimizer.groups.heads.prefixes=[roi_heads.box_head,roi_heads.mask_head,roi_heads.mask_predictor]")
    assert [(f["epoch"], f["kind"], f["subject"]) for f in found] == [(0, "frozen_producer", "roi_heads.box_predictor")]
    assert named(found) == {"loss_classifier", "loss_box_reg"}
    assert found[0]["config_key"] == "optimizer.groups.box_pred.lr_mult"
    # Under the parameter-group table.
    assert caplog.text.index("Parameter groups:") < caplog.text.index("Loss audit:") < caplog.text.index("roi_heads.box_predictor feeds")


def test_rpn_head_frozen(tmp_path, caplog, monkeypatch):
    start_only(monkeypatch)
    found = run(tmp_path, caplog, *ONE_STEP, "optimizer.groups.rpn.lr_mult=0")
    assert [(f["kind"], f["subject"]) for f in found] == [("frozen_producer", "rpn.head")]
    assert named(found) == {"loss_objectness", "loss_rpn_box_reg"}
    assert found[0]["config_key"] == "optimizer.groups.rpn.lr_mult"


def test_head_lr_multiplier_far_too_low(tmp_path, caplog, monkeypatch):
    start_only(monkeypatch)
    found = run(tmp_path, caplog, *ONE_STEP, "optimizer.head_lr_multiplier=0.001")
    assert {f["kind"] for f in found} == {"slow_producer"}
    assert named(found) == {"loss_classifier", "loss_box_reg", "loss_mask"}
    assert {f["config_key"] for f in found} == {"optimizer.head_lr_multiplier"}


def test_mask_loss_weight_zero(tmp_path, caplog, monkeypatch):
    start_only(monkeypatch)
    found = run(tmp_path, caplog, *ONE_STEP, "loss.weights.loss_mask=0")
    assert [(f["kind"], f["components"]) for f in found] == [("zero_weight", ["loss_mask"])]
    assert found[0]["config_key"] == "loss.weights.loss_mask" and "not optimised" in found[0]["message"]


def test_anchors_far_too_small(tmp_path, caplog, monkeypatch):
    start_only(monkeypatch)
    # 100 images (255 objects): the fit is judged on diagnostics.anchor_min_objects (200) objects or more.
    one_step = [o if not o.startswith("data.num_train=") else "data.num_train=100" for o in ONE_STEP]
    found = run(tmp_path, caplog, *one_step, "model.anchor_sizes=[2,4,8]")
    found = [f for f in found if f["severity"] == "warning"]
    assert [(f["kind"], f["subject"]) for f in found] == [("anchor_fit", "rpn.anchor_generator")]
    assert "(judged on 255 training objects)" in found[0]["message"]
    assert named(found) == {"loss_objectness", "loss_rpn_box_reg"}
    assert found[0]["config_key"].startswith("model.anchor_sizes=[")
    assert found[0]["evidence"]["unreachable_share"] == 1.0


# ---------------------------------------------------------------------------- seen in training
def test_objectness_weight_50_dominates(tmp_path, caplog):
    found = run(tmp_path, caplog, *ONE_STEP, "epochs=2", "loss.weights.loss_objectness=50")
    assert [(f["epoch"], f["kind"], f["components"]) for f in found] == [(2, "dominant", ["loss_objectness"])]
    assert found[0]["config_key"] == "loss.weights.loss_objectness"


def permuted_val_split(tmp_path):
    """A shapes set as COCO files, with the validation category ids shifted (circle -> square -> triangle -> circle)."""
    paths = ensure_shapes_dataset(ShapesParams(num_train=2, num_val=12, image_size=64, seed=0, min_objects=1, max_objects=4),
                                  os.environ["MASKRCNN_COCO_CACHE"] + "/shapes", progress=False)
    val = json.loads(Path(paths.val_annotations).read_text())
    ids = sorted(c["id"] for c in val["categories"])
    shift = dict(zip(ids, ids[1:] + ids[:1]))
    for ann in val["annotations"]:
        ann["category_id"] = shift[ann["category_id"]]
    permuted = tmp_path / "instances_val_permuted.json"
    permuted.write_text(json.dumps(val))
    return paths, permuted


class TrueDetections(nn.Module):
    """The real model for training (same submodules, same parameter names), ``outputs`` in turn as
    its detections in eval mode."""

    def __init__(self, model, outputs):
        super().__init__()
        self.transform, self.backbone, self.rpn, self.roi_heads = model.transform, model.backbone, model.rpn, model.roi_heads
        self.__dict__["real"] = model  # not a submodule: its parameters are the ones above
        self.__dict__["cursor"] = itertools.cycle(outputs)

    def forward(self, images, targets=None):
        if self.training:
            self.real.training = True
            return self.real(images, targets)
        return [next(self.cursor) for _ in images]


def test_validation_labels_permuted(tmp_path, caplog, monkeypatch):
    """A tiny run does not learn to detect in seconds, so the detector is stood in for by the true
    (unpermuted) validation objects: what it predicts is right, the permuted file says otherwise."""
    paths, permuted = permuted_val_split(tmp_path)
    truth = build_coco_dataset(paths.val_images, paths.val_annotations, train=False, augment=AugmentConfig(), drop_empty=False)
    outputs = [{"boxes": t["boxes"], "labels": t["labels"], "scores": t["labels"].new_ones(len(t["labels"])).float(),
                "masks": t["masks"][:, None].float()} for _, t in (truth[i] for i in range(len(truth)))]
    real_build = experiment.build_model

    def build_with_true_detections(cfg, num_classes):
        return TrueDetections(real_build(cfg, num_classes), outputs)

    monkeypatch.setattr(experiment, "build_model", build_with_true_detections)
    data = ["data=coco", f"data.root={tmp_path}", f"data.train_images={paths.train_images}",
            f"data.train_annotations={paths.train_annotations}", f"data.val_images={paths.val_images}",
            f"data.val_annotations={permuted}", "data.batch_size=2", "data.num_workers=0", "model.min_size=64", "model.max_size=64",
            *TINY_MODEL_OVERRIDES]
    found = run(tmp_path, caplog, "epochs=2", "checkpoint.every_n_epochs=0", "scheduler.warmup_iters=0",
                "scheduler.milestones=[]", "eval.val_loss=false",
                # The stand-in detector answers in turn: prediction images would take turns of the evaluation's.
                "vis.num_images=0", data=data)
    assert {f["kind"] for f in found} == {"confused_class"}
    assert {f["subject"] for f in found} == {"circle", "square", "triangle"} and {f["epoch"] for f in found} == {2}
    assert all("data.val_annotations" in f["config_key"] and "swapped one-to-one" in f["cause"] for f in found)
    assert {(f["subject"], f["evidence"]["most_given"]) for f in found} == {("circle", "triangle"), ("square", "circle"), ("triangle", "square")}
    assert (tmp_path / "run" / "confusion_epoch_002.png").is_file()


def test_a_diverging_learning_rate_is_named_first(tmp_path, caplog):
    """Clipped gradients keep a far too high lr finite: the divergence guard stops it, naming the lr."""
    with pytest.raises(FloatingPointError) as err:
        run(tmp_path, caplog, "epochs=2", "data.num_train=4", "optimizer.lr=1e4", "optimizer.clip_grad_norm=10",
            "scheduler.warmup_iters=0", "train.max_loss_factor=100", "print_freq=1")
    message = str(err.value)
    assert "lower optimizer.lr" in message
    if "check_dataset" in message:
        assert message.index("optimizer.lr") < message.index("check_dataset")


def test_a_loss_spike_is_said_before_the_divergence_it_precedes(tmp_path, caplog):
    """lr 3 without clipping: iteration 1's loss is hundreds of times the first one's, the guard stops
    the run one iteration later; the spike warning (in the log and diagnostics.jsonl) comes first."""
    with pytest.raises(FloatingPointError) as err:
        run(tmp_path, caplog, "epochs=2", "data.num_train=8", "optimizer.lr=3", "scheduler.warmup_iters=0", "print_freq=1")
    stopped_at = int(re.search(r"iteration (\d+)", str(err.value)).group(1))
    found = findings(tmp_path / "run")
    spikes = [f for f in found if f["kind"] == "loss_spike"]
    assert spikes and spikes[0]["evidence"]["iteration"] < stopped_at
    assert spikes[0]["evidence"]["ratio"] > 5 and spikes[0]["config_key"].startswith("optimizer.lr")
    # Logged while training went on: the warning is there before the exception stops the run.
    assert "Loss spike in epoch 1 at iteration" in caplog.text and "Loss diverged" in str(err.value)


# ------------------------------------------------------------------------------------- healthy
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_short_runs_raise_nothing(tmp_path, caplog, seed):
    found = run(tmp_path, caplog, f"seed={seed}", "epochs=3", "data.num_train=2", "data.num_val=1",
                "checkpoint.every_n_epochs=0", "scheduler.warmup_iters=0", "scheduler.milestones=[]")
    assert found == []
    assert "Loss audit:" in caplog.text and "Anchor fit:" in caplog.text
    assert not ALL & named(found)


# -------------------------------------------- faults in the data, seen at the start (#20, other strengths)
from maskrcnn_coco.analysis import fault_bank as fb  # noqa: E402


def planted_data(tmp_path, fault, num_train=60, num_val=24):
    """A 64 px shapes set with ``fault`` planted, as COCO-format data overrides."""
    source = ensure_shapes_dataset(ShapesParams(num_train=num_train, num_val=num_val, image_size=64, seed=0, min_objects=1,
                                                max_objects=4), os.environ["MASKRCNN_COCO_CACHE"] + "/shapes", progress=False)
    paths = fb.plant(source, tmp_path / "planted", fault)
    return [*fb.data_overrides(paths, size=64), "data.batch_size=2", *TINY_MODEL_OVERRIDES]


START = ["epochs=1", "checkpoint.every_n_epochs=0", "scheduler.milestones=[]"]


def warnings_of(found):
    return [f for f in found if f["severity"] == "warning"]


@pytest.mark.parametrize("strength", [0.3, 0.45])
def test_masks_off_their_objects_are_named_at_the_start(tmp_path, caplog, monkeypatch, strength):
    start_only(monkeypatch)
    found = warnings_of(run(tmp_path, caplog, *START, data=planted_data(tmp_path, fb.Fault("masks_off", strength, plant=fb.shift_masks))))
    assert [(f["kind"], f["components"]) for f in found] == [("mask_box_disagree", ["loss_mask"])]
    assert "masks that do not lie on their boxes" in found[0]["message"] and "image " in found[0]["message"]
    assert found[0]["image_ids"]


def test_noisy_boxes_are_named_at_the_start(tmp_path, caplog, monkeypatch):
    start_only(monkeypatch)
    found = warnings_of(run(tmp_path, caplog, *START, data=planted_data(tmp_path, fb.Fault("noisy_boxes", 0.25, plant=fb.jitter_boxes))))
    assert [(f["kind"], f["components"][0]) for f in found] == [("mask_box_disagree", "loss_box_reg")]  # the more common kind first
    assert "box edges that miss the mask's extent" in found[0]["message"]


def test_dark_validation_images_are_named_at_the_start(tmp_path, caplog, monkeypatch):
    start_only(monkeypatch)
    found = warnings_of(run(tmp_path, caplog, *START,
                            data=planted_data(tmp_path, fb.Fault("dark_val", 0.45, split="val", images=True))))
    assert [(f["kind"], f["subject"]) for f in found][:1] == [("val_unlike_train", found[0]["subject"])]
    assert "darker" in found[0]["message"]


def test_a_rare_class_is_said_at_the_start_as_information(tmp_path, caplog, monkeypatch):
    start_only(monkeypatch)
    found = run(tmp_path, caplog, *START, data=planted_data(tmp_path, fb.Fault("rare", 0.05, plant=fb.make_rare), num_train=120),
                info=True)
    # Only training was made rare: the splits' class shares differ, which is said too.
    assert [(f["kind"], f["subject"]) for f in warnings_of(found)] == [("val_unlike_train", "class shares")]
    assert "triangle" in warnings_of(found)[0]["message"]
    (rare,) = [f for f in found if f["kind"] == "rare_class"]
    assert "'triangle'" in rare["message"] and rare["severity"] == "info"


@pytest.mark.parametrize("weight_decay", [0.03, 0.3])
def test_a_weight_decay_far_above_the_usual_is_said_at_the_start(tmp_path, caplog, monkeypatch, weight_decay):
    start_only(monkeypatch)
    found = warnings_of(run(tmp_path, caplog, *START, f"optimizer.weight_decay={weight_decay}"))
    assert [(f["kind"], f["subject"], f["config_key"]) for f in found] == [
        ("optimizer_range", "weight_decay", "optimizer.weight_decay")]


@pytest.mark.parametrize("overrides", [[], ["optimizer=adamw"], ["seed=3", "model.box_batch_size_per_image=128"]])
def test_healthy_data_and_settings_raise_no_warning_at_the_start(tmp_path, caplog, monkeypatch, overrides):
    start_only(monkeypatch)
    assert warnings_of(run(tmp_path, caplog, *START, *overrides, data=planted_data(tmp_path, fb.Fault("healthy", 0)))) == []
