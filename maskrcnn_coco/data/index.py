"""A compact, serialised dataset index: what a loader worker reads per sample, in two numpy arrays.

Forked loader workers inherit the main process's Python objects. Reading them (reference counts)
and the garbage collector's passes over them write to their pages, so each worker gradually copies
pycocotools' ``COCO`` index and the per-image lists (copy-on-write): a worker's private memory grew
by ~25 KB for every image it loaded on a COCO-sized set, 2.4-3.0 GB per worker on train2017. As
detectron2 does (``DatasetFromList(serialize=True)``), each image's record (file name, size, EXIF
frame, its usable annotations) is pickled into one ``uint8`` buffer with an ``int64`` array of end
offsets: a sample reads two numpy arrays (no Python object of the index is touched) and unpickles
one small record. The buffer can be saved and memory-mapped (``save``/``load``), so processes that
read the same file share its pages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, then renamed to it: a reader sees the
    whole file or none (the pid in the temporary name: ranks of several nodes may share a folder)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_pickle(path: Path, obj: Any) -> None:
    """``obj`` pickled to ``path`` (``atomic_write``)."""
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))


class SerializedRecords:
    """Records (any picklable objects) in one byte buffer; ``records[i]`` unpickles the i-th."""

    def __init__(self, records: Iterable[Any] = (), *, data: np.ndarray | None = None, ends: np.ndarray | None = None):
        if data is None or ends is None:
            blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
            ends = np.cumsum(np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs)), dtype=np.int64)
            data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self._data = data
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += len(self._ends)
        start = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(self._data[start:int(self._ends[index])])

    @property
    def nbytes(self) -> int:
        """The index's size in memory (both arrays)."""
        return int(self._data.nbytes + self._ends.nbytes)

    def save(self, path: str | Path) -> None:
        """Write both arrays to ``path`` (``.npz``-like pair ``<path>.data.npy`` / ``<path>.ends.npy``),
        each written to a temporary name first and renamed: a reader never sees half a file."""
        path = Path(path)
        for suffix, array in ((".data.npy", self._data), (".ends.npy", self._ends)):
            atomic_write(path.with_name(path.name + suffix), lambda f, a=array: np.save(f, a))

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> SerializedRecords:
        """The arrays ``save`` wrote; memory-mapped by default, so every process reading them shares one copy."""
        path = Path(path)
        mode = "r" if mmap else None
        data = np.load(path.with_name(path.name + ".data.npy"), mmap_mode=mode)
        ends = np.load(path.with_name(path.name + ".ends.npy"), mmap_mode=mode)
        return cls(data=data, ends=ends)


@dataclass
class SplitIndex:
    """What a built split is (``data.coco.build_coco_dataset``), fresh or from the cache
    (``data.index_cache``): the records a sample reads, one per image of ``ids`` (``(image_id,
    file_name, width, height, frame, [(annotation_id, category_id, bbox, segmentation), ...])``, the
    usable annotations in the file's order), the images' ``sizes`` (N x 2 width, height), the file's
    ``categories``, the lines its build said, and the checked ``COCO`` (loaded on first use)."""

    records: SerializedRecords
    ids: list[int]
    sizes: np.ndarray
    categories: list[dict[str, Any]]
    lines: list[tuple[int, str]] = field(default_factory=list)
    load_coco: Callable[[], Any] | None = None
    folder: Path | None = None  # the cache folder holding this index (None: not cached)
    positions: dict[int, int] | None = field(default=None, repr=False)  # image id -> record (on first use)
    _coco: Any = field(default=None, repr=False)
    _usable: set[int] | None = field(default=None, repr=False)
    _frames: dict[int, Any] | None = field(default=None, repr=False)

    @property
    def coco(self) -> Any:
        """The split's checked ``COCO`` (invalid annotations removed, the export policies applied)."""
        if self._coco is None and self.load_coco is not None:
            self._coco = self.load_coco()
        return self._coco

    @property
    def usable_ann_ids(self) -> set[int]:
        """Ids of the annotations training uses (on ``ids``)."""
        if self._usable is None:
            self._usable = {ann[0] for i in range(len(self.records)) for ann in self.records[i][5]}
        return self._usable

    @property
    def frames(self) -> dict[int, Any]:
        """Each image's EXIF frame (``data.exif.Frame``) where it has one."""
        if self._frames is None:
            self._frames = {r[0]: r[4] for r in map(self.records.__getitem__, range(len(self.records))) if r[4] is not None}
        return self._frames

    def memo(self, name: str, compute: Callable[[], T]) -> T:
        """``compute()``, kept beside a cached index as ``memo-<name>.pkl`` and read back from there while
        the index stands: analyses of the data alone (class counts, split statistics, masks against
        their boxes, object sizes) then cost nothing at a later start and need no ``coco``."""
        path = self.folder / f"memo-{name}.pkl" if self.folder is not None else None
        if path is not None and path.is_file():
            try:
                with open(path, "rb") as f:
                    return pickle.load(f)
            except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
                pass  # unreadable or from other code: computed again below
        value = compute()
        if path is not None:
            with contextlib.suppress(OSError):  # a read-only cache: computed again next time
                atomic_pickle(path, value)
        return value

    def replay(self, logger: logging.Logger) -> None:
        """Say the build's lines again (a split loaded from the cache says what a fresh build said)."""
        for level, message in self.lines:
            logger.log(level, "%s", message)


def memoized(dataset: Any, name: str, compute: Callable[[], T]) -> T:
    """``compute()`` through the ``SplitIndex.memo`` of ``dataset``'s index, or plainly for a dataset without one."""
    index = getattr(dataset, "index", None)
    return index.memo(name, compute) if isinstance(index, SplitIndex) else compute()


def has_ground_truth(dataset: Any) -> bool:
    """Whether ``dataset`` has a ``coco``, without loading one that its index holds back until first use."""
    index = getattr(dataset, "index", None)
    if isinstance(index, SplitIndex):
        return index._coco is not None or index.load_coco is not None
    return getattr(dataset, "coco", None) is not None
