"""The evaluation sections: ``evaluate`` against bare inference + COCOeval, its stages, COCOeval per backend."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from maskrcnn_coco.benchmark.setup import Setup
from maskrcnn_coco.benchmark.timing import StageClock, Timing, ratios, spread, timed
from maskrcnn_coco.engine.evaluate import EvalObserver, evaluate
from maskrcnn_coco.engine.loop import move_to_device
from maskrcnn_coco.evaluation.coco_eval import coco_metrics, predictions_to_coco, resolve_backend, results_for_loadres


def bare_cocoeval(coco_gt: Any, results: list[dict[str, Any]], image_ids: Sequence[int], backend: str) -> list[float]:
    """loadRes + COCOeval evaluate/accumulate/summarize per IoU type; the 12 stats of each."""
    import contextlib
    import io

    stats: list[float] = []
    for iou_type in ("bbox", "segm"):
        usable = results_for_loadres(coco_gt, results, iou_type)
        if not usable:
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            if backend == "pycocotools":
                from pycocotools.cocoeval import COCOeval

                ev = COCOeval(coco_gt, coco_gt.loadRes(usable), iouType=iou_type)
            else:
                from faster_coco_eval import COCO as FasterCOCO
                from faster_coco_eval import COCOeval_faster

                gt = FasterCOCO(coco_gt.dataset)
                ev = COCOeval_faster(gt, gt.loadRes(usable), iouType=iou_type, print_function=lambda *a, **k: None)
            ev.params.imgIds = sorted(set(image_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats.extend(float(v) for v in ev.stats[:12])
    return stats


def bench_eval(setup: Setup, args: argparse.Namespace, log: Callable[[str], None]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    s = setup
    backend = resolve_backend(s.cfg.eval.backend)
    images = sum(len(b[0]) for b in s.val_batches)
    ids = [int(t["image_id"]) for _, targets in s.val_batches for t in targets]
    ours_t, bare_t = Timing(), Timing()
    holder: dict[str, Any] = {}

    def ours() -> None:
        holder["ours"] = evaluate(s.model, s.val_batches, s.device, mapping=s.mapping, coco_gt=s.coco_gt, progress=False,
                                  mask_threshold=s.cfg.eval.mask_threshold, backend=backend, seed=s.cfg.seed)

    def bare() -> None:
        s.model.eval()
        results = []
        with torch.inference_mode():
            for images_, targets in s.val_batches:
                images_, _ = move_to_device(images_, [], s.device)
                outputs = s.model(images_)
                results.extend(predictions_to_coco(outputs, [int(t["image_id"]) for t in targets], s.mapping, s.cfg.eval.mask_threshold))
        holder["results"] = results
        holder["bare_stats"] = bare_cocoeval(s.coco_gt, results, ids, backend)
        s.model.train()

    for _ in range(args.warmup):
        ours()
        bare()
    for rep in range(args.repeats):
        for timing, trial in [(ours_t, ours), (bare_t, bare)][:: 1 if rep % 2 == 0 else -1]:
            timing.add(*timed(trial, s.device)[1:])
        log(f"  eval repeat {rep + 1}: ours {ours_t.wall[-1]:.2f}s (cpu {ours_t.cpu[-1]:.2f}s), "
            f"bare {bare_t.wall[-1]:.2f}s (cpu {bare_t.cpu[-1]:.2f}s)")
    stages = eval_stages(s, backend, args.repeats)
    _, metrics = holder["ours"]
    ours_stats = [metrics[t][k] for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    bare_six = [v for i in range(0, len(holder["bare_stats"]), 12) for v in holder["bare_stats"][i:i + 6]]
    bare_six = [v if v >= 0 else float("nan") for v in bare_six]
    equal = len(ours_stats) == len(bare_six) and all(
        (math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(ours_stats, bare_six))
    return {"ours": ours_t.summary(images), "bare": bare_t.summary(images), "ratio": ratios(ours_t, bare_t), "stages": stages,
            "backend": backend, "images": images, "detections": len(holder["results"]), "metrics_equal": equal}, holder["results"]


LOSS_STAGES = ("rpn loss", "roi_heads loss", "losses")


def eval_stages(setup: Setup, backend: str, repeats: int) -> dict[str, Any]:
    """Where ``evaluate``'s time goes, stage by stage over the validation batches (median of
    ``repeats`` passes), and the floor that exact val losses put under the evaluation ratio: their
    own stages (the RPN and RoI heads in their loss setting, after the shared RPN head) over
    everything that bare inference + COCOeval also does."""
    s = setup
    runs = []
    for _ in range(repeats):
        clock = StageClock(s.device)
        evaluate(s.model, s.val_batches, s.device, mapping=s.mapping, coco_gt=s.coco_gt, progress=False,
                 mask_threshold=s.cfg.eval.mask_threshold, backend=backend, seed=s.cfg.seed, observer=EvalObserver(mark=clock))
        runs.append(clock.totals)
    out: dict[str, Any] = {n: {"wall": spread([r[n][0] for r in runs]), "cpu": spread([r[n][1] for r in runs])} for n in runs[0]}
    fractions = []
    for r in runs:
        losses = sum(wall for n, (wall, _) in r.items() if n in LOSS_STAGES)
        rest = sum(wall for n, (wall, _) in r.items() if n not in LOSS_STAGES)
        fractions.append(losses / rest if rest > 0 else float("nan"))
    out["losses_over_rest"] = spread(fractions)
    return out


def bench_cocoeval(setup: Setup, results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    ids = sorted({int(t["image_id"]) for _, targets in setup.val_batches for t in targets})
    backends = ["pycocotools"] + (["faster_coco_eval"] if resolve_backend("auto") == "faster_coco_eval" else [])
    timings = {b: Timing() for b in backends}
    metrics = {}
    for _ in range(args.repeats):
        for b in backends:
            metrics[b], wall, cpu = timed(lambda b=b: coco_metrics(setup.coco_gt, results, ids, backend=b), torch.device("cpu"))
            timings[b].add(wall, cpu)
    first = metrics[backends[0]]
    identical = all(_same_metrics(first, metrics[b]) for b in backends)
    return {"detections": len(results), "backends": {b: t.summary() for b, t in timings.items()}, "identical": identical}


def _same_metrics(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(a[t].keys() == b[t].keys() and all((math.isnan(x) and math.isnan(b[t][k])) or x == b[t][k]
                                                  for k, x in a[t].items()) for t in a)
