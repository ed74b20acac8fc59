"""The ``jpeg`` section: decoding COCO-sized JPEG files on the CPU, PIL against ``torchvision.io.decode_jpeg``.

Both paths end where the data pipeline's image step ends, an 8-bit RGB ``(3, H, W)`` tensor:

* ``pil``: ``Image.open(path).convert("RGB")`` then ``pil_to_tensor`` (what ``data.validate.load_rgb``
  and ``transforms.v2.ToImage`` do for a training sample);
* ``decode_jpeg``: ``torchvision.io.decode_jpeg(torchvision.io.read_file(path), mode=RGB)``.

The files are generated (``coco_synth.template_jpeg``: a gradient with noise, quality 90, each file its
own seed) at COCO's sizes (640x480 landscape, 480x640 portrait). Trials alternate A B, B A, ... over the
same files, one process, after one untimed pass of each (the page cache is warm for both); both decoders
run on one thread, so images per second of wall and of process CPU time are per loader worker. The
pixels of the two decoders are compared (libjpeg versions and upsampling may differ by a few levels).

torchvision 0.29 deprecates its image decoders in favour of TorchCodec (a ``DeprecationWarning`` on
first use); the section keeps measuring them while they exist.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from maskrcnn_coco.benchmark.coco_synth import template_jpeg
from maskrcnn_coco.benchmark.timing import Timing, ratios, timed

# COCO's two common sizes (width, height): most of val2017 is 640x480 or 480x640.
COCO_SIZES = ((640, 480), (480, 640))


def write_jpegs(folder: Path, count: int, sizes: Sequence[tuple[int, int]] = COCO_SIZES, seed: int = 0) -> list[Path]:
    """``count`` JPEG files (quality 90) cycling through ``sizes``, each with its own content."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        path = folder / f"{i:04d}_{width}x{height}.jpg"
        path.write_bytes(template_jpeg(width, height, seed + i))
        paths.append(path)
    return paths


def decode_pil(path: Path) -> torch.Tensor:
    from torchvision.transforms.v2.functional import pil_to_tensor

    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB"))


def decode_torchvision(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)


DECODERS: dict[str, Callable[[Path], torch.Tensor]] = {"pil": decode_pil, "decode_jpeg": decode_torchvision}


def bench_jpeg(args: argparse.Namespace, log: Callable[[str], None], folder: Path | None = None) -> dict[str, Any]:
    """Images per second (wall and CPU, one thread) of each decoder on ``args.jpeg_files`` generated files."""
    with tempfile.TemporaryDirectory(prefix="bench_jpeg_") as tmp:
        paths = write_jpegs(Path(folder or tmp), args.jpeg_files)
        outputs = {name: [decode(p) for p in paths] for name, decode in DECODERS.items()}  # the untimed pass
        timings = {name: Timing() for name in DECODERS}
        for rep in range(args.repeats):
            for name in list(DECODERS)[:: 1 if rep % 2 == 0 else -1]:
                decode = DECODERS[name]
                timings[name].add(*timed(lambda decode=decode: [decode(p) for p in paths], torch.device("cpu"))[1:])
            log(f"  jpeg repeat {rep + 1}: " + ", ".join(f"{n} {len(paths) / t.wall[-1]:.0f} img/s (cpu {len(paths) / t.cpu[-1]:.0f})"
                                                         for n, t in timings.items()))
        sizes = sorted({p.stat().st_size for p in paths})
    diffs = [(a.int() - b.int()).abs() for a, b in zip(outputs["pil"], outputs["decode_jpeg"])]
    out: dict[str, Any] = {
        "files": len(paths), "sizes": [list(s) for s in COCO_SIZES], "quality": 90,
        "file_kb": {"min": sizes[0] / 1024, "max": sizes[-1] / 1024},
        **{name: t.summary(len(paths)) for name, t in timings.items()},
        "ratio": ratios(timings["decode_jpeg"], timings["pil"]),  # decode_jpeg / pil seconds: below 1 is faster
        "same_shape": all(a.shape == b.shape for a, b in zip(outputs["pil"], outputs["decode_jpeg"])),
        "max_abs_diff": max(int(d.max()) for d in diffs),
        "mean_abs_diff": statistics.fmean(float(d.float().mean()) for d in diffs),
    }
    # The faster decoder, by CPU time (steadier than wall on a shared machine) and by wall time.
    cpu = {n: out[n]["images_per_cpu_s"]["median"] for n in DECODERS}
    wall = {n: out[n]["images_per_s"]["median"] for n in DECODERS}
    out["faster"] = {"cpu": max(cpu, key=cpu.get), "wall": max(wall, key=wall.get),
                     "speedup_cpu": cpu["decode_jpeg"] / cpu["pil"], "speedup_wall": wall["decode_jpeg"] / wall["pil"]}
    return out
