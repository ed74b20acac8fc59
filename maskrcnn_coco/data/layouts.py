"""Where a COCO-format dataset's files are under ``data.root``: COCO 2017's layout or an annotation
tool's export (``data.layout``), and the val split cut from the train file (``data.val_fraction``).

Layouts (paths under ``data.root``):

- ``coco2017``: ``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json`` (the
  config's defaults).
- ``roboflow`` (Roboflow's "COCO" export): ``train/_annotations.coco.json`` with its images beside it
  in ``train/``, ``valid/`` likewise, sometimes ``test/`` (not used). Source: Datumaro's "Roboflow"
  format page (openvinotoolkit.github.io/datumaro, data-formats/formats/roboflow), "Roboflow COCO JSON".
- ``cvat`` (CVAT's "COCO 1.0" export): ``annotations/instances_<subset>.json`` with the images in
  ``images/<subset>/``, or in ``images/`` itself in exports before mid-2024. A task exports one
  subset, ``default``; a project exports its subsets, ``Train``/``Validation``/``Test`` unless renamed.
  Sources: CVAT's docs, site/content/en/docs/dataset_management/formats/format-coco.md ("images/
  <subset_name>/ ... annotations/instances_<subset_name>.json"; "Otherwise, a singular default subset
  will be created"); cvat-ai/cvat PR #8171 (July 2024, "coco export subsets to different folders",
  ``merge_images=False`` in cvat/apps/dataset_manager/formats/coco.py; before it every subset's
  images went into one ``images/``); cvat-ui/src/consts.ts ``DEFAULT_PROJECT_SUBSETS = ['Train',
  'Test', 'Validation']``.
- ``auto``: the first layout whose train annotation file exists under ``data.root``, in the order
  above, with any path key set explicitly winning for that key; when none is recognised, the four
  path keys as set (``custom``).

A path key set explicitly (``data.val_annotations=...``) wins over an explicit layout's preset for
that key; the files of an explicit or recognised layout must exist.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from maskrcnn_coco.data.split import SplitInfo, format_split, split_annotations
from maskrcnn_coco.utils.errors import ConfigError, DataError, UserError

PATH_KEYS = ("train_images", "val_images", "train_annotations", "val_annotations")
# The config's defaults (CocoDataConfig, conf/data/coco.yaml), relative to data.root.
COCO2017 = {
    "train_images": "train2017",
    "val_images": "val2017",
    "train_annotations": "annotations/instances_train2017.json",
    "val_annotations": "annotations/instances_val2017.json",
}
ROBOFLOW_FILE = "_annotations.coco.json"
ROBOFLOW_SPLITS = ("train", "valid")
CVAT_DEFAULT_SUBSET = "default"
# CVAT subset names (matched ignoring case) taken as train and val; the first match wins.
CVAT_TRAIN_SUBSETS = ("train",)
CVAT_VAL_SUBSETS = ("validation", "val", "valid")
SPLIT_HINT = "data.val_fraction=0.1"


@dataclass
class ResolvedPaths:
    """The files a run reads, the layout they come from (coco2017, roboflow, cvat, or custom: the
    path keys as set) and the console lines that say so."""

    train_images: Path
    val_images: Path
    train_annotations: Path
    val_annotations: Path
    layout: str
    lines: list[str] = field(default_factory=list)
    split: SplitInfo | None = None

    def as_dict(self) -> dict[str, Path]:
        """The four paths under ``PATH_KEYS`` (what ``coco.resolve_paths`` returns)."""
        return {k: getattr(self, k) for k in PATH_KEYS}


@dataclass
class Preset:
    """What one layout finds under a root: the four paths (val ones None when the export has no val
    split), what to say when val is missing, and notes for the console."""

    paths: dict[str, Path | None]
    no_val: str = ""
    notes: list[str] = field(default_factory=list)


def _path(value: str | Path) -> Path:
    return Path(os.path.expanduser(str(value)))


def coco2017_preset(root: Path) -> Preset:
    paths: dict[str, Path | None] = {k: root / v for k, v in COCO2017.items()}
    return Preset(paths)


def roboflow_preset(root: Path) -> Preset:
    train, valid = (root / s for s in ROBOFLOW_SPLITS)
    has_val = (valid / ROBOFLOW_FILE).is_file()
    paths = {
        "train_images": train,
        "train_annotations": train / ROBOFLOW_FILE,
        "val_images": valid if has_val else None,
        "val_annotations": valid / ROBOFLOW_FILE if has_val else None,
    }
    return Preset(paths, f"The Roboflow export at {root} has no validation split ({valid / ROBOFLOW_FILE} not found)")


def cvat_subsets(root: Path) -> dict[str, Path]:
    """CVAT's ``annotations/instances_<subset>.json`` files by subset name."""
    folder = root / "annotations"
    if not folder.is_dir():
        return {}
    return {p.name[len("instances_"):-len(".json")]: p for p in sorted(folder.glob("instances_*.json")) if p.is_file()}


def _cvat_images(root: Path, subset: str) -> Path:
    # images/<subset>/ since CVAT's July 2024 export change, images/ before it.
    nested = root / "images" / subset
    return nested if nested.is_dir() else root / "images"


def cvat_preset(root: Path) -> Preset:
    subsets = cvat_subsets(root)
    by_lower = {name.lower(): name for name in subsets}

    def pick(names: tuple[str, ...]) -> str | None:
        return next((by_lower[n] for n in names if n in by_lower), None)

    train, val = pick(CVAT_TRAIN_SUBSETS), pick(CVAT_VAL_SUBSETS)
    notes = []
    if train is None:
        # A task's one subset is "default"; a lone subset of another name is as good.
        only = next(iter(subsets)) if len(subsets) == 1 else CVAT_DEFAULT_SUBSET
        train, val = (CVAT_DEFAULT_SUBSET if CVAT_DEFAULT_SUBSET in subsets else only), None
    elif CVAT_DEFAULT_SUBSET in subsets:
        notes.append(f"{subsets[CVAT_DEFAULT_SUBSET]} unused (subset {train} is train)")
    train_file = root / "annotations" / f"instances_{train}.json"
    paths = {
        "train_images": _cvat_images(root, train),
        "train_annotations": train_file,
        "val_images": _cvat_images(root, val) if val else None,
        "val_annotations": subsets[val] if val else None,
    }
    no_val = (f"The CVAT export at {root} has one annotation file, {train_file}, and no validation subset"
              if len(subsets) <= 1 else
              f"The CVAT export at {root} has no validation subset (instances_Validation.json; found {', '.join(subsets)})")
    return Preset(paths, no_val, notes)


PRESETS: dict[str, Callable[[Path], Preset]] = {"coco2017": coco2017_preset, "roboflow": roboflow_preset, "cvat": cvat_preset}


def detect_layout(root: Path) -> str | None:
    """The first layout (coco2017, roboflow, cvat) whose train annotation file exists under ``root``."""
    for name, preset in PRESETS.items():
        train = preset(root).paths["train_annotations"]
        if train is not None and train.is_file():
            return name
    return None


def _not_recognised(root: Path) -> UserError:
    # Starts as coco.py's missing-file error did before layouts, naming COCO 2017's file first.
    looked = [f"{PRESETS[n](root).paths['train_annotations']} ({what})"
              for n, what in (("coco2017", "COCO 2017"), ("roboflow", "Roboflow"), ("cvat", "CVAT COCO 1.0"))]
    where = "" if root.is_dir() else f"; data.root={root} does not exist"
    return DataError(f"Annotation file not found: {looked[0]}, {looked[1]} or {looked[2]}{where}; set data.root to the "
                     "dataset's folder, or data.train_annotations and data.train_images to its files")


def _root(cfg: Any) -> Path | None:
    """``data.root``, or None where it is left at ``???`` (the four path keys all set instead)."""
    try:
        return _path(cfg.root)
    except MissingMandatoryValue:
        return None


def overridden_keys(cfg: Any, root: Path | None) -> list[str]:
    """The path keys whose value is not what the config's default makes of ``data.root``."""
    if root is None:
        return list(PATH_KEYS)
    raw_root = str(cfg.root)
    return [k for k in PATH_KEYS
            if os.path.normpath(os.path.expanduser(str(getattr(cfg, k))))
            != os.path.normpath(os.path.expanduser(f"{raw_root}/{COCO2017[k]}"))]


def _describe(paths: dict[str, Path | None]) -> str:
    return (f"train {paths['train_annotations']} + {paths['train_images']}, "
            f"val {paths['val_annotations']} + {paths['val_images']}")


def _missing(paths: dict[str, Path | None], keys: tuple[str, ...]) -> list[str]:
    missing = []
    for k in keys:
        p = paths[k]
        if p is not None and not (p.is_dir() if k.endswith("_images") else p.is_file()):
            missing.append(str(p))
    return missing


def _check_files(preset: Preset, paths: dict[str, Path | None], subject: str, split: bool) -> None:
    """The files of a recognised or explicit layout exist (val's only when not cut from train), or one
    error naming the missing ones and the key to set."""
    train_keys = ("train_annotations", "train_images")
    missing = _missing(paths, train_keys if split else (*train_keys, "val_annotations", "val_images"))
    if set(missing) & {str(paths[k]) for k in train_keys}:
        raise DataError(f"{subject}: not found: {', '.join(missing)}; check data.root, or set data.layout=auto")
    cut = f"set {SPLIT_HINT} to cut a val split from {paths['train_annotations']}, or data.val_annotations and data.val_images"
    if not split and (paths["val_annotations"] is None or paths["val_images"] is None):
        raise ConfigError(f"{preset.no_val}; {cut}")
    if missing:
        raise DataError(f"{subject}: not found: {', '.join(missing)}; {cut}")


def resolve_layout(cfg: Any, split_dir: Path) -> ResolvedPaths:
    """The image folders and annotation files of ``cfg`` (a ``CocoDataConfig`` or its DictConfig),
    from ``data.layout`` and ``data.root`` (module doc), with the lines to print at start.

    With ``data.val_fraction`` set, val is cut from the resolved train annotation file into
    ``split_dir`` (``split.split_annotations``; re-used while the source, fraction and seed are the
    same) and both splits read the train images folder; a val file of the layout is then unused.
    Errors name the files looked for and the key to set, in one line.
    """
    if is_dataclass(cfg) and not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)  # interpolates ${.root}
    layout, fraction = cfg.layout, cfg.val_fraction
    root = _root(cfg)
    given = {k: _path(getattr(cfg, k)) for k in PATH_KEYS}
    overridden = overridden_keys(cfg, root)
    set_keys = ", ".join(f"data.{k}" for k in overridden)

    preset: Preset | None = None
    # auto with some keys set: a recognised export still gives the keys left unset (a Roboflow
    # export without valid/ plus data.val_annotations=...); nothing recognised: the keys as set.
    detected = detect_layout(root) if layout == "auto" and root is not None and len(overridden) < len(PATH_KEYS) else None
    if layout == "auto" and (root is None or (overridden and detected is None) or len(overridden) == len(PATH_KEYS)):
        name, why, paths = "custom", f"{set_keys} set explicitly", dict(given)
    else:
        if root is None:
            raise ConfigError(f"data.layout={layout}: set data.root to the dataset's folder")
        name = layout if layout != "auto" else detected
        if name is None:
            raise _not_recognised(root)
        preset = PRESETS[name](root)
        paths = {**preset.paths, **{k: given[k] for k in overridden}}
        why = f"data.layout={name}" if layout != "auto" else f"recognised from data.root={root}"
        subject = f"data.layout={name}, data.root={root}" if layout != "auto" else f"Data layout {name} ({why})"
        if overridden:
            why += f"; {set_keys} as set"
    head = f"Data layout: {name} ({why})"
    notes = [*preset.notes] if preset else []

    if preset is not None:  # custom paths are checked when loaded, as before layouts
        _check_files(preset, paths, subject, split=fraction is not None)

    if fraction is None:
        lines = [f"{head}: {_describe(paths)}" + "".join(f"; {n}" for n in notes)]
        return ResolvedPaths(**paths, layout=name, lines=lines)

    train_file, images = paths["train_annotations"], paths["train_images"]
    unused = paths["val_annotations"]
    if unused is not None and unused.is_file():
        notes.append(f"{unused} unused (data.val_fraction wins)")
    train_split, val_split, info = split_annotations(train_file, fraction, cfg.split_seed, split_dir)
    lines = [f"{head}: train {train_file} + {images}, val cut from it by data.val_fraction={fraction} "
             "(same images folder)" + "".join(f"; {n}" for n in notes), format_split(info)]
    return ResolvedPaths(images, images, train_split, val_split, layout=name, lines=lines, split=info)
