"""Reading finished runs back for a person: per tag first/best/last and the trend, the run's diagnostics.

``python scripts/inspect_runs.py PATH...`` (``maskrcnn_coco.cli.inspect_runs``) is the command; this
module is its logic, plain functions over plain data:

* ``find_runs(path)``: the run folders under ``path`` (itself, a multirun's job folders, a whole
  ``runs/maskrcnn``): folders holding an event file or ``metrics.jsonl``;
* ``load_run(path, name)``: a ``Run`` with its scalars (``read_scalars``, the event files as
  TensorBoard reads them; ``metrics.jsonl`` only for runs without an event file), its
  ``diagnostics.jsonl`` findings and its class names (``classes.json``: a per-class AP row shows
  its class's name as written beside the tag's ASCII key);
* ``summarise(points, tag)``: first, best (with its epoch), last, the trend over the run and the
  change in the last epoch; ``format_run(run)``: one aligned text table per run;
* ``write_csv(runs, path)`` (long format ``run,tag,epoch,value``) and ``plot_runs(runs, path)``.

Tags are those of ``maskrcnn_coco.tracking.scalars``; steps are epochs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskrcnn_coco.analysis.diagnostics import DIAGNOSTICS_FILE, LAST_FOUND_FILE, as_key, no_longer_found, rank_findings
from maskrcnn_coco.analysis.history import HISTORY_FILE, read_history
from maskrcnn_coco.analysis.runs import read_scalars
from maskrcnn_coco.config import DiagnosticsConfig
from maskrcnn_coco.tracking.scalars import (
    CLASS_AP_PREFIX,
    IOU_TYPES,
    LOSS_COMPONENTS,
    METRIC_NAMES,
    TRAIN_ONLY_TOTAL,
    TRAIN_TOTAL,
    VAL_TOTAL,
    loss_tag,
    map_tag,
    read_class_names,
)
from maskrcnn_coco.utils.errors import UserError

EVENT_FILE_MARK = "tfevents"
# A change of at most this share of the larger value (first vs last, or over the last epoch) is "flat":
# the run monitors' threshold of what counts as falling (``diagnostics.fall_rel``, 0.02), one number.
DEFAULT_FLAT_TOL = DiagnosticsConfig.fall_rel

Points = list[tuple[int, float]]

ARROWS = {"falling": "↓", "rising": "↑", "flat": "→"}


class NoRunError(UserError):
    """A PATH given to ``inspect_runs`` that is no run folder and holds none."""


# ----------------------------------------------------------------------------- finding runs
def is_event_file(path: Path) -> bool:
    return path.is_file() and EVENT_FILE_MARK in path.name


def is_run_dir(path: Path) -> bool:
    """A folder with a TensorBoard event file or an epoch history (``metrics.jsonl``)."""
    if not path.is_dir():
        return False
    return (path / HISTORY_FILE).is_file() or any(is_event_file(p) for p in path.iterdir())


def _job_key(path: Path) -> tuple[str, int, str]:
    """Sweep jobs ``<n>_<overrides>`` in job order, other folders by name."""
    head = path.name.split("_", 1)[0]
    return (str(path.parent), int(head) if head.isdigit() else 10**9, path.name)


def find_runs(path: str | Path) -> list[Path]:
    """``path`` itself when it is a run folder (or a run's event file or ``metrics.jsonl``), else
    every run folder below it (a run's own sub-folders are not searched; hidden folders such as
    ``.hydra`` are skipped). Raises ``NoRunError`` naming ``path`` when there is none."""
    path = Path(path)
    if not path.exists():
        raise NoRunError(f"{path}: no such file or folder")
    if path.is_file() and (is_event_file(path) or path.name == HISTORY_FILE):
        path = path.parent  # a run's event file or history given directly
    if is_run_dir(path):
        return [path]
    found = []
    if path.is_dir():
        for root, dirs, _ in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if is_run_dir(Path(root)) and Path(root) != path:
                found.append(Path(root))
                dirs[:] = []
    if not found:
        raise NoRunError(
            f"{path}: no run folder there (a run folder holds an event file events.out.tfevents.* or {HISTORY_FILE})"
        )
    return sorted(found, key=_job_key)


def run_names(paths: Sequence[Path]) -> list[str]:
    """Each run's folder name (a sweep job's job folder name), with as many parent folders as it
    takes to tell apart runs of the same name (``<sweep>/0_optimizer.lr=0.01``)."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashes = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clashes and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


# ----------------------------------------------------------------------------- reading a run
@dataclass
class Run:
    """A run read back: ``scalars`` ``{tag: [(epoch, value), ...]}``, where they came from, the
    findings of ``diagnostics.jsonl`` (None when the run has no such file) and ``class_names``
    ``{key: name as written}`` (``classes.json``; empty without it)."""

    name: str
    path: Path
    scalars: dict[str, Points]
    source: str
    diagnostics: list[dict[str, Any]] | None = None
    skipped_diagnostics: int = 0
    epochs: tuple[int, int] | None = None
    class_names: dict[str, str] = field(default_factory=dict)
    # The last epoch each finding held and the epoch checked up to (``LAST_FOUND_FILE``; empty/None without it).
    last_found: dict[tuple[Any, ...], int] = field(default_factory=dict)
    checked_epoch: int | None = None


def history_scalars(history: Iterable[Mapping[str, Any]]) -> dict[str, Points]:
    """``read_history``'s records as ``{tag: [(epoch, value)]}``, finite numbers only."""
    scalars: dict[str, Points] = {}
    for record in history:
        for tag, value in record.items():
            if tag != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                scalars.setdefault(tag, []).append((int(record["epoch"]), float(value)))
    return {tag: sorted(points) for tag, points in sorted(scalars.items())}


def read_diagnostics(run_dir: str | Path) -> tuple[list[dict[str, Any]] | None, int]:
    """(findings of ``diagnostics.jsonl``, number of unreadable lines skipped); (None, 0) without
    the file. Records are kept as written: unknown keys are carried, missing ones left out."""
    path = Path(run_dir) / DIAGNOSTICS_FILE
    if not path.is_file():
        return None, 0
    findings, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict):
            findings.append(record)
        else:
            skipped += 1
    return findings, skipped


def read_last_found(run_dir: str | Path) -> tuple[dict[tuple[Any, ...], int], int | None]:
    """``LAST_FOUND_FILE`` read back: ({finding key: last epoch it held}, the epoch checked up to);
    ({}, None) without the file (runs before it existed) or when it cannot be read."""
    try:
        payload = json.loads((Path(run_dir) / LAST_FOUND_FILE).read_text())
        return {as_key(k): int(e) for k, e in payload["last_found"]}, int(payload["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}, None


def load_run(path: str | Path, name: str | None = None) -> Run:
    """A run folder's scalars (its event files through ``read_scalars``; ``metrics.jsonl`` when it
    has no event file) and diagnostics."""
    path = Path(path)
    events = sorted(p.name for p in path.iterdir() if is_event_file(p))
    if events:
        scalars = read_scalars(path)
        source = events[0] if len(events) == 1 else f"{len(events)} event files"
    else:
        scalars = history_scalars(read_history(path))
        source = f"{HISTORY_FILE} (no event file)"
    diagnostics, skipped = read_diagnostics(path)
    steps = [step for points in scalars.values() for step, _ in points]
    epochs = (min(steps), max(steps)) if steps else None
    return Run(name or path.name, path, scalars, source, diagnostics, skipped, epochs, read_class_names(path),
               *read_last_found(path))


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run under each of ``paths`` (see ``find_runs``), each once, named by ``run_names``.
    Raises ``NoRunError`` for the first path without a run."""
    found: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        for run_dir in find_runs(p):
            key = run_dir.resolve()
            if key not in seen:
                seen.add(key)
                found.append(run_dir)
    return [load_run(p, n) for p, n in zip(found, run_names(found))]


# ----------------------------------------------------------------------------- summarising
def best_mode(tag: str) -> str | None:
    """``min`` for losses, ``max`` for mAP, None where "best" means nothing (lr, time, ...)."""
    if tag.startswith("loss/"):
        return "min"
    if tag.startswith("mAP/"):
        return "max"
    return None


def direction(before: float, after: float, tol: float = DEFAULT_FLAT_TOL) -> str:
    """``falling``, ``rising`` or ``flat`` (a change of at most ``tol`` times the larger magnitude)."""
    if abs(after - before) <= tol * max(abs(before), abs(after)):
        return "flat"
    return "falling" if after < before else "rising"


def relative_change(before: float, after: float) -> float:
    """``(after - before) / |before|``; ±inf from 0, 0 when equal."""
    if after == before:
        return 0.0
    if before == 0:
        return math.copysign(math.inf, after - before)
    return (after - before) / abs(before)


@dataclass(frozen=True)
class Summary:
    """One tag of one run: first, best and last ``(epoch, value)``, the trend from first to last and
    the direction of the last epoch's change (None with a single value)."""

    tag: str
    first: tuple[int, float]
    best: tuple[int, float] | None
    last: tuple[int, float]
    trend: str | None
    change: float | None
    last_step: str | None
    last_step_change: float | None

    @property
    def worse(self) -> bool:
        """A loss that rose or a metric that fell over the run."""
        mode = best_mode(self.tag)
        return (mode == "min" and self.trend == "rising") or (mode == "max" and self.trend == "falling")


def summarise(points: Sequence[tuple[int, float]], tag: str, tol: float = DEFAULT_FLAT_TOL) -> Summary | None:
    """First/best/last of ``points`` (non-finite values ignored); None when nothing is left."""
    points = sorted((int(s), float(v)) for s, v in points if math.isfinite(v))
    if not points:
        return None
    first, last = points[0], points[-1]
    mode = best_mode(tag)
    best = None
    if mode is not None:  # ties go to the earliest epoch
        best = (min if mode == "min" else max)(points, key=lambda p: p[1])
    trend = change = last_step = last_step_change = None
    if len(points) > 1:
        trend, change = direction(first[1], last[1], tol), relative_change(first[1], last[1])
        prev = points[-2]
        last_step, last_step_change = direction(prev[1], last[1], tol), relative_change(prev[1], last[1])
    return Summary(tag, first, best, last, trend, change, last_step, last_step_change)


def table_tags(scalars: Mapping[str, Any], all_tags: bool = False) -> list[str]:
    """The tags a run's table shows, in reading order: train total and components, val total and
    components, bbox then segm COCO metrics; ``all_tags`` adds every other tag (per-class AP, lr, ...)."""
    order = [
        TRAIN_TOTAL, TRAIN_ONLY_TOTAL, *(loss_tag("train", c) for c in LOSS_COMPONENTS),
        VAL_TOTAL, *(loss_tag("val", c) for c in LOSS_COMPONENTS),
        *(map_tag(iou, m) for iou in IOU_TYPES for m in METRIC_NAMES),
    ]
    tags = [t for t in order if t in scalars]
    if all_tags:
        tags += sorted(t for t in scalars if t not in order)
    return tags


# ----------------------------------------------------------------------------- text
def fmt_value(value: float) -> str:
    return f"{value:.4g}"


def fmt_change(change: float | None) -> str:
    if change is None:
        return ""
    if math.isinf(change):
        return "from 0"
    return f"{change:+.1%}"


PAST = {"falling": "fell", "rising": "rose", "flat": "flat"}


def _trend_cell(word: str | None, change: float | None, worse: bool = False, past: bool = False) -> str:
    if word is None:
        return "-"
    return f"{ARROWS[word]} {PAST[word] if past else word} {fmt_change(change)}" + (" !" if worse else "")


TABLE_HEADER = ("tag", "first", "best", "@ep", "last", "trend (first→last)", "last epoch")
RIGHT_ALIGNED = {"first", "best", "@ep", "last"}


def tag_label(tag: str, class_names: Mapping[str, str]) -> str:
    """``tag``, a per-class AP tag followed by its class's name as written where that is not its key
    (``mAP/segm_AP_class_u81ea_u8ee2_u8eca (自転車)``)."""
    _, sep, key = tag.partition("_" + CLASS_AP_PREFIX)
    name = class_names.get(key) if sep and tag.startswith("mAP/") else None
    return f"{tag} ({name})" if name is not None and name != key else tag


def summary_row(s: Summary, class_names: Mapping[str, str] | None = None) -> list[str]:
    best_value, best_epoch = (fmt_value(s.best[1]), str(s.best[0])) if s.best else ("-", "-")
    return [
        tag_label(s.tag, class_names or {}), fmt_value(s.first[1]), best_value, best_epoch, fmt_value(s.last[1]),
        _trend_cell(s.trend, s.change, s.worse), _trend_cell(s.last_step, s.last_step_change, past=True),
    ]


def legend(tol: float = DEFAULT_FLAT_TOL) -> str:
    """What the table's columns mean (printed once under the tables)."""
    return (f"best: lowest loss, highest mAP (@ep: its epoch). trend: last vs first value; last epoch: last vs\n"
            f"previous value; 'flat' within {tol:.0%} of the larger. !: a loss that rose or a metric that fell.")


def text_width(text: str) -> int:
    """Terminal columns of ``text``: two for a wide character (CJK), none for a combining mark."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def align(rows: Sequence[Sequence[str]], header: Sequence[str], indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell (``text_width``); numeric columns right-aligned."""
    widths = [max(text_width(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = []
    for row in (header, *rows):
        pads = [" " * (w - text_width(c)) for c, w in zip(row, widths)]
        cells = [p + c if h in RIGHT_ALIGNED else c + p for c, p, h in zip(row, pads, header)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _compact(value: Any, limit: int = 60) -> str:
    if isinstance(value, float):
        text = fmt_value(value)
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_compact(v, limit) for v in value) + "]"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}: {_compact(v, limit)}" for k, v in value.items()) + "}"
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_diagnostic(record: Mapping[str, Any], note: str | None = None) -> list[str]:
    """One finding (``Diagnosis.to_json``: a line of ``diagnostics.jsonl``) in two or three lines;
    tolerant of missing and unknown keys (``components`` as a list, or ``component`` as one name).
    A finding of ``severity`` ``info`` is marked so; a probe finding (``batch``, no epoch) names its batch;
    ``note``: e.g. "no longer found at epochs 3-5" (``no_longer_found``)."""
    components = record.get("components", record.get("component"))
    if isinstance(components, (list, tuple)):
        components = ", ".join(map(str, components))
    when = (f"batch {record['batch']}" if record.get("epoch") is None and record.get("batch") is not None
            else f"epoch {record.get('epoch', '?')}")
    head = [when, str(record.get("kind", "?"))]
    if record.get("severity") == "info":
        head.append("info")
    if note:
        head.append(note)
    head += [str(x) for x in (components, record.get("subject")) if x]
    key = record.get("config_key")
    if key:
        head.append(f"change {key}")
    lines = ["    " + " · ".join(head)]
    cause = record.get("cause") or record.get("message")
    if cause:
        lines.append(f"      cause: {cause}")
    evidence = record.get("evidence")
    if isinstance(evidence, Mapping) and evidence:
        lines.append("      evidence: " + ", ".join(f"{k}={_compact(v)}" for k, v in evidence.items()))
    return lines


def format_diagnostics(run: Run) -> list[str]:
    if run.diagnostics is None:
        return [f"  diagnostics: no {DIAGNOSTICS_FILE}"]
    k = run.skipped_diagnostics
    skipped = f" ({k} unreadable line{'s' if k != 1 else ''} skipped)" if k else ""
    if not run.diagnostics:
        return [f"  diagnostics: none{skipped}"]
    n = len(run.diagnostics)
    lines = [f"  diagnostics: {n} finding{'s' if n != 1 else ''}{skipped}, warnings first, strongest first"]
    for record in rank_findings(run.diagnostics):
        note = no_longer_found(record, run.last_found, run.checked_epoch) if run.checked_epoch else None
        lines += format_diagnostic(record, note)
    return lines


def format_run(run: Run, tol: float = DEFAULT_FLAT_TOL, all_tags: bool = False) -> str:
    """The text block of one run: a header line, the table, the diagnostics."""
    epochs = f"epochs {run.epochs[0]}-{run.epochs[1]}" if run.epochs else "no values"
    lines = [f"== {run.name} ==  {run.path}", f"  {epochs}, {len(run.scalars)} tags, read from {run.source}"]
    summaries = [s for tag in table_tags(run.scalars, all_tags) if (s := summarise(run.scalars[tag], tag, tol))]
    if summaries:
        lines += align([summary_row(s, run.class_names) for s in summaries], TABLE_HEADER)
    else:
        lines.append("  no loss or mAP values")
    lines += format_diagnostics(run)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files
CSV_FIELDS = ("run", "tag", "epoch", "value")


def csv_rows(runs: Sequence[Run]) -> list[tuple[str, str, int, float]]:
    """Every scalar of every run in long format: ``(run, tag, epoch, value)``."""
    return [(run.name, tag, step, value) for run in runs for tag, points in sorted(run.scalars.items()) for step, value in points]


def write_csv(runs: Sequence[Run], path: str | Path) -> int:
    """``run,tag,epoch,value`` rows (values at full precision); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = csv_rows(runs)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        writer.writerows((r, t, e, repr(v)) for r, t, e, v in rows)
    return len(rows)


def plot_title(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit]) + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")
    return f"{len(names)} run{'s' if len(names) != 1 else ''}: {shown}"


def plot_runs(runs: Sequence[Run], path: str | Path) -> str:
    """One panel per loss component (train solid, val dashed), one for the totals
    (``loss/train_total`` solid, ``loss/val`` dashed) and one for ``mAP/segm_AP``; one colour per
    run, the legend outside the axes. Writes a PNG at ``path``; returns the figure's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    panels: list[tuple[str, tuple[str, ...]]] = [
        *((c, (loss_tag("train", c), loss_tag("val", c))) for c in LOSS_COMPONENTS),
        ("total: loss/train_total, loss/val", (TRAIN_TOTAL, VAL_TOTAL)),
        ("mAP/segm_AP", ("mAP/segm_AP",)),
    ]
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    colours = [cmap(i % cmap.N) for i in range(len(runs))]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), squeeze=False)
    flat = axes.flatten()
    for ax, (title, tags) in zip(flat, panels):
        for run, colour in zip(runs, colours):
            for tag, style in zip(tags, ("-", "--")):
                points = [(s, v) for s, v in run.scalars.get(tag, []) if math.isfinite(v)]
                if points:
                    ax.plot(*zip(*points), linestyle=style, color=colour, marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in flat[len(panels):]:
        fig.delaxes(ax)
    handles = [Line2D([], [], color=c, label=run.name) for run, c in zip(runs, colours)]
    handles += [Line2D([], [], color="grey", linestyle="-", label="train"),
                Line2D([], [], color="grey", linestyle="--", label="val")]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=9, title="run")
    title = plot_title([run.name for run in runs])
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return title
