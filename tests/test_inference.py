"""``maskrcnn_coco/inference.py``: ``load_model`` / ``predict`` without a dataset, the weights files they
read (our checkpoints, their ``model_config``, torchvision COCO state dicts) and evaluation's results path.

``trained_run`` trains one tiny run per test session (in process, through ``run_training`` as the entry
point trains, with the ``.hydra/config.yaml`` Hydra writes beside it); the other inference test files
use it too."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import compose_cfg
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_coco import load_model, predict
from maskrcnn_coco.cli.experiment import run_training
from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.evaluation.coco_eval import predictions_to_coco
from maskrcnn_coco.inference import RUN_CONFIG, image_tensor, load_image, read_weights
from maskrcnn_coco.modeling.weights import WeightsError

RUN_OVERRIDES = ["epochs=1", "vis.num_images=0", "diagnostics.enabled=false"]
COCO_DOG = 18  # COCO's category id of "dog" (torchvision's output index 18)


@contextlib.contextmanager
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``conftest``'s shapes cache for a module-scoped fixture (set up before its per-test one)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASKRCNN_COCO_CACHE", str(tmp_path_factory.getbasetemp() / "shapes_cache"))
        yield


def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny run folder (trained on first use): ``checkpoints/last.pth``, ``metrics.jsonl``,
    ``.hydra/config.yaml``. The shapes set goes to the session's cache, as ``conftest`` sends it."""
    root = tmp_path_factory.getbasetemp() / "inference_run"
    run = root / "run"
    if not (run / "checkpoints" / "last.pth").is_file():
        with session_cache(tmp_path_factory):
            cfg = compose_cfg(f"runs_dir={root}", *RUN_OVERRIDES)
            run_training(cfg, run)
            (run / RUN_CONFIG).parent.mkdir(exist_ok=True)
            OmegaConf.save(cfg, run / RUN_CONFIG)  # what Hydra saves: the composed config, unresolved
    return run


def val_images(run: Path) -> list[Path]:
    """The run's validation image files (the shapes set of its config)."""
    cfg = OmegaConf.load(run / RUN_CONFIG)
    from maskrcnn_coco.data.coco import resolve_paths

    return sorted(resolve_paths(cfg.data, progress=False)["val_images"].glob("*.png"))


def coco_r50_state_dict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's torchvision COCO-shaped state dict (maskrcnn_resnet50_fpn, 91 outputs; written on
    first use) whose box classifier always prefers output 18: its detections are all COCO's dog."""
    path = tmp_path_factory.getbasetemp() / "maskrcnn_coco91.pth"
    if not path.is_file():
        torch.manual_seed(0)
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
        state = model.state_dict()
        state["roi_heads.box_predictor.cls_score.bias"][COCO_DOG] = 10.0
        torch.save(state, path)
    return path


R50_SMALL_INPUT = {"min_size": 64, "max_size": 64}  # R-50 on 64 px images: fast on a CPU


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_model(run_dir / "checkpoints" / "last.pth")


def test_new_checkpoints_carry_the_model_config_and_load_without_a_dataset(run_dir, loaded):
    ckpt = torch.load(run_dir / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    resolved = OmegaConf.to_container(OmegaConf.load(run_dir / RUN_CONFIG), resolve=True)["model"]
    assert ckpt["model_config"] == resolved  # resolved: min_size is the image size, not an interpolation
    assert ckpt["model_config"]["min_size"] == 64 and ckpt["model_config"]["fpn_channels"] == 16
    assert loaded.names == ["circle", "square", "triangle"] and loaded.category_ids == [1, 2, 3]
    assert not loaded.model.training and loaded.device == torch.device("cpu")
    own = loaded.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ckpt["model"].items())


def test_an_older_checkpoint_takes_its_run_config_and_elsewhere_says_what_to_pass(run_dir, tmp_path):
    ckpt = torch.load(run_dir / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    old = {k: v for k, v in ckpt.items() if k not in ("model_config", "config")}  # written before both existed
    in_run = run_dir / "checkpoints" / "old_format.pth"
    torch.save(old, in_run)
    try:
        assert read_weights(in_run).model_config["fpn_channels"] == 16  # from <run>/.hydra/config.yaml
        assert load_model(in_run).names == ["circle", "square", "triangle"]
    finally:
        in_run.unlink()
    elsewhere = tmp_path / "old_format.pth"
    torch.save(old, elsewhere)
    with pytest.raises(WeightsError) as err:
        load_model(elsewhere)
    assert "does not say which model it belongs to" in str(err.value) and "maskrcnn-export-weights" in str(err.value)
    # The model section can be given instead.
    assert load_model(elsewhere, model_config=ckpt["model_config"]).names == ["circle", "square", "triangle"]


def test_predict_takes_paths_pil_images_and_tensors_alike(run_dir, loaded):
    path = val_images(run_dir)[0]
    by_path, by_pil, by_tensor = predict(loaded, [path, Image.open(path), image_tensor(load_image(path), loaded.mapping)],
                                         score_threshold=0.0)
    assert by_path.source == str(path) and by_pil.source == "<image 1>"
    assert by_path.detections and by_path.detections == by_pil.detections == by_tensor.detections
    scores = [d["score"] for d in by_path.detections]
    assert scores == sorted(scores, reverse=True)
    names = dict(zip(loaded.category_ids, loaded.names))
    assert all(names[d["category_id"]] == d["category_name"] for d in by_path.detections)
    masks = by_path.masks()
    assert masks.shape == (len(scores), 64, 64) and masks.dtype == bool
    # A threshold keeps the detections at or above it, in the same order (alone in its batch both times:
    # a CPU convolution's last digits may depend on the batch it runs in).
    [alone] = predict(loaded, path, score_threshold=0.0)
    cut = alone.detections[len(alone.detections) // 2]["score"]
    [high] = predict(loaded, path, score_threshold=cut)
    assert high.detections == [d for d in alone.detections if d["score"] >= cut]


def test_masks_are_the_pasted_masks_of_the_model_encoded(run_dir, loaded):
    """The box-crop RLEs of ``predict`` equal the RLEs of torchvision's own full-size pasted masks."""
    path = val_images(run_dir)[1]
    [result] = predict(loaded, path, score_threshold=0.0)
    image = image_tensor(load_image(path), loaded.mapping)
    with torch.inference_mode():
        [pasted] = loaded.model([image])
    expected = predictions_to_coco([pasted], [0], loaded.mapping)
    assert [d["segmentation"] for d in result.detections] == [r["segmentation"] for r in expected]
    assert [d["bbox"] for d in result.detections] == [r["bbox"] for r in expected]
    decoded = mask_utils.decode([r["segmentation"] for r in expected]).transpose(2, 0, 1).astype(bool)
    assert np.array_equal(result.masks(), decoded)


@pytest.mark.slow  # a ResNet-50 Mask R-CNN built and run: several seconds on a CPU
def test_a_torchvision_coco_state_dict_keeps_coco_ids_and_names(tmp_path_factory):
    path = coco_r50_state_dict(tmp_path_factory)
    weights = read_weights(path)
    assert weights.kind == "state_dict" and weights.torchvision_arch == "maskrcnn_r50_fpn"
    loaded = load_model(path, model_config={"arch": "maskrcnn_r50_fpn", **R50_SMALL_INPUT})
    assert loaded.category_ids == list(range(1, 91))  # label index = COCO category id
    assert loaded.names[0] == "person" and loaded.names[COCO_DOG - 1] == "dog" and loaded.names[11] == "N/A"
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    [result] = predict(loaded, image, score_threshold=0.5)
    assert result.detections and {(d["category_id"], d["category_name"]) for d in result.detections} == {(COCO_DOG, "dog")}
    with torch.inference_mode():
        [raw] = loaded.model([image])
    assert set(raw["labels"][raw["scores"] >= 0.5].tolist()) == {COCO_DOG}  # the model's own output index


def test_a_bare_model_predicts_with_the_classes_given(run_dir, loaded):
    image = image_tensor(load_image(val_images(run_dir)[0]), loaded.mapping)
    [named] = predict(loaded.model, image, score_threshold=0.0, categories=["circle", "square", "triangle"])
    [numbered] = predict(loaded.model, image, score_threshold=0.0)
    mapping = CategoryMapping([{"id": 7, "name": "a"}, {"id": 9, "name": "b"}, {"id": 11, "name": "c"}])
    [mapped] = predict(loaded.model, image, score_threshold=0.0, categories=mapping)
    assert named.detections
    assert [d["category_name"] for d in numbered.detections] == [f"class {d['category_id']}" for d in named.detections]
    assert [d["category_id"] for d in mapped.detections] == [2 * d["category_id"] + 5 for d in named.detections]


def test_weights_of_another_architecture_name_the_keys_and_counts(run_dir, tmp_path):
    state = torch.load(run_dir / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)["model"]
    state["roi_heads.box_head.fc6.renamed"] = state.pop("roi_heads.box_head.fc6.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        load_model(path, model_config=OmegaConf.to_container(compose_cfg().model, resolve=True))
    message = str(err.value)
    total = len(state)
    assert f"{path} does not fit the model built as model.arch=small;" in message
    assert f"missing from the file: 1 of the model's {total} tensors (e.g. roi_heads.box_head.fc6.weight)" in message
    assert f"not in the model: 1 of the file's {total} tensors (e.g. roi_heads.box_head.fc6.renamed)" in message
