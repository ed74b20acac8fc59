"""Is the data fit to learn from: masks that disagree with their boxes, and a validation split unlike
the training split (issue #20, "Diagnosis from behaviour"), as ``Diagnosis`` findings.

Both run once at the start of a run (``cli.experiment.audit_start``) and in the dataset checker
(``scripts/check_dataset.py``). What is read per split (``split_stats``):

* image sizes, objects per image and the class histogram: from the annotation file, every image
  the split uses (nothing decoded);
* per-channel mean and standard deviation of the pixel values (0..1): from at most
  ``SAMPLE_IMAGES`` images per split, drawn with a fixed seed and decoded by
  ``data.validate.load_rgb`` as training decodes them (EXIF, 16-bit, palettes, ...). The pixels of
  every sampled image count equally (a large image weighs more).

Cost at start, measured on one busy core: the default shapes set (1000 train / 80 val images of
128 px) takes about 0.2 s for both splits (180 PNGs decoded, 15 ms for the 2.5k masks); 100 JPEGs
of 640x480 take about 0.4 s per split. The mask/box check costs about 6 us per polygon annotation
(``data.validate.mask_box_agreement``, ~5 s for COCO's 860k); the in-box pixel share, which
rasterises the masks that leave their boxes, is left to the dataset checker.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskrcnn_coco.analysis.diagnostics import Diagnosis, rare_class_notes
from maskrcnn_coco.data.coco import category_counts
from maskrcnn_coco.data.index import has_ground_truth, memoized
from maskrcnn_coco.data.validate import (
    MASK_BOX_CAUSE,
    MASK_BOX_WARN_SHARE,
    MaskBoxAgreement,
    load_rgb,
    mask_box_agreement,
)

SAMPLE_IMAGES = 100
SAMPLE_SEED = 0

# Thresholds (to move to DiagnosticsConfig later). Measured on healthy shapes splits (train and val
# drawn from the same generator with other seeds; 1000/80 images of 128 px, seeds 0-2, and 60/20 and
# 200/80 of 64 px): pixel mean differs by <= 0.009 (<= 1.7 % relative), one channel by <= 0.017,
# pixel std ratio 0.985-1.006, image sizes equal, objects per image ratio 0.91-1.01, class share
# ratio <= 1.32 (80 val images) and <= 1.55 (20). Each threshold leaves a wide margin above that;
# darkened validation images (x0.7, x0.5, x0.35) cross the mean threshold.
MAX_MEAN_DIFF = 0.15  # absolute difference of the mean pixel value (0..1), overall or one channel
MAX_MEAN_REL = 0.35  # ... or relative to the training value
STD_RATIO_RANGE = (0.6, 1.6)  # val / train pixel standard deviation (contrast)
MAX_SIZE_RATIO = 1.5  # median image width or height, either way
MAX_OBJECTS_RATIO = 2.0  # mean objects per image, either way
MAX_CLASS_RATIO = 3.0  # a class's share of the instances, either way ...
MIN_CLASS_EXPECTED = 20  # ... when the larger share predicts at least this many instances in the smaller split
# Fewer images than this in a split (decoded ones for the pixels): no comparison. A mean over 20
# images of real photos (per-image brightness sd ~0.1) moves by ~0.02, far below MAX_MEAN_DIFF;
# tiny runs (2 train / 1 val image) stay quiet.
MIN_IMAGES = 20

MASK_BOX_KEY = "the training annotations (python scripts/check_dataset.py)"
SPLIT_KEY = "the validation split (data.val_images, data.val_annotations); python scripts/check_dataset.py compares the splits"
CHANNELS = "RGB"


@dataclass
class SplitStats:
    """What one split looks like (``split_stats``). Pixel values are 0..1; ``mean``/``std`` are None
    when no image could be decoded."""

    split: str
    images: int
    instances: int
    median_size: tuple[float, float]  # width, height
    classes: dict[str, int]  # category name -> usable instances, in category id order
    sampled: int = 0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seconds: float = 0.0
    undecodable: list[int] = field(default_factory=list)  # sampled image ids that did not decode

    @property
    def objects_per_image(self) -> float:
        return self.instances / self.images if self.images else 0.0

    @property
    def brightness(self) -> float | None:
        return None if self.mean is None else float(np.mean(self.mean))

    @property
    def contrast(self) -> float | None:
        return None if self.std is None else float(np.mean(self.std))

    def class_shares(self) -> dict[str, float]:
        return {name: n / self.instances if self.instances else 0.0 for name, n in self.classes.items()}

    def summary(self, label: bool = True) -> str:
        """One line (``label``: starting with the split's name): sizes, objects, largest classes,
        pixel statistics and what was sampled."""
        shares = sorted(self.class_shares().items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{name} {share:.0%}" for name, share in shares[:5])
        more = f", ... ({len(shares)} classes)" if len(shares) > 5 else ""
        if self.mean is None:
            pixels = "pixels not sampled"
        else:
            pixels = (f"pixel mean {self.brightness:.2f} ({_channels(self.mean)}), std {self.contrast:.2f} "
                      f"({self.sampled} images decoded in {self.seconds:.2f} s)")
        w, h = self.median_size
        name = f"{self.split}: " if label else ""
        return (f"{name}{self.images} images (median {w:.0f}x{h:.0f} px), {self.objects_per_image:.2f} objects "
                f"per image, classes {shown}{more}; {pixels}")


def _channels(values: Sequence[float]) -> str:
    return " ".join(f"{c} {v:.2f}" for c, v in zip(CHANNELS, values))


def split_stats(
    coco: Any,
    image_ids: Sequence[int],
    usable_ann_ids: Iterable[int] | None,
    images_dir: str | Path | None,
    *,
    split: str,
    sample: int = SAMPLE_IMAGES,
    seed: int = SAMPLE_SEED,
) -> SplitStats:
    """The statistics of the images ``image_ids`` of ``coco`` and their usable annotations
    (``usable_ann_ids``; None: the non-crowd ones); pixels from at most ``sample`` images of
    ``images_dir`` (drawn with ``seed``; none without a folder). Images that do not decode are
    skipped (the dataset check names them)."""
    counts = category_counts(coco, image_ids, usable_ann_ids)
    instances = sum(counts.values())
    sizes = np.asarray([(coco.imgs[i]["width"], coco.imgs[i]["height"]) for i in image_ids], np.float64).reshape(-1, 2)
    median = (float(np.median(sizes[:, 0])), float(np.median(sizes[:, 1]))) if len(sizes) else (0.0, 0.0)
    stats = SplitStats(split, len(image_ids), instances, median, counts)
    if images_dir is not None and sample > 0 and len(image_ids):
        _sample_pixels(stats, coco, image_ids, Path(images_dir), sample, seed)
    return stats


def _sample_pixels(stats: SplitStats, coco: Any, image_ids: Sequence[int], folder: Path, sample: int, seed: int) -> None:
    """Per-channel mean and std of the pixels of ``sample`` seeded images, from PIL's 256-bin
    histograms (exact for 8-bit values, and far cheaper than float sums of squares)."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(np.asarray(image_ids), size=min(sample, len(image_ids)), replace=False).tolist())
    hist = np.zeros((3, 256), np.int64)
    for image_id in chosen:
        try:
            image = load_rgb(folder / coco.imgs[image_id]["file_name"])
        except Exception:  # noqa: BLE001 - PIL's errors vary; the dataset check names the file
            stats.undecodable.append(image_id)
            continue
        hist += np.asarray(image.histogram(), np.int64).reshape(3, 256)
        stats.sampled += 1
    if stats.sampled:
        values = np.arange(256) / 255.0
        total = hist.sum(axis=1)
        mean = hist @ values / total
        var = np.clip(hist @ values**2 / total - mean**2, 0.0, None)
        stats.mean, stats.std = tuple(mean.tolist()), tuple(np.sqrt(var).tolist())
    stats.seconds = time.perf_counter() - start


def dataset_split_stats(dataset: Any, split: str, *, sample: int = SAMPLE_IMAGES, seed: int = SAMPLE_SEED) -> SplitStats | None:
    """``split_stats`` of a training or validation dataset (``coco``, ``ids``, ``usable_ann_ids``,
    ``root``: the image folder); None for a dataset without them."""
    if getattr(dataset, "ids", None) is None or not has_ground_truth(dataset):
        return None
    return memoized(dataset, f"split_stats-{split}-{sample}-{seed}", lambda: split_stats(
        dataset.coco, list(dataset.ids), getattr(dataset, "usable_ann_ids", None), getattr(dataset, "root", None),
        split=split, sample=sample, seed=seed))


# ------------------------------------------------------------------------- comparing the splits
def _ratio(val: float, train: float) -> float:
    """How many times larger the larger value is (inf when only one is 0)."""
    lo, hi = sorted((val, train))
    return hi / lo if lo > 0 else (1.0 if hi == 0 else float("inf"))


def _finding(subject: str, message: str, cause: str, evidence: dict[str, Any], strength: float) -> Diagnosis:
    return Diagnosis(kind="val_unlike_train", components=(), subject=subject, message=message, cause=cause,
                     config_key=SPLIT_KEY, section="validation-unlike-training", severity="warning",
                     evidence=evidence, strength=strength)


def _mean_off(val: float, train: float) -> bool:
    return abs(val - train) > MAX_MEAN_DIFF or (train > 0 and abs(val - train) / train > MAX_MEAN_REL)


def _pixel_findings(train: SplitStats, val: SplitStats) -> list[Diagnosis]:
    if train.mean is None or val.mean is None or train.std is None or val.std is None or min(train.sampled, val.sampled) < MIN_IMAGES:
        return []
    out = []
    t, v = train.brightness or 0.0, val.brightness or 0.0
    std_ratio = (val.contrast or 0.0) / train.contrast if train.contrast else 1.0
    contrast_off = not STD_RATIO_RANGE[0] <= std_ratio <= STD_RATIO_RANGE[1]
    sampled = f"{val.sampled} validation and {train.sampled} training images sampled"
    channels = f"per channel {_channels(val.mean)} vs {_channels(train.mean)}"
    evidence = {"val_mean": list(val.mean), "train_mean": list(train.mean), "val_std": list(val.std),
                "train_std": list(train.std), "val_sampled": val.sampled, "train_sampled": train.sampled}
    cause = "validation images taken under other light or exported with another colour pipeline (gamma, colour space, 16-bit scaling)"
    scaled = False
    if _mean_off(v, t):
        word = "darker" if v < t else "brighter"
        # Values multiplied by a factor change mean and std alike: one fault, said once.
        scaled = contrast_off and t > 0 and abs(std_ratio / (v / t) - 1.0) < 0.2
        also = (f"; pixel std {val.contrast:.2f} vs {train.contrast:.2f} too: the values look scaled by {v / t:.2f}"
                if scaled else "")
        out.append(_finding("pixel mean", f"validation images are much {word} than training: mean pixel {v:.2f} vs {t:.2f} "
                            f"({channels}{also}; {sampled})", cause, evidence, abs(v - t) / MAX_MEAN_DIFF))
    else:
        off = [c for c, a, b in zip(CHANNELS, val.mean, train.mean) if _mean_off(a, b)]
        if off:
            out.append(_finding("pixel colour", f"validation images have another colour balance than training: mean pixel "
                                f"{channels} (channel{'s' if len(off) > 1 else ''} {', '.join(off)} off; {sampled})",
                                cause, evidence, max(abs(a - b) for a, b in zip(val.mean, train.mean)) / MAX_MEAN_DIFF))
    if contrast_off and not scaled:
        word = "lower" if std_ratio < 1 else "higher"
        out.append(_finding("pixel std", f"validation images have much {word} contrast than training: pixel std "
                            f"{val.contrast:.2f} vs {train.contrast:.2f} (x{std_ratio:.2f}; per channel {_channels(val.std)} vs "
                            f"{_channels(train.std)}; {sampled})", cause, evidence, _ratio(std_ratio, 1.0)))
    return out


def compare_splits(train: SplitStats, val: SplitStats) -> list[Diagnosis]:
    """``val_unlike_train`` findings naming what differs between the splits, with both numbers:
    pixel brightness, colour and contrast, image size, objects per image, class shares (the
    thresholds above; nothing is compared on fewer than ``MIN_IMAGES`` images)."""
    if min(train.images, val.images) < MIN_IMAGES:
        return []
    out = _pixel_findings(train, val)
    (tw, th), (vw, vh) = train.median_size, val.median_size
    size_ratio = max(_ratio(vw, tw), _ratio(vh, th))
    if size_ratio > MAX_SIZE_RATIO:
        word = "larger" if vw * vh > tw * th else "smaller"
        out.append(_finding(
            "image size", f"validation images are {word} than training: median {vw:.0f}x{vh:.0f} vs {tw:.0f}x{th:.0f} px "
            f"(x{size_ratio:.1f}); the model resizes both alike, so validation objects appear at other scales",
            "the validation split exported or photographed at another resolution",
            {"val_median_size": list(val.median_size), "train_median_size": list(train.median_size)}, size_ratio / MAX_SIZE_RATIO))
    objects_ratio = _ratio(val.objects_per_image, train.objects_per_image)
    if objects_ratio > MAX_OBJECTS_RATIO:
        word = "more" if val.objects_per_image > train.objects_per_image else "fewer"
        out.append(_finding(
            "objects per image", f"validation images hold many {word} objects than training: {val.objects_per_image:.2f} vs "
            f"{train.objects_per_image:.2f} per image ({val.instances} instances on {val.images} images vs {train.instances} on "
            f"{train.images})", "the validation split drawn from other scenes, or annotated more or less completely",
            {"val_objects_per_image": val.objects_per_image, "train_objects_per_image": train.objects_per_image},
            objects_ratio / MAX_OBJECTS_RATIO))
    classes = _class_differences(train, val)
    if classes:
        shown = "; ".join(f"{name} {vs:.1%} of validation instances vs {ts:.1%} of training (x{r:.1f})" for name, vs, ts, r in classes[:5])
        more = f"; and {len(classes) - 5} more" if len(classes) > 5 else ""
        out.append(_finding(
            "class shares", f"class shares differ between the splits: {shown}{more}",
            "the validation split sampled from other scenes or labelled with other rules",
            {"classes": [{"name": n, "val_share": vs, "train_share": ts} for n, vs, ts, _ in classes]},
            classes[0][3] / MAX_CLASS_RATIO))
    return out


def _class_differences(train: SplitStats, val: SplitStats) -> list[tuple[str, float, float, float]]:
    """``(name, val share, train share, ratio)`` of the classes whose shares differ by more than
    ``MAX_CLASS_RATIO``, largest ratio first. A class counts only where the larger share predicts at
    least ``MIN_CLASS_EXPECTED`` instances in the smaller split, so a few instances cannot fire it."""
    ts, vs = train.class_shares(), val.class_shares()
    smaller = min(train.instances, val.instances)
    out = []
    for name in ts.keys() | vs.keys():
        t, v = ts.get(name, 0.0), vs.get(name, 0.0)
        ratio = _ratio(v, t)
        if ratio > MAX_CLASS_RATIO and max(t, v) * smaller >= MIN_CLASS_EXPECTED:
            out.append((name, v, t, ratio))
    return sorted(out, key=lambda row: (-row[3], row[0]))


# ------------------------------------------------------------------------------ mask/box agreement
def mask_box_finding(agreement: MaskBoxAgreement) -> Diagnosis | None:
    """The ``mask_box_disagree`` finding when ``agreement`` warns: ``loss_mask`` when masks are shifted
    against boxes of their size (mask targets then show objects the boxes do not frame),
    ``loss_box_reg`` when box edges miss their masks' extent (careless or rescaled boxes), both when
    each holds at least a quarter of the annotations below the level."""
    if not agreement.warns:
        return None
    # The more common kind first.
    kinds = sorted((("loss_mask", agreement.masks_off), ("loss_box_reg", agreement.boxes_loose)), key=lambda kv: -kv[1])
    components = tuple(c for c, n in kinds if n >= 0.25 * agreement.bad)
    worst = agreement.named()
    return Diagnosis(
        kind="mask_box_disagree", components=components, message=agreement.describe(), cause=MASK_BOX_CAUSE,
        config_key=MASK_BOX_KEY, section="data-disagrees-with-itself", severity="warning",
        image_ids=tuple(r.image_id for r in worst),
        evidence={"file": agreement.source, "measured": agreement.measured, "pixels": agreement.pixels,
                  "below": {str(k): v for k, v in agreement.below.items()}, "share_bad": agreement.share_bad,
                  "masks_off": agreement.masks_off, "boxes_loose": agreement.boxes_loose,
                  "worst": [[r.image_id, r.annotation_id, r.inside, r.iou] for r in worst]},
        strength=agreement.share_bad / MASK_BOX_WARN_SHARE,
    )


def dataset_mask_box(dataset: Any, source: str | None = None, *, pixels: bool = False) -> MaskBoxAgreement | None:
    """``mask_box_agreement`` of a dataset's usable annotations (``coco``, ``ids``, ``usable_ann_ids``);
    ``source``: the annotation file to name (default: the dataset's ``source``)."""
    if getattr(dataset, "ids", None) is None or not has_ground_truth(dataset):
        return None
    source = source or getattr(dataset, "source", None)
    return memoized(dataset, f"mask_box-{pixels}-{hashlib.sha1(str(source).encode()).hexdigest()[:8]}", lambda: mask_box_agreement(
        dataset.coco, dataset.ids, getattr(dataset, "usable_ann_ids", None), pixels=pixels, source=source))


# ------------------------------------------------------------------------------- at run start
@dataclass
class DataAudit:
    """The start-of-run data checks: both splits' statistics, the training masks' agreement with
    their boxes, and the findings (``mask_box_disagree``, ``val_unlike_train``, ``rare_class``)."""

    train: SplitStats | None
    val: SplitStats | None
    agreement: MaskBoxAgreement | None
    findings: list[Diagnosis]
    seconds: float

    def format(self) -> str:
        lines = [f"Data at start ({self.seconds:.2f} s):"]
        lines += [f"  {s.summary()}" for s in (self.train, self.val) if s is not None]
        if self.agreement is not None:
            a = self.agreement
            counts = " and ".join(f"{n} below {level}" for level, n in a.below.items())
            lines.append(f"  train masks on their boxes: {a.measured} annotations, {counts} (box/mask-box IoU)")
        return "\n".join(lines)


def audit_data(train_dataset: Any, val_dataset: Any, *, train_source: str | None = None) -> DataAudit:
    """Run the data checks on the training and validation datasets (see the module doc for what is
    sampled and what it costs)."""
    start = time.perf_counter()
    agreement = dataset_mask_box(train_dataset, train_source)
    train, val = dataset_split_stats(train_dataset, "train"), dataset_split_stats(val_dataset, "val")
    findings = []
    finding = mask_box_finding(agreement) if agreement is not None else None
    if finding is not None:
        findings.append(finding)
    if train is not None and val is not None:
        findings += compare_splits(train, val)
    if train is not None:
        findings += rare_class_notes(train.classes)
    return DataAudit(train, val, agreement, findings, time.perf_counter() - start)
