"""Cut a validation split out of one COCO annotation file (``data.val_fraction``).

An annotation tool's export often has a single file (CVAT's ``instances_default.json``, a Roboflow
export without ``valid/``). ``split_annotations`` writes ``train_split.json`` and ``val_split.json``
beside a ``split.json`` record, and re-uses them while the source file, fraction and seed are the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskrcnn_coco.utils.errors import ConfigError, DataError

TRAIN_FILE = "train_split.json"
VAL_FILE = "val_split.json"
RECORD_FILE = "split.json"


@dataclass(frozen=True)
class SplitInfo:
    """What ``split_annotations`` did: the source, the image ids of each side, where and whether reused."""

    source: Path
    val_fraction: float
    seed: int
    train_image_ids: list[Any]
    val_image_ids: list[Any]
    out_dir: Path
    reused: bool

    @property
    def num_images(self) -> int:
        return len(self.train_image_ids) + len(self.val_image_ids)


def split_rank(seed: int, image_id: Any) -> int:
    """An image's place in the val order: a hash of (seed, image id) alone, so it does not depend on
    the other images of the file or their order."""
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def val_count(fraction: float, num_images: int) -> int:
    """``round(fraction * n)`` (halves up), at least 1 and at most n - 1."""
    return min(num_images - 1, max(1, math.floor(fraction * num_images + 0.5)))


def choose_val_ids(image_ids: list[Any], fraction: float, seed: int) -> set[Any]:
    """The ``val_count`` images of lowest ``split_rank``.

    The same ids, fraction and seed always give the same set. Adding or removing images leaves every
    other image's rank as it was, so at most the images at the boundary change side (one per image
    added), never a reshuffle of the file.
    """
    ranked = sorted(image_ids, key=lambda i: split_rank(seed, i))
    return set(ranked[: val_count(fraction, len(image_ids))])


def _source_stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"source": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_json_atomic(path: Path, data: Any) -> None:
    """Temp file in the same folder + rename: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # dumps, not dump: dump streams through the pure-Python encoder, ~10x slower on COCO's 118k images.
            f.write(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _reusable(out_dir: Path, stamp: dict[str, Any], fraction: float, seed: int) -> dict[str, Any] | None:
    """The record of an earlier split of the same source file (size + mtime), fraction and seed whose
    two files are still there; else None."""
    if not all((out_dir / name).is_file() for name in (RECORD_FILE, TRAIN_FILE, VAL_FILE)):
        return None
    try:
        record = json.loads((out_dir / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = {**stamp, "val_fraction": fraction, "seed": seed}
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in same.items()):
        return None
    return record


def _load_images(path: Path) -> dict[str, Any]:
    """The annotation file as a dict with an ``images`` list of entries with ids; a ``DataError``
    naming the file otherwise. Repeated ids are left to the dataset checks (``data.on_invalid``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"Could not read COCO annotations {path}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path} is not a COCO annotation file (no 'images' list)")
    if any(not isinstance(im, dict) or "id" not in im for im in data["images"]):
        raise DataError(f"{path}: an entry of 'images' has no 'id'")
    return data


def split_annotations(annotation_file: str | Path, val_fraction: float, seed: int,
                      out_dir: str | Path) -> tuple[Path, Path, SplitInfo]:
    """Split ``annotation_file`` by image into ``out_dir/train_split.json`` and ``out_dir/val_split.json``.

    ``round(val_fraction * n)`` images (at least 1, at most n - 1) go to val: those of lowest hash of
    (``seed``, image id) (``choose_val_ids``), so the split is the same on every run and adding images
    to the file does not reshuffle the others. Annotations follow their images (one pass, source order
    kept; annotations of no listed image stay in train); categories and every other top-level key (info,
    licenses, ...) are copied to both files. Files are written atomically, then ``split.json``
    ({source, size, mtime_ns, val_fraction, seed, train_image_ids, val_image_ids}); a later call with
    the same source file (size and mtime), fraction and seed re-uses them without reading the source.
    Returns (train file, val file, ``SplitInfo``).
    """
    source = Path(annotation_file).expanduser().absolute()
    out_dir = Path(out_dir).expanduser()
    train_path, val_path = out_dir / TRAIN_FILE, out_dir / VAL_FILE
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction={val_fraction}: must be between 0 and 1, e.g. 0.1")
    if not source.is_file():
        raise DataError(f"Annotation file not found: {source} (the file data.val_fraction splits)")
    stamp = _source_stamp(source)

    record = _reusable(out_dir, stamp, val_fraction, seed)
    if record is not None:
        info = SplitInfo(source, val_fraction, seed, record["train_image_ids"], record["val_image_ids"], out_dir, True)
        return train_path, val_path, info

    data = _load_images(source)
    # Records sharing an id (merged exports) share its side; the dataset checks then name them.
    ids = list(dict.fromkeys(im["id"] for im in data["images"]))
    if len(ids) < 2:
        raise DataError(f"{source} lists {len(ids)} image(s); data.val_fraction needs at least 2 to split "
                          "(or set data.val_annotations and data.val_images)")
    val_ids = choose_val_ids(ids, val_fraction, seed)
    # One pass, a set lookup per annotation (linear for COCO's 860k); the source order is kept.
    train_anns: list[Any] = []
    val_anns: list[Any] = []
    for ann in data.get("annotations") or []:
        in_val = isinstance(ann, dict) and ann.get("image_id") in val_ids
        (val_anns if in_val else train_anns).append(ann)
    rest = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    train = {**rest, "images": [im for im in data["images"] if im["id"] not in val_ids], "annotations": train_anns}
    val = {**rest, "images": [im for im in data["images"] if im["id"] in val_ids], "annotations": val_anns}

    out_dir.mkdir(parents=True, exist_ok=True)
    # The record goes first and comes back last: a crash in between leaves no record to re-use.
    (out_dir / RECORD_FILE).unlink(missing_ok=True)
    _write_json_atomic(train_path, train)
    _write_json_atomic(val_path, val)
    info = SplitInfo(source, val_fraction, seed, [i for i in ids if i not in val_ids], [i for i in ids if i in val_ids],
                     out_dir, False)
    _write_json_atomic(out_dir / RECORD_FILE, {**stamp, "val_fraction": val_fraction, "seed": seed,
                                               "train_image_ids": info.train_image_ids,
                                               "val_image_ids": info.val_image_ids})
    return train_path, val_path, info


def format_split(info: SplitInfo) -> str:
    """One console line: what was split into how many images, with which settings, and where."""
    where = f"re-used from {info.out_dir}" if info.reused else f"written to {info.out_dir}"
    return (f"Split {info.source.name} ({info.num_images:,} images) into {len(info.train_image_ids):,} train / "
            f"{len(info.val_image_ids):,} val images (data.val_fraction={info.val_fraction}, "
            f"data.split_seed={info.seed}); {where}")
