"""Images of predictions (engine/visualize.py): files at evaluated epochs only, ground truth beside
predictions, detections above the score threshold drawn and the others not (pixel colours), the same
images every epoch, the model and the RNG untouched, the hook wired by ``vis.*``, and the images read
back from TensorBoard's event file."""

import importlib
import json

import pytest
import torch
from helpers import VAL_LOSSES
from omegaconf import OmegaConf
from PIL import Image, ImageColor
from torch import nn

from maskrcnn_coco.config import LOSS_COMPONENTS, VisConfig
from maskrcnn_coco.engine import EpochResult, FitSettings, TrainingState, default_hooks, fit
from maskrcnn_coco.engine.visualize import (
    CONFUSION_TAG,
    GRID_PATTERN,
    IMAGE_PATTERN,
    LATEST_KEY,
    PREDICTIONS_TAG,
    SUMMARY_PATTERN,
    PredictionImages,
    predict,
)
from maskrcnn_coco.engine.writers import ConfusionWriter, TrackerWriter
from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.tracking.backends import NullTracker, TensorBoardTracker
from maskrcnn_coco.utils.draw import class_colour, to_uint8

from conftest import tiny_model_cfg

SIZE = 64  # tiny_data's images
GAP = 4  # side_by_side's spacer
BAND = 14  # a one-line title band (draw._caption)
EVALUATED = {"val_loss": {"loss_mask": 1.0}, "metrics": {"bbox": {"AP": 0.1}}, "time": {"train_s": 100.0}}
NOT_EVALUATED = {"val_loss": None, "metrics": None}
# A confident detection of class 1 and an unsure one of class 2 (boxes in the 64 px image's frame).
SURE_BOX, UNSURE_BOX = [8.0, 8.0, 40.0, 40.0], [20.0, 30.0, 60.0, 60.0]


class FixedDetector(nn.Module):
    """Returns the same two detections for every image in eval mode (and counts those calls), constant
    losses in train mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)  # a parameter: predict() reads the model's device from it
        self.calls: list[int] = []

    def forward(self, images, targets=None):
        if self.training:
            return {k: self.conv.weight.sum() * 0 + 0.5 for k in LOSS_COMPONENTS}
        assert torch.is_inference_mode_enabled()
        self.calls.append(len(images))
        masks = torch.zeros(2, 1, SIZE, SIZE)
        masks[0, 0, 10:20, 10:20] = 0.9
        return [{"boxes": torch.tensor([SURE_BOX, UNSURE_BOX]), "labels": torch.tensor([1, 2]),
                 "scores": torch.tensor([0.9, 0.3]), "masks": masks} for _ in images]


def rgb(name):
    return list(ImageColor.getrgb(class_colour(name)))


def state_for(model, mapping):
    return TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.1), None, None, mapping, epochs=2)


def pixel(picture, x, y):
    return picture.getpixel((x, y))[:3]


def test_files_at_evaluated_epochs_only_with_both_frames(tmp_path, tiny_data):
    dataset, mapping = tiny_data.val_loader.dataset, tiny_data.mapping
    run_dir = tmp_path / "run"
    model = FixedDetector()
    hook = PredictionImages(run_dir, dataset, num_images=2, seed=0, min_side=0)
    state = state_for(model, mapping)

    hook.after_epoch(state, EpochResult(1, NOT_EVALUATED, {}))
    assert not run_dir.exists() and model.calls == [] and LATEST_KEY not in state.latest

    hook.after_epoch(state, EpochResult(2, EVALUATED, {}))
    assert model.calls == [2]  # one batched forward of the chosen images
    summary = json.loads((run_dir / SUMMARY_PATTERN.format(2)).read_text())
    ids = summary["image_ids"]
    assert len(ids) == 2 and summary["grid"] == GRID_PATTERN.format(2)
    assert 0 < summary["seconds"] < 60 and summary["cost_share"] == pytest.approx(summary["seconds"] / 100.0)
    # Only the detection above the threshold is listed (and drawn).
    assert [d["name"] for d in summary["detections"][str(ids[0])]] == [mapping.names[0]]
    assert state.latest[LATEST_KEY]["image_ids"] == ids
    for image_id in ids:
        picture = Image.open(run_dir / IMAGE_PATTERN.format(2, image_id))
        assert picture.size == (2 * SIZE + GAP, SIZE + BAND)  # ground truth | predictions, titled
    assert (run_dir / GRID_PATTERN.format(2)).is_file()
    assert sorted(p.name for p in (run_dir / "vis").iterdir()) == ["epoch_002", GRID_PATTERN.format(2).split("/")[-1]]


def test_only_detections_above_the_threshold_are_drawn(tmp_path, tiny_data):
    dataset, mapping = tiny_data.val_loader.dataset, tiny_data.mapping
    image, _ = dataset[0]
    raw = to_uint8(image)
    sure, unsure = mapping.names[0], mapping.names[1]

    def drawn(threshold, run_dir):
        hook = PredictionImages(run_dir, dataset, num_images=1, score_threshold=threshold, min_side=0)
        hook.indices = [0]
        hook.after_epoch(state_for(FixedDetector(), mapping), EpochResult(1, EVALUATED, {}))
        return Image.open(run_dir / IMAGE_PATTERN.format(1, hook.latest["image_ids"][0])).convert("RGB")

    def in_predictions(picture, x, y):  # (x, y) in the image's frame -> the predictions half
        return pixel(picture, SIZE + GAP + x, BAND + y)

    # Left edges at mid-height (clear of the caption at the top-left corner).
    sure_edge, unsure_edge = (int(SURE_BOX[0]), 30), (int(UNSURE_BOX[0]), 50)
    picture = drawn(0.5, tmp_path / "a")
    assert list(in_predictions(picture, *sure_edge)) == rgb(sure)
    assert list(in_predictions(picture, *unsure_edge)) == raw[:, unsure_edge[1], unsure_edge[0]].tolist()  # untouched
    # The mask (probabilities 0.9 inside 10:20) is tinted; a pixel outside both boxes is the image's.
    assert list(in_predictions(picture, 15, 15)) != raw[:, 15, 15].tolist()
    assert list(in_predictions(picture, 62, 2)) == raw[:, 2, 62].tolist()
    # The unsure detection is drawn once the threshold is below its score: the check above is not vacuous.
    picture = drawn(0.2, tmp_path / "b")
    assert list(in_predictions(picture, *unsure_edge)) == rgb(unsure)


def test_the_same_images_every_epoch_and_after_a_resume(tmp_path, tiny_data):
    dataset, mapping = tiny_data.val_loader.dataset, tiny_data.mapping
    hook = PredictionImages(tmp_path, dataset, num_images=2, seed=3)
    state = state_for(FixedDetector(), mapping)
    for epoch in (1, 2):
        hook.after_epoch(state, EpochResult(epoch, EVALUATED, {}))
    first, second = (json.loads((tmp_path / SUMMARY_PATTERN.format(e)).read_text())["image_ids"] for e in (1, 2))
    assert first == second
    resumed = PredictionImages(tmp_path, dataset, num_images=2, seed=3)  # a new process: the same choice
    assert resumed.indices == hook.indices


def test_model_weights_modes_and_rng_are_untouched(tmp_path, tiny_model, tiny_data):
    tiny_model.train()
    tiny_model.roi_heads.eval()  # a mixed state must come back as it was
    modes = [m.training for m in tiny_model.modules()]
    weights = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    rng = torch.get_rng_state()
    hook = PredictionImages(tmp_path, tiny_data.val_loader.dataset, num_images=4, score_threshold=0.0)
    hook.after_epoch(state_for(tiny_model, tiny_data.mapping), EpochResult(1, EVALUATED, {}))
    assert [m.training for m in tiny_model.modules()] == modes
    assert all(torch.equal(v, weights[k]) for k, v in tiny_model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not p.is_inference() for p in tiny_model.parameters())
    # Drawn at the default size: a 64 px image is enlarged 4x so its captions stay legible.
    picture = Image.open(tmp_path / IMAGE_PATTERN.format(1, hook.latest["image_ids"][0]))
    assert picture.size == (2 * 4 * SIZE + GAP, 4 * SIZE + BAND)
    # predict: one detection dict per image, on the CPU, outside inference mode.
    (out,) = predict(tiny_model, [tiny_data.val_loader.dataset[0][0]])
    assert set(out) == {"boxes", "labels", "scores", "masks"} and not out["boxes"].is_inference()


def test_the_hook_is_wired_by_vis(tmp_path, tiny_data):
    from hydra import compose, initialize_config_dir

    from maskrcnn_coco.analysis.sweep import register_resolvers
    from maskrcnn_coco.cli.experiment import build_hooks
    from maskrcnn_coco.config import config_dir, register_configs
    from maskrcnn_coco.tracking.backends import NullTracker

    val = tiny_data.val_loader.dataset
    hooks = default_hooks(tmp_path, FitSettings(progress=False), val_dataset=val)
    kinds = [type(h) for h in hooks]
    (vis,) = [h for h in hooks if isinstance(h, PredictionImages)]
    assert kinds.index(ConfusionWriter) < kinds.index(PredictionImages) < kinds.index(TrackerWriter)
    assert len(vis.indices) == VisConfig().num_images and vis.score_threshold == 0.5 and vis.max_detections == 20
    off = default_hooks(tmp_path, FitSettings(progress=False), val_dataset=val, vis=VisConfig(num_images=0))
    assert not any(isinstance(h, PredictionImages) for h in off)

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        on = compose("config", overrides=["vis.score_threshold=0.7", "vis.max_detections=5"])
        off = compose("config", overrides=["vis.num_images=0"])
        default = compose("config")
    assert OmegaConf.to_object(default.vis) == VisConfig()  # conf/config.yaml spells the schema's defaults
    (vis,) = [h for h in build_hooks(on, tmp_path, FitSettings(progress=False), NullTracker(), [], {}, val_dataset=val)
              if isinstance(h, PredictionImages)]
    assert (vis.score_threshold, vis.max_detections, len(vis.indices)) == (0.7, 5, 4)
    assert not any(isinstance(h, PredictionImages)
                   for h in build_hooks(off, tmp_path, FitSettings(progress=False), NullTracker(), [], {}, val_dataset=val))


class ImageRecorder(NullTracker):
    """A tracker that keeps the images it is given."""

    def __init__(self):
        self.images: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []

    def log_scalar(self, tag, value, step):
        pass

    def log_image(self, tag, image, step):
        self.images.append((tag, tuple(image.shape), image.dtype, step))


def test_tracker_images_and_the_confusion_matrix(tmp_path, tiny_data):
    dataset, mapping = tiny_data.val_loader.dataset, tiny_data.mapping
    tracker = ImageRecorder()
    hook = PredictionImages(tmp_path, dataset, tracker, num_images=2, min_side=0)
    confusion = {"ground_truth": [*mapping.names, "background"], "predicted": [*mapping.names, "missed"],
                 "matrix": [[2, 0, 0, 1], [0, 1, 0, 0], [0, 0, 3, 0], [1, 0, 0, 0]],
                 "params": {"iou_threshold": 0.5, "score_threshold": 0.5}}
    record = {**EVALUATED, "metrics": {"bbox": {"AP": 0.1}, "confusion": confusion}}
    hook.after_epoch(state_for(FixedDetector(), mapping), EpochResult(3, record, {}))
    ids = hook.latest["image_ids"]
    tags = [tag for tag, *_ in tracker.images]
    assert tags == [f"{PREDICTIONS_TAG}/{i}" for i in ids] + [CONFUSION_TAG]
    assert all(step == 3 and dtype == torch.uint8 and shape[0] == 3 for _, shape, dtype, step in tracker.images)
    assert tracker.images[0][1] == (3, SIZE + BAND, 2 * SIZE + GAP)
    assert tracker.images[-1][1][1] > 200  # the matplotlib figure


CONFUSION = {"ground_truth": ["circle", "square", "triangle", "background"],
             "predicted": ["circle", "square", "triangle", "missed"],
             "matrix": [[2, 0, 0, 1], [0, 1, 0, 0], [0, 0, 3, 0], [1, 0, 0, 0]],
             "params": {"iou_threshold": 0.5, "score_threshold": 0.5}}


def read_images(run_dir):
    """``{tag: [(step, width, height), ...]}`` of the image summaries in ``run_dir``'s event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})  # 0: keep every image
    events.Reload()
    return {tag: [(e.step, e.width, e.height) for e in events.Images(tag)] for tag in events.Tags()["images"]}


def test_images_read_back_from_tensorboard(tmp_path, tiny_data, monkeypatch):
    """A 2-epoch fit (the default hooks, evaluation stubbed) with the real TensorBoard tracker: each
    epoch's predictions and confusion matrix are in the event file, at step = epoch."""
    monkeypatch.setattr(importlib.import_module("maskrcnn_coco.engine.fit"), "evaluate",
                        lambda *args, **kwargs: (dict(VAL_LOSSES), {"bbox": {"AP": 0.5}, "confusion": CONFUSION}))
    run_dir = tmp_path / "run"
    model = FixedDetector()
    settings = FitSettings(epochs=2, device="cpu", progress=False)
    tracker = TensorBoardTracker(run_dir)
    hooks = default_hooks(run_dir, settings, tracker, val_dataset=tiny_data.val_loader.dataset)
    train = [batch for _, batch in zip(range(2), tiny_data.train_loader)]
    try:
        fit(model, torch.optim.SGD(model.parameters(), lr=0.01), train, ["val batches"], settings, hooks,
            mapping=tiny_data.mapping, run_dir=run_dir)
    finally:
        tracker.close()
    images = read_images(run_dir)
    predictions = sorted(tag for tag in images if tag.startswith(PREDICTIONS_TAG + "/"))
    assert len(predictions) == 4 and CONFUSION_TAG in images
    assert sum(len(v) for v in images.values()) == 10 >= 5  # 4 predictions + 1 confusion matrix per epoch
    assert all([step for step, *_ in images[tag]] == [1, 2] for tag in [*predictions, CONFUSION_TAG])
    # Ground truth | predictions at the default size (64 px images enlarged 4x), titled.
    assert images[predictions[0]][0][1:] == (2 * 4 * SIZE + GAP, 4 * SIZE + BAND)
    assert model.calls == [4, 4] and all((run_dir / GRID_PATTERN.format(e)).is_file() for e in (1, 2))


@pytest.mark.slow
def test_a_real_fit_writes_the_images(tmp_path, tiny_data):
    """The tiny model, trained and evaluated for real (COCOeval's confusion matrix), read back from
    TensorBoard."""
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(), tiny_data.mapping.num_classes)
    settings = FitSettings(epochs=2, device="cpu", progress=False)
    tracker = TensorBoardTracker(run_dir)
    hooks = default_hooks(run_dir, settings, tracker, val_dataset=tiny_data.val_loader.dataset)
    try:
        fit(model, torch.optim.SGD(model.parameters(), lr=0.01), tiny_data.train_loader, tiny_data.val_loader, settings,
            hooks, mapping=tiny_data.mapping, run_dir=run_dir)
    finally:
        tracker.close()
    images = read_images(run_dir)
    assert sum(len(v) for v in images.values()) == 10 and CONFUSION_TAG in images
    summary = json.loads((run_dir / SUMMARY_PATTERN.format(2)).read_text())
    assert summary["train_seconds"] > 0 and summary["cost_share"] == pytest.approx(summary["seconds"] / summary["train_seconds"])
