"""EXIF orientation: which pixel frame (raw or displayed) each image is loaded in (``data.exif``).

Phone photos store their pixels in the sensor's frame and an EXIF ``Orientation`` tag (1-8) that
viewers apply. Annotation tools (labelme, CVAT, Label Studio, Roboflow) show, annotate and write
the size of the *displayed* image, so by default (``apply``, as detectron2's ``read_image`` and
Ultralytics do) an image is loaded as displayed. The annotation file's width/height decide per
image (``decide_frame``):

* it equals the displayed size: the orientation is applied (also when it equals the raw size too,
  e.g. 180 degrees, or 90 degrees on a square image: annotation tools show the displayed frame);
* it equals only the raw size (a JSON written by a script that read raw sizes): the raw frame is
  used for that image, and the run says so in one line (``FramePlan.summary_lines``);
* neither: a problem naming the orientation the file carries.

``ignore`` always uses the raw frame. The orientation and raw size come from the file's header
(``Image.open`` is lazy; no pixel is decoded before training loads the image, ``load_oriented``):
about 0.26 ms per small JPEG, page cache warm, on a busy 2-core machine, nearly all of it
``Image.open`` itself. That is Python parsing the markers, so threads help little: COCO train2017
(118k images) would take about 30 s there, more when the files are not in the page cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image
from tqdm import tqdm

from maskrcnn_coco.config import EXIF_POLICIES
from maskrcnn_coco.data.exports import examples_text, plural
from maskrcnn_coco.data.validate import (
    MISSING_FILE,
    SIZE_MISMATCH,
    UNDECODABLE,
    describe_error,
    image_record_problem,
    load_rgb,
)

# Kind of problem (the checker counts per kind): the file carries an orientation and its size
# matches the annotation file in no frame the policy allows.
EXIF_SIZE_MISMATCH = "EXIF size mismatch"

ORIENTATION_TAG = int(ExifTags.Base.Orientation)  # 0x0112 = 274

# What a viewer does to the stored pixels to display them (the EXIF 2.3 / TIFF 6.0 meaning of each
# value: 6 = the stored top row becomes the displayed right column, so the display turns the stored
# image 90 degrees clockwise).
ORIENTATION_NAMES: dict[int, str] = {
    1: "as stored",
    2: "mirrored left-right",
    3: "rotated 180°",
    4: "mirrored top-bottom",
    5: "mirrored left-right and rotated 90° counter-clockwise",
    6: "rotated 90° clockwise",
    7: "mirrored left-right and rotated 90° clockwise",
    8: "rotated 90° counter-clockwise",
}

# The same table as PIL's ``ImageOps.exif_transpose`` (PIL's ROTATE_* turn counter-clockwise).
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# ----------------------------------------------------------------------------- one file's header
def _orientation_of(image: Image.Image) -> int:
    """The orientation tag of an opened (not loaded) image; 1 when absent, out of range or unreadable."""
    try:
        # The base method: PNG's own getexif decodes the whole image to look for an eXIf chunk
        # after the pixels. Such a chunk is therefore not seen (nor is it by most viewers).
        value = Image.Image.getexif(image).get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block: PIL raises struct/Syntax/Value/OSError
        return 1
    return value if type(value) is int and 1 <= value <= 8 else 1


def read_header(path: str | Path) -> tuple[int, tuple[int, int]]:
    """``(orientation, (raw width, raw height))`` from the file's header, no pixel decoded.

    Raises what ``Image.open`` raises for a file that is absent (``FileNotFoundError``) or not an
    image (``PIL.UnidentifiedImageError``); a corrupt EXIF block reads as orientation 1.
    """
    with Image.open(path) as image:
        return _orientation_of(image), image.size


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation (1..8) of the image at ``path``; 1 when absent, out of range or unreadable."""
    return read_header(path)[0]


def displayed_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """The size a viewer shows a ``width`` x ``height`` stored image with ``orientation`` at (5-8 swap)."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _describe(orientation: int) -> str:
    return f"EXIF orientation {orientation}, {ORIENTATION_NAMES.get(orientation, 'unknown')}"


# -------------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class Frame:
    """How one image is loaded: ``apply`` turns its raw pixels into the displayed frame;
    ``raw_only``: the annotation file has only the raw size, so the raw frame is used although the
    policy applies orientations; ``problem``: its size matches the annotation file in no allowed frame."""

    orientation: int = 1
    apply: bool = False
    raw_only: bool = False
    problem: str | None = None


def decide_frame(orientation: int, raw_size: tuple[int, int], width: int, height: int, policy: str = "apply") -> Frame:
    """The frame of an image whose header says ``orientation`` and ``raw_size`` and whose
    annotation says ``width`` x ``height``, under ``policy`` (``apply`` or ``ignore``)."""
    if policy not in EXIF_POLICIES:
        raise ValueError(f"EXIF policy {policy!r} is not one of {EXIF_POLICIES}")
    wanted = (int(width), int(height))
    raw = (int(raw_size[0]), int(raw_size[1]))
    shown = displayed_size(*raw, orientation)
    says = f"but the annotation file says {wanted[0]}x{wanted[1]}"
    if orientation == 1:
        problem = None if raw == wanted else f"is {raw[0]}x{raw[1]} pixels {says}"
        return Frame(1, False, False, problem)
    displayed = f": displayed {shown[0]}x{shown[1]}" if shown != raw else ""
    mismatch = f"is {raw[0]}x{raw[1]} pixels ({_describe(orientation)}{displayed}) {says}"
    if policy == "ignore":
        if raw == wanted:
            return Frame(orientation, False, False, None)
        if shown == wanted:  # only here would the other policy help
            mismatch = (f"is {raw[0]}x{raw[1]} pixels as stored ({_describe(orientation)}) {says}, its displayed size: "
                        "data.exif=ignore loads the stored pixels, data.exif=apply loads it as displayed")
        return Frame(orientation, False, False, mismatch)
    if shown == wanted:  # displayed wins when both match (orientations 2-4, square images)
        return Frame(orientation, True, False, None)
    if raw == wanted:
        return Frame(orientation, False, True, None)
    return Frame(orientation, True, False, mismatch)


def frame_for(path: str | Path, width: int, height: int, policy: str = "apply") -> Frame:
    """``decide_frame`` for the image at ``path`` (reads its header only; raises as ``read_header``)."""
    orientation, raw = read_header(path)
    return decide_frame(orientation, raw, width, height, policy)


# ------------------------------------------------------------------------------------- a split
@dataclass
class FramePlan:
    """The frames of a split's images (``plan_frames``).

    ``frames``: image id -> ``Frame``, only for images with an orientation other than 1 (an absent
    id loads as stored); ``raw_only``: records (``image_id``, ``file``, ``orientation``) of the
    images loaded raw because the annotation file has their raw size; ``problems``: records
    (``image_id``, ``file``, ``kind``, ``problem``) as ``validate.check_split``'s bad images, of
    kind ``EXIF_SIZE_MISMATCH`` for an oriented file and ``validate.SIZE_MISMATCH`` otherwise;
    ``rotated``: how many images carry an orientation other than 1; ``read``: headers read.
    """

    policy: str
    frames: dict[int, Frame] = field(default_factory=dict)
    raw_only: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)
    rotated: int = 0
    read: int = 0

    def frame(self, image_id: int) -> Frame | None:
        """The frame to pass to ``load_oriented`` (None: load as stored)."""
        return self.frames.get(image_id)

    def summary_lines(self, source_name: str, examples: int = 3) -> list[str]:
        """The lines a run prints at its start (none when no image carries an orientation)."""
        lines = []
        if self.policy == "ignore":
            if self.rotated:
                lines.append(f"{plural(self.rotated, 'image', 'images')} in {source_name} "
                             f"{'carries' if self.rotated == 1 else 'carry'} an EXIF rotation: loaded as stored "
                             "(data.exif=ignore; data.exif=apply loads them as displayed, as annotation tools show them)")
            return lines
        shown = sum(1 for f in self.frames.values() if f.apply and f.problem is None)
        if shown:
            lines.append(f"{plural(shown, 'image', 'images')} in {source_name} {'carries' if shown == 1 else 'carry'} "
                         "an EXIF rotation: loaded as displayed (as annotation tools show them; data.exif=ignore loads raw pixels)")
        if self.raw_only:
            n = len(self.raw_only)
            named = examples_text([f"image {r['image_id']} ({r['file']}, orientation {r['orientation']})" for r in self.raw_only], examples)
            lines.append(f"{plural(n, 'image', 'images')} in {source_name} {'is' if n == 1 else 'are'} annotated in "
                         f"{'its' if n == 1 else 'their'} raw frame (the JSON's size is the raw pixels') though "
                         f"{'its' if n == 1 else 'their'} EXIF says rotated: loaded without rotation, e.g. {named}")
        return lines


def plan_frames(
    images_dir: str | Path,
    records: Sequence[Mapping[str, Any]],
    policy: str = "apply",
    *,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "Reading image headers",
) -> FramePlan:
    """Read the header of every image record of ``records`` (COCO ``images`` entries) in threads and
    decide its frame under ``policy``.

    Records without a usable file name or size, missing files and files that are not images are
    skipped (``validate.check_split`` and the loader report them). Sizes are compared for every
    image, so a plain size mismatch is found here too, without decoding.
    """
    if policy not in EXIF_POLICIES:
        raise ValueError(f"EXIF policy {policy!r} is not one of {EXIF_POLICIES}")
    root = Path(images_dir)
    workers = workers or min(8, os.cpu_count() or 1)
    todo = [r for r in records if image_record_problem(r) is None]

    def one(img: Mapping[str, Any]) -> tuple[Mapping[str, Any], Frame] | None:
        try:
            return img, frame_for(root / img["file_name"], img["width"], img["height"], policy)
        except Exception:  # noqa: BLE001 - absent or not an image: reported by the other checks
            return None

    plan = FramePlan(policy)
    bar = tqdm(total=len(todo), desc=desc, disable=None if progress else True, dynamic_ncols=True, leave=False)  # off outside a terminal
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for found in pool.map(one, todo, chunksize=64):
            bar.update()
            if found is None:
                continue
            img, frame = found
            plan.read += 1
            if frame.orientation != 1:
                plan.rotated += 1
                plan.frames[img["id"]] = frame
            if frame.raw_only:
                plan.raw_only.append({"image_id": img["id"], "file": img["file_name"], "orientation": frame.orientation})
            if frame.problem:
                kind = EXIF_SIZE_MISMATCH if frame.orientation != 1 else SIZE_MISMATCH
                plan.problems.append({"image_id": img["id"], "file": img["file_name"], "kind": kind, "problem": frame.problem})
    bar.close()
    return plan


# ------------------------------------------------------------------------------------- loading
def load_oriented(path: str | Path, frame: Frame | None) -> Image.Image:
    """The image at ``path`` as 8-bit RGB (``validate.load_rgb``), turned into its displayed frame
    when ``frame.apply`` (as ``ImageOps.exif_transpose`` does, mirrored orientations included).

    The orientation comes from ``frame``, not from the file again, so what loads is what was planned.
    """
    image = load_rgb(path)
    method = _TRANSPOSE.get(frame.orientation) if frame is not None and frame.apply else None
    return image if method is None else image.transpose(method)


def decode_problem(path: str | Path, width: int, height: int, policy: str = "apply") -> tuple[str, str] | None:
    """``(kind, problem)`` when the image at ``path`` cannot be used as a ``width`` x ``height`` RGB
    image in the frame ``policy`` gives it, else None: the decode check of ``validate.check_images``, frame-aware.
    Decodes the whole image (the slow, complete check)."""
    try:
        frame = frame_for(path, width, height, policy)
    except FileNotFoundError:
        return MISSING_FILE, "file not found"
    except Exception as err:  # noqa: BLE001 - not an image: PIL raises UnidentifiedImageError, OSError, ...
        return UNDECODABLE, f"cannot be decoded ({describe_error(err)})"
    if frame.problem:
        return (EXIF_SIZE_MISMATCH if frame.orientation != 1 else SIZE_MISMATCH), frame.problem
    try:
        image = load_oriented(path, frame)
    except FileNotFoundError:
        return MISSING_FILE, "file not found"
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib/struct errors...
        return UNDECODABLE, f"cannot be decoded ({describe_error(err)})"
    if image.size != (int(width), int(height)):  # the decoder disagrees with the header
        where = f" ({_describe(frame.orientation)}, {'applied' if frame.apply else 'not applied'})" if frame.orientation != 1 else ""
        return SIZE_MISMATCH, f"is {image.size[0]}x{image.size[1]} pixels{where} but the annotation file says {int(width)}x{int(height)}"
    return None
