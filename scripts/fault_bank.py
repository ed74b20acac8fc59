"""Run the fault bank: short real runs with one planted fault each, and what the run said.

    python scripts/fault_bank.py --output runs/fault_bank [--only mask_lr,healthy_s0] [--train 400 --epochs 4]
    python scripts/fault_bank.py --output runs/fault_bank --report      # re-read finished runs

Each run is the real entry point (``maskrcnn_coco/main_mlops.py``) in a subprocess on a planted copy of
the shapes set (``maskrcnn_coco.analysis.fault_bank``). The report lists, per run, the first and last
train epoch of each component, val loss, bbox/segm AP50, and every finding of ``diagnostics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maskrcnn_coco.analysis import fault_bank as fb  # noqa: E402
from maskrcnn_coco.analysis.history import read_history  # noqa: E402
from maskrcnn_coco.config import LOSS_COMPONENTS  # noqa: E402
from maskrcnn_coco.data.shapes import ShapesParams, ensure_shapes_dataset  # noqa: E402
from maskrcnn_coco.tracking.scalars import loss_tag, map_tag  # noqa: E402

MASK_GROUP = ("+optimizer.groups.mask={{prefixes:[roi_heads.mask_head,roi_heads.mask_predictor],lr_mult:{strength}}}",
              "optimizer.groups.heads.prefixes=[roi_heads.box_head,roi_heads.box_predictor]")

# name -> (fault, extra overrides). Strengths differ from the table (#20), which the rules
# were written against.
RUNS: dict[str, tuple[fb.Fault, tuple[str, ...]]] = {
    "healthy_s0": (fb.Fault("healthy", 0), ()),
    "healthy_s3": (fb.Fault("healthy", 0), ("seed=3",)),
    "healthy_adamw": (fb.Fault("healthy", 0), ("optimizer=adamw",)),
    "healthy_roi128_s1": (fb.Fault("healthy", 0), ("seed=1", "model.box_batch_size_per_image=128")),
    "mask_lr": (fb.Fault("slow_head", 0.05, overrides=MASK_GROUP), ()),
    "masks_off": (fb.Fault("masks_off", 0.6, plant=fb.shift_masks), ()),
    "noisy_boxes": (fb.Fault("noisy_boxes", 0.35, plant=fb.jitter_boxes), ()),
    "labels": (fb.Fault("labels", 0.4, plant=fb.relabel), ()),
    "labels_s1": (fb.Fault("labels", 0.3, plant=fb.relabel), ("seed=1",)),
    "dark_val": (fb.Fault("dark_val", 0.35, split="val", images=True), ()),
    "rare": (fb.Fault("rare", 0.04, plant=fb.make_rare), ()),
    "weight_decay": (fb.Fault("weight_decay", 0.1, overrides=("optimizer.weight_decay={strength}",)), ()),
    # Fine-tuning (the common real start): losses start far below chance; run after healthy_s0.
    "healthy_pretrained": (fb.Fault("healthy", 0), ("seed=7", "model.weights={out}/healthy_s0/checkpoints/last.pth")),
    "tiny_data": (fb.Fault("tiny_data", 32, overrides=("data.max_train_images={strength:.0f}", "epochs=20",
                                                        # 160 iterations: the default 250-iteration warmup would outlast them
                                                        "scheduler.warmup_iters=100", "scheduler.milestones=[15,18]")), ()),
}


def run_one(name: str, out: Path, source, epochs: int) -> float:
    fault, extra = RUNS[name]
    planted = fb.plant(source, out / "data" / name, fault)
    overrides = [o.format(strength=fault.strength) for o in fault.overrides]
    extra = tuple(o.format(out=out) for o in extra)
    run_dir = out / name
    cmd = [sys.executable, str(REPO / "maskrcnn_coco" / "main_mlops.py"), *fb.data_overrides(planted),
           f"epochs={epochs}", "tracker=none", "progress=false", f"hydra.run.dir={run_dir}",
           "checkpoint.every_n_epochs=0", *overrides, *extra]
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
    return time.perf_counter() - start


def rediagnose(run_dir: Path, export: Path | None = None) -> list:
    """The current rules over a finished run's history, epoch by epoch, with the run's own producer lrs
    (its model and optimizer rebuilt from ``.hydra/config.yaml``) and training class counts. With
    ``export``: the history and that context as ``<export>/<run>.json`` (tests/data/fault_bank)."""
    from omegaconf import OmegaConf

    from maskrcnn_coco.analysis.diagnostics import diagnose, training_labels_disagree
    from maskrcnn_coco.cli.experiment import build_components, scaled_optimizer_config
    from maskrcnn_coco.config import register_configs
    from maskrcnn_coco.data.coco import class_instance_counts
    from maskrcnn_coco.engine.label_check import saved_checks
    from maskrcnn_coco.engine.writers import run_context
    from maskrcnn_coco.solver.param_groups import build_optimizer
    from maskrcnn_coco.tracking.scalars import class_key

    register_configs()
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    parts = build_components(cfg, progress=False)
    optimizer = build_optimizer(scaled_optimizer_config(cfg), parts.model)
    counts = {class_key(k): v for k, v in class_instance_counts(parts.data.train_loader.dataset).items()}
    lines = (run_dir / "diagnostics.jsonl").read_text().splitlines()
    start = [f for f in map(json.loads, filter(str.strip, lines)) if f["epoch"] == 0]
    context = run_context(parts.model, optimizer, parts.loss_weights, class_counts=counts, start=start,
                          train_images=len(parts.data.train_loader.dataset))
    history = read_history(run_dir)
    steps = len(parts.data.train_loader)
    if export is not None:
        keep = [k for k in history[-1] if k == "epoch" or k.startswith(("loss/", "mAP/"))]
        fixture = {"run": run_dir.name, "overrides": OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"),
                   "history": [{k: r[k] for k in keep if k in r} for r in history],
                   "loss_weights": dict(parts.loss_weights), "num_classes": len(counts), "steps_per_epoch": steps,
                   "producer_lrs": dict(context.producer_lrs), "lr_keys": dict(context.lr_keys),
                   "class_counts": counts, "start_findings": sorted(map(list, context.start_findings)),
                   "train_images": context.train_images,
                   # The label check's per-evaluation input of the training-labels rule (no rows).
                   "label_checks": saved_checks(run_dir)}
        fixture["overrides"] = [o for o in OmegaConf.to_container(fixture["overrides"]) if "/work/" not in o]
        export.mkdir(parents=True, exist_ok=True)
        (export / f"{run_dir.name}.json").write_text(json.dumps(fixture, indent=1))
    checks = dict(saved_checks(run_dir))
    found, seen = [], set()
    for i in range(len(history)):
        epoch = history[i].get("epoch", i + 1)
        window = [(e, c) for e, c in sorted(checks.items()) if e <= epoch]
        for d in [*diagnose(history[: i + 1], loss_weights=parts.loss_weights, num_classes=len(counts),
                            config=cfg.diagnostics, steps_per_epoch=steps, context=context),
                  *(training_labels_disagree(window, cfg.diagnostics) if epoch in checks else [])]:
            if d.key not in seen:
                seen.add(d.key)
                found.append(d)
    return found


def report(out: Path, names, again: bool = False, export: Path | None = None) -> str:
    lines = []
    for name in names:
        run_dir = out / name
        history = read_history(run_dir)
        if not history:
            lines.append(f"== {name}: no history")
            continue
        lines.append(f"== {name} ({len(history)} epochs)")
        for c in LOSS_COMPONENTS:
            train = [r.get(loss_tag("train", c)) for r in history]
            val = [r.get(loss_tag("val", c)) for r in history]
            lines.append(f"  {c:18s} train " + " ".join(f"{v:.4f}" if v is not None else "-" for v in train)
                         + " | val " + " ".join(f"{v:.4f}" if v is not None else "-" for v in val))
        last = history[-1]
        aps = {k: round(v, 3) for k, v in last.items() if k.startswith("mAP/") and "class" not in k
               and any(m in k for m in ("AP50", "_AP", "APs", "APl"))}
        lines.append(f"  {aps}")
        cls = {k.split("class_")[1]: [round(r.get(k, float('nan')), 3) for r in history] for k in last
               if k.startswith(map_tag("segm", "AP_class_"))}
        lines.append(f"  segm per class: {cls}")
        diag = run_dir / "diagnostics.jsonl"
        for line in (diag.read_text().splitlines() if diag.is_file() else []):
            f = json.loads(line)
            if again and f["epoch"]:
                continue  # said again below by the current rules
            lines.append(f"  [{f['epoch']}] {f['severity']} {f['kind']} {f['components']} {f['subject']}: {f['message'][:400]}")
        if again:
            for d in rediagnose(run_dir, export):
                lines.append(f"  now [{d.epoch}] {d.severity} {d.kind} {list(d.components)} {d.subject}: {d.text()[:400]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/fault_bank")
    parser.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--report", action="store_true", help="only re-read finished runs")
    parser.add_argument("--rediagnose", action="store_true", help="with --report: the current rules over the histories")
    parser.add_argument("--export", default=None, help="with --rediagnose: write each run's history and context here")
    args = parser.parse_args(argv)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    if not args.report:
        source = ensure_shapes_dataset(ShapesParams(args.train, args.val, 128, 0, 1, 4), out / "shapes")
        for name in names:
            seconds = run_one(name, out, source, args.epochs)
            print(f"{name}: {seconds:.0f} s", flush=True)
    print(report(out, names, again=args.rediagnose, export=Path(args.export) if args.export else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
