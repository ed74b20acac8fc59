"""One validated index per split and node, built once and memory-mapped by every process.

Building a split (``json.load``, annotation validation, image-file and EXIF-header checks) took 9 s
for 20k COCO-sized images and 17 s for 60k, repeated by every rank of every run. The first build
writes what a split is to a cache folder (``data.index_cache``):

* ``records.data.npy`` / ``records.ends.npy``: the per-image records the loader reads
  (``data.index.SerializedRecords``), memory-mapped, so the ranks and loader workers of a node
  share one copy of their pages;
* ``ground_truth.pkl``: the checked annotation file (the split's ``coco`` as the dataset cleaned
  it), unpickled only when something asks for ``dataset.coco`` (evaluation, the analyses);
* ``meta.pkl``, written last: the key, image ids and sizes, categories and the lines the build said
  (repeated at a cached start, so a run says what it trains on either way).

The folder is named by the settings that change the index (the split's paths, ``train``,
``drop_empty_train_images``, ``max_*_images``, ``on_invalid``, ``exif``, ``crowd``) and the source
of the modules that build it; ``meta.pkl`` holds the annotation file's size, mtime and SHA-1 and
the image folder's mtime. Any difference rebuilds the index. Every file is written to a temporary
name and renamed, so a reader sees a whole index or none. In a distributed run local rank 0
builds while the node's other ranks wait (``node_first``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from maskrcnn_coco.data.index import SerializedRecords, SplitIndex, atomic_pickle
from maskrcnn_coco.utils import dist

log = logging.getLogger(__name__)

CACHE_POLICIES = ("auto", "off")  # besides a folder path
INDEX_DIR = ".maskrcnn_coco_index"  # beside the annotation file
META, GROUND_TRUTH, RECORDS = "meta.pkl", "ground_truth.pkl", "records"
# The modules whose code decides what an index holds: a change to any of them rebuilds it.
_BUILDERS = ("coco.py", "exif.py", "exports.py", "index.py", "index_cache.py", "validate.py")

T = TypeVar("T")


def code_version() -> str:
    """SHA-1 of the source of the modules that build an index (a new release never reads an old index)."""
    here = Path(__file__).parent
    digest = hashlib.sha1()
    for name in _BUILDERS:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


def file_fingerprint(annotations: Path, images: Path) -> dict[str, Any]:
    """What must be unchanged for an index to stand: the annotation file's size, mtime and SHA-1,
    the image folder's mtime (a file added or removed there changes it)."""
    stat = annotations.stat()
    digest = hashlib.sha1()
    with open(annotations, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return {"annotations": str(annotations), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha1": digest.hexdigest(), "images": str(images), "images_mtime_ns": images.stat().st_mtime_ns}


class IndexCache:
    """The cache folder of one split with its settings, or ``None`` from ``for_split`` when off."""

    def __init__(self, folder: Path, annotations: Path, images: Path):
        self.folder, self.annotations, self.images = folder, annotations, images
        self._fingerprint: dict[str, Any] | None = None  # the files as the last ``load`` found them

    def fingerprint(self) -> dict[str, Any]:
        """The files' fingerprint, taken once (by ``load``, before any build): an index is stored with
        the files it was built from, not with a file that changed while it was being built."""
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self.annotations, self.images)
        return self._fingerprint

    @classmethod
    def for_split(cls, policy: str, annotations: Path, images: Path, settings: Mapping[str, Any]) -> IndexCache | None:
        """``policy`` (``data.index_cache``): ``auto``, ``off`` or a folder."""
        if policy == "off":
            return None
        annotations, images = annotations.resolve(), images.resolve()
        key = repr(sorted({"annotations": str(annotations), "images": str(images), "code": code_version(),
                           **settings}.items()))
        name = f"{annotations.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"
        if policy != "auto":
            return cls(Path(policy).expanduser() / name, annotations, images)
        beside = annotations.parent / INDEX_DIR
        if _writable(beside):
            return cls(beside / name, annotations, images)
        cache = Path(os.path.expanduser(os.environ.get("MASKRCNN_COCO_CACHE", "~/.cache/maskrcnn_coco")))
        return cls(cache / "index" / name, annotations, images)

    def load(self) -> SplitIndex | None:
        """The cached split, or None when there is none or it no longer matches the files."""
        self._fingerprint = None
        fingerprint = self.fingerprint()
        meta_path = self.folder / META
        if not meta_path.is_file():
            return None
        try:
            with open(meta_path, "rb") as f:
                meta = pickle.load(f)
            if meta.get("fingerprint") != fingerprint:
                log.info("The index of %s is rebuilt: %s changed since it was built (%s)", self.annotations.name,
                         _what_changed(meta.get("fingerprint", {}), fingerprint), self.folder)
                return None
            records = SerializedRecords.load(self.folder / RECORDS)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError) as err:
            log.warning("The index in %s cannot be read (%s: %s); it is rebuilt", self.folder, type(err).__name__, err)
            return None
        gt_path = self.folder / GROUND_TRUTH
        return SplitIndex(records=records, ids=meta["ids"], sizes=meta["sizes"], categories=meta["categories"],
                          lines=meta["lines"], load_coco=lambda: _load_ground_truth(gt_path), folder=self.folder)

    def save(self, split: SplitIndex) -> bool:
        """Write the index (each file atomically, ``meta.pkl`` last); False with one line when the folder
        cannot be written (the run goes on without a cache)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / META).unlink(missing_ok=True)  # a reader sees no index while the parts change
            for old in self.folder.glob("memo-*.pkl"):  # analyses of the index this one replaces
                old.unlink()
            split.records.save(self.folder / RECORDS)
            atomic_pickle(self.folder / GROUND_TRUTH, split.coco)  # COCO with its indexes: no createIndex on load
            meta = {"fingerprint": self.fingerprint(), "ids": split.ids,
                    "sizes": split.sizes, "categories": split.categories, "lines": split.lines}
            atomic_pickle(self.folder / META, meta)
            split.folder = self.folder
        except OSError as err:
            log.warning("Could not write the index of %s to %s (%s); set data.index_cache to a writable folder, "
                        "or off", self.annotations.name, self.folder, err)
            return False
        return True


def node_first(build: Callable[[], T], load: Callable[[], T | None]) -> T:
    """``build`` on local rank 0 while the node's other ranks wait, then ``load`` (what it wrote) on
    them; a rank that finds nothing builds for itself. In one process: ``load`` or ``build``.

    A failing build still reaches the barrier before it raises, so the other ranks do not wait for
    ever: they build too and fail with the same error.
    """
    if dist.world_size() == 1 or not dist.launched_distributed():
        return load() or build()
    first = dist.local_rank() == 0
    result: T | None = None
    error: BaseException | None = None
    if first:
        try:
            result = load() or build()
        except BaseException as err:  # noqa: BLE001 - re-raised after the barrier
            error = err
    dist.synchronize()
    if error is not None:
        raise error
    return result if first else (load() or build())  # type: ignore[return-value]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


def _load_ground_truth(path: Path) -> Any:
    log.debug("Loading the checked annotations from %s (%.0f MB)", path, path.stat().st_size / 2**20)
    with open(path, "rb") as f:
        return pickle.load(f)


def _what_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    if old.get("sha1") != new.get("sha1") or old.get("size") != new.get("size"):
        return "the annotation file"
    if old.get("images_mtime_ns") != new.get("images_mtime_ns"):
        return "the image folder"
    return "the annotation file's modification time"
