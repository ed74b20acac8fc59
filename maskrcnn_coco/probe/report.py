"""Loss-probe output: JSON/CSV files, console tables, a plot, and the side-by-side comparison."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from maskrcnn_coco.engine.per_image import K_MAD, MIN_RATIO, POSITIVE_ONLY, medians, rank_outliers, ranked_per_positive
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS

JSON_NAME = "loss_components.json"
# The version of a JSON record's layout, its top-level ``schema`` field. 2: findings (``warnings``) are
# ``Diagnosis.to_json`` objects (``kind``, ``severity``, ``components``, ``batch``, ``image_ids``, ...;
# 1, without the field, had ``code`` and ``component``) and ``anchor_fit`` is ``audit.anchor_fit``'s.
SCHEMA = 2
CSV_NAME = "loss_components.csv"
PNG_NAME = "loss_components.png"
UNITS = {
    "loss_objectness": "sampled anchors",
    "loss_rpn_box_reg": "sampled anchors",
    "loss_classifier": "sampled proposals",
    "loss_box_reg": "sampled proposals",
    "loss_mask": "positive proposals (x mask pixels)",  # those matched to an instance with a mask
}


# Under the verbose per-level table: which rule puts an object on a level, per column.
LEVEL_LEGEND = (
    "gt(anch): objects whose size sqrt(w*h) is nearest this level's anchor sizes (the RPN's view; density = "
    "gt(anch) / grid cells / images)",
    "pos anch: anchors the RPN sampler drew as positive here (IoU matching: an object may match on two levels)",
    "gt(RoI): objects whose box the RoI pooler maps here, floor(4 + log2(sqrt(w*h)/224)) clamped to the "
    "pooled levels: where their box/mask losses come from (- : level not pooled)",
)
SAMPLING_KEYS = (
    "rpn_sampled_anchors", "rpn_positive_anchors", "roi_sampled_proposals", "roi_positive_proposals",
    "mask_positive_proposals", "mask_box_only_proposals",
)
# What each component's value depends on besides the predictions: (positives, sampled, label,
# proportional). A proportional component sums over the positives and divides by all sampled, so
# its value follows the number of positives; the others change with the positive/negative mix.
SAMPLING_CONTEXT: dict[str, tuple[str, str | None, str, bool]] = {
    "loss_objectness": ("rpn_positive_anchors", "rpn_sampled_anchors", "RPN pos/sampled anchors", False),
    "loss_rpn_box_reg": ("rpn_positive_anchors", "rpn_sampled_anchors", "RPN pos/sampled anchors", True),
    "loss_classifier": ("roi_positive_proposals", "roi_sampled_proposals", "RoI pos/sampled proposals", False),
    "loss_box_reg": ("roi_positive_proposals", "roi_sampled_proposals", "RoI pos/sampled proposals", True),
    "loss_mask": ("mask_positive_proposals", None, "mask positives", False),
}
# Positives changing by more than this factor between two probes drive a component's ratio.
CONTEXT_FACTOR = 1.5
NO_VALUE = "\u2014"  # an em dash: a ratio of 0/0, or a value missing from one side


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
        row[f"gt_objects_roi@{stats['level']}"] = stats["gt_objects_roi"]
        row[f"positive_anchors@{stats['level']}"] = stats["positive_anchors"]
    row.update({key: record["sampling"].get(key, "") for key in SAMPLING_KEYS})
    row["num_warnings"] = sum(w["severity"] == "warning" for w in record["warnings"])
    row["image_ids"] = " ".join(str(i) for i in record["image_ids"])
    row["config_overrides"] = " ".join(run.get("config_overrides", []))
    row["weights"] = run.get("weights") or ""
    row["backbone_weights"] = run.get("backbone_weights") or ""
    row["seed"] = run.get("seed")
    row["split"] = run.get("split")
    row["statistics"] = record.get("normalisation", {}).get("statistics", "")
    return row


def write_reports(records: Sequence[Mapping[str, Any]], run: Mapping[str, Any], output_dir: str | Path, fmt: str = "both") -> list[Path]:
    """``loss_components.json`` (a list, one record per batch) and/or ``.csv``, plus the plot.

    Every JSON record carries ``schema`` (``SCHEMA``) and, like every CSV row, ``run``: the config
    overrides, weights, seed and split.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if fmt in ("json", "both"):
        path = output_dir / JSON_NAME
        path.write_text(json.dumps([_clean({"schema": SCHEMA, **record, **run}) for record in records], indent=2))
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
        written.append(plot_probe(records, output_dir / PNG_NAME, plot_title(records, run)))
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
        level_stats = []
        for key, value in row.items():
            if "@" in key and key.split("@")[0] in per_level:
                comp, level = key.split("@", 1)
                per_level[comp][level] = float(value)
            elif key.startswith("positive_anchors@"):
                level_stats.append({"level": key.split("@", 1)[1], "positive_anchors": float(value)})
        weighted_total_value = float(row["total_loss"])
        records.append({
            "batch_idx": int(row["batch_idx"]),
            "loss_components": {k: float(row[k]) for k in LOSS_COMPONENTS},
            "weighted_components": {**{k: float(row[f"{k}_weighted"]) for k in LOSS_COMPONENTS}, "total": weighted_total_value},
            "per_level_losses": per_level,
            "batch_stats": {"per_level_stats": level_stats},
            # Older CSVs have no sampling columns: the comparison then shows no context.
            "sampling": {k: float(row[k]) for k in SAMPLING_KEYS if row.get(k) not in (None, "")},
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
    box_only = record.get("sampling", {}).get("mask_box_only_proposals", 0)
    for k in LOSS_COMPONENTS:
        share = wc[k] / total * 100 if total and math.isfinite(total) else math.nan
        # Said only when there are some, so an all-masked batch reads as it always did.
        skipped = f"; {box_only} box-only positives skipped (no mask)" if k == "loss_mask" and box_only else ""
        lines.append(
            f"  {k:<18} {raw[k]:>9.4f} {w[k]:>7.2f} {wc[k]:>9.4f} {share:>6.1f}%  "
            f"{record['normalization_factors'][k]} {UNITS[k]}{skipped}"
        )
    lines.append(f"  {'total':<18} {raw['total']:>9.4f} {'':>7} {total:>9.4f}")
    if verbose:
        levels = [s["level"] for s in stats["per_level_stats"]]
        lines.append(
            f"  {'level':<8} {'stride':>6} {'grid':>9} {'anchors':>8} {'gt(anch)':>8} {'density':>8} {'pos anch':>8} {'gt(RoI)':>8}"
        )
        for s in stats["per_level_stats"]:
            grid = f"{s['grid'][0]}x{s['grid'][1]}"
            pooled = s.get("gt_objects_roi", "?") if s["pooled_by_roi_heads"] else "-"
            lines.append(
                f"  {s['level']:<8} {s['stride'] or '-':>6} {grid:>9} {s['anchors']:>8} {s['gt_objects']:>8} "
                f"{s['object_density']:>8.4f} {s['positive_anchors']:>8} {pooled:>8}"
            )
        lines += [f"  {line}" for line in LEVEL_LEGEND]
        header = "  " + f"{'per-level loss':<18}" + "".join(f"{lv:>10}" for lv in levels)
        lines.append(header)
        for k in LOSS_COMPONENTS:
            lines.append("  " + f"{k:<18}" + "".join(f"{record['per_level_losses'][k].get(lv, 0.0):>10.4f}" for lv in levels))
    for warning in record["warnings"]:
        lines.append(f"  [{warning['severity']}] {warning['message']}")
    return "\n".join(lines)


def finding_kind(finding: Mapping[str, Any]) -> str:
    """A finding's ``kind`` (schema 2), or the ``code`` of a schema-1 record."""
    return str(finding.get("kind", finding.get("code", "?")))


def format_summary(records: Sequence[Mapping[str, Any]]) -> str:
    means = component_means(records)
    lines = [f"Mean over {len(records)} batches:"]
    lines += [f"  {k:<18} {v:>9.4f}" for k, v in means.items()]
    counts: dict[str, int] = {}
    for r in records:
        for w in r["warnings"]:
            key = f"{w['severity']}:{finding_kind(w)}"
            counts[key] = counts.get(key, 0) + 1
    if counts:
        lines.append("Diagnoses: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    else:
        lines.append("Diagnoses: none")
    return "\n".join(lines)


def per_image_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The per-image rows of all records (``--per-image``), each with its ``batch_idx``."""
    return [{**row, "batch_idx": r["batch_idx"]} for r in records for row in r.get("per_image") or []]


def per_image_outliers(records: Sequence[Mapping[str, Any]], **rule: Any) -> dict[str, list[dict[str, Any]]]:
    """``engine.per_image.rank_outliers`` over every probed image of ``records``, each entry with its batch."""
    rows = per_image_rows(records)
    batch_of = {row["image_id"]: row["batch_idx"] for row in rows}
    ranked = rank_outliers(rows, **rule)
    return {c: [{**e, "batch_idx": batch_of.get(e["image_id"])} for e in entries] for c, entries in ranked.items()}


def format_per_image(records: Sequence[Mapping[str, Any]], most: int = 10, **rule: Any) -> str | None:
    """The console section of ``--per-image``: per component, the images whose value stands far above
    the rest (``engine.per_image.outlier_images``), worst first; None when the records have no rows."""
    rows = per_image_rows(records)
    if not rows:
        return None
    k, min_ratio = rule.get("k", K_MAD), rule.get("min_ratio", MIN_RATIO)
    outliers = per_image_outliers(records, **rule)
    mid = medians(rows)
    lines = [f"Per-image losses ({len(rows)} images, each alone; far above = above the median + {k:g} x MAD "
             f"and at least {min_ratio:g}x the median):"]
    unit = {c: " per positive" if ranked_per_positive(rows, c) else "" for c in LOSS_COMPONENTS}
    lines.append("  medians: " + ", ".join(f"{c}{unit[c]} {_num(mid[c], 0).strip()}" for c in LOSS_COMPONENTS))
    for component, entries in outliers.items():
        among = " (images with objects)" if component in POSITIVE_ONLY else ""
        lines.append(f"  images whose {component}{unit[component]} stands far above the rest{among}:")
        for e in entries[:most]:
            where = f"image {e['image_id']} (batch {e['batch_idx']}, {e['num_objects']} objects)"
            if not math.isfinite(e["value"]):
                lines.append(f"    {where}: non-finite ({e['loss']})")
                continue
            lines.append(f"    {where}: {e['value']:.4f} = {e['ratio']:.1f}x the median {e['median']:.4g}")
        if len(entries) > most:
            lines.append(f"    ... and {len(entries) - most} more (see per_image in {JSON_NAME})")
    if not outliers:
        lines.append("  no image stands far above the rest in any component.")
    return "\n".join(lines)


def sampling_means(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean per batch of each ``sampling`` count the records hold (none for an older CSV)."""
    out = {}
    for key in SAMPLING_KEYS:
        values = [float(r["sampling"][key]) for r in records if key in r.get("sampling", {})]
        if values and len(values) == len(records):
            out[key] = statistics.fmean(values)
    return out


def per_positive(records: Sequence[Mapping[str, Any]], component: str) -> float:
    """A proportional component's mean per positive over all batches: sum(loss x sampled) / sum(positives)."""
    pos_key, sampled_key, _, _ = SAMPLING_CONTEXT[component]
    try:
        num = sum(float(r["loss_components"][component]) * float(r["sampling"][sampled_key]) for r in records)
        den = sum(float(r["sampling"][pos_key]) for r in records)
    except KeyError:
        return math.nan
    return num / den if den else math.nan


def _ratio(b: float, a: float) -> float:
    """B / A, NaN when undefined (A zero, either side missing or not finite)."""
    return b / a if a and math.isfinite(a) and math.isfinite(b) else math.nan


def _num(value: float, width: int, spec: str = ".4f") -> str:
    return f"{value:>{width}{spec}}" if math.isfinite(value) else f"{NO_VALUE:>{width}}"


def _count(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def _positive_share_factor(sa: Mapping[str, float], sb: Mapping[str, float], component: str) -> float:
    """How much the positives (per sampled, where the loss divides by all sampled) changed from A to B:
    NaN when the records do not say, inf when A had none and B some."""
    pos_key, sampled_key, _, _ = SAMPLING_CONTEXT[component]
    if pos_key not in sa or pos_key not in sb:
        return math.nan
    share_a, share_b = sa[pos_key], sb[pos_key]
    if sampled_key is not None and sampled_key in sa and sampled_key in sb:
        share_a, share_b = share_a / max(sa[sampled_key], 1.0), share_b / max(sb[sampled_key], 1.0)
    if share_a == 0:
        return math.inf if share_b > 0 else 1.0
    return share_b / share_a


def _driven_by_sampling(factor: float) -> bool:
    return factor == 0 or (not math.isnan(factor) and max(factor, 1 / factor) > CONTEXT_FACTOR)


def _context(sa: Mapping[str, float], sb: Mapping[str, float], component: str) -> str:
    pos_key, sampled_key, label, _ = SAMPLING_CONTEXT[component]
    if pos_key not in sa or pos_key not in sb:
        return ""
    if sampled_key is None or sampled_key not in sa or sampled_key not in sb:
        return f"{label} {_count(sa[pos_key])} -> {_count(sb[pos_key])}"
    return (f"{label} {_count(sa[pos_key])}/{_count(sa[sampled_key])} -> "
            f"{_count(sb[pos_key])}/{_count(sb[sampled_key])}")


def _level_positives(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean positive anchors per batch on each level, where the records hold them."""
    counts: dict[str, list[float]] = {}
    for r in records:
        for stats in r.get("batch_stats", {}).get("per_level_stats", []):
            counts.setdefault(stats["level"], []).append(float(stats["positive_anchors"]))
    return {level: statistics.fmean(v) for level, v in counts.items() if len(v) == len(records)}


def format_comparison(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], name_a: str, name_b: str, verbose: bool = False) -> str:
    """Side-by-side component means of two probe outputs with their ratio (B / A) and, beside each
    ratio, the sampling it was computed over (positives / sampled per batch, A -> B).

    A ratio marked ``*`` is driven by the sampling: the share of positives changed by more than
    ``CONTEXT_FACTOR``; the notes below the table say how (for the box regressions, which sum over
    positives, the ratio per positive). ``\u2014`` stands for a ratio of 0/0 or a missing value.
    """
    ma, mb = component_means(a), component_means(b)
    sa, sb = sampling_means(a), sampling_means(b)
    name_a, name_b = f"A: {name_a}", f"B: {name_b}"
    width = max(14, len(name_a), len(name_b))
    lines = [
        f"{'component':<20} {name_a:>{width}} {name_b:>{width}} {'B/A':>8}  sampling per batch (A -> B)",
        "-" * (20 + 2 * width + 11 + 48),
    ]
    notes = []
    for k in ma:
        ratio = _ratio(mb[k], ma[k])
        mark, context = " ", ""
        if k in SAMPLING_CONTEXT:
            context = _context(sa, sb, k)
            factor = _positive_share_factor(sa, sb, k)
            # loss_mask is a mean per positive: their number does not scale it.
            if _driven_by_sampling(factor) and k != "loss_mask":
                mark = "*"
                pos_key, _, _, proportional = SAMPLING_CONTEXT[k]
                change = f"positives per sampled x{factor:.2f} ({_count(sa[pos_key])} -> {_count(sb[pos_key])} per batch)"
                if proportional:
                    per_pos = _ratio(per_positive(b, k), per_positive(a, k))
                    notes.append(f"  {k}: {change}; it sums over the positives and divides by all sampled, "
                                 f"so it follows their number: per positive, B/A = {_num(per_pos, 0, '.2f').strip()}")
                else:
                    notes.append(f"  {k}: {change}; it averages positives and negatives, "
                                 "so B/A also reflects the changed mix, not only the predictions")
        lines.append(f"{k:<20} {_num(ma[k], width)} {_num(mb[k], width)} {_num(ratio, 7, '.2f')}{mark}  {context}".rstrip())
    lines.append(f"(A: {len(a)} batches, B: {len(b)} batches)")
    if notes:
        lines.append(f"* driven by the sampling (share of positives changed by more than {CONTEXT_FACTOR}x):")
        lines += notes
    if verbose:
        la, lb = level_means(a), level_means(b)
        pa, pb = _level_positives(a), _level_positives(b)
        lines.append("Per level:")
        for k in LOSS_COMPONENTS:
            for level in sorted(set(la[k]) | set(lb[k])):
                va, vb = la[k].get(level, math.nan), lb[k].get(level, math.nan)
                context = ""
                if k in ("loss_objectness", "loss_rpn_box_reg") and level in pa and level in pb:
                    context = f"RPN positive anchors {_count(pa[level])} -> {_count(pb[level])}"
                lines.append(f"  {k + '@' + level:<26} {_num(va, width)} {_num(vb, width)} {_num(_ratio(vb, va), 8, '.2f')}  {context}".rstrip())
    return "\n".join(lines)


# A component's val/train ratio stands out above this factor x the median ratio of the others, or
# above SPLIT_ABSOLUTE on its own.
SPLIT_RELATIVE = 2.0
SPLIT_ABSOLUTE = 3.0


def split_ratios(train: Sequence[Mapping[str, Any]], val: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | bool]]:
    """Per component: mean on train and on val, val/train, the median ratio of the other components,
    and whether this ratio stands out (``> SPLIT_RELATIVE`` x that median, or ``> SPLIT_ABSOLUTE``)."""
    mt, mv = component_means(train), component_means(val)
    ratios = {k: _ratio(mv[k], mt[k]) for k in LOSS_COMPONENTS}
    out: dict[str, dict[str, float | bool]] = {}
    for k in LOSS_COMPONENTS:
        others = [r for c, r in ratios.items() if c != k and math.isfinite(r)]
        med = statistics.median(others) if others else math.nan
        ratio = ratios[k]
        flagged = math.isfinite(ratio) and (ratio > SPLIT_ABSOLUTE or (math.isfinite(med) and ratio > SPLIT_RELATIVE * med))
        out[k] = {"train": mt[k], "val": mv[k], "ratio": ratio, "others_median": med, "flagged": flagged}
    return out


def format_split_comparison(train: Sequence[Mapping[str, Any]], val: Sequence[Mapping[str, Any]]) -> str:
    """The two splits side by side (component means, val/train), with a warning for a component whose
    ratio stands out from the others': the split-specific failure (augmentation, annotations of one split)."""
    rows = split_ratios(train, val)
    lines = [
        f"Splits compared ({len(train)} train batches, {len(val)} val batches):",
        f"{'component':<20} {'train':>10} {'val':>10} {'val/train':>10}",
        "-" * 53,
    ]
    for k, row in rows.items():
        mark = "!" if row["flagged"] else ""
        lines.append(f"{k:<20} {_num(row['train'], 10)} {_num(row['val'], 10)} {_num(row['ratio'], 9, '.2f')}{mark}")
    for k, row in rows.items():
        if row["flagged"]:
            lines.append(
                f"[warning] {k}: val/train = {row['ratio']:.2f}, against a median of {row['others_median']:.2f} for the "
                f"other components (flagged above {SPLIT_RELATIVE:g}x that median or {SPLIT_ABSOLUTE:g} on its own): "
                "look at what differs between the splits for this component (annotations, augmentation, object sizes)"
            )
    if not any(row["flagged"] for row in rows.values()):
        lines.append("No component's val/train ratio stands out.")
    note = fresh_statistics_note(val)
    if note:
        lines.append(note)
    return "\n".join(lines)


def fresh_statistics_note(val: Sequence[Mapping[str, Any]]) -> str | None:
    """A note when the val split ran on running statistics still at their initial values (a fresh
    model): its BatchNorm layers then barely normalise (mean 0, variance 1), so val/train also measures
    batch against initial statistics, not only the splits."""
    fresh = max((int(r.get("normalisation", {}).get("initial_running_stats", 0)) for r in val), default=0)
    if not fresh or not any(r.get("normalisation", {}).get("statistics") == "running" for r in val):
        return None
    total = max(int(r.get("normalisation", {}).get("batchnorm_layers", 0)) for r in val)
    return (f"[note] val ran on running statistics, and {fresh} of {total} BatchNorm layers still hold their initial "
            "ones (mean 0, variance 1: a fresh model): val/train then also compares batch statistics (train) with "
            "no normalisation (val). Compare the splits with trained weights (--weights).")


def plot_title(records: Sequence[Mapping[str, Any]], run: Mapping[str, Any]) -> str:
    """What the plot was probed with: weights, split, config, seed and batch count."""
    weights = run.get("weights") or "none (random init)"
    backbone = f" | backbone weights: {run['backbone_weights']}" if run.get("backbone_weights") else ""
    return (f"Loss probe | weights: {weights}{backbone} | split: {run.get('split', '?')} | "
            f"config: {run.get('config', '?')} | seed {run.get('seed', '?')} | {len(records)} batch{'es' * (len(records) != 1)}")


def plot_probe(records: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Left: weighted components stacked per batch. Right: mean per-level contribution per component.

    ``title`` (see ``plot_title``) heads the figure and is stored as the PNG's ``Title`` text chunk.
    The legends sit outside the axes, so they never hide a bar.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5))
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
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)

    means = level_means(records)
    levels = list(dict.fromkeys(lv for k in LOSS_COMPONENTS for lv in means[k]))
    width = 0.8 / max(len(levels), 1)
    for i, level in enumerate(levels):
        right.bar(np.arange(len(LOSS_COMPONENTS)) + i * width, [means[k].get(level, 0.0) for k in LOSS_COMPONENTS], width, label=f"level {level}")
    right.set_xticks(np.arange(len(LOSS_COMPONENTS)) + width * (len(levels) - 1) / 2, [k.replace("loss_", "") for k in LOSS_COMPONENTS])
    right.set_ylabel("mean contribution (raw)")
    right.set_title("Per-FPN-level contribution of each component")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=max(len(levels), 1), frameon=False)
    if title:
        fig.suptitle(textwrap.fill(title, 160), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Title": title} if title else None)
    plt.close(fig)
    return path
