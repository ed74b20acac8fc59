"""Inference from a trained model, without a dataset: ``load_model`` and ``predict`` (also as
``from maskrcnn_coco import load_model, predict``), and the weights-only file for deployment
(``export_weights``, the ``maskrcnn-export-weights`` command).

    >>> from maskrcnn_coco import load_model, predict
    >>> loaded = load_model("runs/maskrcnn/<run>/checkpoints/best.pth")      # device="cuda" for a GPU
    >>> loaded.names, loaded.category_ids          # the classes it predicts, in label order
    >>> [result] = predict(loaded, ["photo.jpg"], score_threshold=0.5)
    >>> det = result.detections[0]                  # a COCO result (image_id left out) + its class name
    >>> det["category_id"], det["category_name"], det["score"], det["bbox"]   # bbox: [x, y, width, height]
    >>> det["segmentation"]                         # the mask as COCO RLE: {"size": [h, w], "counts": "..."}
    >>> result.masks()                              # (N, H, W) bool array, the RLEs decoded

The files ``load_model`` takes (``read_weights``):

* a checkpoint written by training (``<run>/checkpoints/*.pth``): its weights, its classes
  (``categories``) and the model config it was trained with (``model_config``; in a checkpoint
  written before that entry existed, the ``model`` part of its ``config``, else the run's
  ``.hydra/config.yaml`` beside its ``checkpoints/`` folder);
* a weights file written by ``export_weights``: the same model, classes and model config without
  the optimizer, RNG and history;
* a torchvision state dict of ``maskrcnn_resnet50_fpn`` or ``maskrcnn_resnet50_fpn_v2`` (the
  architecture is recognised from its keys): a COCO one (91 outputs) keeps its own label space, the
  output index being the COCO category id, with COCO's names from torchvision's weights metadata
  (no download); another class count gets the names ``class 1``, ``class 2``, ...

The model is built as training builds it (``modeling.build.build_model``) with nothing to fetch, and
the file's weights are loaded only if every tensor fits (``weights.load_exact_weights``): a file of
another architecture is a ``WeightsError`` that counts and names the keys that differ.

Images are loaded as training loads them (``data.exif.load_oriented``: any PIL mode as 8-bit RGB,
the EXIF orientation applied) and made tensors by the validation pipeline
(``data.coco.build_transforms``). Detections take evaluation's results path
(``eval_step.evaluate_batch(paste_masks=False)`` then ``coco_eval.predictions_to_coco``): each mask
is encoded as RLE from the pixels of its box, never pasted into an image-sized array.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from maskrcnn_coco.config import AugmentConfig, ModelConfig, SmallModelConfig, validate_config
from maskrcnn_coco.data.coco import CategoryMapping, build_transforms
from maskrcnn_coco.data.exif import Frame, load_oriented, read_header
from maskrcnn_coco.data.validate import to_rgb
from maskrcnn_coco.engine.checkpoint import CHECKPOINT_DIR, MODEL_CONFIG, model_config_of, save_checkpoint
from maskrcnn_coco.engine.eval_step import evaluate_batch
from maskrcnn_coco.evaluation.coco_eval import predictions_to_coco
from maskrcnn_coco.modeling.build import TORCHVISION_ARCHS, _to_frozen_bn, build_model
from maskrcnn_coco.modeling.weights import (
    CLASS_SCORE_KEY,
    TORCHVISION_COCO_CLASSES,
    WeightsError,
    load_exact_weights,
    load_weights_file,
    state_dict_classes,
    state_dict_mismatch,
    state_dict_of,
    torchvision_coco_categories,
)
from maskrcnn_coco.utils.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["ImagePrediction", "LoadedModel", "WeightsFile", "export_weights", "load_image", "load_model", "predict",
           "read_weights"]

RUN_CONFIG = Path(".hydra") / "config.yaml"  # a run folder's composed config, written by Hydra
WEIGHTS_FORMAT = "maskrcnn_coco.weights"  # the ``format`` entry of an exported weights file
WEIGHTS_FORMAT_VERSION = 1
# A ResNet-50 body's tensor: a state dict without it cannot be a torchvision R-50 model (no build needed).
_R50_KEY = "backbone.body.layer1.0.conv3.weight"

ImageInput = str | Path | Image.Image | torch.Tensor


# ------------------------------------------------------------------------------ weights files
@dataclass
class WeightsFile:
    """What a weights file holds (``read_weights``): the state dict, its kind (``checkpoint``,
    ``weights``: an export, ``state_dict``: anything else), the classes (``mapping``: the file's own,
    or COCO's for a torchvision COCO state dict; None when unknown) and the model config when known,
    and the run folder it lies in (None outside one)."""

    path: Path
    state: dict[str, torch.Tensor]
    kind: str
    mapping: CategoryMapping | None = None
    model_config: dict[str, Any] | None = None
    run_dir: Path | None = None
    torchvision_arch: str | None = None  # a bare state dict recognised as this torchvision architecture

    @property
    def num_classes(self) -> int | None:
        """Classes of the box predictor, background included."""
        return state_dict_classes(self.state)


def run_dir_of(path: str | Path) -> Path | None:
    """The run folder of a checkpoint at ``<run>/checkpoints/<name>.pth`` when ``<run>/.hydra/config.yaml``
    exists; None for a file elsewhere."""
    path = Path(path).expanduser().resolve()
    run = path.parent.parent
    return run if path.parent.name == CHECKPOINT_DIR and (run / RUN_CONFIG).is_file() else None


def run_model_config(run_dir: Path) -> dict[str, Any]:
    """The ``model`` section of a run's ``.hydra/config.yaml``, resolved within the whole config (its
    ``min_size`` may interpolate ``data.image_size``)."""
    path = run_dir / RUN_CONFIG
    try:
        cfg = OmegaConf.load(path)
        return OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[return-value]
    except (OmegaConfBaseException, AttributeError, OSError) as err:
        raise ConfigError(f"{path}: cannot read its model section ({err})") from None


def torchvision_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The torchvision architecture (``TORCHVISION_ARCHS``) whose state dict ``state`` is, keys and
    shapes compared on an empty model (built on the ``meta`` device: no memory, no init); None when
    none fits."""
    classes = state_dict_classes(state)
    if _R50_KEY not in state or classes is None:
        return None
    for arch, (builder, _, _) in TORCHVISION_ARCHS.items():
        with torch.device("meta"):
            empty = builder(weights=None, weights_backbone=None, num_classes=classes)
        if not any(state_dict_mismatch(empty, state)):
            return arch
    return None


def numbered_classes(num_classes: int) -> CategoryMapping:
    """Classes known only by their count: ids 1..K named ``class 1`` ... ``class K``."""
    return CategoryMapping([{"id": i, "name": f"class {i}"} for i in range(1, num_classes)])


def read_weights(path: str | Path) -> WeightsFile:
    """Read a weights file (module docstring: checkpoint, export, torchvision state dict); a missing
    or unreadable file is a ``WeightsError`` naming it. The model config and classes are filled in
    where the file or its run folder says them."""
    path = Path(path).expanduser()
    obj = load_weights_file(path)
    state = state_dict_of(obj, path)
    ours = isinstance(obj, dict) and isinstance(obj.get("model"), dict)
    kind = ("weights" if obj.get("format") == WEIGHTS_FORMAT else "checkpoint") if ours else "state_dict"
    categories = obj.get("categories") if ours else None
    found = WeightsFile(path, state, kind, run_dir=run_dir_of(path),
                        mapping=CategoryMapping.from_state_dict(categories) if categories else None,
                        model_config=model_config_of(obj) if ours else None)
    if found.model_config is None and found.run_dir is not None:
        found.model_config = run_model_config(found.run_dir)
    if found.model_config is None:
        found.torchvision_arch = torchvision_arch(state)
        if found.torchvision_arch is not None:
            # torchvision's own defaults (min_size 800, 100 detections, ...): ModelConfig's.
            found.model_config = {"arch": found.torchvision_arch}
    if found.mapping is None and found.torchvision_arch is not None and found.num_classes == TORCHVISION_COCO_CLASSES:
        found.mapping = CategoryMapping(torchvision_coco_categories())
    return found


def model_schema(model_config: Mapping[str, Any] | DictConfig) -> DictConfig:
    """``model_config`` typed by its schema (``SmallModelConfig`` for ``arch: small``, else
    ``ModelConfig``) and checked by its rules: an unknown key or a bad value is a ``ConfigError``. A
    section of a whole config is resolved there first (``min_size`` may interpolate ``data.image_size``)."""
    if isinstance(model_config, DictConfig):
        model_config = OmegaConf.to_container(model_config, resolve=True)  # type: ignore[assignment]
    arch = model_config.get("arch")
    schema = SmallModelConfig() if arch == "small" else ModelConfig(arch=arch)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), model_config)
    except OmegaConfBaseException as err:
        raise ConfigError(f"model config {dict(model_config)}: {err}") from None
    validate_config(cfg, prefix="model.")
    return cfg  # type: ignore[return-value]


def build_for_weights(model_config: Mapping[str, Any] | DictConfig, weights: WeightsFile, hint: str = "") -> nn.Module:
    """The model of ``model_config`` with ``weights`` loaded exactly (``load_exact_weights``), in eval
    mode on the CPU. Nothing is downloaded: ``model.weights`` and ``model.backbone_weights`` are what
    the model started from in training, the file replaces them."""
    cfg = model_schema(model_config)
    cfg.weights, cfg.backbone_weights = None, None
    num_classes = weights.num_classes
    if num_classes is None:
        raise WeightsError(f"{weights.path} has no box predictor ({CLASS_SCORE_KEY}): not a Mask R-CNN state dict")
    model = build_model(cfg, num_classes)
    if cfg.arch == "maskrcnn_r50_fpn" and "backbone.body.bn1.num_batches_tracked" not in weights.state:
        # Trained from pretrained weights, torchvision's v1 backbone has FrozenBatchNorm2d (as build_model
        # makes it then): the same module type gives the same arithmetic, so the same detections.
        model.backbone.body = _to_frozen_bn(model.backbone.body)
    load_exact_weights(model, weights.state, weights.path, f"model.arch={cfg.arch}", hint)
    return model.eval()


# --------------------------------------------------------------------------------- the model
@dataclass
class LoadedModel:
    """A model ready for inference (eval mode) with the classes it predicts: label ``i`` (1..K) is
    the COCO category ``category_ids[i - 1]`` named ``names[i - 1]``."""

    model: nn.Module
    category_ids: list[int]
    names: list[str]
    model_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def mapping(self) -> CategoryMapping:
        return CategoryMapping([{"id": i, "name": n} for i, n in zip(self.category_ids, self.names)])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


NO_MODEL_CONFIG_HINT = ("pass the checkpoint from its run folder (<run>/checkpoints/, beside <run>/.hydra/config.yaml), "
                        "or a weights file exported from there with maskrcnn-export-weights (it embeds the model config)")


def inference_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` (``cpu``, ``cuda``, ``cuda:1``); a bad name is a ``ConfigError``."""
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={device!r} is not a device: use cpu, cuda or cuda:N") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", *,
               model_config: Mapping[str, Any] | None = None) -> LoadedModel:
    """The model in ``path`` (module docstring: a checkpoint, an exported weights file or a torchvision
    state dict), in eval mode on ``device`` (``cpu``, ``cuda``, ``cuda:1``), with its classes.

    ``model_config`` (the ``model`` section of a run's config, a dict) replaces what the file and its
    run folder say. Raises ``WeightsError`` (a ``UserError``) for a missing file, a file whose model
    config cannot be found, or weights that do not fit the architecture, naming what to pass."""
    weights = read_weights(path)
    return loaded_from(weights, device, model_config=model_config)


def loaded_from(weights: WeightsFile, device: str | torch.device = "cpu", *,
                model_config: Mapping[str, Any] | None = None) -> LoadedModel:
    """``load_model`` of an already read file."""
    config = dict(model_config) if model_config is not None else weights.model_config
    if config is None:
        raise WeightsError(f"{weights.path} does not say which model it belongs to (no model config in it, and it "
                           f"is not in a run folder): {NO_MODEL_CONFIG_HINT}, or model_config=<the run's model section>")
    model = build_for_weights(config, weights)
    try:
        model = model.to(inference_device(device))
    except (RuntimeError, AssertionError) as err:  # torch's words for a CUDA it has not got
        raise ConfigError(f"device={device!r}: {err}") from None
    # Classes the file does not name (a bare state dict): numbered; the count is known once the model is built.
    mapping = weights.mapping or numbered_classes(weights.num_classes)  # type: ignore[arg-type]
    return LoadedModel(model, list(mapping.coco_ids), list(mapping.names), dict(config), str(weights.path))


def as_loaded(model: LoadedModel | nn.Module, categories: CategoryMapping | Sequence[str] | None = None) -> LoadedModel:
    """``model`` as a ``LoadedModel``: a bare torchvision-style Mask R-CNN gets ``categories`` (a
    ``CategoryMapping``, or names in label order with ids 1..K), else numbered classes."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(categories, CategoryMapping):
        mapping = categories
    elif categories is not None:
        mapping = CategoryMapping([{"id": i, "name": n} for i, n in enumerate(categories, start=1)])
    else:
        mapping = numbered_classes(model.roi_heads.box_predictor.cls_score.out_features)
    return LoadedModel(model, list(mapping.coco_ids), list(mapping.names))


# --------------------------------------------------------------------------------- the images
def load_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as training loads it: 8-bit RGB from any PIL mode, turned into the frame its
    EXIF orientation says viewers display (``data.exif``). Raises what PIL raises for a file that is
    missing or not an image."""
    orientation, _ = read_header(path)
    return load_oriented(path, Frame(orientation, apply=True))


def image_tensor(image: Image.Image | torch.Tensor, mapping: CategoryMapping) -> torch.Tensor:
    """A float ``(3, H, W)`` tensor in [0, 1]: a PIL image through the validation pipeline
    (``build_transforms(False, ...)``, as evaluation sees it); a tensor as it is (uint8 scaled to
    [0, 1], one channel repeated)."""
    if isinstance(image, torch.Tensor):
        tensor = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor
    tensor, _ = build_transforms(False, AugmentConfig(), mapping)(to_rgb(image), {"image_id": 0})
    return tensor


def above(output: Mapping[str, Any], score_threshold: float) -> dict[str, Any]:
    """One image's detections of score at least ``score_threshold`` (tensors indexed, the rest kept)."""
    keep = output["scores"] >= score_threshold
    return {k: v[keep] if isinstance(v, torch.Tensor) else v for k, v in output.items()}


def detect(loaded: LoadedModel, images: Sequence[torch.Tensor], *, score_threshold: float = 0.5,
           mask_threshold: float = 0.5) -> list[list[dict[str, Any]]]:
    """Per image (float ``(3, H, W)`` tensors, one batch) its detections of score at least
    ``score_threshold``, highest first, as COCO results without ``image_id`` plus ``category_name``:
    evaluation's results path (module docstring)."""
    if not images:
        return []
    batch = [image.to(loaded.device) for image in images]
    # No targets: only the detections are asked for (eval mode, model's modes restored).
    _, outputs = evaluate_batch(loaded.model, batch, [{} for _ in batch], losses=False, detections=True, paste_masks=False)
    outputs = [above(out, score_threshold) for out in outputs]
    names = dict(zip(loaded.category_ids, loaded.names))
    per_image: list[list[dict[str, Any]]] = [[] for _ in outputs]
    for result in predictions_to_coco(outputs, list(range(len(outputs))), loaded.mapping, mask_threshold):
        index = result.pop("image_id")
        per_image[index].append({**result, "category_name": names[result["category_id"]]})
    return per_image


@dataclass
class ImagePrediction:
    """One image's detections (``detect``'s dicts: ``category_id``, ``category_name``, ``score``,
    ``bbox`` as COCO ``[x, y, width, height]``, ``segmentation`` as COCO RLE), highest score first."""

    source: str
    height: int
    width: int
    detections: list[dict[str, Any]]

    def masks(self) -> np.ndarray:
        """The masks as an ``(N, H, W)`` bool array (the RLEs decoded)."""
        if not self.detections:
            return np.zeros((0, self.height, self.width), dtype=bool)
        decoded = mask_utils.decode([d["segmentation"] for d in self.detections])  # H x W x N
        return np.ascontiguousarray(decoded.transpose(2, 0, 1)).astype(bool)

    def boxes_xyxy(self) -> torch.Tensor:
        """The boxes as an ``(N, 4)`` float tensor ``[x1, y1, x2, y2]``."""
        boxes = torch.tensor([d["bbox"] for d in self.detections], dtype=torch.float32).reshape(-1, 4)
        return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """The detections as COCO results of ``image_id`` (``category_name`` left out)."""
        return [{"image_id": int(image_id), **{k: v for k, v in d.items() if k != "category_name"}} for d in self.detections]


def _as_input(item: ImageInput, index: int, mapping: CategoryMapping) -> tuple[str, torch.Tensor]:
    if isinstance(item, (str, Path)):
        return str(item), image_tensor(load_image(item), mapping)
    if isinstance(item, (Image.Image, torch.Tensor)):
        return f"<image {index}>", image_tensor(item, mapping)
    raise TypeError(f"predict: image {index} is a {type(item).__name__}; pass a path, a PIL image or a (3, H, W) tensor")


def predict(
    model: LoadedModel | nn.Module,
    images: ImageInput | Iterable[ImageInput],
    *,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    batch_size: int = 4,
    categories: CategoryMapping | Sequence[str] | None = None,
) -> list[ImagePrediction]:
    """The detections of each image (``ImagePrediction``, in the order given), ``batch_size`` images per
    forward pass.

    ``model``: a ``load_model`` result, or a bare Mask R-CNN with ``categories`` (its classes in label
    order; default ``class 1``, ...). ``images``: file paths (loaded as training loads them: EXIF
    orientation, any PIL mode), PIL images (taken as they are, converted to RGB) or float ``(3, H, W)``
    tensors in [0, 1] (uint8 is scaled), alone or in a list. Detections below ``score_threshold`` are
    left out; a pixel is in a mask above ``mask_threshold``. A file that cannot be read raises what PIL
    raises (``maskrcnn-predict`` skips it instead)."""
    if batch_size < 1:
        raise ValueError(f"predict: batch_size={batch_size} must be at least 1")
    loaded = as_loaded(model, categories)
    single = isinstance(images, (str, Path, Image.Image, torch.Tensor))
    items = [images] if single else list(images)  # type: ignore[list-item]
    out: list[ImagePrediction] = []
    for start in range(0, len(items), batch_size):
        inputs = [_as_input(item, start + i, loaded.mapping) for i, item in enumerate(items[start:start + batch_size])]
        found = detect(loaded, [t for _, t in inputs], score_threshold=score_threshold, mask_threshold=mask_threshold)
        out += [ImagePrediction(source, int(t.shape[-2]), int(t.shape[-1]), dets) for (source, t), dets in zip(inputs, found)]
    return out


# -------------------------------------------------------------------------- weights export
def weights_only(loaded: LoadedModel, weights: WeightsFile) -> dict[str, Any]:
    """The exported file's content: the state dict as the source file has it, the class count, the
    classes and the model config; nothing of the training state (optimizer, RNG, history)."""
    return {
        "format": WEIGHTS_FORMAT,
        "format_version": WEIGHTS_FORMAT_VERSION,
        "model": weights.state,
        "num_classes": weights.num_classes,
        "categories": loaded.mapping.state_dict(),
        MODEL_CONFIG: dict(loaded.model_config),
    }


def export_weights(source: str | Path, output: str | Path) -> Path:
    """Write the weights of ``source`` (any file ``load_model`` takes) to ``output`` for deployment
    (``weights_only``), after checking that they load (the model is built and the weights loaded
    exactly, so the file always loads with ``load_model``); written atomically. Returns ``output``."""
    output = Path(output).expanduser()
    if output.resolve() == Path(source).expanduser().resolve():
        raise ConfigError(f"--output {output} is the source file itself: choose another path")
    weights = read_weights(source)
    return save_checkpoint(output, weights_only(loaded_from(weights), weights))
