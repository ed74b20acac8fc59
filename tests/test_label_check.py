"""The label check: each annotated object classified on its own box (the model untouched), the shares
per split and class, the standardised training share, the most confident disagreements named by
annotation id, and the hook's wiring into the diagnostics writer."""

import json

import pytest
import torch

from maskrcnn_coco.config import AugmentConfig, DiagnosticsConfig
from maskrcnn_coco.data.coco import build_coco_dataset
from maskrcnn_coco.engine import EpochResult, TrainingState
from maskrcnn_coco.engine.label_check import (
    FILE_PATTERN,
    LATEST_KEY,
    LabelCheck,
    agreement,
    classify_annotations,
    most_confident_disagreements,
    standardised_share,
)
from maskrcnn_coco.engine.per_image import unaugmented
from maskrcnn_coco.modeling.build import build_model

from conftest import square_ann, tiny_model_cfg, write_coco_dataset

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "box"}, {"id": 3, "name": "tile"}]


def squares(tmp_path, split, labels):
    """64-px images with two squares each, labelled ``labels[image][object]`` (category ids)."""
    images = [{"id": 10 + i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in range(len(labels))]
    anns = [square_ann(100 * im["id"] + j, im["id"], c, x, y, s)
            for im, cats in zip(images, labels) for j, ((x, y, s), c) in enumerate(zip([(6, 8, 20), (34, 30, 22)], cats))]
    img_dir, ann_file = write_coco_dataset(tmp_path / "data", CATEGORIES, images, anns, split=split)
    return build_coco_dataset(img_dir, ann_file, train=split == "train", augment=AugmentConfig(), drop_empty=False)


def says(model, label):
    """A tiny model whose box classifier gives every box object class ``label`` (probability ~0.98)."""
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.zero_()
        model.roi_heads.box_predictor.cls_score.bias.zero_()
        model.roi_heads.box_predictor.cls_score.bias[label] = 5.0
    return model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(tiny_model_cfg(), len(CATEGORIES) + 1)


def samples_of(dataset):
    view = unaugmented(dataset)
    return view, [view[i] for i in range(len(view))]


def test_every_object_is_classified_on_its_own_box_and_the_model_is_untouched(tmp_path, model):
    view, samples = samples_of(squares(tmp_path, "train", [[1, 2], [2, 2], [3, 1]]))
    model.train()
    model.roi_heads.eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = classify_annotations(model, [s[0] for s in samples], [s[1] for s in samples], batch_size=2)
    assert [(r["image_id"], r["index"], r["given"]) for r in rows] == [
        (10, 0, 1), (10, 1, 2), (11, 0, 2), (11, 1, 2), (12, 0, 3), (12, 1, 1)]
    assert all(1 <= r["predicted"] <= 3 and 0 < r["p_given"] <= r["p_predicted"] <= 1 for r in rows)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Batching does not change a verdict: each box is pooled from its own image.
    other = classify_annotations(model, [s[0] for s in samples], [s[1] for s in samples], batch_size=5)
    assert [r["predicted"] for r in other] == [r["predicted"] for r in rows]
    assert [r["p_given"] for r in other] == pytest.approx([r["p_given"] for r in rows], abs=1e-5)

    says(model, 2)
    rows = classify_annotations(model, [s[0] for s in samples], [s[1] for s in samples])
    assert {r["predicted"] for r in rows} == {2} and all(r["p_predicted"] > 0.97 for r in rows)
    found = agreement(rows)
    assert (found["share"], found["agree"], found["objects"], found["images"]) == (0.5, 3, 6, 3)
    assert found["per_class"] == {1: [0, 2], 2: [3, 3], 3: [0, 1]}
    # Named by annotation id, most confident first (all equal here: in order).
    off = most_confident_disagreements(rows, view)
    assert [(d["image_id"], d["annotation_id"], d["given"], d["predicted"]) for d in off] == [
        (10, 1000, 1, 2), (12, 1200, 3, 2), (12, 1201, 1, 2)]


def test_images_without_objects_and_models_without_box_heads_give_no_rows(model):
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64), "image_id": 5}
    assert classify_annotations(model, [torch.rand(3, 64, 64)], [empty]) == []
    assert agreement([]) is None
    assert classify_annotations(torch.nn.Linear(2, 2), [torch.rand(3, 8, 8)], [empty]) == []


def test_the_training_share_is_standardised_to_the_validation_class_mix():
    # Training: the easy class 1 agrees 90 %, the hard class 2 50 %, 1:3 mix -> 60 % plain.
    train = {"share": 0.6, "per_class": {1: [9, 10], 2: [15, 30]}}
    # Validation is 3:1 the other way: weighted the same, the training share would be 80 %.
    val = {"share": 0.8, "per_class": {"1": [24, 30], "2": [6, 10]}}  # keys as JSON gives them back
    assert standardised_share(train, val) == pytest.approx(0.75 * 0.9 + 0.25 * 0.5)
    assert standardised_share(train, {"per_class": {3: [1, 1]}}) is None


def test_the_hook_feeds_the_writer_which_names_the_training_labels(tmp_path, model):
    """Training objects labelled 'box' where validation's identical objects are 'square' (all of them:
    category ids mapped wrongly in the training file); the classifier says 'square' for every box."""
    from maskrcnn_coco.engine.writers import DiagnosticsWriter

    train = squares(tmp_path, "train", [[2, 2]] * 30)
    val = squares(tmp_path, "val", [[1, 1]] * 30)
    says(model, 1)
    run_dir = tmp_path / "run"
    hook = LabelCheck(run_dir, train, val, num_images=28, seed=0, batch_size=8)
    assert len(hook.indices["train"]) == len(hook.indices["val"]) == 28
    writer = DiagnosticsWriter(run_dir, DiagnosticsConfig(patience_epochs=2))
    state = TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.1), None, None, train.mapping, epochs=3)
    state.history = []

    hook.after_epoch(state, EpochResult(1, {"val_loss": None, "metrics": None}, {}))
    assert not run_dir.exists() and LATEST_KEY not in state.latest  # not an evaluated epoch
    evaluated = {"val_loss": {"loss_classifier": 1.0}, "metrics": {"bbox": {"AP": 0.1}}}
    for epoch in (2, 3):
        state.epoch = epoch
        hook.after_epoch(state, EpochResult(epoch, evaluated, {}))
        writer.after_epoch(state, EpochResult(epoch, evaluated, {}))
    saved = json.loads((run_dir / FILE_PATTERN.format(3)).read_text())
    assert saved["train"]["share"] == 0.0 and saved["val"]["share"] == 1.0 and saved["train"]["objects"] == 56
    assert len(saved["rows"]["train"]) == len(saved["rows"]["val"]) == 56 and saved["seconds"] > 0
    assert state.latest[LATEST_KEY]["epoch"] == 3
    (finding,) = [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]
    assert finding["kind"] == "training_labels" and finding["epoch"] == 3
    assert "0% of 56 annotated objects of the training subset their own label, but 100% of 56" in finding["message"]
    assert "Most confidently given another class: ann " in finding["message"]
    # Resumed: the writer's window comes back from its state.
    again = DiagnosticsWriter(run_dir, DiagnosticsConfig(patience_epochs=2))
    again.load_state_dict(json.loads(json.dumps(writer.state_dict())))
    assert again.agreements == writer.agreements
