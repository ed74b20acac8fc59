"""The one scalar vocabulary: an epoch record becomes ``{tag: float}`` here and nowhere else.

Every consumer (trackers, the console block, ``metrics.jsonl``, the sweep summary, the sweep
objective, anything that reads a run back) uses these tags:

* ``loss/train_total`` (the weighted sum: what was optimised) and ``loss/train_<component>`` (raw);
  ``loss/train`` when only a float total is known
* ``loss/val`` (weighted total) and ``loss/val_<component>``
* ``mAP/<bbox|segm>_<AP|AP50|AP75|APs|APm|APl>`` (finite values only: COCO's undefined ones are left out)
* ``mAP/<bbox|segm>_AP_class_<key>``: one class's AP, ``<key>`` from ``class_keys`` (below)
* ``lr`` (the backbone group's, else the first group's) and ``lr/<group>``
* ``grad_norm/<group>``, ``time/<name>``
* ``spike/loss``, ``spike/grad_norm``: the epoch's largest iteration-level ratio (a window's peak over
  its reference, ``engine.monitors.SpikeMonitor``); what the spike warnings compare with their factors
* ``eval/images``, ``eval/val_images`` (evaluated epochs): how many val images ``loss/val`` and ``mAP/*``
  were measured on, and how many the val set has (fewer: ``eval.subset``'s fixed subset)

Iteration-level scalars (``iteration_scalars``), one namespace ``iter/`` at ``step=global_step`` (the
optimizer steps so far), every ``print_freq`` iterations and at an epoch's end; each is the mean over
the window since the previous read-back (the epoch tags above are untouched):

* ``iter/<component>`` (raw, e.g. ``iter/loss_mask``) and ``iter/loss_total`` (weighted)
* ``iter/lr/<group>`` (the groups as ``lr/<group>`` names them), ``iter/grad_norm/<set>`` (windows
  in which the gradient norms were measured)
* ``iter/time_data``, ``iter/time_iter`` (seconds per iteration), ``iter/images_per_s`` (all ranks)
* ``iter/memory/<name>`` in MiB: ``main_rss_mb``, ``workers_uss_mb``, ``workers_pss_mb`` (with loader
  workers), ``cuda_max_allocated_mb`` (the window's peak), ``cuda_reserved_mb``

Class keys and display names. A class appears in tags, metric names and CSV columns by its *key*,
an ASCII form of its name made here and nowhere else (``class_keys``); people read the name as
written (its *display name*), which a run keeps in ``classes.json`` (``write_class_names``) so that
readers can turn keys back into names (``read_class_names``). The key of a name:

* the name is NFKC-normalised (full-width forms, ligatures: ``ﬁ`` -> ``fi``); a character whose NFKD
  form is ASCII once its combining marks are dropped is written so (``café`` -> ``cafe``), and a few
  Latin letters are spelt out (``ß`` -> ``ss``, ``æ`` -> ``ae``, ``ø`` -> ``o``, ...);
* any other character becomes its code point, ``u`` and at least four lowercase hex digits, joined
  to its neighbours by one ``_`` (``自転車`` -> ``u81ea_u8ee2_u8eca``, ``hello 世界`` ->
  ``hello_u4e16_u754c``, ``ガ`` -> ``u30ac``), so such names keep apart instead of vanishing;
* in the ASCII rest, a run of characters other than letters, digits, ``_``, ``-`` and ``.`` becomes
  one ``_``, and ``_`` is stripped at the ends (``traffic light`` -> ``traffic_light``; an empty name
  -> ``unnamed``): a name already safe is its own key, as before keys existed;
* among a dataset's classes, in category id order, a key already taken gets ``_<category id>``
  appended (``a b`` (id 1), ``a_b`` (id 2) -> ``a_b``, ``a_b_2``).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from maskrcnn_coco.config import DEFAULT_OBJECTIVE, LOSS_COMPONENTS
from maskrcnn_coco.utils.errors import ConfigError, UserError

T = TypeVar("T")

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
TRAIN_TOTAL = "loss/train_total"
TRAIN_ONLY_TOTAL = "loss/train"  # a train loss known only as a float total
VAL_TOTAL = "loss/val"
ITER_PREFIX = "iter/"
ITER_TOTAL = "iter/loss_total"
OBJECTIVE_MODES = ("final", "best")
CLASS_AP_PREFIX = "AP_class_"  # a class's AP metric: AP_class_<key>, tag mAP/<iou_type>_AP_class_<key>
CLASSES_FILE = "classes.json"  # in a run folder: [{"id": coco id, "name": display name, "key": key}, ...]

__all__ = [
    "CLASSES_FILE",
    "CLASS_AP_PREFIX",
    "DEFAULT_OBJECTIVE",
    "ITER_PREFIX",
    "LOSS_COMPONENTS",
    "METRIC_NAMES",
    "check_objective",
    "class_key",
    "class_keys",
    "class_names_by_key",
    "epoch_scalars",
    "iteration_scalars",
    "loss_tag",
    "loss_weights_from_config",
    "map_tag",
    "read_class_names",
    "weighted_total",
    "write_class_names",
]


def loss_tag(split: str, component: str | None = None) -> str:
    """``loss/<split>_<component>`` (raw), or the weighted total: ``loss/train_total``, ``loss/val``."""
    if component is None:
        return TRAIN_TOTAL if split == "train" else VAL_TOTAL
    return f"loss/{split}_{component}"


def map_tag(iou_type: str, metric: str) -> str:
    """``mAP/<bbox|segm>_<metric>`` (``metric``: one of ``METRIC_NAMES``, or ``AP_class_<key>``)."""
    return f"mAP/{iou_type}_{metric}"


# ------------------------------------------------------------------------- class keys and names
# Latin letters NFKD leaves whole, spelt as ASCII readers expect (the rest become code points).
_SPELT = {"ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "đ": "d", "Đ": "D",
          "ð": "d", "Ð": "D", "þ": "th", "Þ": "Th", "ł": "l", "Ł": "L", "\u0131": "i"}  # \u0131: dotless i
_UNSAFE = re.compile(r"[^0-9A-Za-z_.-]+")


def class_key(name: Any) -> str:
    """One name as an ASCII tag fragment (module docstring), without the dataset-wide uniqueness that
    ``class_keys`` adds: ``café`` -> ``cafe``, ``自転車`` -> ``u81ea_u8ee2_u8eca``."""
    parts = [""]  # ASCII runs at even positions, code points at odd ones
    for ch in unicodedata.normalize("NFKC", str(name)):
        if unicodedata.combining(ch) and parts[-1]:
            continue  # an accent NFKC could not compose with the ASCII letter before it
        latin = _SPELT.get(ch) or "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        if latin and latin.isascii():
            parts[-1] += latin
        else:  # no ASCII spelling (ガ keeps its mark: it is no accent on カ)
            parts += [f"u{ord(ch):04x}", ""]
    # Each ASCII run is sanitised alone, so a code point is joined to its neighbours by exactly one "_".
    pieces = [p if i % 2 else _UNSAFE.sub("_", p).strip("_") for i, p in enumerate(parts)]
    return "_".join(p for p in pieces if p) or "unnamed"


def class_keys(names: Sequence[Any], ids: Sequence[int] | None = None) -> list[str]:
    """Each class's key, unique among ``names``: in ``ids`` order (COCO category ids; 1..N when None),
    a key already taken gets ``_<id>`` appended (again, until it is free)."""
    ids = list(range(1, len(names) + 1)) if ids is None else [int(i) for i in ids]
    if len(ids) != len(names):
        raise ValueError(f"class_keys: {len(names)} names but {len(ids)} ids")
    keys: dict[int, str] = {}
    taken: set[str] = set()
    for position in sorted(range(len(names)), key=lambda i: ids[i]):
        key = class_key(names[position])
        while key in taken:
            key = f"{key}_{ids[position]}"
        taken.add(key)
        keys[position] = key
    return [keys[i] for i in range(len(names))]


def class_names_by_key(names: Sequence[Any], ids: Sequence[int] | None = None) -> dict[str, str]:
    """``{key: display name}`` (the name as written) for the classes ``names`` (ids as ``class_keys``)."""
    return dict(zip(class_keys(names, ids), map(str, names)))


def write_class_names(run_dir: str | Path, coco_ids: Sequence[int], names: Sequence[Any]) -> Path:
    """``<run_dir>/classes.json``: ``[{"id": coco id, "name": display name, "key": key}, ...]`` in id
    order, UTF-8 with the names as written; returns its path."""
    keys = class_keys(names, coco_ids)
    rows = sorted(({"id": int(i), "name": str(n), "key": k} for i, n, k in zip(coco_ids, names, keys)),
                  key=lambda row: row["id"])
    path = Path(run_dir) / CLASSES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_class_names(run_dir: str | Path) -> dict[str, str]:
    """``{key: display name}`` from ``<run_dir>/classes.json``; ``{}`` for a run without one (runs
    written before it existed). A file that is not such a list raises ``UserError`` naming it."""
    path = Path(run_dir) / CLASSES_FILE
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return {str(row["key"]): str(row["name"]) for row in rows}
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path}: not a list of {{\"id\", \"name\", \"key\"}} objects ({err})") from None


def loss_weights_from_config(weights: Any) -> dict[str, float]:
    """``cfg.loss.weights`` (dataclass or DictConfig) -> ``{component: weight}`` for all five."""
    return {name: float(getattr(weights, name)) for name in LOSS_COMPONENTS}


def weighted_total(components: Mapping[str, T], weights: Mapping[str, float] | None = None) -> T:
    """Sum of ``weight * component`` (weight 1.0 where ``weights`` has none); works for floats and tensors."""
    weights = weights or {}
    total: Any = 0.0
    for name, value in components.items():
        total = total + float(weights.get(name, 1.0)) * value
    return total


def _losses(split: str, value: Any, weights: Mapping[str, float] | None) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        return {TRAIN_ONLY_TOTAL if split == "train" else VAL_TOTAL: float(value)}
    if not value:
        return {}
    total_tag = TRAIN_TOTAL if split == "train" else VAL_TOTAL
    tags = {total_tag: float(weighted_total(value, weights))}
    tags.update({loss_tag(split, name): float(v) for name, v in value.items()})
    return tags


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """One epoch's record -> ``{tag: value}`` under the README's naming scheme.

    ``record`` keys (all optional): ``train_loss`` / ``val_loss`` (a dict of raw components, or a
    float total), ``loss_weights`` (for the weighted totals; 1.0 where absent), ``metrics``
    (``{"bbox": {"AP": ...}, "segm": {...}}``), ``lr`` (``{group: lr}`` or a float),
    ``grad_norm`` (``{group: norm}``), ``time`` (``{name: seconds}``), ``spike`` (``{name: ratio}``),
    ``eval`` (``{"images": evaluated, "val_images": the val set's}``).
    """
    weights = record.get("loss_weights")
    tags: dict[str, float] = {}
    tags.update(_losses("train", record.get("train_loss"), weights))
    tags.update(_losses("val", record.get("val_loss"), weights))
    for iou_type, values in (record.get("metrics") or {}).items():
        for name, value in (values or {}).items():
            # Non-numeric entries (the confusion matrix ``evaluate`` returns as ``metrics["confusion"]``) are no scalars.
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                tags[map_tag(iou_type, name)] = float(value)
    lr = record.get("lr")
    if isinstance(lr, Mapping):
        if lr:
            tags["lr"] = float(lr.get("backbone", next(iter(lr.values()))))
        tags.update({f"lr/{group}": float(v) for group, v in lr.items()})
    elif lr is not None:
        tags["lr"] = float(lr)
    for prefix in ("grad_norm", "time", "spike", "eval"):
        tags.update({f"{prefix}/{name}": float(v) for name, v in (record.get(prefix) or {}).items()})
    return tags


def on_full_val_set(scalars: Mapping[str, Any]) -> bool:
    """Whether an epoch's ``loss/val`` and ``mAP/*`` were measured on the whole val set (not on
    ``eval.subset``'s fixed subset): only such epochs compete for the best one."""
    images, total = scalars.get("eval/images"), scalars.get("eval/val_images")
    return images is None or total is None or images >= total


def iteration_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """One read-back window -> ``{tag: value}`` under the ``iter/`` namespace (module docstring).

    ``record`` keys (all optional): ``loss`` (``{component: window mean}``, raw), ``loss_weights``
    (for ``iter/loss_total``; 1.0 where absent), ``lr`` (``{group: lr}``), ``grad_norm``
    (``{set: window mean}``), ``time`` (``{"data": s, "iter": s}``), ``images_per_s``, ``memory``
    (``{name: MiB}``, names ending in ``_mb``).
    """
    tags: dict[str, float] = {}
    losses = record.get("loss") or {}
    if losses:
        tags.update({ITER_PREFIX + name: float(v) for name, v in losses.items()})
        tags[ITER_TOTAL] = float(weighted_total(losses, record.get("loss_weights")))
    for prefix in ("lr", "grad_norm", "memory"):
        tags.update({f"{ITER_PREFIX}{prefix}/{name}": float(v) for name, v in (record.get(prefix) or {}).items()})
    tags.update({f"{ITER_PREFIX}time_{name}": float(v) for name, v in (record.get("time") or {}).items()})
    if record.get("images_per_s") is not None:
        tags[ITER_PREFIX + "images_per_s"] = float(record["images_per_s"])
    return tags


# ------------------------------------------------------------------------- reading tags back
def check_objective(metric: str, mode: str = "final") -> None:
    """Reject an objective tag the history cannot answer, before any training."""
    iou_type, _, name = metric.removeprefix("mAP/").partition("_")
    is_map = metric.startswith("mAP/") and iou_type in IOU_TYPES and name in METRIC_NAMES
    if not is_map and metric not in (VAL_TOTAL, TRAIN_TOTAL):
        raise ConfigError(
            f"objective.metric={metric!r}: use mAP/<bbox|segm>_<{'|'.join(METRIC_NAMES)}>, {VAL_TOTAL} or {TRAIN_TOTAL}"
        )
    if mode not in OBJECTIVE_MODES:
        raise ConfigError(f"objective.mode={mode!r}: use {' or '.join(OBJECTIVE_MODES)}")


def lower_is_better(tag: str) -> bool:
    return tag.startswith("loss/")
