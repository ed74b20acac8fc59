"""What real annotation tools write, made usable or named in one line (issue #22).

labelme, CVAT, Label Studio, Roboflow and merged exports follow conventions of their own; none of
them is the user's bug, and none may change training or scoring silently:

* **Duplicate image ids** (merged exports): two image records with one ``id`` make their
  annotations ambiguous (pycocotools keeps the last record and gives it both files' annotations).
  They are bad images (``DUPLICATE_IMAGE_ID``): ``data.on_invalid=error`` stops naming them,
  ``drop`` skips the id.
* **File paths as the tool stored them** (Label Studio's ``../../media/upload/1/x.jpg`` or
  ``/data/upload/1/x.jpg``, Windows separators): when the path does not exist but its basename does
  in the image folder, that file is used (``relocate_by_basename``), and one line says so.
* **Crowd annotations** (CVAT's "COCO 1.0" writes every mask-drawn object as an uncompressed RLE
  with ``iscrowd: 1``): counted, with the classes that lose all their instances; ``data.crowd=train``
  makes them ordinary instances (``apply_crowd_policy``).
* **Placeholder categories** (``_background_``/``background`` from labelme converters, Roboflow's
  id-0 category that is the supercategory of all the others): left out of the classes when no
  annotation uses them (``placeholder_categories``, ``drop_categories``).
* **Box-only annotations** (no ``segmentation``): train the box branches, counted in one line.
* **Negatives** (images without annotations): counted in one line with the key that keeps them.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DUPLICATE_IMAGE_ID = "duplicate image id"
PLACEHOLDER_NAMES = ("_background_", "background", "__background__")


def plural(n: int, one: str, many: str | None = None) -> str:
    """``1 image``, ``2 images``, ``1,234 classes`` (``many``: the plural when not ``one + "s"``)."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def examples_text(items: Sequence[str], examples: int = 3) -> str:
    """The first ``examples`` items, comma-separated, with ``, ...`` when there are more."""
    return ", ".join(items[:examples]) + (", ..." if len(items) > examples else "")


def duplicate_image_records(dataset: dict[str, Any]) -> list[dict[str, Any]]:
    """One bad-image record per image id that several ``images`` entries share (from the file's list:
    pycocotools' index keeps only the last)."""
    files: dict[Any, list[str]] = defaultdict(list)
    for image in dataset.get("images", []):
        if isinstance(image, dict):
            files[image.get("id")].append(str(image.get("file_name")))
    return [
        {"image_id": image_id, "file": names[-1], "kind": DUPLICATE_IMAGE_ID,
         "problem": f"image id {image_id} is used by {len(names)} image records ({', '.join(names)}): their annotations "
                    "cannot be told apart (merged exports? give each image its own id)"}
        for image_id, names in files.items() if len(names) > 1
    ]


def basename(file_name: str) -> str:
    """The file's name alone, whichever separator the tool wrote (``\\`` from Windows too)."""
    return file_name.replace("\\", "/").rsplit("/", 1)[-1]


def relocate_by_basename(root: str | Path, missing: Iterable[tuple[int, str]], coco: Any) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """For each ``(image_id, file_name)`` not found under ``root``: when ``root/<basename>`` exists, the
    image record's ``file_name`` becomes the basename (in ``coco``). Returns the relocated records
    (``image_id``, ``file``, ``used``) and what is still missing."""
    root = Path(root)
    try:
        with os.scandir(root) as it:
            present = {e.name for e in it if e.is_file()}
    except OSError:
        present = set()
    relocated, still = [], []
    for image_id, name in missing:
        base = basename(name)
        if base != name and base in present:
            coco.imgs[image_id]["file_name"] = base
            relocated.append({"image_id": image_id, "file": name, "used": base})
        else:
            still.append((image_id, name))
    return relocated, still


def relocated_line(records: Sequence[dict[str, Any]], source: str, root: str | Path) -> str:
    named = [f"image {r['image_id']} ({r['file']} -> {r['used']})" for r in records]
    return (f"{plural(len(records), 'file_name')} in {source} {'does' if len(records) == 1 else 'do'} not exist as written "
            f"but the file is in {root}: used from there, e.g. {examples_text(named)}")


def _names(coco: Any) -> dict[int, str]:
    return {int(cid): str(c.get("name", cid)) for cid, c in coco.cats.items()}


def apply_crowd_policy(coco: Any, policy: str, source: str) -> str | None:
    """``data.crowd``: ``train`` makes ``iscrowd=1`` annotations ordinary instances (in ``coco``, so
    training and evaluation agree); ``ignore`` keeps COCO's semantics. The line to print (None when
    the file has no crowd annotation)."""
    crowd = [a for a in coco.dataset.get("annotations", []) if a.get("iscrowd")]
    if not crowd:
        return None
    n = len(crowd)
    if policy == "train":
        for ann in crowd:
            ann["iscrowd"] = 0
        return (f"{plural(n, 'annotation')} in {source} {'is' if n == 1 else 'are'} iscrowd=1: trained and scored as "
                "ordinary instances (data.crowd=train)")
    names = _names(coco)
    kept = Counter(a.get("category_id") for a in coco.dataset["annotations"] if not a.get("iscrowd"))
    lost = sorted({a.get("category_id") for a in crowd} - set(kept), key=lambda c: (str(type(c)), c))
    lost_text = (f"; {plural(len(lost), 'class', 'classes')} {'has' if len(lost) == 1 else 'have'} only crowd instances "
                 f"and so nothing to learn: {', '.join(repr(names.get(c, c)) for c in lost)}") if lost else ""
    return (f"{plural(n, 'annotation')} in {source} {'is' if n == 1 else 'are'} iscrowd=1 (crowd regions): COCO semantics "
            f"leave them out of training (COCOeval ignores detections on them){lost_text}; data.crowd=train trains on them "
            "(CVAT's COCO 1.0 export marks mask-drawn objects as crowd)")


def placeholder_categories(coco: Any, used: Iterable[int] | None = None) -> list[tuple[int, str, str]]:
    """``(id, name, why)`` of the categories that are a tool's placeholder and that no annotation
    uses (``used``: category ids used anywhere, default this file's)."""
    used = set(used) if used is not None else {a.get("category_id") for a in coco.dataset.get("annotations", [])}
    cats = [c for c in coco.dataset.get("categories", []) if isinstance(c, dict)]
    out = []
    for cat in cats:
        cid, name = cat.get("id"), str(cat.get("name", ""))
        if cid in used:
            continue
        if name.strip().lower() in PLACEHOLDER_NAMES:
            out.append((cid, name, "a background placeholder"))
            continue
        others = [c for c in cats if c is not cat]
        if cid == 0 and others and all(str(c.get("supercategory", "")) == name for c in others):
            out.append((cid, name, "Roboflow's id-0 category, the supercategory of all the others"))
    return out


def drop_categories(coco: Any, ids: Iterable[int]) -> None:
    """Remove categories from ``coco`` (its ``dataset`` and index)."""
    ids = set(ids)
    if not ids:
        return
    coco.dataset["categories"] = [c for c in coco.dataset.get("categories", []) if c.get("id") not in ids]
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()


def placeholder_line(dropped: Sequence[tuple[int, str, str]], source: str) -> str:
    named = [f"{name!r} (id {cid}: {why})" for cid, name, why in dropped]
    return (f"{plural(len(dropped), 'category', 'categories')} of {source} left out of the classes: "
            f"{', '.join(named)}; no annotation uses {'it' if len(dropped) == 1 else 'them'}")


def has_mask(ann: dict[str, Any]) -> bool:
    """Whether the annotation carries a segmentation (polygons or RLE); box-only otherwise."""
    seg = ann.get("segmentation")
    return bool(seg) and (not isinstance(seg, dict) or "counts" in seg)


def box_only_line(usable: Sequence[dict[str, Any]], source: str) -> str | None:
    """One line when some usable annotations have no mask: they train the box branches only."""
    n = sum(1 for a in usable if not has_mask(a))
    if not n:
        return None
    if n == len(usable):
        return (f"No annotation in {source} has a segmentation ({plural(n, 'box-only annotation')}): the box branches "
                "train, the mask loss is 0 and masks are not evaluated (bbox AP only)")
    return (f"{plural(n, 'annotation')} of {len(usable):,} in {source} {'has' if n == 1 else 'have'} no segmentation "
            "(box-only): they train the box branches, the mask loss skips them, and segm AP ignores detections on them")


def negatives_line(negatives: int, total: int, source: str, *, train: bool, dropped: bool) -> str | None:
    """How many images have no usable annotation, and what becomes of them."""
    if not negatives:
        return None
    head = f"{plural(negatives, 'image')} of {total:,} in {source} {'has' if negatives == 1 else 'have'} no annotation"
    if not train:
        return head + " (negatives): kept for evaluation"
    if dropped:
        return head + " (negatives): left out of training (data.drop_empty_train_images=false trains on them as negatives)"
    return head + " (negatives): trained as negatives (data.drop_empty_train_images=false)"
