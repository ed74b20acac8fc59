"""The evaluation results path, before and after masks stayed over their boxes (issue #23 item 4).

    python scripts/results_path_benchmark.py [--sections to_coco,large,cocoeval] [--images 50]
        [--threads 1] [--cocoeval-images 5000] [--results-per-image 100]

Three sections, each printing the old path and the new side by side:

* ``to_coco``: detections -> COCO results per image at COCO size (640x480, 100 detections, boxes
  with COCO's size mix: 41% small, 34% medium, 25% large). Old: torchvision's ``paste_masks_in_image``
  (the model's postprocess) then ``predictions_to_coco`` of the full-size masks; new:
  ``predictions_to_coco`` of the masks over their boxes. Wall and CPU ms per image in this process,
  interleaved, and whether the results are equal.
* ``large``: one 4000x3000 image through an untrained ResNet-50 FPN Mask R-CNN, its detections to
  COCO results, at ``box_score_thresh`` 0 (100 detections), 0.05 (torchvision's default; the
  untrained model still keeps 100) and 1 (no detection: the model's own peak): the peak RSS of
  each, old (``model(images)``: pasted masks) and new (``evaluate_batch(..., paste_masks=False)``).
* ``cocoeval``: ``coco_metrics`` over synthetic results (``--cocoeval-images`` x
  ``--results-per-image``) per backend: the peak RSS and time of rank 0's COCOeval, before (a copy
  of the results per IoU type, the backend's ground truth indexed per call) and after, and for
  faster-coco-eval the time of a second call (its ground truth index kept from the first).

Peak RSS is per process, so each measurement runs in a child process of this script (one case
each); ``/proc/self/clear_refs`` resets the peak just before the measured step, so ``peak`` is the
step's own high-water mark and ``over`` its rise over the RSS it started from.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


# ------------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) back to the current RSS


def measured(step: Any) -> dict[str, Any]:
    """``step()``'s wall time, peak RSS and RSS rise over where it started (bytes)."""
    _reset_peak()
    start = _status_kb("VmRSS") * 1024
    t = time.perf_counter()
    value = step()
    wall = time.perf_counter() - t
    peak = _status_kb("VmHWM") * 1024
    return {"value": value, "wall_s": wall, "peak": peak, "over": peak - start}


def _child(*args: str) -> dict[str, Any]:
    threads = str(torch.get_num_threads())
    proc = subprocess.run([sys.executable, __file__, "--threads", threads, "--child", *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------- to_coco
def coco_like_detections(n_images: int, n: int = 100, h: int = 480, w: int = 640, seed: int = 0,
                         max_side: float = 400) -> list[dict[str, Any]]:
    """Detections as the RoI heads give them: boxes with COCO's size mix (large ones' side up to
    ``max_side``), 28x28 blob probabilities."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    blob = (1.3 - (xx**2 + yy**2)).clamp(0, 1)
    outs = []
    for _ in range(n_images):
        kind = rng.choice(3, size=n, p=[0.41, 0.34, 0.25])
        side = rng.uniform(np.array([4, 32, 96])[kind], np.array([32, 96, max_side])[kind])
        ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
        bw, bh = np.minimum(side * np.sqrt(ratio), w), np.minimum(side / np.sqrt(ratio), h)
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes = torch.tensor(np.stack([x0, y0, x0 + bw, y0 + bh], 1), dtype=torch.float32)
        masks = (blob + 0.3 * torch.rand(n, 1, 28, 28, generator=g) - 0.15).clamp(0, 1)
        outs.append({"boxes": boxes, "scores": torch.rand(n, generator=g), "labels": torch.randint(1, 81, (n,), generator=g),
                     "box_masks": masks, "image_size": (h, w)})
    return outs


def bench_to_coco(n_images: int, max_side: float) -> None:
    import torch.nn.functional as F
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_masks_in_image

    from maskrcnn_coco.data.coco import CategoryMapping
    from maskrcnn_coco.evaluation.coco_eval import predictions_to_coco

    mapping = CategoryMapping([{"id": i, "name": str(i)} for i in range(1, 81)])
    outs = coco_like_detections(n_images, max_side=max_side)
    area = float(np.mean([((o["boxes"][:, 2:] - o["boxes"][:, :2]).prod(1)).mean() for o in outs]))

    def old(out: dict[str, Any], image_id: int) -> tuple[list[dict[str, Any]], float]:
        t = time.process_time()
        full = {k: v for k, v in out.items() if k not in ("box_masks", "image_size")}
        full["masks"] = paste_masks_in_image(out["box_masks"], out["boxes"], out["image_size"])
        pasted = time.process_time() - t
        return predictions_to_coco([full], [image_id], mapping), pasted

    def new(out: dict[str, Any], image_id: int) -> tuple[list[dict[str, Any]], float]:
        return predictions_to_coco([out], [image_id], mapping), 0.0

    totals = {"old": [0.0, 0.0, 0.0], "new": [0.0, 0.0, 0.0]}  # wall, cpu, of which paste (cpu)
    equal = True
    for i, out in enumerate(outs):
        got = {}
        for name, path in ([("old", old), ("new", new)] if i % 2 == 0 else [("new", new), ("old", old)]):
            wall, cpu = time.perf_counter(), time.process_time()
            got[name], paste = path(out, i)
            totals[name][0] += time.perf_counter() - wall
            totals[name][1] += time.process_time() - cpu
            totals[name][2] += paste
        equal &= got["old"] == got["new"]
    # The floor of both paths: torchvision's bilinear resize of each mask to its (padded) box.
    cpu = time.process_time()
    for out in outs:
        masks, scale = expand_masks(out["box_masks"], padding=1)
        for m, (x0, y0, x1, y1) in zip(masks, expand_boxes(out["boxes"], scale).to(torch.int64).tolist()):
            F.interpolate(m[None], size=(max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)), mode="bilinear", align_corners=False)
    resize = 1e3 * (time.process_time() - cpu) / n_images
    ms = {k: [1e3 * v / n_images for v in t] for k, t in totals.items()}
    print(f"to_coco: {n_images} images 480x640, 100 detections each (mean box area {area:.0f} px), "
          f"torch threads {torch.get_num_threads()}")
    print(f"  {'':28}{'old':>12}{'new':>12}")
    print(f"  {'ms/image wall':28}{ms['old'][0]:12.1f}{ms['new'][0]:12.1f}")
    print(f"  {'ms/image CPU':28}{ms['old'][1]:12.1f}{ms['new'][1]:12.1f}")
    print(f"  {'  of which paste (CPU)':28}{ms['old'][2]:12.1f}{'-':>12}")
    print(f"  {'  of which resize (CPU)':28}{resize:12.1f}{resize:12.1f}   (torchvision's, each mask to its box)")
    print(f"  results equal: {equal}")


# ----------------------------------------------------------------------------------- large
def _large_child(path: str, thresh: float) -> dict[str, Any]:
    from maskrcnn_coco.config import ModelConfig
    from maskrcnn_coco.data.coco import CategoryMapping
    from maskrcnn_coco.engine.eval_step import evaluate_batch
    from maskrcnn_coco.evaluation.coco_eval import predictions_to_coco
    from maskrcnn_coco.modeling.build import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="maskrcnn_r50_fpn", box_score_thresh=thresh), num_classes=91).eval()
    mapping = CategoryMapping([{"id": i, "name": str(i)} for i in range(1, 91)])
    image = torch.rand(3, 3000, 4000, generator=torch.Generator().manual_seed(0))

    def step() -> list[dict[str, Any]]:
        _, outputs = evaluate_batch(model, [image], [{}], losses=False, paste_masks=path == "old")
        return predictions_to_coco(outputs, [1], mapping)

    out = measured(step)
    results = out.pop("value")
    digest = hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()
    return {**out, "detections": len(results), "digest": digest}


def bench_large(thresholds: list[float]) -> None:
    print("large: one 4000x3000 image, untrained R50-FPN (detections -> COCO results included), peak RSS (GiB)")
    print(f"  {'box_score_thresh':18}{'detections':>11}{'old peak':>10}{'new peak':>10}{'old over':>10}{'new over':>10}"
          f"{'old s':>8}{'new s':>8}  equal")
    for thresh in thresholds:
        old, new = _child("large", "old", str(thresh)), _child("large", "new", str(thresh))
        print(f"  {thresh:<18}{new['detections']:>11}{old['peak'] / GIB:10.2f}{new['peak'] / GIB:10.2f}"
              f"{old['over'] / GIB:10.2f}{new['over'] / GIB:10.2f}{old['wall_s']:8.1f}{new['wall_s']:8.1f}  "
              f"{old['digest'] == new['digest'] and old['detections'] == new['detections']}")


# -------------------------------------------------------------------------------- cocoeval
def synthetic_coco(n_images: int, per_image: int, seed: int = 0) -> tuple[Any, list[dict[str, Any]]]:
    """A COCO-like ground truth (640x480, 80 classes, ~7 polygons an image) and ``per_image``
    results an image (each object found, jittered, plus false positives), masks as compressed RLE."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    rng = np.random.default_rng(seed)
    h, w = 480, 640
    images = [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i in range(1, n_images + 1)]
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 81)]

    def polygon(x: float, y: float, bw: float, bh: float) -> list[float]:  # an octagon in the box
        px = x + bw * np.array([0.3, 0.7, 1, 1, 0.7, 0.3, 0, 0])
        py = y + bh * np.array([0, 0, 0.3, 0.7, 1, 1, 0.7, 0.3])
        return np.stack([px, py], 1).ravel().round(2).tolist()

    def boxes(n: int) -> np.ndarray:
        side = np.exp(rng.uniform(np.log(6), np.log(300), n))
        bw, bh = np.minimum(side * rng.uniform(0.7, 1.4, n), w - 1), np.minimum(side * rng.uniform(0.7, 1.4, n), h - 1)
        return np.stack([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh], 1)

    anns, results = [], []
    for image in images:
        k = max(1, rng.poisson(7))
        truth = boxes(k)
        labels = rng.integers(1, 81, k)
        for (x, y, bw, bh), c in zip(truth, labels):
            seg = [polygon(x, y, bw, bh)]
            area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))))
            anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": int(c), "bbox": [x, y, bw, bh],
                         "area": area, "iscrowd": 0, "segmentation": seg})
        found = truth + rng.normal(0, 2, truth.shape)
        found[:, 2:] = np.maximum(found[:, 2:], 2)
        dets = np.concatenate([found, boxes(per_image - k)])[:per_image]
        det_labels = np.concatenate([labels, rng.integers(1, 81, per_image)])[:per_image]
        rles = mask_utils.frPyObjects([polygon(*b) for b in dets], h, w)
        for b, c, s, rle in zip(dets.tolist(), det_labels, rng.uniform(0, 1, per_image), rles):
            results.append({"image_id": image["id"], "category_id": int(c), "bbox": b, "score": float(s),
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, results


def before_coco_metrics(coco_gt: Any, results: list[dict[str, Any]], image_ids: list[int], backend: str) -> list[float]:
    """``coco_metrics`` as it was: a fresh copy of the results per IoU type (``results_for_loadres``)
    and the backend's ground truth indexed on every call."""
    from pycocotools.cocoeval import COCOeval

    from maskrcnn_coco.evaluation.coco_eval import results_for_loadres
    from maskrcnn_coco.evaluation.ground_truth import scoring_ground_truth

    stats: list[float] = []
    scoring = scoring_ground_truth(coco_gt)
    indexed: dict[int, Any] = {}
    for iou_type in ("bbox", "segm"):
        truth = scoring[iou_type]
        usable = results_for_loadres(truth, results, iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            if backend == "pycocotools":
                ev = COCOeval(truth, truth.loadRes(usable), iouType=iou_type)
            else:
                from faster_coco_eval import COCO as FasterCOCO
                from faster_coco_eval import COCOeval_faster

                if id(truth) not in indexed:
                    indexed[id(truth)] = FasterCOCO(truth.dataset)
                gt = indexed[id(truth)]
                ev = COCOeval_faster(gt, gt.loadRes(usable), iouType=iou_type, print_function=lambda *a, **k: None)
            ev.params.imgIds = sorted(set(image_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats.extend(float(v) for v in ev.stats[:6])
    return stats


def _cocoeval_child(version: str, backend: str, n_images: int, per_image: int) -> dict[str, Any]:
    from maskrcnn_coco.evaluation.coco_eval import coco_metrics
    from maskrcnn_coco.evaluation.ground_truth import scoring_ground_truth

    coco, results = synthetic_coco(n_images, per_image)
    ids = sorted(coco.imgs)
    scoring_ground_truth(coco)  # the dataset's cleaning, done when it is built, outside the measurement
    if version == "before":
        out = measured(lambda: before_coco_metrics(coco, results, ids, backend))
        again = None
    else:
        out = measured(lambda: coco_metrics(coco, results, ids, backend=backend))
        again = None
        if backend != "pycocotools":  # its ground truth is the COCO object itself: nothing cached
            t = time.perf_counter()
            coco_metrics(coco, results, ids, backend=backend)
            again = time.perf_counter() - t
        m = out["value"]
        out["value"] = [m[t][k] for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    out["stats"] = [round(v, 12) for v in out.pop("value")]
    return {**out, "again_s": again, "results": len(results)}


def bench_cocoeval(n_images: int, per_image: int) -> None:
    from maskrcnn_coco.evaluation.coco_eval import resolve_backend

    backends = ["pycocotools"] + (["faster_coco_eval"] if resolve_backend("auto") == "faster_coco_eval" else [])
    print(f"cocoeval: rank 0's coco_metrics over {n_images} images x {per_image} results (bbox + segm), peak RSS (GiB)")
    print(f"  {'backend':18}{'version':>8}{'peak':>8}{'over':>8}{'time s':>9}{'again s':>9}  metrics equal")
    for backend in backends:
        before = _child("cocoeval", "before", backend, str(n_images), str(per_image))
        after = _child("cocoeval", "after", backend, str(n_images), str(per_image))
        equal = before["stats"] == after["stats"]
        for name, r in (("before", before), ("after", after)):
            again = f"{r['again_s']:9.1f}" if r["again_s"] is not None else f"{'-':>9}"
            print(f"  {backend:18}{name:>8}{r['peak'] / GIB:8.2f}{r['over'] / GIB:8.2f}{r['wall_s']:9.1f}{again}  {equal}")


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="to_coco,large,cocoeval")
    parser.add_argument("--images", type=int, default=50, help="to_coco: images (100 detections each)")
    parser.add_argument("--max-side", type=float, default=400, help="to_coco: the largest boxes' side (px)")
    parser.add_argument("--large-thresholds", default="0,0.05,1",
                        help="large: box_score_thresh values (1: no detection, the model's own peak)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--cocoeval-images", type=int, default=5000)
    parser.add_argument("--results-per-image", type=int, default=100)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        kind, *rest = args.child
        if kind == "large":
            out = _large_child(rest[0], float(rest[1]))
        else:
            out = _cocoeval_child(rest[0], rest[1], int(rest[2]), int(rest[3]))
        print(json.dumps(out))
        return 0
    sections = args.sections.split(",")
    if "to_coco" in sections:
        bench_to_coco(args.images, args.max_side)
    if "large" in sections:
        bench_large([float(t) for t in args.large_thresholds.split(",")])
    if "cocoeval" in sections:
        bench_cocoeval(args.cocoeval_images, args.results_per_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
