"""Loss-probe output: JSON/CSV files, console tables, a plot, and the side-by-side comparison."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS

JSON_NAME = "loss_components.json"
CSV_NAME = "loss_components.csv"
PNG_NAME = "loss_components.png"
UNITS = {
    "loss_objectness": "sampled anchors",
    "loss_rpn_box_reg": "sampled anchors",
    "loss_classifier": "sampled proposals",
    "loss_box_reg": "sampled proposals",
    "loss_mask": "positive proposals (x mask pixels)",
}


def _clean(obj: Any) -> Any:
    """JSON has no NaN/Inf: keep them as strings ("nan", "inf"), which ``float()`` reads back."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Mapping):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def csv_row(record: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "batch_idx": record["batch_idx"],
        "batch_size": record["batch_stats"]["batch_size"],
        "total_objects": record["batch_stats"]["total_objects"],
        "total_loss": record["weighted_components"]["total"],
    }
    row.update({k: record["loss_components"][k] for k in LOSS_COMPONENTS})
    row.update({f"{k}_weight": record["scaling_coefficients"][k] for k in LOSS_COMPONENTS})
    row.update({f"{k}_weighted": record["weighted_components"][k] for k in LOSS_COMPONENTS})
    row.update({f"{k}_normalizer": record["normalization_factors"][k] for k in LOSS_COMPONENTS})
    for k in LOSS_COMPONENTS:
        for level, value in record["per_level_losses"][k].items():
            row[f"{k}@{level}"] = value
    for stats in record["batch_stats"]["per_level_stats"]:
        row[f"gt_objects@{stats['level']}"] = stats["gt_objects"]
        row[f"positive_anchors@{stats['level']}"] = stats["positive_anchors"]
    row["num_warnings"] = sum(w["severity"] == "warning" for w in record["warnings"])
    row["image_ids"] = " ".join(str(i) for i in record["image_ids"])
    row["config_overrides"] = " ".join(run.get("config_overrides", []))
    row["weights"] = run.get("weights") or ""
    row["backbone_weights"] = run.get("backbone_weights") or ""
    row["seed"] = run.get("seed")
    row["split"] = run.get("split")
    return row


def write_reports(records: Sequence[Mapping[str, Any]], run: Mapping[str, Any], output_dir: str | Path, fmt: str = "both") -> list[Path]:
    """``loss_components.json`` (a list, one record per batch) and/or ``.csv``, plus the plot.

    Every JSON record and CSV row carries ``run``: the config overrides, weights, seed and split.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if fmt in ("json", "both"):
        path = output_dir / JSON_NAME
        path.write_text(json.dumps([_clean({**record, **run}) for record in records], indent=2))
        written.append(path)
    if fmt in ("csv", "both"):
        path = output_dir / CSV_NAME
        rows = [csv_row(r, run) for r in records]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["batch_idx"])
            writer.writeheader()
            writer.writerows(rows)
        written.append(path)
    if records:
        written.append(plot_probe(records, output_dir / PNG_NAME))
    return written


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from a probe output folder or file (JSON preferred, CSV accepted)."""
    path = Path(path)
    if path.is_dir():
        json_path, csv_path = path / JSON_NAME, path / CSV_NAME
        path = json_path if json_path.is_file() else csv_path
    if not path.is_file():
        raise FileNotFoundError(f"No probe output at {path} (expected {JSON_NAME} or {CSV_NAME})")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open() as f:
        rows = list(csv.DictReader(f))
    records = []
    for row in rows:
        per_level: dict[str, dict[str, float]] = {k: {} for k in LOSS_COMPONENTS}
        for key, value in row.items():
            if "@" in key and key.split("@")[0] in per_level:
                comp, level = key.split("@", 1)
                per_level[comp][level] = float(value)
        weighted_total_value = float(row["total_loss"])
        records.append({
            "batch_idx": int(row["batch_idx"]),
            "loss_components": {k: float(row[k]) for k in LOSS_COMPONENTS},
            "weighted_components": {**{k: float(row[f"{k}_weighted"]) for k in LOSS_COMPONENTS}, "total": weighted_total_value},
            "per_level_losses": per_level,
        })
    return records


def component_means(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean over batches of each raw component, plus the weighted total."""
    means = {}
    for k in LOSS_COMPONENTS:
        values = [float(r["loss_components"][k]) for r in records]
        means[k] = statistics.fmean(values) if values else math.nan
    totals = [float(r["weighted_components"]["total"]) for r in records]
    means["total (weighted)"] = statistics.fmean(totals) if totals else math.nan
    return means


def level_means(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for k in LOSS_COMPONENTS:
        levels: dict[str, list[float]] = {}
        for r in records:
            for level, value in r["per_level_losses"][k].items():
                levels.setdefault(level, []).append(float(value))
        out[k] = {level: statistics.fmean(v) for level, v in levels.items()}
    return out


def format_batch(record: Mapping[str, Any], verbose: bool = False) -> str:
    """One batch as a console table (with per-level breakdown when ``verbose``)."""
    stats = record["batch_stats"]
    raw, w, wc = record["loss_components"], record["scaling_coefficients"], record["weighted_components"]
    total = wc["total"]
    lines = [
        (
            f"Batch {record['batch_idx']}: {stats['batch_size']} images, {stats['total_objects']} objects, "
            f"{stats['num_levels']} FPN levels | image ids {record['image_ids']}"
        ),
        f"  {'component':<18} {'raw':>9} {'weight':>7} {'weighted':>9} {'share':>7}  normalised by",
    ]
    for k in LOSS_COMPONENTS:
        share = wc[k] / total * 100 if total and math.isfinite(total) else math.nan
        lines.append(
            f"  {k:<18} {raw[k]:>9.4f} {w[k]:>7.2f} {wc[k]:>9.4f} {share:>6.1f}%  "
            f"{record['normalization_factors'][k]} {UNITS[k]}"
        )
    lines.append(f"  {'total':<18} {raw['total']:>9.4f} {'':>7} {total:>9.4f}")
    if verbose:
        levels = [s["level"] for s in stats["per_level_stats"]]
        lines.append(f"  {'level':<8} {'stride':>6} {'grid':>9} {'anchors':>8} {'gt objs':>8} {'density':>8} {'pos anch':>8}")
        for s in stats["per_level_stats"]:
            grid = f"{s['grid'][0]}x{s['grid'][1]}"
            gt = s["gt_objects"] if s["pooled_by_roi_heads"] else "-"
            lines.append(
                f"  {s['level']:<8} {s['stride'] or '-':>6} {grid:>9} {s['anchors']:>8} {gt:>8} "
                f"{s['object_density']:>8.4f} {s['positive_anchors']:>8}"
            )
        header = "  " + f"{'per-level loss':<18}" + "".join(f"{lv:>10}" for lv in levels)
        lines.append(header)
        for k in LOSS_COMPONENTS:
            lines.append("  " + f"{k:<18}" + "".join(f"{record['per_level_losses'][k].get(lv, 0.0):>10.4f}" for lv in levels))
    for warning in record["warnings"]:
        lines.append(f"  [{warning['severity']}] {warning['message']}")
    return "\n".join(lines)


def format_summary(records: Sequence[Mapping[str, Any]]) -> str:
    means = component_means(records)
    lines = [f"Mean over {len(records)} batches:"]
    lines += [f"  {k:<18} {v:>9.4f}" for k, v in means.items()]
    counts: dict[str, int] = {}
    for r in records:
        for w in r["warnings"]:
            counts[f"{w['severity']}:{w['code']}"] = counts.get(f"{w['severity']}:{w['code']}", 0) + 1
    if counts:
        lines.append("Diagnoses: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    else:
        lines.append("Diagnoses: none")
    return "\n".join(lines)


def format_comparison(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], name_a: str, name_b: str, verbose: bool = False) -> str:
    """Side-by-side component means of two probe outputs with their ratio (B / A)."""
    ma, mb = component_means(a), component_means(b)
    width = max(14, len(name_a), len(name_b))
    lines = [
        f"{'component':<20} {name_a:>{width}} {name_b:>{width}} {'B/A':>8}",
        "-" * (20 + 2 * width + 11),
    ]
    for k in ma:
        ratio = mb[k] / ma[k] if ma[k] and math.isfinite(ma[k]) else math.nan
        lines.append(f"{k:<20} {ma[k]:>{width}.4f} {mb[k]:>{width}.4f} {ratio:>8.2f}")
    lines.append(f"(A: {len(a)} batches, B: {len(b)} batches)")
    if verbose:
        la, lb = level_means(a), level_means(b)
        lines.append("Per level:")
        for k in LOSS_COMPONENTS:
            for level in sorted(set(la[k]) | set(lb[k])):
                va, vb = la[k].get(level, math.nan), lb[k].get(level, math.nan)
                ratio = vb / va if va and math.isfinite(va) else math.nan
                lines.append(f"  {k + '@' + level:<26} {va:>{width}.4f} {vb:>{width}.4f} {ratio:>8.2f}")
    return "\n".join(lines)


def plot_probe(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Left: weighted components stacked per batch. Right: mean per-level contribution per component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5))
    x = np.arange(len(records))
    bottom = np.zeros(len(records))
    for k in LOSS_COMPONENTS:
        values = np.array([float(r["weighted_components"][k]) for r in records])
        values = np.where(np.isfinite(values), values, 0.0)
        left.bar(x, values, bottom=bottom, label=k)
        bottom += values
    left.set_xticks(x, [str(r["batch_idx"]) for r in records])
    left.set_xlabel("batch")
    left.set_ylabel("weighted loss")
    left.set_title("Weighted components per batch (stacked = optimised total)")
    left.legend(fontsize=8)

    means = level_means(records)
    levels = list(dict.fromkeys(lv for k in LOSS_COMPONENTS for lv in means[k]))
    width = 0.8 / max(len(levels), 1)
    for i, level in enumerate(levels):
        right.bar(np.arange(len(LOSS_COMPONENTS)) + i * width, [means[k].get(level, 0.0) for k in LOSS_COMPONENTS], width, label=f"level {level}")
    right.set_xticks(np.arange(len(LOSS_COMPONENTS)) + width * (len(levels) - 1) / 2, [k.replace("loss_", "") for k in LOSS_COMPONENTS])
    right.set_ylabel("mean contribution (raw)")
    right.set_title("Per-FPN-level contribution of each component")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
