"""Command line of prediction (``python scripts/predict.py --weights CKPT --input PATH... --output DIR``,
console ``maskrcnn-predict``).

Runs a trained model (any file ``inference.load_model`` takes: no dataset or config needed, the
classes come from the file) on image files, folders (every image below them) or globs, and writes
into ``--output``:

* ``<name>.png`` per image: its detections of score >= ``--score-threshold`` drawn (masks, boxes,
  class names and scores, ``utils.draw``), a small image enlarged by an integer factor first;
* ``predictions.json``: the detections as one COCO results list (``image_id``, ``category_id``,
  ``bbox`` as ``[x, y, width, height]``, ``score``, ``segmentation`` as RLE), written image by image
  as they come (nothing of the whole set is held in memory); ``images.json``: the COCO ``images`` (id,
  file, size, drawn picture) and ``categories`` those ids refer to;
* ``contact_sheet.png``: the first ``SHEET_MAX`` pictures with a key of the class colours.

Images load as training loads them (``inference.load_image``: any PIL mode, EXIF orientation); the
detections take evaluation's results path (``inference.detect``). A file that cannot be read is named
in one line and skipped; the others go on. Exit status: 0; 1 when a file was skipped; 2 with one
``Error:`` line on bad input (weights, no images found).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from tqdm import tqdm

from maskrcnn_coco.cli.evaluate import error_line
from maskrcnn_coco.cli.experiment import resolve_device
from maskrcnn_coco.data.exports import plural
from maskrcnn_coco.data.validate import describe_error
from maskrcnn_coco.inference import ImagePrediction, LoadedModel, detect, image_tensor, load_image, load_model
from maskrcnn_coco.utils.draw import colour_key, contact_sheet, draw_instances, enlarged, save_png, stacked, thumbnail
from maskrcnn_coco.utils.errors import ConfigError, UserError

PREDICTIONS_FILE, IMAGES_FILE, SHEET_NAME = "predictions.json", "images.json", "contact_sheet.png"
SHEET_MAX = 64  # pictures on the contact sheet (the first ones), held as thumbnails until it is drawn
TILE = 256  # the sheet's tile size
# Image files a folder or a glob contributes: every extension PIL opens (an explicit file is always taken).
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Detect objects with a trained model on images (files, folders, globs): each image drawn with its "
        "masks, boxes, class names and scores, one COCO results JSON and a contact sheet. Exit status: 0, 1 when an "
        "unreadable file was skipped, 2 on bad input.",
    )
    p.add_argument("--weights", required=True, metavar="CKPT",
                   help="a checkpoint (runs/maskrcnn/<run>/checkpoints/best.pth), an exported weights file or a torchvision state dict")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="image files, folders (every image below them) or globs ('photos/**/*.jpg', quoted)")
    p.add_argument("--output", required=True, metavar="DIR", help=f"folder for the pictures, {PREDICTIONS_FILE}, {IMAGES_FILE}, {SHEET_NAME}")
    p.add_argument("--score-threshold", type=float, default=0.5, help="detections below this score are left out (default 0.5)")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="a pixel is in a mask above this probability (default 0.5)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--min-side", type=int, default=256,
                   help="enlarge pictures whose longer side is below this by an integer factor, so captions stay legible (default 256; 0: never)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """The image files named by ``inputs``, in order and once each: a file as it is, a folder's image
    files below it (sorted), a glob's matching image files (sorted). A path that neither exists nor
    matches is a ``ConfigError``."""
    found: list[Path] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif glob.has_magic(spec):
            found += sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                            if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_EXTENSIONS)
        else:
            raise ConfigError(f"--input {spec}: no such file or folder")
    unique = dict.fromkeys(p.resolve() for p in found)
    return [Path(p) for p in unique]


def picture_names(paths: Sequence[Path], reserved: Sequence[str] = (PREDICTIONS_FILE, IMAGES_FILE, SHEET_NAME)) -> list[str]:
    """Each image's picture name, ``<stem>.png``, made unique (``<stem>_2.png``, ...) among the images
    and the command's own files."""
    taken = {name.lower() for name in reserved}
    names = []
    for path in paths:
        name, n = f"{path.stem}.png", 1
        while name.lower() in taken:
            n += 1
            name = f"{path.stem}_{n}.png"
        taken.add(name.lower())
        names.append(name)
    return names


class JsonListWriter:
    """A JSON list written item by item (``[``, items, ``]``), so the whole list is never in memory."""

    def __init__(self, stream: IO[str]):
        self.stream, self.count = stream, 0
        stream.write("[")

    def write(self, item: Any) -> None:
        self.stream.write(("," if self.count else "") + "\n" + json.dumps(item))
        self.count += 1

    def close(self) -> None:
        self.stream.write("\n]\n")


def batches(paths: Sequence[Path], size: int) -> Iterator[list[tuple[int, Path]]]:
    """``(position, path)`` in batches of ``size``."""
    for start in range(0, len(paths), size):
        yield list(enumerate(paths[start:start + size], start=start))


def draw_picture(image: torch.Tensor, prediction: ImagePrediction, min_side: int) -> torch.Tensor:
    """``image`` with its detections drawn: masks, boxes, class names and scores (``draw_instances``)."""
    masks = torch.from_numpy(prediction.masks())
    image, boxes, masks = enlarged(image, prediction.boxes_xyxy(), masks, min_side)
    names = [d["category_name"] for d in prediction.detections]
    return draw_instances(image, boxes, names, masks, scores=[d["score"] for d in prediction.detections])


def check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.score_threshold <= 1:
        raise ConfigError("--score-threshold must be between 0 and 1")
    if not 0 <= args.mask_threshold < 1:
        raise ConfigError("--mask-threshold must be between 0 (included) and 1")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if args.min_side < 0:
        raise ConfigError("--min-side must be >= 0")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a folder")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        paths = collect_images(args.input)
        if not paths:
            raise ConfigError(f"no image found in {' '.join(args.input)} (folders and globs take the files PIL opens: "
                              ".jpg, .png, .tif, .bmp, .webp, ...)")
        loaded = load_model(args.weights, resolve_device(args.device))
    except UserError as err:
        print(error_line(err), file=sys.stderr)
        return 2
    output = Path(args.output)
    print(f"{plural(len(paths), 'image')} -> {output} (model {loaded.model_config.get('arch')} on {loaded.device}, "
          f"{plural(len(loaded.names), 'class', 'classes')}, score >= {args.score_threshold:g})")
    try:
        output.mkdir(parents=True, exist_ok=True)
        return run(loaded, paths, args, output)
    except OSError as err:
        print(f"Error: cannot write to {output}: {err}", file=sys.stderr)
        return 2


def run(loaded: LoadedModel, paths: Sequence[Path], args: argparse.Namespace, output: Path) -> int:
    """Predict, draw and write every image (module docstring); the exit status."""
    names = picture_names(paths)
    images: list[dict[str, Any]] = []  # one small record per image: what images.json says
    tiles, captions, seen_classes = [], [], []
    skipped = detections = 0
    start = time.perf_counter()
    bar = tqdm(total=len(paths), desc="Predicting", unit="img", disable=True if args.no_progress else None, dynamic_ncols=True)
    with (output / PREDICTIONS_FILE).open("w") as stream:
        results = JsonListWriter(stream)
        for batch in batches(paths, args.batch_size):
            inputs = []
            for position, path in batch:
                try:
                    inputs.append((position, path, image_tensor(load_image(path), loaded.mapping)))
                except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for a bad file
                    skipped += 1
                    tqdm.write(f"Skipped {path}: cannot be read ({describe_error(err)})", file=sys.stderr)
            found = detect(loaded, [t for *_, t in inputs], score_threshold=args.score_threshold,
                           mask_threshold=args.mask_threshold)
            for (position, path, tensor), dets in zip(inputs, found):
                prediction = ImagePrediction(str(path), int(tensor.shape[-2]), int(tensor.shape[-1]), dets)
                image_id = len(images) + 1
                for result in prediction.to_coco(image_id):
                    results.write(result)
                detections += len(dets)
                picture = draw_picture(tensor, prediction, args.min_side)
                save_png(picture, output / names[position])
                images.append({"id": image_id, "file_name": str(path), "height": prediction.height,
                               "width": prediction.width, "picture": names[position], "detections": len(dets)})
                if len(tiles) < SHEET_MAX:
                    tiles.append(thumbnail(picture, TILE))
                    captions.append(f"{path.name}: {plural(len(dets), 'detection')}")
                    seen_classes += [d["category_name"] for d in dets]
            bar.update(len(batch))
        results.close()
    bar.close()
    seconds = time.perf_counter() - start
    categories = [{"id": i, "name": n} for i, n in zip(loaded.category_ids, loaded.names)]
    (output / IMAGES_FILE).write_text(json.dumps({"images": images, "categories": categories}, indent=1, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    if tiles:
        sheet = contact_sheet(tiles, captions, columns=min(8, math.ceil(math.sqrt(len(tiles)))), tile_size=TILE)
        if seen_classes:  # which colour is which class, for the classes on the sheet
            sheet = stacked(sheet, colour_key(sorted(set(seen_classes)), width=sheet.shape[2]))
        save_png(sheet, output / SHEET_NAME)
    done = len(images)
    rate = done / seconds if seconds > 0 else float("nan")
    print(f"Predicted {plural(done, 'image')} ({plural(detections, 'detection')}) in {seconds:.1f} s: {rate:.2f} images/s"
          + (f"; skipped {plural(skipped, 'unreadable file')}" if skipped else ""))
    print(f"Wrote {done} pictures, {PREDICTIONS_FILE}, {IMAGES_FILE}" + (f" and {SHEET_NAME}" if tiles else "") + f" to {output}")
    return 1 if skipped else 0


def cli() -> None:
    """Console script ``maskrcnn-predict``: ``main``'s return value is the exit status."""
    sys.exit(main())
