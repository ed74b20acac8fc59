"""Weights: torchvision weights names and local files (our checkpoints, torchvision state dicts,
``{"state_dict": ...}`` files), loaded with ``torch.load(..., weights_only=True)`` and errors that
name the file. When weights were trained for another number of classes, the box and mask predictors
are replaced by fresh ones (the standard fine-tuning recipe) and a message says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from maskrcnn_coco.utils.errors import UserError

log = logging.getLogger(__name__)

PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


class WeightsError(UserError, RuntimeError):
    """Weights that cannot be found, downloaded or loaded into the model."""


def is_local_path(spec: str) -> bool:
    """A weights spec that names a file rather than a torchvision weights enum member."""
    return any(sep in spec for sep in ("/", "\\")) or spec.endswith((".pth", ".pt", ".bin")) or Path(spec).exists()


def enum_member(enum: Any, name: str, key: str) -> Any:
    try:
        return enum[name]
    except KeyError:
        names = ", ".join(["DEFAULT", *(m.name for m in enum)])
        raise WeightsError(
            f"{key}={name!r} is neither a local file nor a {enum.__name__} name ({names})"
        ) from None


def download(fn: Callable[[], Any], what: str) -> Any:
    try:
        return fn()
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        if isinstance(err, WeightsError):
            raise
        raise WeightsError(
            f"Could not fetch {what} ({type(err).__name__}: {err}). Without network access, download "
            "the file elsewhere and pass its path instead (model.weights=/path/to/file.pth)."
        ) from err


def load_weights_file(path: str | Path) -> Any:
    """``torch.load`` (tensors and plain data only) with errors that name the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors carry little context on their own
        raise WeightsError(f"Could not read weights file {path}: {err}") from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from our checkpoints, torchvision files, or ``{"state_dict": ...}`` files."""
    return state_dict_of(load_weights_file(path), path)


def state_dict_of(obj: Any, source: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a loaded weights file ``obj`` (``read_state_dict``'s unwrapping of our
    checkpoints, ``{"state_dict": ...}`` files and bare state dicts), for a caller that also reads
    the file's other entries; ``source`` names the file in the error."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source} does not hold a state dict (a mapping of names to tensors)")
    return obj


def load_model_weights(model: MaskRCNN, path: str | Path, num_classes: int) -> None:
    """Load a full-model state dict; predictors trained for another class count are replaced."""
    state = read_state_dict(path)
    own = model.state_dict()
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched and all(k.startswith(PREDICTOR_PREFIXES) for k in mismatched):
        file_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
        for k in [k for k in state if k.startswith(PREDICTOR_PREFIXES)]:
            del state[k]
        log.info(
            "Replaced box and mask predictors: %s was trained for %d classes, the dataset has %d "
            "(background included); they start fresh.", Path(path).name, file_classes, num_classes,
        )
    elif mismatched:
        shapes = "; ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:5])
        raise WeightsError(f"{path} does not fit this model architecture ({shapes})")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(PREDICTOR_PREFIXES)]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"{path} does not match this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
        )


def replace_predictors(model: MaskRCNN, num_classes: int, source: str) -> None:
    """Swap the box and mask predictors for fresh ones when the class count differs."""
    box_pred = model.roi_heads.box_predictor
    old = box_pred.cls_score.out_features
    if old == num_classes:
        return
    model.roi_heads.box_predictor = FastRCNNPredictor(box_pred.cls_score.in_features, num_classes)
    mask_pred = model.roi_heads.mask_predictor
    model.roi_heads.mask_predictor = MaskRCNNPredictor(
        mask_pred.conv5_mask.in_channels, mask_pred.conv5_mask.out_channels, num_classes
    )
    log.info(
        "Replaced box and mask predictors: %s has %d classes, the dataset has %d (background included); they start fresh.",
        source, old, num_classes,
    )


def backbone_state_dict(spec: str, enum: Any, arch: str) -> Mapping[str, torch.Tensor]:
    if is_local_path(spec):
        state = read_state_dict(spec)
        for prefix in ("backbone.body.", "body.", "module."):
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return state
    weights = enum_member(enum, spec, "model.backbone_weights")
    return download(lambda: weights.get_state_dict(progress=True), f"{arch} weights {spec!r}")


def load_backbone_body(body: nn.Module, state: Mapping[str, torch.Tensor], spec: str) -> None:
    # The classifier (fc) is never part of a detection backbone, whether or not the body has one yet.
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    result = body.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"Backbone weights {spec} do not match the backbone: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


# ------------------------------------------------------------------ exact loading (inference)
# torchvision's COCO models: 91 outputs, output index = COCO category id (0: background; the ids
# COCO left unused are named "N/A").
TORCHVISION_COCO_CLASSES = 91
CLASS_SCORE_KEY = "roi_heads.box_predictor.cls_score.weight"
# BatchNorm's step counter: absent from FrozenBatchNorm2d and from torchvision's COCO files, and
# unused in eval mode, so it never decides whether a file fits.
_NORM_COUNTER = "num_batches_tracked"


def state_dict_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """Classes (background included) of a Mask R-CNN state dict's box predictor; None without one."""
    weight = state.get(CLASS_SCORE_KEY)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def torchvision_coco_categories() -> list[dict[str, Any]]:
    """COCO's categories as torchvision's COCO weights label them: ``{"id": i, "name": ...}`` for the
    outputs 1..90 (id = output index; the 10 ids COCO does not use are named ``N/A``). From the
    weights' metadata, which ships with torchvision: nothing is downloaded."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    names = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return [{"id": i, "name": name} for i, name in enumerate(names) if i > 0]


def state_dict_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, reshaped)`` keys of ``state`` against ``model``: the model's tensors the
    file lacks, the file's tensors the model has no place for, and those of another shape (as
    ``"key: file (..) vs model (..)"``). BatchNorm's ``num_batches_tracked`` is left out."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_NORM_COUNTER)]
    unexpected = [k for k in state if k not in own and not k.endswith(_NORM_COUNTER)]
    reshaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in state if k in own and state[k].shape != own[k].shape]
    return missing, unexpected, reshaped


def load_exact_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, built: str,
                       hint: str = "") -> None:
    """Load ``state`` into ``model`` only if every tensor fits (no predictor replaced, nothing left
    fresh: evaluation and inference need the weights exactly); otherwise a ``WeightsError`` that
    counts the keys missing, unexpected and of another shape, names a few of each and ends with
    ``hint``. ``built`` says what the model was built as (e.g. ``model.arch=small``)."""
    missing, unexpected, reshaped = state_dict_mismatch(model, state)
    if missing or unexpected or reshaped:
        parts = []
        for what, keys in ((f"missing from the file: {len(missing)} of the model's {len(model.state_dict())} tensors", missing),
                           (f"not in the model: {len(unexpected)} of the file's {len(state)} tensors", unexpected),
                           (f"of another shape: {len(reshaped)}", reshaped)):
            if keys:
                parts.append(f"{what} (e.g. {', '.join(keys[:3])})")
        message = f"{source} does not fit the model built as {built}; " + "; ".join(parts)
        raise WeightsError(message + (f". {hint}" if hint else ""))
    model.load_state_dict(dict(state), strict=False)  # strict=False: BatchNorm counters only (checked above)
