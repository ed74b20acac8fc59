"""Per-image losses: each loss component of each image on its own, and the images whose loss stands far
above the rest (issue #20: "annotations to check").

torchvision reduces every loss over the batch (``loss_mask`` is a mean over all positive proposals of
all images), so one image with a wrong annotation hides inside a batch mean. ``per_image_losses`` runs
one training forward per image (losses need train mode) under ``torch.no_grad()``, with the
normalisation layers in eval mode, on a forked RNG, and restores every buffer: the model and the
training RNG stream are the same afterwards. ``outlier_images`` ranks the images whose component is
far above the others' (robustly: median and MAD). ``PerImageLosses`` is the hook that does this at
each evaluation on a fixed subset of training images and writes ``per_image_losses_epoch_NNN.json``
and a contact sheet of the worst images with their ground truth (``annotations_to_check_epoch_NNN.png``).

Which statistics the normalisation layers use (``statistics``):

* ``"running"`` (default): each BatchNorm's running statistics, as the run's own evaluation
  (``eval_step.loss_mode``) sees the model. A single image's batch statistics would normalise it by
  itself (and a 1x1 feature map fails in train mode), so per image only fixed statistics make sense.
* ``"batch"``: each BatchNorm normalises with the statistics of the whole given batch, captured by one
  training-mode forward of the batch: what the training step applied to these images (the probe's
  ``--split train``). Equal to a training forward up to float rounding.
"""

from __future__ import annotations

import json
import logging
import math
import statistics as stats
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskrcnn_coco.analysis.diagnostics import json_safe
from maskrcnn_coco.config import AugmentConfig
from maskrcnn_coco.data.coco import build_transforms
from maskrcnn_coco.data.samplers import SeededSamples
from maskrcnn_coco.engine.eval_step import loss_mode, restored_modes
from maskrcnn_coco.engine.hooks import MONITOR, EpochResult, Hook
from maskrcnn_coco.engine.loop import move_to_device
from maskrcnn_coco.engine.state import TrainingState
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS
from maskrcnn_coco.utils.draw import contact_sheet, draw_instances, enlarged, save_png

log = logging.getLogger(__name__)

STATISTICS = ("running", "batch")
# Components computed over positive samples only: an image without objects has 0 there by definition,
# so only images with objects are ranked on them (their zeros would pull the median down).
POSITIVE_ONLY = frozenset({"loss_box_reg", "loss_mask", "loss_rpn_box_reg"})
# Components that sum over the positives and divide by all sampled: an image with more positives (more
# objects) has a larger value without a worse regression, so they are ranked per positive:
# value x sampled / positives, from the row's sampler counts.
PER_POSITIVE = {"loss_box_reg": ("roi_positive", "roi_sampled"), "loss_rpn_box_reg": ("rpn_positive", "rpn_sampled")}
COUNTS = ("rpn_positive", "rpn_sampled", "roi_positive", "roi_sampled")
# Outlier rule defaults: above median + K_MAD x MAD and at least MIN_RATIO x the median, among at
# least MIN_IMAGES images (a median of fewer says little).
K_MAD = 5.0
MIN_RATIO = 2.0
MIN_IMAGES = 5
FILE_PATTERN = "per_image_losses_epoch_{:03d}.json"
SHEET_PATTERN = "annotations_to_check_epoch_{:03d}.png"
LATEST_KEY = "per_image"  # state.latest[LATEST_KEY]: the hook's latest result


# ------------------------------------------------------------------------------ buffers and modes
def buffer_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every buffer of ``model`` (BatchNorm running statistics and counters)."""
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def restore_buffers(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Put back the buffers of ``buffer_snapshot``, in place (bit-identical)."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(saved[name])


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def fresh_norms(model: nn.Module) -> int:
    """BatchNorm layers whose running statistics are still the initial ones (mean 0, variance 1): in
    eval mode those do not normalise, so a fresh model's running-statistics losses are not the
    batch-statistics ones training sees."""
    return sum(bool((m.running_mean == 0).all() and (m.running_var == 1).all()) for m in batchnorms(model))


def _capture_batch_statistics(model: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]]) -> None:
    """Set each BatchNorm's running statistics to the batch's own (biased) statistics, from one
    training-mode forward of the batch: afterwards eval mode normalises each image as training
    normalised it within this batch. The caller restores the buffers."""
    norms = batchnorms(model)
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        dims = [0, *range(2, x.dim())]
        # What train-mode BatchNorm normalises with: the biased variance (the running one is unbiased).
        seen[module] = (x.mean(dims), x.var(dims, unbiased=False))

    handles = [m.register_forward_pre_hook(record) for m in norms]
    try:
        with restored_modes(model):
            model.train()
            model(list(images), [dict(t) for t in targets])
    finally:
        for h in handles:
            h.remove()
    for m in norms:
        if m in seen:
            mean, var = seen[m]
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


@contextmanager
def _untouched(model: nn.Module, device: torch.device) -> Iterator[None]:
    """No gradients, a forked RNG (the samplers' draws leave the training stream as it was), and every
    buffer and train/eval mode of ``model`` restored afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    saved = buffer_snapshot(model)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), restored_modes(model):
            yield
    finally:
        restore_buffers(model, saved)


class _CountingSampler:
    """Wraps a BalancedPositiveNegativeSampler; keeps the positives and sampled of its last draw (device tensors)."""

    def __init__(self, sampler: Any):
        self.sampler = sampler
        self.counts: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, labels: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pos, neg = self.sampler(labels)
        positives = sum(p.sum() for p in pos)
        self.counts = (positives, positives + sum(n.sum() for n in neg))
        return pos, neg

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


@contextmanager
def _counting(model: nn.Module) -> Iterator[dict[str, _CountingSampler]]:
    """The RPN's and RoI heads' samplers counted while open (``{"rpn": ..., "roi": ...}``; empty for a
    model without them)."""
    owners = {"rpn": getattr(model, "rpn", None), "roi": getattr(model, "roi_heads", None)}
    owners = {k: m for k, m in owners.items() if hasattr(m, "fg_bg_sampler")}
    originals = {k: m.fg_bg_sampler for k, m in owners.items()}
    counters = {k: _CountingSampler(s) for k, s in originals.items()}
    for k, m in owners.items():
        m.fg_bg_sampler = counters[k]
    try:
        yield counters
    finally:
        for k, m in owners.items():
            m.fg_bg_sampler = originals[k]


def _image_id(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def per_image_losses(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    targets: Sequence[Mapping[str, Any]],
    device: torch.device | str | None = None,
    *,
    seed: int = 0,
    statistics: str = "running",
) -> list[dict[str, Any]]:
    """One row per image: ``image_id``, ``num_objects``, ``num_masked`` (objects with a mask), the five raw components as floats, each from a
    training forward of that image alone (``model([image], [target])``, normalisation layers in eval
    mode with the ``statistics`` of the module doc), and what its samplers drew (``rpn_positive``,
    ``rpn_sampled`` anchors, ``roi_positive``, ``roi_sampled`` proposals). Image ``i`` runs with
    ``torch.manual_seed(seed + i)`` on a forked RNG, so its row is reproducible and the caller's RNG is
    untouched; the model's buffers and modes are the same afterwards. An image whose forward raises
    (torchvision rejects degenerate boxes) gets NaN components and the exception in ``error``.
    ``device``: default the model's."""
    if statistics not in STATISTICS:
        raise ValueError(f"statistics={statistics!r}: use one of {', '.join(STATISTICS)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    images, targets = move_to_device(images, targets, device)
    values: list[torch.Tensor] = []
    errors: dict[int, str] = {}
    nan = torch.full((len(LOSS_COMPONENTS) + len(COUNTS),), math.nan, device=device)
    with _untouched(model, device):
        if statistics == "batch":
            torch.manual_seed(seed)
            _capture_batch_statistics(model, images, targets)
        with loss_mode(model), _counting(model) as counters:
            for i, (image, target) in enumerate(zip(images, targets)):
                torch.manual_seed(seed + i)
                for counter in counters.values():
                    counter.counts = None  # a forward that never reaches a sampler counts nothing
                try:
                    loss_dict = model([image], [dict(target)])
                    counts = [c for k in ("rpn", "roi") for c in _counts(counters.get(k), device)]
                    values.append(torch.stack([*(loss_dict[k].detach().float() for k in LOSS_COMPONENTS), *counts]))
                except (ValueError, RuntimeError, IndexError, AssertionError) as err:
                    errors[i] = f"{type(err).__name__}: {err}"
                    values.append(nan)
    table = torch.stack(values).tolist() if values else []  # one read-back for all images
    # Objects with a mask (box-only ones have an empty mask target, which the mask loss skips).
    masked = torch.stack([t["masks"].flatten(1).any(1).sum() if len(t["masks"]) else torch.zeros((), dtype=torch.int64, device=device)
                          for t in targets]).tolist() if targets else []
    rows = []
    for i, (target, row) in enumerate(zip(targets, table)):
        out: dict[str, Any] = {"image_id": _image_id(target.get("image_id")), "num_objects": len(target["boxes"]),
                               "num_masked": int(masked[i])}
        out.update(zip(LOSS_COMPONENTS, row))
        out.update((k, int(v) if math.isfinite(v) else None) for k, v in zip(COUNTS, row[len(LOSS_COMPONENTS):]))
        if i in errors:
            out["error"] = errors[i]
        rows.append(out)
    return rows


def _counts(counter: _CountingSampler | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, sampled) of the counter's last draw as float device tensors; NaN without one."""
    if counter is None or counter.counts is None:
        nan = torch.tensor(math.nan, device=device)
        return nan, nan
    positives, sampled = counter.counts
    return positives.float(), sampled.float()


# ------------------------------------------------------------------------------------ outliers
def ranked_value(row: Mapping[str, Any], component: str) -> float:
    """What an image is ranked on for ``component``: the component, per positive for ``PER_POSITIVE``
    ones when the row has its sampler counts (NaN with no positive)."""
    value = float(row[component])
    if component in PER_POSITIVE:
        pos_key, sampled_key = PER_POSITIVE[component]
        positives, sampled = row.get(pos_key), row.get(sampled_key)
        if positives is not None and sampled is not None and math.isfinite(value):
            return value * sampled / positives if positives else math.nan
    return value


def ranked_per_positive(rows: Sequence[Mapping[str, Any]], component: str) -> bool:
    """Whether ``component`` is ranked per positive over ``rows`` (``ranked_value``): every row with a
    finite value has its sampler counts."""
    keys = PER_POSITIVE.get(component)
    return keys is not None and all(r.get(k) is not None for r in rows if math.isfinite(float(r[component])) for k in keys)


def _ranked_rows(rows: Sequence[Mapping[str, Any]], component: str) -> list[Mapping[str, Any]]:
    """The rows ranked on ``component``: with objects (and positives, when ranked per positive) for a
    positive-only component, else all."""
    if component not in POSITIVE_ONLY:
        return list(rows)
    with_objects = [r for r in rows if r.get("num_objects", 1) > 0]
    if component == "loss_mask":  # box-only objects give no mask loss: their images rank on nothing
        with_objects = [r for r in with_objects if r.get("num_masked", 1) > 0]
    keys = PER_POSITIVE.get(component)
    if keys and ranked_per_positive(with_objects, component):
        with_objects = [r for r in with_objects if r[keys[0]] != 0]  # no positive: nothing regressed
    return with_objects


def outlier_images(
    rows: Sequence[Mapping[str, Any]],
    component: str,
    *,
    k: float = K_MAD,
    min_ratio: float = MIN_RATIO,
    min_images: int = MIN_IMAGES,
) -> list[dict[str, Any]]:
    """The images whose ``component`` stands far above the rest, worst first: above the median plus
    ``k`` x the median absolute deviation **and** at least ``min_ratio`` x the median, among the
    finite values of the ranked images (``ranked_value``: per positive for ``PER_POSITIVE`` components;
    images with objects for ``POSITIVE_ONLY`` ones). An image whose loss is non-finite is listed first
    when the finite ones are the majority. Each entry: ``image_id``, ``value`` (the ranked value),
    ``per_positive``, ``loss`` (the component), ``median``, ``mad``, ``ratio`` (value / median),
    ``num_objects``. Fewer than ``min_images`` finite values: none."""
    ranked = _ranked_rows(rows, component)
    by_positive = ranked_per_positive(ranked, component)
    values = {id(r): ranked_value(r, component) if by_positive else float(r[component]) for r in ranked}
    finite = [r for r in ranked if math.isfinite(values[id(r)])]
    if len(finite) < min_images:
        return []
    median = stats.median(values[id(r)] for r in finite)
    mad = stats.median(abs(values[id(r)] - median) for r in finite)
    out = []
    if len(finite) * 2 > len(ranked):
        out += [_entry(r, component, math.nan, by_positive, median, mad) for r in ranked
                if not math.isfinite(float(r[component]))]
    above = [r for r in finite if values[id(r)] > max(median + k * mad, min_ratio * median, 0.0)]
    entries = (_entry(r, component, values[id(r)], by_positive, median, mad) for r in above)
    return out + sorted(entries, key=lambda e: -e["value"])


def _entry(row: Mapping[str, Any], component: str, value: float, by_positive: bool, median: float, mad: float) -> dict[str, Any]:
    ratio = value / median if median > 0 and math.isfinite(value) else math.inf
    return {"image_id": row["image_id"], "value": value, "per_positive": by_positive, "loss": float(row[component]),
            "median": median, "mad": mad, "ratio": ratio, "num_objects": row.get("num_objects")}


def rank_outliers(rows: Sequence[Mapping[str, Any]], components: Iterable[str] = LOSS_COMPONENTS,
                  **rule: Any) -> dict[str, list[dict[str, Any]]]:
    """``outlier_images`` of every component that has any: ``{component: ranked entries}``."""
    ranked = {c: outlier_images(rows, c, **rule) for c in components}
    return {c: entries for c, entries in ranked.items() if entries}


def images_to_check(outliers: Mapping[str, Sequence[Mapping[str, Any]]], most: int = 12) -> list[tuple[Any, list[tuple[str, Mapping[str, Any]]]]]:
    """The outlier images, worst first (by their largest ratio over the components), at most ``most``:
    ``[(image_id, [(component, entry), ...]), ...]``."""
    by_image: dict[Any, list[tuple[str, Mapping[str, Any]]]] = {}
    for component, entries in outliers.items():
        for entry in entries:
            by_image.setdefault(entry["image_id"], []).append((component, entry))
    for found in by_image.values():
        found.sort(key=lambda ce: -_sort_ratio(ce[1]))
    ordered = sorted(by_image.items(), key=lambda item: -_sort_ratio(item[1][0][1]))
    return ordered[:most]


def _sort_ratio(entry: Mapping[str, Any]) -> float:
    ratio = float(entry["ratio"])
    return math.inf if math.isnan(ratio) else ratio


def caption(image_id: Any, found: Sequence[tuple[str, Mapping[str, Any]]], lines: int = 2) -> str:
    """``image 12: loss_mask 2.31 (median 0.21)``, one line per component (the worst ``lines``)."""
    parts = [f"{c} {e['value']:.3g}{' per positive' if e.get('per_positive') else ''} (median {e['median']:.3g})"
             for c, e in found[:lines]]
    return f"image {image_id}: " + "\n".join(parts)


# --------------------------------------------------------------------------------- drawing
def annotation_ids(dataset: Any, image_id: Any, count: int) -> list[Any] | None:
    """The annotation ids of ``image_id`` in the order the dataset builds its target (its index's, or the
    usable ones of ``dataset.coco``), or None when unknown or when their number is not ``count`` (a box the
    pipeline dropped would shift them)."""
    from_index = getattr(dataset, "annotation_ids", None)
    if callable(from_index):  # a dataset of data.coco: its index knows them (no ground truth loaded)
        ids = from_index(image_id)
    else:
        coco = getattr(dataset, "coco", None)
        if coco is None:
            return None
        usable = getattr(dataset, "usable_ann_ids", None)
        ids = [a["id"] for a in coco.imgToAnns.get(image_id, []) if usable is None or a["id"] in usable]
    return ids if ids is not None and len(ids) == count else None


def draw_ground_truth(image: torch.Tensor, target: Mapping[str, Any], class_names: Sequence[str],
                      ann_ids: Sequence[Any] | None = None, min_side: int = 256) -> torch.Tensor:
    """``image`` with its ground truth: masks, boxes, class names (``class_names[label - 1]``) and
    annotation ids when known; uint8 ``(3, H, W)``. An image whose longer side is below ``min_side`` is
    enlarged first (nearest neighbour), so the captions stay legible on the contact sheet's tiles."""
    labels = [int(v) for v in target["labels"].tolist()]
    names = [class_names[label - 1] if 0 < label <= len(class_names) else str(label) for label in labels]
    image, boxes, masks = image.detach().cpu(), target["boxes"].detach().cpu().float(), target.get("masks")
    masks = masks.detach().cpu().bool() if masks is not None else None
    image, boxes, masks = enlarged(image, boxes, masks, min_side)
    return draw_instances(image, boxes, names, masks, ids=ann_ids)


def annotations_sheet(
    outliers: Mapping[str, Sequence[Mapping[str, Any]]],
    samples: Mapping[Any, tuple[torch.Tensor, Mapping[str, Any]]],
    class_names: Sequence[str],
    *,
    dataset: Any = None,
    most: int = 12,
) -> torch.Tensor | None:
    """A contact sheet of the worst outlier images (``images_to_check``) with their ground truth, each
    captioned ``image <id>: <component> <value> (median <m>)``; ``samples``: ``{image_id: (image,
    target)}`` as the model received them; ``dataset``: to name annotation ids. None without outliers."""
    tiles, captions = [], []
    for image_id, found in images_to_check(outliers, most):
        if image_id not in samples:
            continue
        image, target = samples[image_id]
        ids = annotation_ids(dataset, image_id, len(target["boxes"])) if dataset is not None else None
        tiles.append(draw_ground_truth(image, target, class_names, ids))
        captions.append(caption(image_id, found))
    return contact_sheet(tiles, captions) if tiles else None


def medians(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The median of each component's ranked value over its ranked images (``outlier_images``; NaN
    when none is finite)."""
    out = {}
    for c in LOSS_COMPONENTS:
        ranked = _ranked_rows(rows, c)
        by_positive = ranked_per_positive(ranked, c)
        values = [v for v in (ranked_value(r, c) if by_positive else float(r[c]) for r in ranked) if math.isfinite(v)]
        out[c] = stats.median(values) if values else math.nan
    return out


# -------------------------------------------------------------------------------------- the hook
def unaugmented(dataset: Any) -> Any:
    """The samples of ``dataset`` (a training dataset of ``data.coco``, possibly inside
    ``SeededSamples``) through the validation pipeline: same images, ids and annotations, no
    augmentation, so an image's loss changes between evaluations only with the model. A dataset of
    another kind is returned as it is (its own transforms apply)."""
    while isinstance(dataset, SeededSamples):
        dataset = dataset.dataset
    if not (hasattr(dataset, "with_transforms") and hasattr(dataset, "mapping")):
        log.info("Per-image losses: %s is not a COCO dataset of ours; its own transforms apply", type(dataset).__name__)
        return dataset
    # train=False: the validation pipeline (target preparation, dtype, sanitising; no augmentation).
    view = dataset.with_transforms(build_transforms(False, AugmentConfig(), dataset.mapping))
    view.mapping = dataset.mapping
    return view


def choose_subset(size: int, num_images: int, seed: int) -> list[int]:
    """``num_images`` dataset indices drawn once from ``seed`` (all when the dataset is smaller), sorted."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:num_images].tolist())


class PerImageLosses(Hook):
    """At each evaluated epoch: the per-image losses of a fixed subset of training images, and the
    images whose component stands far above the rest.

    ``dataset``: the training dataset (read through the validation pipeline, ``unaugmented``);
    ``num_images`` of it are chosen once from ``seed`` (``choose_subset``), so every evaluation and a
    resumed run rank the same images. Cost: one forward per image, 0.12-0.17 of a training iteration
    of the default run on a CPU (batch 4, fp32), so the default 24 images cost 1.2-1.6 % of its
    250-iteration epoch (docs/loss_probe.md, *Per-image losses*). Writes ``<run_dir>/per_image_losses_epoch_NNN.json`` (the rows,
    the medians, the ranked outliers per component, the images to check, the seconds it took) and,
    when there are outliers, ``annotations_to_check_epoch_NNN.png`` (at most ``max_sheet`` images with
    their ground truth). The result is also in ``state.latest["per_image"]`` and ``self.latest``
    (``epoch``, ``outliers``, ``images_to_check``, ``path``, ``sheet``), for the diagnosis rules.

    It runs after evaluation (``after_epoch``), never inside the training iterations, and on the bare
    module (no collective: eval-mode BatchNorm, SyncBatchNorm included, needs none). Priority
    ``MONITOR``: before the output hooks of the same epoch, so they can cite its result.
    """

    priority = MONITOR
    main_process_only = True

    def __init__(self, run_dir: str | Path, dataset: Any, *, num_images: int = 24, seed: int = 0, k: float = K_MAD,
                 min_ratio: float = MIN_RATIO, max_sheet: int = 12, statistics: str = "running"):
        self.run_dir = Path(run_dir)
        self.dataset = unaugmented(dataset)
        self.indices = choose_subset(len(self.dataset), num_images, seed)
        self.seed, self.k, self.min_ratio, self.max_sheet = seed, k, min_ratio, max_sheet
        self.statistics = statistics
        self.latest: dict[str, Any] | None = None

    def load(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """The subset's samples, decoded anew each time (no copy of the images is kept between evaluations)."""
        return [self.dataset[i] for i in self.indices]

    def after_epoch(self, state: TrainingState, result: EpochResult) -> None:
        record = result.record
        if not (record.get("metrics") or record.get("val_loss")):
            return  # not an evaluated epoch
        train_s = (record.get("time") or {}).get("train_s")
        self.latest = self.compute(state.model, result.epoch, getattr(state.mapping, "names", None), train_s)
        state.latest[LATEST_KEY] = self.latest

    def compute(self, model: nn.Module, epoch: int, class_names: Sequence[str] | None,
                train_seconds: float | None = None) -> dict[str, Any]:
        """Per-image losses of the subset with ``model``, written for ``epoch``; returns the summary.
        ``train_seconds``: the epoch's training time, against which the cost is written (``cost_share``)."""
        t0 = time.perf_counter()
        samples = self.load()
        images = [image for image, _ in samples]
        targets = [target for _, target in samples]
        rows = per_image_losses(model, images, targets, seed=self.seed, statistics=self.statistics)
        outliers = rank_outliers(rows, k=self.k, min_ratio=self.min_ratio)
        worst = images_to_check(outliers, self.max_sheet)
        sheet = None
        if worst:
            by_id = {_image_id(t.get("image_id")): (image, t) for image, t in samples}
            drawn = annotations_sheet(outliers, by_id, class_names or (), dataset=self.dataset, most=self.max_sheet)
            if drawn is not None:
                sheet = save_png(drawn, self.run_dir / SHEET_PATTERN.format(epoch))
        seconds = time.perf_counter() - t0
        path = self.run_dir / FILE_PATTERN.format(epoch)
        summary = {
            "epoch": epoch,
            "num_images": len(rows),
            "seed": self.seed,
            "statistics": self.statistics,
            "rule": {"k_mad": self.k, "min_ratio": self.min_ratio, "min_images": MIN_IMAGES},
            "seconds": seconds,
            "cost_share": seconds / train_seconds if train_seconds else None,  # of the epoch's training time
            "medians": medians(rows),
            "outliers": outliers,
            "images_to_check": [image_id for image_id, _ in worst],
            "sheet": sheet.name if sheet is not None else None,
            "rows": rows,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(summary), indent=1))
        if worst:
            shown = ", ".join(f"{image_id} ({found[0][0]} {found[0][1]['value']:.3g}, median {found[0][1]['median']:.3g})"
                              for image_id, found in worst[:5])
            log.info("Per-image losses (epoch %d, %d training images, %.1f s): annotations to check: images %s%s; see %s",
                     epoch, len(rows), seconds, shown, " ..." if len(worst) > 5 else "", sheet.name if sheet else path.name)
        return {"epoch": epoch, "path": path, "sheet": sheet, "outliers": outliers,
                "images_to_check": summary["images_to_check"], "medians": summary["medians"], "seconds": seconds}
