"""Sweep summaries: when a Hydra multirun ends, one table and one plot comparing its jobs.

``SweepSummaryCallback.on_multirun_end`` reads each job folder's ``metrics.jsonl`` (written by
``fit`` every epoch, by scalar tag) and ``.hydra/overrides.yaml``, and writes into the sweep folder:

* ``sweep_summary.csv`` and ``sweep_summary.md``: one row per job (overrides, each loss component's
  final train and val value, the weighted totals, bbox/segm AP and AP50, best epoch by the objective
  metric); the CSV's columns are scalar tags, the markdown's the same without ``loss/``/``loss_``;
* ``sweep_summary.png``: one panel per loss component and one for the totals, train solid and val
  dashed, one colour per job (a head lr that overfits shows as a val curve rising above its train
  curve, not only as a higher total), and one panel for the objective metric;
* a "Seeds" section (``seed_report``) when jobs differ only in ``seed``: each setting's spread over
  its seeds, and any seed that trails its siblings, with the epoch its training loss fell behind (a
  recipe that reaches 0.90 on two seeds and 0.79 on the third is unstable, not broken, and no
  per-run rule can see that).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from maskrcnn_coco.analysis.history import best_epoch, last_value, read_history, record_metric
from maskrcnn_coco.tracking.scalars import (
    DEFAULT_OBJECTIVE,
    LOSS_COMPONENTS,
    TRAIN_TOTAL,
    VAL_TOTAL,
    loss_tag,
    lower_is_better,
)

log = logging.getLogger(__name__)

# Final values shown per job, by scalar tag (the one vocabulary of maskrcnn_coco.tracking.scalars):
# each component's train and val side by side, then the weighted totals and AP.
SUMMARY_TAGS = (
    *(loss_tag(split, k) for k in LOSS_COMPONENTS for split in ("train", "val")),
    TRAIN_TOTAL,
    VAL_TOTAL,
    "mAP/bbox_AP",
    "mAP/bbox_AP50",
    "mAP/segm_AP",
    "mAP/segm_AP50",
)
SUMMARY_COLUMNS = ("job", "varied", "overrides", "epochs", *SUMMARY_TAGS, "best_epoch", "best_value")


MAX_DIRNAME = 120


# Set by the launching process (on_multirun_start) for job processes that do not see its command
# line: submitit's local and SLURM launchers run each job in a process of its own.
SWEPT_KEYS_ENV = "MASKRCNN_COCO_SWEPT_KEYS"


def override_key(override: str) -> str:
    """The config key a Hydra override sets (``+model.x=1`` -> ``model.x``)."""
    return override.split("=", 1)[0].lstrip("+~")


def swept_keys(argv: Sequence[str], sweeper_params: Mapping[str, Any] | None) -> set[str]:
    """Keys a multirun varies: sweep-syntax overrides on the command line plus the sweeper's params."""
    keys = set(sweeper_params or {})
    if os.environ.get(SWEPT_KEYS_ENV):
        return keys | set(os.environ[SWEPT_KEYS_ENV].split(","))
    candidates = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(candidates)
    except OverrideParseException:  # Hydra itself reports a bad argument; naming folders must not
        parsed = []
    keys.update(o.key_or_group for o in parsed if o.is_sweep_override())
    return keys


def task_swept_keys() -> list[str]:
    """The keys the running Hydra multirun varies (for the HParams table's ``differs``); [] outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return []
    params = HydraConfig.get().sweeper.get("params")
    params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else params
    return sorted(swept_keys(sys.argv[1:], params))


def job_dirname(task_overrides: Sequence[str], sweeper_params: Mapping[str, Any] | None = None) -> str:
    """``<key>=<value>,...`` of the swept keys only, safe as a folder name.

    Hydra's ``override_dirname`` lists every override, which grows past the file-name limit
    when a sweep also fixes many other keys; the swept values are what tells the jobs apart.
    """
    keys = swept_keys(sys.argv[1:], sweeper_params)
    parts = [o for o in task_overrides if override_key(o) in keys]
    name = re.sub(r"[/\\\s]", "_", ",".join(parts)) or "job"
    if len(name) > MAX_DIRNAME:
        name = f"{name[:MAX_DIRNAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def register_resolvers() -> None:
    """``${job_dirname:${hydra.overrides.task},${hydra.sweeper.params}}`` for ``hydra.sweep.subdir``."""
    if not OmegaConf.has_resolver("job_dirname"):
        OmegaConf.register_new_resolver(
            "job_dirname",
            lambda overrides, params=None: job_dirname(
                list(overrides), OmegaConf.to_container(params) if isinstance(params, DictConfig) else params
            ),
        )


def collect_jobs(sweep_dir: Path, metric: str = DEFAULT_OBJECTIVE) -> list[dict[str, Any]]:
    """One row per job folder of ``sweep_dir`` that has an epoch history, in job order."""
    rows = []
    job_dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for job_dir in sorted(job_dirs, key=lambda p: _job_order(p.name)):
        history = read_history(job_dir)
        if not history:
            continue
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        best = best_epoch(history, metric)
        row: dict[str, Any] = {
            "job": job_dir.name,
            "override_list": list(overrides),
            "overrides": " ".join(overrides),
            "epochs": history[-1]["epoch"],
            **{tag: last_value(history, tag) for tag in SUMMARY_TAGS},
            "best_epoch": best[0],
            "best_value": best[1],
            "history": history,
        }
        rows.append(row)
    # What tells the jobs apart: the overrides not shared by every job.
    common = set.intersection(*(set(r["override_list"]) for r in rows)) if len(rows) > 1 else set()
    for row in rows:
        row["varied"] = " ".join(o for o in row["override_list"] if o not in common) or row["job"]
    return rows


# A seed trails its siblings when its final objective is worse than their median by more than this
# share of it: a healthy recipe's seeds lie within a few percent (README "Seeds and spread").
SEED_GAP = 0.05
# ... and, for AP (0-1), by at least this much: at AP 0.0003 against 0.0000 (an untrained smoke
# sweep) the share is 100 % and means nothing.
SEED_MIN_AP_GAP = 0.02
# The epoch a trailing seed fell behind: its train total above its siblings' median by this share.
LAG_GAP = 0.10


def seed_groups(rows: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Jobs that share every override but ``seed`` (two seeds or more), in job order."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        overrides = row["override_list"]
        if any(override_key(o) == "seed" for o in overrides):
            rest = tuple(sorted(o for o in overrides if override_key(o) != "seed"))
            groups.setdefault(rest, []).append(row)
    return [g for g in groups.values() if len({_seed(r) for r in g}) > 1]


def _seed(row: Mapping[str, Any]) -> str:
    return next(o.split("=", 1)[1] for o in row["override_list"] if override_key(o) == "seed")


def _shortfall(value: float, reference: float, lower_better: bool) -> float:
    """How much worse ``value`` is than ``reference``, as a share of it (negative: better)."""
    if reference == 0:
        return 0.0
    return (value - reference) / abs(reference) * (1 if lower_better else -1)


def _worse(value: float, reference: float, lower_better: bool) -> bool:
    """``value`` worse than ``reference`` by more than ``SEED_GAP`` of it (and ``SEED_MIN_AP_GAP`` for AP)."""
    if _shortfall(value, reference, lower_better) <= SEED_GAP:
        return False
    return lower_better or reference - value >= SEED_MIN_AP_GAP


def _lag_epoch(row: Mapping[str, Any], siblings: Sequence[Mapping[str, Any]]) -> tuple[int, float, float] | None:
    """(epoch, its train total, the siblings' median) at the first epoch the job's train total is
    ``LAG_GAP`` above its siblings' median; None when it never is."""
    for record in row["history"]:
        value = record_metric(record, TRAIN_TOTAL)
        others = [v for s in siblings for r in s["history"]
                  if r["epoch"] == record["epoch"] and (v := record_metric(r, TRAIN_TOTAL)) is not None]
        if value is not None and others and _shortfall(value, statistics.median(others), True) > LAG_GAP:
            return record["epoch"], value, statistics.median(others)
    return None


def seed_report(rows: Sequence[Mapping[str, Any]], metric: str = DEFAULT_OBJECTIVE) -> list[str]:
    """One line per setting run with several seeds (its final ``metric`` per seed, mean and range),
    then one line per seed that trails its siblings' median by more than ``SEED_GAP``."""
    lower = lower_is_better(metric)
    lines = []
    for group in seed_groups(rows):
        values = {_seed(r): last_value(r["history"], metric) for r in group}
        scored = {k: v for k, v in values.items() if v is not None}
        if len(scored) < 2:
            continue
        mean = sum(scored.values()) / len(scored)
        spread = max(scored.values()) - min(scored.values())
        setting = " ".join(o for o in group[0]["varied"].split() if override_key(o) != "seed")
        last = max(r["epochs"] for r in group)
        # An unfinished job's value is from an earlier epoch than its siblings': say so.
        per_seed = ", ".join(
            f"{_seed(r)}: {_fmt(values[_seed(r)])}" + (f" (epoch {r['epochs']} of {last})" if r["epochs"] < last else "")
            for r in group)
        lines.append(f"seeds {', '.join(values)}{f' of {setting}' if setting else ''}: final {metric} {per_seed} "
                     f"(mean {mean:.4f}, range {spread:.4f} = {spread / abs(mean) if mean else 0:.1%} of the mean)")
        if len(scored) == 2:
            (a, va), (b, vb) = scored.items()
            if _worse(va, vb, lower) or _worse(vb, va, lower):
                lines.append(f"seeds {a} and {b} differ by more than {SEED_GAP:.0%} in {metric}: "
                             "compare settings over 3 seeds or more")
            continue
        for row in group:
            seed, value = _seed(row), values[_seed(row)]
            siblings = [r for r in group if r is not row and values[_seed(r)] is not None]
            if value is None:
                continue
            reference = statistics.median([values[_seed(r)] for r in siblings])
            if not _worse(value, reference, lower):
                continue
            gap = _shortfall(value, reference, lower)
            line = (f"seed={seed} trails its siblings: {metric} {value:.4f} against their median "
                    f"{reference:.4f} ({gap:.1%} worse, more than {SEED_GAP:.0%})")
            lag = _lag_epoch(row, siblings)
            if lag:
                line += f"; its {TRAIN_TOTAL} fell behind at epoch {lag[0]} ({lag[1]:.3f} against {lag[2]:.3f})"
            lines.append(line + ". The recipe is seed-sensitive: quote its spread, not one seed")
    return lines


def _job_order(name: str) -> tuple[int, str]:
    head = name.split("_", 1)[0]
    return (int(head), name) if head.isdigit() else (10**9, name)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def column_label(tag: str) -> str:
    """A summary column's short name in the markdown table: ``loss/val_loss_mask`` -> ``val_mask``,
    ``loss/train_total`` -> ``train_total``; other tags as they are."""
    return tag.removeprefix("loss/").replace("_loss_", "_")


def summary_markdown(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """The table printed to the console: varied overrides only (the CSV also has all of them)."""
    cols = [c for c in SUMMARY_COLUMNS if c not in ("job", "overrides")]
    header = ["job", *(column_label(c) for c in cols[:-1]), f"best {metric}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in ("job", *cols)) + " |")
    return "\n".join(lines)


# The plot's panels: (title, train tag or None, val tag or None); train solid, val dashed.
PLOT_PANELS = (
    *((k, loss_tag("train", k), loss_tag("val", k)) for k in LOSS_COMPONENTS),
    ("total (weighted)", TRAIN_TOTAL, VAL_TOTAL),
)


def sweep_figure(rows: Sequence[Mapping[str, Any]], title: str, metric: str = DEFAULT_OBJECTIVE):
    """The summary plot as a matplotlib ``Figure`` (2 x 4 axes): one panel per loss component and one
    for the totals, each with every job's train (solid) and val (dashed) curve in the job's colour,
    one panel for ``metric``, and the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    shown = DEFAULT_OBJECTIVE if metric.startswith("loss/") else metric  # a loss objective is in the totals panel
    panels = [*PLOT_PANELS, (shown, shown, None)]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), squeeze=False)
    flat = axes.flatten()
    for ax, (name, train_tag, val_tag) in zip(flat, panels):
        for i, row in enumerate(rows):
            for tag, style in ((train_tag, "-"), (val_tag, "--")):
                points = [(r["epoch"], v) for r in row["history"] if tag and (v := record_metric(r, tag)) is not None]
                if points:
                    ax.plot(*zip(*points), linestyle=style, color=f"C{i % 10}", marker="o", markersize=3)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    legend_ax = flat[-1]
    for ax in flat[len(panels):]:
        ax.axis("off")
    handles = [Line2D([], [], color=f"C{i % 10}", label=row["varied"]) for i, row in enumerate(rows)]
    handles += [Line2D([], [], color="black", linestyle="-", label="train"),
                Line2D([], [], color="black", linestyle="--", label="val")]
    legend_ax.legend(handles=handles, loc="center", fontsize=9, title="job (varied overrides)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: Path, metric: str = DEFAULT_OBJECTIVE) -> Path:
    """Write ``sweep_figure`` to ``path`` (a PNG)."""
    import matplotlib.pyplot as plt

    fig = sweep_figure(rows, f"Sweep: {path.parent.name} ({len(rows)} jobs)", metric)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_sweep_summary(sweep_dir: str | Path, metric: str = DEFAULT_OBJECTIVE) -> str:
    """Write ``sweep_summary.{csv,md,png}`` into ``sweep_dir``; return the markdown (the table, then
    the seed report when jobs differ only in ``seed``)."""
    sweep_dir = Path(sweep_dir)
    rows = collect_jobs(sweep_dir, metric)
    if not rows:
        return ""
    with (sweep_dir / "sweep_summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = summary_markdown(rows, metric)
    seeds = seed_report(rows, metric)
    if seeds:
        table += "\n\n## Seeds\n\n" + "\n".join(f"- {line}" for line in seeds)
    (sweep_dir / "sweep_summary.md").write_text(f"# Sweep {sweep_dir.name}\n\n{table}\n")
    plot_sweep(rows, sweep_dir / "sweep_summary.png", metric)
    return table


class SweepSummaryCallback(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): summarise a finished multirun."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = config.hydra.sweeper.get("params") if "sweeper" in config.hydra else None
        params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else params
        keys = swept_keys(sys.argv[1:], params)
        if keys:
            os.environ[SWEPT_KEYS_ENV] = ",".join(sorted(keys))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(SWEPT_KEYS_ENV, None)
        sweep_dir = Path(config.hydra.sweep.dir)
        metric = config.get("objective", {}).get("metric", DEFAULT_OBJECTIVE)
        table = write_sweep_summary(sweep_dir, metric)
        if table:
            log.info("Sweep summary (%s/sweep_summary.{csv,md,png}):\n%s", sweep_dir, table)
