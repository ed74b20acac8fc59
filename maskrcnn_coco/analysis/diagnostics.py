"""Which part of the detector is failing, read from a run's history: pure monitor functions, and the
one finding type (``Diagnosis``) and shared rules of the monitors, the start-of-run audit and the loss probe.

Each monitor takes the history (``[{"epoch": e, <tag>: value}, ...]``, tags of
``maskrcnn_coco.tracking.scalars``), the loss weights and ``DiagnosticsConfig`` thresholds, and
returns ``Diagnosis`` objects for the latest epoch: what is seen (with its numbers), the likely
cause and the config key to change. ``DiagnosticsWriter`` (``engine/writers.py``, a hook) runs ``diagnose``
after every epoch, logs new findings as warnings and appends them to ``diagnostics.jsonl``.

No monitor fires before ``min_epoch``, and a pattern must hold for ``patience_epochs`` consecutive
epochs (a rise or a stall: that many epoch-to-epoch changes). Trend monitors also skip the epochs
that start within the first ``min_steps`` optimizer steps (warmup; ``loss_box_reg`` rises while the
RPN starts producing positives), so short and tiny runs stay quiet.
The patterns and their fixes are described in docs/LOSS_BREAKDOWN.md; each warning links its section.

``Diagnosis`` is also what the start-of-run audit (``analysis.audit``) and the loss probe
(``probe.core.probe_findings``) return, and the dominance rule (``dominance``, ``dominates``) and its
cause and key are shared with the probe, so one ``DiagnosticsConfig`` threshold decides both.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from maskrcnn_coco.config import LOSS_COMPONENTS, DiagnosticsConfig
from maskrcnn_coco.tracking.scalars import loss_tag, map_tag, on_full_val_set

DOC = "docs/LOSS_BREAKDOWN.md"
# One JSON object per finding, in the run folder (written by ``engine.writers.DiagnosticsWriter``).
DIAGNOSTICS_FILE = "diagnostics.jsonl"
# The last epoch each monitor finding still held, rewritten every epoch (diagnostics.jsonl keeps only
# the first): what the closing summary and ``inspect_runs`` mark as "no longer found".
LAST_FOUND_FILE = "diagnostics_last_found.json"

# Which config key trains each component (what a warning tells you to change).
WEIGHT_KEY = "loss.weights.{}"
# What each component trains (the modules whose parameters its gradient reaches first).
PRODUCERS: dict[str, tuple[str, ...]] = {
    "loss_objectness": ("rpn.head",),
    "loss_rpn_box_reg": ("rpn.head",),
    "loss_classifier": ("roi_heads.box_head", "roi_heads.box_predictor"),
    "loss_box_reg": ("roi_heads.box_head", "roi_heads.box_predictor"),
    "loss_mask": ("roi_heads.mask_head", "roi_heads.mask_predictor"),
}
# The lr config key of each component's producers with the default parameter groups.
LR_KEY = {
    "loss_objectness": "optimizer.groups.rpn.lr_mult",
    "loss_rpn_box_reg": "optimizer.groups.rpn.lr_mult",
    "loss_classifier": "optimizer.head_lr_multiplier",
    "loss_box_reg": "optimizer.head_lr_multiplier",
    "loss_mask": "optimizer.head_lr_multiplier",
}


def lr_config_key(group: str) -> str:
    """The config key of a (logical) parameter group's lr: the heads' multiplier, else the group's."""
    return "optimizer.head_lr_multiplier" if group == "heads" else f"optimizer.groups.{group}.lr_mult"


def chance_values(num_classes: int) -> dict[str, float]:
    """The loss of an untrained (uniform) prediction: binary cross-entropies ln 2, the box
    classifier's (K + 1)-way cross-entropy ln(K + 1) for K object classes."""
    return {"loss_mask": math.log(2.0), "loss_objectness": math.log(2.0), "loss_classifier": math.log(num_classes + 1.0)}


SPIKE_KINDS = ("loss_spike", "grad_norm_spike")


# The fields of a finding's JSON object (``Diagnosis.to_json``): a line of diagnostics.jsonl, an entry of
# the audit's and of a loss-probe record's ``warnings``.
FINDING_FIELDS = ("epoch", "kind", "severity", "components", "subject", "batch", "image_ids", "evidence", "cause",
                  "config_key", "message", "strength")


@dataclass
class Diagnosis:
    """One finding of the run's monitors, the start-of-run audit or the loss probe: ``kind``, the
    ``components`` concerned, what is seen (``message``, with numbers), the likely ``cause`` and the
    ``config_key`` to change; ``evidence`` holds the numbers. ``severity``: ``warning`` (a fault) or
    ``info`` (worth knowing, not a fault). ``epoch``: the run's epoch (0: the start of the run; None
    for a probe finding); ``batch`` and ``image_ids``: the probed batch and its COCO image ids."""

    kind: str
    components: tuple[str, ...]
    message: str
    cause: str
    config_key: str | None
    section: str
    epoch: int | None = 0
    evidence: dict[str, Any] = field(default_factory=dict)
    subject: str | None = None  # a module or class name when the finding is about one
    severity: str = "warning"
    batch: int | None = None
    image_ids: tuple[Any, ...] = ()
    strength: float = 1.0  # how far past its threshold (ranks the run's summary)

    @property
    def key(self) -> tuple[Any, ...]:
        """Identity for reporting a finding once per run; a spike once per epoch and subject (the
        components a spike names vary from one iteration to the next)."""
        return finding_key({"kind": self.kind, "components": self.components, "subject": self.subject, "epoch": self.epoch})

    def text(self) -> str:
        cause = f" Likely cause: {self.cause}." if self.cause else ""
        change = f" Change: {self.config_key}." if self.config_key else ""
        return f"{self.message}{cause}{change} (see {DOC}#{self.section})"

    def to_json(self) -> dict[str, Any]:
        """The finding as one JSON object, with the fields ``FINDING_FIELDS`` (``message`` is ``text()``)."""
        return {
            "epoch": self.epoch,
            "kind": self.kind,
            "severity": self.severity,
            "components": list(self.components),
            "subject": self.subject,
            "batch": self.batch,
            "image_ids": _plain(list(self.image_ids)),
            "evidence": _plain(self.evidence),
            "cause": self.cause,
            "config_key": self.config_key,
            "message": self.text(),
            "strength": _plain(float(self.strength)),
        }


def json_safe(obj: Any, digits: int | None = None) -> Any:
    """``obj`` as JSON can hold it: non-finite floats as null (JSON has no NaN/Inf), string keys,
    tuples as lists; floats rounded to ``digits`` when given."""
    if isinstance(obj, float):
        return (obj if digits is None else round(obj, digits)) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, digits) for v in obj]
    return obj


def _plain(obj: Any) -> Any:
    return json_safe(obj, digits=6)


@dataclass
class RunContext:
    """What the monitors know of a run beyond its history: the learning rate of each loss producer
    (``PRODUCERS``' modules) and the config key that sets it, the training instances per class name,
    and the start-of-run findings (``(kind, subject)``), so that a behaviour can confirm or withdraw them."""

    producer_lrs: Mapping[str, float] = field(default_factory=dict)
    lr_keys: Mapping[str, str] = field(default_factory=dict)
    class_counts: Mapping[str, int] = field(default_factory=dict)
    start_findings: frozenset[tuple[str, str | None]] = frozenset()
    train_images: int | None = None


# ------------------------------------------------------------------------------------ helpers
def series(history: Sequence[Mapping[str, Any]], tag: str) -> list[tuple[int, float]]:
    """``[(epoch, value)]`` of the epochs that have a finite ``tag``."""
    out = []
    for record in history:
        value = record.get(tag)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.append((int(record["epoch"]), float(value)))
    return out


def _window(history: Sequence[Mapping[str, Any]], tag: str, n: int) -> list[float] | None:
    """The last ``n`` values of ``tag``, only if the latest epoch has it."""
    points = series(history, tag)
    if len(points) < n or not history or points[-1][0] != int(history[-1]["epoch"]):
        return None
    return [v for _, v in points[-n:]]


def _changes(values: Sequence[float]) -> list[float]:
    """Relative epoch-to-epoch changes."""
    return [(b - a) / abs(a) if a else (0.0 if b == a else math.inf) for a, b in itertools.pairwise(values)]


def _fmt(values: Sequence[float]) -> str:
    return " -> ".join(f"{v:.4g}" for v in values)


def _optimised(weights: Mapping[str, float]) -> list[str]:
    return [c for c in LOSS_COMPONENTS if weights.get(c, 1.0) > 0]


def _others_fall(history, weights, exclude: str, n: int, cfg: DiagnosticsConfig) -> tuple[bool, float | None]:
    """Whether the other optimised components fell over the last ``n`` epochs: their median
    relative change is below ``-others_fall_rel``. Returns (fell, median change)."""
    drops = []
    for c in _optimised(weights):
        if c == exclude:
            continue
        values = _window(history, loss_tag("train", c), n)
        if values and values[0]:
            drops.append(values[-1] / values[0] - 1.0)
    if not drops:
        return False, None
    median = statistics.median(drops)
    return median < -cfg.others_fall_rel, median


# ------------------------------------------------------------------- dominance: one rule, shared
def optimised_weighted(values: Mapping[str, Any], weights: Mapping[str, float]) -> dict[str, float]:
    """weight x value of each optimised component (weight > 0) whose value is a finite number: what
    dominance is judged on. Zero-weight components are not optimised and never count."""
    out = {}
    for c in _optimised(weights):
        v = values.get(c)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[c] = weights.get(c, 1.0) * float(v)
    return out


def dominance(weighted: Mapping[str, float]) -> dict[str, tuple[float, float, float]]:
    """Per component of ``weighted`` (``optimised_weighted``): (its ratio to the median of the others,
    its share of their total, that median). Nothing with fewer than three components or a total <= 0;
    a component whose others' median is <= 0 is left out."""
    total = sum(weighted.values())
    if len(weighted) < 3 or total <= 0:
        return {}
    out = {}
    for c, value in weighted.items():
        median = statistics.median(v for o, v in weighted.items() if o != c)
        if median > 0:
            out[c] = (value / median, value / total, median)
    return out


def dominates(ratio: float, share: float, cfg: DiagnosticsConfig) -> bool:
    """The dominance rule of the monitors and the probe: at least ``dominance_factor`` times the median of
    the other optimised weighted components and more than ``dominance_share`` of the optimised loss.
    (Late in a healthy run the RPN terms are ~50x below the heads' (README: 0.002 vs 0.17), so the median
    of 3-4 others can be an RPN term: dominating also means holding most of the optimised loss.)"""
    return ratio >= cfg.dominance_factor and share > cfg.dominance_share


def dominance_cause(c: str, weight: float) -> tuple[str, str]:
    """(likely cause, config key) of a dominant component ``c`` at loss weight ``weight``."""
    if weight > 1.0:
        return (f"its loss weight is too large ({WEIGHT_KEY.format(c)}={weight:g}): the shared backbone follows its "
                "gradient and the other heads get too little"), WEIGHT_KEY.format(c)
    return ("its head cannot fit its targets (for the RPN: anchors that do not fit the objects, see the anchor-fit "
            "audit; for the heads: a too low learning rate)"), f"{WEIGHT_KEY.format(c)} or {LR_KEY[c]}"


def _epoch(history: Sequence[Mapping[str, Any]]) -> int:
    return int(history[-1]["epoch"]) if history else 0


def _too_early(history: Sequence[Mapping[str, Any]], cfg: DiagnosticsConfig) -> bool:
    return not history or _epoch(history) < max(cfg.min_epoch, 2)


# ----------------------------------------------------------------------------------- monitors
def stuck_at_chance(history, weights, num_classes: int, cfg: DiagnosticsConfig) -> list[Diagnosis]:
    """(b) An optimised component within ``chance_tolerance`` of its chance value and not falling for
    ``patience_epochs`` epoch-to-epoch changes while the others fall: its producer is not learning."""
    if _too_early(history, cfg):
        return []
    out = []
    n = cfg.patience_epochs + 1
    for c, chance in chance_values(num_classes).items():
        if weights.get(c, 1.0) <= 0:
            continue
        values = _window(history, loss_tag("train", c), n)
        if values is None or not all(abs(v - chance) <= cfg.chance_tolerance * chance for v in values):
            continue
        if values[-1] / values[0] - 1.0 < -cfg.fall_rel:
            continue  # still coming down through its chance value
        fell, median = _others_fall(history, weights, c, n, cfg)
        if not fell:
            continue
        producers = " and ".join(PRODUCERS[c])
        out.append(Diagnosis(
            kind="at_chance", components=(c,), section="stuck-at-chance", epoch=_epoch(history),
            message=(f"{c} is stuck at its chance value {chance:.3f} ({_fmt(values)} over the last {n} epochs) "
                     f"while the other components fell (median {median:+.0%})."),
            cause=(f"{producers} {'does' if len(PRODUCERS[c]) == 1 else 'do'} not learn: frozen or at a near-zero "
                   "learning rate (see the start-of-run audit), or its targets carry no signal"),
            config_key=LR_KEY[c],
            evidence={"values": values, "chance": chance, "others_median_change": median},
        ))
    return out


def stalled_or_rising(history, weights, num_classes: int, cfg: DiagnosticsConfig) -> list[Diagnosis]:
    """(a) An optimised component that rises, or stops falling, for ``patience_epochs`` epochs while
    the other optimised components fall (by more than ``others_fall_rel`` for a stall, more than
    ``fall_rel`` for a rise). (A component at its chance value is ``stuck_at_chance``'s.)"""
    if _too_early(history, cfg):
        return []
    out = []
    n = cfg.patience_epochs + 1
    chances = chance_values(num_classes)
    for c in _optimised(weights):
        values = _window(history, loss_tag("train", c), n)
        if values is None:
            continue
        changes = _changes(values)
        rising = all(d > cfg.rise_rel for d in changes)
        stalled = all(d > -cfg.fall_rel for d in changes)
        if not (rising or stalled):
            continue
        if c in chances and all(abs(v - chances[c]) <= cfg.chance_tolerance * chances[c] for v in values):
            continue
        fell, median = _others_fall(history, weights, c, n, cfg)
        # A stall counts only while the others clearly fall; a settled component that rises for
        # `patience_epochs` epochs is a fault whenever the others still come down at all (noisy boxes:
        # loss_box_reg +8 %, +5 % while the others' median fell 14 %).
        if not (fell or (rising and median is not None and median < -cfg.fall_rel)):
            continue
        verb = "rises" if rising else "stopped falling"
        weight = weights.get(c, 1.0)
        out.append(Diagnosis(
            kind="rising" if rising else "stalled", components=(c,), section="rising-or-stalled", epoch=_epoch(history),
            message=(f"{c} {verb} ({_fmt(values)} over the last {n} epochs) while the other optimised components "
                     f"fell (median {median:+.0%})."),
            # Targets first: noisy boxes make loss_box_reg rise and shifted masks stall loss_mask, and a
            # larger weight or lr cannot fix either (measured, scripts/fault_bank.py).
            cause=(f"its targets disagree with the images (masks or boxes that do not lie on their objects: see the "
                   f"data check at start and the per-image losses' annotations to check), its share of the optimised "
                   f"loss is too small to move {' and '.join(PRODUCERS[c])} (weight {weight:g}), or their learning "
                   "rate is too low"
                   if not rising else
                   f"its targets disagree with the images (noisy or shifted annotations: see the data check at start "
                   f"and the per-image losses' annotations to check), else the other components' gradients pull the "
                   f"shared features away from {c}, or its learning rate is too high for its head"),
            config_key=f"the training annotations (python scripts/check_dataset.py), then {WEIGHT_KEY.format(c)} or {LR_KEY[c]}",
            evidence={"values": values, "changes": changes, "others_median_change": median, "weight": weight},
        ))
    return out


def train_val_gap(history, weights, num_classes: int, cfg: DiagnosticsConfig) -> list[Diagnosis]:
    """(c) A component whose validation value does not fall while its training value falls (by more
    than ``fall_rel`` per evaluation), with the val/train ratio widening by more than ``rise_rel`` at
    each of ``patience_epochs`` evaluations."""
    if _too_early(history, cfg):
        return []
    out = []
    n = cfg.patience_epochs + 1
    for c in _optimised(weights):
        val = _window(history, loss_tag("val", c), n)
        if val is None:
            continue
        epochs = [e for e, _ in series(history, loss_tag("val", c))][-n:]
        by_epoch = dict(series(history, loss_tag("train", c)))
        if any(e not in by_epoch or by_epoch[e] <= 0 for e in epochs):
            continue
        train = [by_epoch[e] for e in epochs]
        ratios = [v / t for v, t in zip(val, train)]
        train_fell = train[-1] / train[0] - 1.0 < -cfg.fall_rel * (n - 1)
        val_not_falling = val[-1] / val[0] - 1.0 > -cfg.fall_rel
        widening = all(d > cfg.rise_rel for d in _changes(ratios))
        if not (train_fell and val_not_falling and widening):
            continue
        rising = all(d > cfg.rise_rel for d in _changes(val))
        out.append(Diagnosis(
            kind="val_rising" if rising else "train_val_gap", components=(c,), section="train-val-gap", epoch=_epoch(history),
            message=(f"validation {c} {'rises' if rising else 'does not fall'} ({_fmt(val)}) while training {c} falls "
                     f"({_fmt(train)}) over epochs {epochs[0]}-{epochs[-1]}: val/train {_fmt(ratios)}."),
            cause=("overfitting of its head to the training images, or validation annotations that differ from "
                   "training's (other labelling rules, category ids, box/mask conventions)"),
            config_key="data.augment.*, optimizer.weight_decay, epochs (fewer), or data.val_annotations",
            evidence={"val": val, "train": train, "epochs": epochs, "ratio": ratios},
        ))
    return out


def dominant_component(history, weights, num_classes: int, cfg: DiagnosticsConfig) -> list[Diagnosis]:
    """(d) A weighted component that ``dominates`` (at least ``dominance_factor`` times the median of the
    other optimised weighted components and more than ``dominance_share`` of the optimised loss) for
    ``patience_epochs`` epochs. Zero-weight components are not optimised and never count in the median."""
    if _too_early(history, cfg):
        return []
    n = max(cfg.patience_epochs, 1)
    optimised = _optimised(weights)
    if len(optimised) < 3:
        return []
    out = []
    for c in optimised:
        ratios: list[float] = []
        shares: list[float] = []
        for record in history[-n:]:
            found = dominance(optimised_weighted({o: record.get(loss_tag("train", o)) for o in optimised}, weights))
            if c not in found:
                break
            ratios.append(found[c][0])
            shares.append(found[c][1])
        if len(ratios) < n or not all(dominates(r, f, cfg) for r, f in zip(ratios, shares)):
            continue
        w = weights.get(c, 1.0)
        raw = history[-1][loss_tag("train", c)]
        cause, key = dominance_cause(c, w)
        out.append(Diagnosis(
            kind="dominant", components=(c,), section="dominant-component", epoch=_epoch(history),
            message=(f"{c} dominates the optimised loss: weight {w:g} x {raw:.4g} = {w * raw:.4g}, {shares[-1]:.0%} of "
                     f"it and {ratios[-1]:.0f}x the median of the other weighted components over the last {n} epochs "
                     f"(ratios {_fmt(ratios)})."),
            cause=cause, config_key=key,
            evidence={"ratios": ratios, "shares": shares, "weight": w, "value": raw},
        ))
    return out


def unoptimised_rising(history, weights, num_classes: int, cfg: DiagnosticsConfig) -> list[Diagnosis]:
    """(e) A component with loss weight 0 (not optimised) that rises for ``patience_epochs`` epochs."""
    if _too_early(history, cfg):
        return []
    out = []
    n = cfg.patience_epochs + 1
    for c in LOSS_COMPONENTS:
        if weights.get(c, 1.0) != 0:
            continue
        values = _window(history, loss_tag("train", c), n)
        if values is None or not all(d > cfg.rise_rel for d in _changes(values)):
            continue
        out.append(Diagnosis(
            kind="unoptimised_rising", components=(c,), section="not-optimised", epoch=_epoch(history),
            message=f"{c} rises ({_fmt(values)} over the last {n} epochs) and is not optimised (loss weight 0).",
            cause=(f"{WEIGHT_KEY.format(c)}=0: nothing trains {' and '.join(PRODUCERS[c])} for it, and the shared "
                   "features drift away from what they need"),
            config_key=WEIGHT_KEY.format(c),
            evidence={"values": values, "weight": 0.0},
        ))
    return out


# A lagging class whose AP / median AP grew by more than this over the window is catching up.
CATCHING_UP = 0.1


def class_aps(record: Mapping[str, Any], iou_type: str | None = None) -> tuple[str | None, dict[str, float]]:
    """``(IoU type, {class name: AP})`` from an epoch record's ``mAP/<iou_type>_AP_class_<name>``
    tags; without ``iou_type`` segm when it has any, else bbox."""
    for t in (iou_type,) if iou_type else ("segm", "bbox"):
        prefix = map_tag(t, "AP_class_")
        aps = {k[len(prefix):]: float(v) for k, v in record.items() if k.startswith(prefix) and isinstance(v, (int, float))}
        if aps:
            return t, aps
    return None, {}


# A class whose AP grew by at least this factor (and ``CATCHING_UP_ABS``) over the window is being
# learned, later than the others: healthy short shapes runs learn triangles last (segm AP 0.065 at
# epoch 4, 0.281 at epoch 8), and that is not a fault.
CATCHING_UP_FACTOR = 1.5
CATCHING_UP_ABS = 0.02
# A class with less than this share of the training instances, and below 1/(4K), is rare.
RARE_SHARE = 0.1


def rare_classes(class_counts: Mapping[str, int]) -> dict[str, float]:
    """The classes holding less than ``RARE_SHARE`` and less than a quarter of an even share (1/K) of
    the training instances: {name: share}."""
    total = sum(class_counts.values())
    if total <= 0 or len(class_counts) < 2:
        return {}
    even = 1.0 / len(class_counts)
    return {name: n / total for name, n in class_counts.items() if n / total < min(RARE_SHARE, 0.25 * even)}


def lagging_classes(history, weights, num_classes: int, cfg: DiagnosticsConfig, context: RunContext) -> list[Diagnosis]:
    """A class whose AP (``mAP/<segm|bbox>_AP_class_<name>``) stays below ``class_ap_ratio`` times the
    median class AP (when that median exceeds ``class_ap_min_median``) for ``patience_epochs``
    evaluations, judged against its own trajectory: a class whose AP grows (x ``CATCHING_UP_FACTOR``
    and + ``CATCHING_UP_ABS`` over the window, or its ratio to the median by ``CATCHING_UP``) is being
    learned late, not lagging, unless it is rare (``rare_classes``), which is then said with its share."""
    if _too_early(history, cfg):
        return []
    n = max(cfg.patience_epochs, 1)
    iou_type, _ = class_aps(history[-1])
    if iou_type is None:
        return []
    evaluated = [aps for r in history if (aps := class_aps(r, iou_type)[1])][-n:]
    if len(evaluated) < n:
        return []
    flagged: dict[str, list[tuple[float, float]]] = {}
    for aps in evaluated:
        if len(aps) < 2:
            return []
        median = statistics.median(aps.values())
        if median <= cfg.class_ap_min_median:
            return []
        for name, ap in aps.items():
            if ap < cfg.class_ap_ratio * median:
                flagged.setdefault(name, []).append((ap, median))
    rare = rare_classes(context.class_counts)
    total = sum(context.class_counts.values())
    out = []
    for name, points in flagged.items():
        if len(points) < n:
            continue
        ratios = [ap / median for ap, median in points]
        aps = [p[0] for p in points]
        growing = n > 1 and (ratios[-1] - ratios[0] > CATCHING_UP
                             or (aps[-1] >= CATCHING_UP_FACTOR * aps[0] and aps[-1] - aps[0] >= CATCHING_UP_ABS))
        if growing and name not in rare:
            continue  # learned later than the others, on its way: not (yet) lagging
        ap, median = points[-1]
        count = context.class_counts.get(name)
        rare_text = (f"; it is rare: {count} of {total} training instances ({rare[name]:.1%}, an even share would be "
                     f"{1 / len(context.class_counts):.0%})" if name in rare else "")
        out.append(Diagnosis(
            kind="lagging_class", components=(), subject=name, section="per-class",
            epoch=_epoch(history), strength=cfg.class_ap_ratio * median / max(ap, 1e-3),
            message=(f"class {name!r} lags: {iou_type} AP {_fmt(aps)} vs the median class AP {median:.3f} "
                     f"(below {cfg.class_ap_ratio:g}x for {n} evaluations{', not catching up' if not growing else ''}){rare_text}."),
            cause=("too few training instances of it for the model to learn it (class imbalance)" if name in rare else
                   "few or inconsistent training annotations for this class, objects of a size the anchors do not "
                   "fit, or a class the confusion matrix shows mixed up with another"),
            config_key=("more training instances of the class (or repeat-factor sampling of its images)" if name in rare else
                        "the class's training annotations (python scripts/check_dataset.py), model.anchor_sizes"),
            evidence={"iou_type": iou_type, "ap": aps, "median": [p[1] for p in points], "ratio": ratios,
                      "instances": count, "share": rare.get(name)},
        ))
    return out


def rare_class_notes(class_counts: Mapping[str, int]) -> list[Diagnosis]:
    """Start of run (info): the rare classes of the training set with their instance counts."""
    rare = rare_classes(class_counts)
    if not rare:
        return []
    total = sum(class_counts.values())
    listed = ", ".join(f"{name!r} {class_counts[name]} ({share:.1%})" for name, share in sorted(rare.items(), key=lambda kv: kv[1]))
    return [Diagnosis(
        kind="rare_class", components=(), subject=None, section="per-class", epoch=0, severity="info",
        message=f"Rare classes in the training set ({total} instances, {len(class_counts)} classes): {listed}.",
        cause="their AP will lag unless they get more instances", config_key=None,
        evidence={"rare": rare, "counts": {k: class_counts[k] for k in rare}},
    )]


def muted(finding: Diagnosis, ignore: Sequence[str]) -> bool:
    """Whether ``diagnostics.ignore`` mutes ``finding``: an entry names its kind, its subject (a class or
    module), one of its components, or ``kind:subject``."""
    if not ignore:
        return False
    names = {finding.kind, str(finding.subject), f"{finding.kind}:{finding.subject}", *finding.components}
    return any(str(entry) in names for entry in ignore)


def _class_ap(record: Mapping[str, Any], metric_name: str) -> tuple[float | None, float | None, str | None]:
    """(AP of one class, median class AP, IoU type) in an epoch record: segm, else bbox."""
    iou_type, aps = class_aps(record)
    ap = aps.get(metric_name.removeprefix("AP_class_"))
    return (ap, statistics.median(aps.values()), iou_type) if ap is not None else (None, None, None)


def confused_with_another(history, confusions: Sequence[Mapping[str, Any]], num_classes: int,
                          cfg: DiagnosticsConfig) -> list[Diagnosis]:
    """A ground-truth class whose matched detections (at least ``confusion_min_matches``) are mostly
    (> ``confusion_off_share``) given another class, in each of the last ``patience_epochs`` confusion
    matrices, when either

    * several classes are each given (>= 80 %) one distinct other class: a one-to-one swap, which a
      classifier does not learn but a relabelling makes; the validation labels are named; or
    * the class's AP also lags (below ``class_ap_ratio`` x the median class AP, that median above
      ``class_ap_min_median``): the classifier is named.

    Without either it is a classifier still sorting two classes out (in the default run squares are
    mostly detected as circles at epochs 2-3, with their AP near the others'): nothing is said.
    """
    if _too_early(history, cfg):
        return []
    n = max(cfg.patience_epochs, 1)
    if len(confusions) < n:
        return []
    per_matrix = [{row["class"]: row for row in confused_classes(m, cfg.confusion_min_matches)} for m in confusions[-n:]]
    names = set.intersection(*(set(rows) for rows in per_matrix)) if per_matrix else set()
    confused = sorted(name for name in names if all(m[name]["off_share"] > cfg.confusion_off_share for m in per_matrix))
    latest = [per_matrix[-1][name] for name in confused]
    # Several classes each given (almost always) a distinct other class: a relabelling, not a weak
    # classifier (which smears a class over others, or collapses several onto one).
    swapped = (len(latest) >= 2 and len({r["most_given"] for r in latest}) == len(latest)
               and all(r["most_given_count"] >= 0.8 * r["matched"] for r in latest))
    metric_names = dict(zip(list(confusions[-1]["ground_truth"])[:-1], confusions[-1].get("metric_names") or []))
    out = []
    for name in confused:
        rows = [m[name] for m in per_matrix]
        last = rows[-1]
        ap, median, iou_type = _class_ap(history[-1], metric_names.get(name, ""))
        lags = ap is not None and median is not None and median > cfg.class_ap_min_median and ap < cfg.class_ap_ratio * median
        if not (swapped or lags):
            continue
        ap_text = f"; its {iou_type} AP {ap:.3f} vs the median class AP {median:.3f}" if ap is not None else ""
        out.append(Diagnosis(
            kind="confused_class", components=("loss_classifier",), subject=name, section="per-class",
            epoch=_epoch(history),
            message=(f"ground-truth class {name!r}: {last['off_share']:.0%} of its {last['matched']} matched detections "
                     f"are another class (mostly {last['most_given']!r}: {last['most_given_count']}) "
                     f"in the last {n} evaluations{ap_text}."),
            cause=("the confused classes are swapped one-to-one, which a classifier does not learn: the validation "
                   "labels disagree with training's (category ids swapped or mapped differently in the validation "
                   "annotation file)"
                   if swapped else
                   f"the classifier does not tell {name!r} from {last['most_given']!r} (too few epochs, too low a heads "
                   "learning rate, look-alike classes, or training annotations that mix the two)"),
            config_key="data.val_annotations (category ids)" if swapped else
                       "optimizer.head_lr_multiplier, epochs, or the two classes' training annotations",
            evidence={"off_share": [r["off_share"] for r in rows], "matched": [r["matched"] for r in rows],
                      "most_given": last["most_given"], "swapped": swapped, "ap": ap, "median_ap": median},
        ))
    return out


# Training labels that disagree with the classifier (engine/label_check.py): the classifier gives the
# training subset's annotated objects their own label less often than the validation subset's, by at
# least LABEL_MIN_GAP at each of the last patience evaluations and significantly (one-sided z at most
# -LABEL_Z, pooled binomial) at the latest, with LABEL_MIN_OBJECTS objects on each side. Healthy short
# runs give the training subset 0.04-0.13 *more* (it is what the model fitted).
LABEL_MIN_GAP = 0.05
LABEL_Z = 1.645
LABEL_MIN_OBJECTS = 50


def label_gap_z(train: float, n_train: int, val: float, n_val: int) -> float:
    """The one-sided z of ``train - val`` for two shares of ``n_train`` and ``n_val`` objects (pooled)."""
    pooled = (train * n_train + val * n_val) / (n_train + n_val)
    spread = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n_train + 1 / n_val))
    return (train - val) / spread


def training_labels_disagree(evaluations: Sequence[tuple[int, Mapping[str, Any]]],
                             cfg: DiagnosticsConfig) -> list[Diagnosis]:
    """Per evaluation ``(epoch, label check)`` (``engine.label_check.LabelCheck``'s summary: ``train`` and
    ``val`` agreements, the ``standardised`` training share, the most confident ``disagreements``):
    the training objects agree with the classifier less often than the validation objects, for
    ``patience_epochs`` evaluations: a share of the training labels is wrong (flipped by annotators, or
    category ids mapped wrongly in the training file), while validation's are right."""
    n = max(cfg.patience_epochs, 1)
    if len(evaluations) < n:
        return []
    window = evaluations[-n:]
    gaps = []
    for _, check in window:
        train, val = check.get("train"), check.get("val")
        if not train or not val or min(train["objects"], val["objects"]) < LABEL_MIN_OBJECTS:
            return []
        share = check.get("standardised")
        share = train["share"] if share is None else share
        if val["share"] - share < LABEL_MIN_GAP:
            return []
        gaps.append((share, val["share"]))
    epoch, check = window[-1]
    train, val = check["train"], check["val"]
    share, val_share = gaps[-1]
    z = label_gap_z(share, train["objects"], val_share, val["objects"])
    if z > -LABEL_Z:
        return []
    worst = check.get("disagreements") or []
    named = ", ".join(f"ann {d['annotation_id']}" if d.get("annotation_id") is not None else
                      f"image {d['image_id']} object {d['index']}" for d in worst[:6])
    return [Diagnosis(
        kind="training_labels", components=("loss_classifier",), section="training-labels", epoch=epoch,
        strength=-z / LABEL_Z,
        message=(f"training labels disagree with the classifier: it gives {share:.0%} of {train['objects']} annotated "
                 f"objects of the training subset their own label, but {val_share:.0%} of {val['objects']} validation "
                 f"objects theirs (z {z:.1f}; in the last {n} evaluations "
                 + ", ".join(f"{t:.0%} vs {v:.0%}" for t, v in gaps)
                 + "; healthy runs give the training objects more, it is what the model fitted)"
                 + (f". Most confidently given another class: {named}" if named else "") + "."),
        cause=("a share of the training annotations carries another class than its object (labels flipped by the "
               "annotators, or category ids mapped wrongly in the training file), while validation's are right"),
        config_key="the training annotations' category ids (python scripts/check_dataset.py; the run's "
                   "label_check_epoch_NNN.json lists the objects the classifier gives another class)",
        evidence={"train": [t for t, _ in gaps], "val": [v for _, v in gaps], "z": z,
                  "train_objects": train["objects"], "val_objects": val["objects"],
                  "annotation_ids": [d.get("annotation_id") for d in worst[:12]]},
    )]


def confused_classes(confusion: Mapping[str, Any], min_matches: int = 5) -> list[dict[str, Any]]:
    """Per ground-truth class of a confusion matrix (``evaluation.per_class.confusion_matrix``) with at
    least ``min_matches`` matched detections: the share of them given another class, and which."""
    names = list(confusion["ground_truth"])[:-1]
    out = []
    for i, name in enumerate(names):
        row = [int(v) for v in confusion["matrix"][i][: len(names)]]
        total = sum(row)
        if total < min_matches:
            continue
        off = {names[j]: v for j, v in enumerate(row) if j != i}
        most = max(off, key=off.get) if off else name
        out.append({"class": name, "matched": total, "correct": row[i], "off_share": (total - row[i]) / total,
                    "most_given": most, "most_given_count": off.get(most, 0)})
    return out


# ------------------------------------------------------------------ behaviour against the others
def _falls(history: Sequence[Mapping[str, Any]], components: Sequence[str]) -> dict[str, float]:
    """ln(first / latest) train value of each component over ``history`` (a fall is positive)."""
    out = {}
    for c in components:
        first, last = history[0].get(loss_tag("train", c)), history[-1].get(loss_tag("train", c))
        if all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (first, last)):
            out[c] = math.log(first / last)
    return out


# A component's fall since epoch 1 relative to the median fall of the others (log ratios), as healthy
# short runs of the shapes set give it at epochs 3-4 (scripts/fault_bank.py, tests/data/fault_bank/
# healthy_*.json: seeds 0 and 3, AdamW, 128 sampled RoIs, a fine-tuned start): loss_mask 1.33-1.74 with
# SGD from scratch (AdamW 1.00-1.09), loss_classifier 0.61-1.18, loss_rpn_box_reg 0.68-0.93 (0.42 in the
# fine-tuned start, whose others fell too little to judge), loss_objectness 2.5-8.3. At the others' lr a
# component lags below lag_ratio (0.6) x its value here, below every healthy run; with its producers
# at half the others' lr or less, below the value itself, which AdamW's mask (1.0-1.09) and the RPN
# box term (0.68) of healthy runs also fall below: there the lower lr is the stated cause either way.
# loss_box_reg is not judged: it rises while the RPN starts producing positives and then falls least
# (-0.54 to 0.49x the others in healthy runs); noisy boxes show as its rise and in the data check.
HEALTHY_RELATIVE_FALL = {"loss_classifier": 0.6, "loss_mask": 1.3, "loss_objectness": 1.0, "loss_rpn_box_reg": 0.9}


def _producer_lr(c: str, context: RunContext) -> tuple[float | None, float | None, str | None]:
    """(lr of ``c``'s producers, median lr of the other loss producers, the key that sets ``c``'s)."""
    mine = [context.producer_lrs[m] for m in PRODUCERS[c] if m in context.producer_lrs]
    others = [lr for m, lr in context.producer_lrs.items() if m not in PRODUCERS[c]]
    if not mine or not others:
        return None, None, None
    key = next((context.lr_keys[m] for m in PRODUCERS[c] if m in context.lr_keys), LR_KEY[c])
    return min(mine), statistics.median(others), key


def lagging_component(history, weights, num_classes: int, cfg: DiagnosticsConfig, context: RunContext) -> list[Diagnosis]:
    """One component that falls far less than the others: its fall since the first epoch (log ratio)
    relative to the median fall of the other optimised components below what healthy runs show for
    its kind (``HEALTHY_RELATIVE_FALL``; x ``lag_ratio`` when its producers learn at the others' lr),
    at the latest and the previous epoch, at epoch ``lag_min_epoch`` or the next, while the others fell by more than
    ``others_fall_rel``. The cause is read off the producers' learning rate: at most half the other
    producers' -> that lr and its key; the same -> its targets (annotations)."""
    # Judged at epochs lag_min_epoch and the next only: the healthy references were measured there
    # (a 32-image run's 20 epochs of 8 steps compare nothing like them).
    if len(history) < 2 or _epoch(history) not in (cfg.lag_min_epoch, cfg.lag_min_epoch + 1):
        return []
    optimised = _optimised(weights)
    now, before = _falls(history, optimised), _falls(history[:-1], optimised)
    if len(now) < 3:
        return []
    out = []
    for c in optimised:
        if c not in HEALTHY_RELATIVE_FALL or now.get(c, 0.0) <= 0:
            continue  # not judged, or rising or flat: the trend monitors' (rising, stalled, at chance)
        ratios = []
        for falls in (before, now):
            others = statistics.median(v for o, v in falls.items() if o != c) if len(falls) > 1 else 0.0
            if c not in falls or others < -math.log(1.0 - cfg.others_fall_rel):
                break
            ratios.append(falls[c] / others)
        lr, other_lr, key = _producer_lr(c, context)
        slow_lr = bool(lr is not None and other_lr and lr <= 0.5 * other_lr)
        # Producers at a lower lr than the others' (which the start-of-run audit lets pass above 1/100):
        # falling slower than any healthy run confirms it; at the same lr the lag must be clear.
        limit = HEALTHY_RELATIVE_FALL[c] * (1.0 if slow_lr else cfg.lag_ratio)
        if len(ratios) < 2 or not all(r < limit for r in ratios):
            continue
        first, last = history[0][loss_tag("train", c)], history[-1][loss_tag("train", c)]
        others_text = ", ".join(f"{o} {math.expm1(-v):+.0%}" for o, v in now.items() if o != c)
        producers = " and ".join(PRODUCERS[c])
        if slow_lr:
            cause = (f"{producers} learn at lr {lr:.3g}, {other_lr / lr:.0f}x below the other loss producers' {other_lr:.3g}: "
                     f"{c} follows its slower head")
            change = key
        else:
            cause = (f"{producers} learn at the same lr as the others, so {c}'s targets are the likely cause: masks or "
                     "boxes that do not match their objects (see the data check at start and the per-image losses' "
                     "'annotations to check'), else a head too weak for them") if lr is not None else (
                     f"a learning rate of {producers} below the other heads', or {c}'s targets (annotations)")
            change = f"the training annotations (python scripts/check_dataset.py), then {LR_KEY[c]}"
        out.append(Diagnosis(
            kind="lagging_component", components=(c,), section="lagging-component", epoch=_epoch(history),
            message=(f"{c} lags the other components: {math.expm1(-now[c]):+.0%} since epoch {history[0]['epoch']} "
                     f"({first:.4g} -> {last:.4g}) while {others_text}; its fall is {ratios[-1]:.2f}x the others' "
                     f"median (healthy short runs: >= {HEALTHY_RELATIVE_FALL[c]:.2f}x, flagged below {limit:.2f}x)."),
            cause=cause, config_key=change,
            evidence={"fall_ratio": ratios, "limit": limit, "first": first, "last": last,
                      "falls": {o: math.expm1(-v) for o, v in now.items()}, "producer_lr": lr, "other_lr": other_lr},
        ))
    return out


def _evaluated(history: Sequence[Mapping[str, Any]], *tags: str) -> list[Mapping[str, Any]]:
    return [r for r in history if all(isinstance(r.get(t), (int, float)) and r[t] >= 0 for t in tags)]


# segm AP50 / bbox AP50 in healthy short runs of the shapes set (scripts/fault_bank.py).
HEALTHY_SEGM_BBOX = (0.9, 1.05)


def metric_disparity(history, weights, num_classes: int, cfg: DiagnosticsConfig, context: RunContext) -> list[Diagnosis]:
    """Box and mask quality far apart: segm AP50 below ``disparity_low`` x bbox AP50 (the mask branch
    fails where the boxes succeed) or the opposite, for ``patience_epochs`` evaluations, overall or for
    one class (AP per class); and small objects far behind large ones (bbox APs < 0.2 x APl)."""
    if _too_early(history, cfg):
        return []
    n = max(cfg.patience_epochs, 1)
    s50, b50 = map_tag("segm", "AP50"), map_tag("bbox", "AP50")
    evaluated = _evaluated(history, s50, b50)[-n:]
    if len(evaluated) < n or evaluated[-1] is not history[-1]:
        return []
    low, floor = cfg.disparity_low, cfg.disparity_min_ap50
    pairs = [(r[s50], r[b50]) for r in evaluated]
    healthy = f"healthy short runs: {HEALTHY_SEGM_BBOX[0]:g}-{HEALTHY_SEGM_BBOX[1]:g}"
    out = []
    mask_bad = all(b >= floor and sg < low * b for sg, b in pairs)
    box_bad = all(sg >= floor and b < low * sg for sg, b in pairs)
    if mask_bad or box_bad:
        sg, b = pairs[-1]
        branch, comp, other = (("mask", "loss_mask", "boxes") if mask_bad else ("box", "loss_box_reg", "masks"))
        out.append(Diagnosis(
            kind="metric_disparity", components=(comp,), subject=branch, section="metric-disparity",
            epoch=_epoch(history), strength=(b / max(sg, 1e-6)) if mask_bad else (sg / max(b, 1e-6)),
            message=(f"segm AP50 {sg:.3f} vs bbox AP50 {b:.3f} (ratio {sg / b if b else math.inf:.2f}; {healthy}) in the "
                     f"last {n} evaluations: the {branch} branch fails where the {other} succeed."),
            cause=(("training masks that do not lie on their objects (shifted, flipped or from another image; see the "
                    "data check at start), a mask head that does not learn (its lr), or a mask threshold far off")
                   if mask_bad else
                   "training boxes that do not match their objects (careless or shifted boxes), or a box head that does "
                   "not learn"),
            config_key=("the training masks (python scripts/check_dataset.py), then optimizer.head_lr_multiplier"
                        if mask_bad else "the training boxes (python scripts/check_dataset.py)"),
            evidence={"segm_AP50": [p[0] for p in pairs], "bbox_AP50": [p[1] for p in pairs], "healthy": HEALTHY_SEGM_BBOX},
        ))
    else:
        per_class = [(class_aps(r, "segm")[1], class_aps(r, "bbox")[1]) for r in evaluated]
        names = set.intersection(*(set(sa) & set(ba) for sa, ba in per_class)) if per_class else set()
        for name in sorted(names):
            rows = [(sa[name], ba[name]) for sa, ba in per_class]
            if all(b >= floor and sg < low * b for sg, b in rows):
                sg, b = rows[-1]
                out.append(Diagnosis(
                    kind="metric_disparity", components=("loss_mask",), subject=name, section="metric-disparity",
                    epoch=_epoch(history), strength=b / max(sg, 1e-6),
                    message=(f"class {name!r}: segm AP {sg:.3f} vs bbox AP {b:.3f} (ratio {sg / b:.2f}) in the last {n} "
                             f"evaluations: its masks fail where its boxes succeed."),
                    cause=f"the masks of {name!r} in the training annotations do not lie on their objects, or are drawn another way",
                    config_key=f"the training masks of {name!r} (python scripts/check_dataset.py)",
                    evidence={"segm_AP": [r[0] for r in rows], "bbox_AP": [r[1] for r in rows]},
                ))
    small, large = map_tag("bbox", "APs"), map_tag("bbox", "APl")
    sizes = [(r[small], r[large]) for r in _evaluated(history, small, large)[-n:]]
    if len(sizes) == n and all(al >= floor and a_s < 0.2 * al for a_s, al in sizes):
        a_s, al = sizes[-1]
        out.append(Diagnosis(
            kind="metric_disparity", components=("loss_objectness", "loss_rpn_box_reg"), subject="object size",
            section="metric-disparity", epoch=_epoch(history), strength=0.2 * al / max(a_s, 1e-6),
            message=(f"small objects far behind large ones: bbox APs {a_s:.3f} vs APl {al:.3f} (ratio {a_s / al:.2f}; "
                     f"Mask R-CNN R50-FPN on COCO ends near 0.45) in the last {n} evaluations."),
            cause="anchors too large for the small objects, or images resized so small objects fall below the finest FPN level",
            config_key="model.anchor_sizes, model.min_size / model.max_size",
            evidence={"APs": [p[0] for p in sizes], "APl": [p[1] for p in sizes]},
        ))
    return out


def first_evaluation_gap(history, weights, num_classes: int, cfg: DiagnosticsConfig, context: RunContext) -> list[Diagnosis]:
    """At the first evaluation judged (the first settled one from ``min_epoch``: before overfitting), components whose validation loss is above
    ``first_eval_ratio`` x the epoch's training mean: validation unlike training."""
    evaluated = [r for r in history if any(loss_tag("val", c) in r for c in LOSS_COMPONENTS)
                 and int(r["epoch"]) >= max(cfg.min_epoch, 2)]
    if len(evaluated) != 1 or evaluated[0] is not history[-1]:
        return []
    record = evaluated[0]
    ratios = {}
    for c in _optimised(weights):
        val, train = record.get(loss_tag("val", c)), record.get(loss_tag("train", c))
        if isinstance(val, (int, float)) and isinstance(train, (int, float)) and train > 0 and math.isfinite(val):
            ratios[c] = val / train
    high = {c: r for c, r in ratios.items() if r > cfg.first_eval_ratio}
    if not high:
        return []
    detail = ", ".join(f"{c} val {record[loss_tag('val', c)]:.4g} vs train {record[loss_tag('train', c)]:.4g} ({r:.1f}x)"
                       for c, r in high.items())
    return [Diagnosis(
        kind="val_unlike_train", components=tuple(high), section="validation-unlike-training", epoch=_epoch(history),
        strength=max(high.values()) / cfg.first_eval_ratio,
        message=(f"At the first evaluation (epoch {record['epoch']}) validation loss is far above training: {detail} "
                 f"(flagged above {cfg.first_eval_ratio:g}x; the epoch's training mean includes its first, untrained steps, "
                 "so healthy runs stay below it)."),
        cause=("validation images or annotations unlike training's (brightness or colour, image or object sizes, "
               "labelling rules: see the split comparison at start), or a training set so small that the model "
               "memorises it from the first epoch"),
        config_key="data.val_images / data.val_annotations (compare the splits: python scripts/check_dataset.py)",
        evidence={"ratios": ratios, "flagged": high},
    )]


# Validation loss this many times training's (the optimised totals) at ``patience_epochs`` settled
# evaluations: the model fits what validation does not share. Healthy short runs: 0.82-0.92 at epoch 4;
# 32 training images x 20 epochs: 1.61 and 1.55 at epochs 19-20.
OVERFIT_RATIO = 1.5
# Fewer training images than this are named as the likely cause.
FEW_IMAGES = 200


def overfitting(history, weights, num_classes: int, cfg: DiagnosticsConfig, context: RunContext) -> list[Diagnosis]:
    """The validation loss (sum of the optimised components) above ``OVERFIT_RATIO`` x the training
    epoch mean for ``patience_epochs`` evaluations: overfitting, named with the training set's size."""
    n = max(cfg.patience_epochs, 1)
    optimised = _optimised(weights)
    pairs = []
    for r in history:
        train = [r.get(loss_tag("train", c)) for c in optimised]
        val = [r.get(loss_tag("val", c)) for c in optimised]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (*train, *val)) and sum(train) > 0:
            pairs.append((int(r["epoch"]), sum(val), sum(train)))
    if len(pairs) < n or pairs[-1][0] != _epoch(history) or _epoch(history) < max(cfg.min_epoch, 2):
        return []
    window = pairs[-n:]
    if not all(v / t > OVERFIT_RATIO for _, v, t in window):
        return []
    ratios = [v / t for _, v, t in window]
    images = context.train_images
    few = images is not None and images < FEW_IMAGES
    unlike = sorted(str(subject) for kind, subject in context.start_findings if kind == "val_unlike_train")
    return [Diagnosis(
        kind="overfitting", components=tuple(optimised), section="train-val-gap", epoch=_epoch(history),
        strength=ratios[-1] / OVERFIT_RATIO,
        message=(f"validation loss {window[-1][1]:.4g} is {ratios[-1]:.2f}x training's {window[-1][2]:.4g} "
                 f"(ratios {_fmt(ratios)} over the last {n} evaluations; healthy short runs: 0.82-0.92)"
                 + (f" with {images} training images." if images is not None else ".")),
        cause=(f"validation unlike training: the start's split comparison found {', '.join(unlike)} apart" if unlike else
               f"too few training images ({images}): the model memorises them" if few else
               "the model fits the training images more than what validation shares with them (overfitting), "
               "or validation unlike training (see the split comparison at start)"),
        config_key=("data.val_images / data.val_annotations" if unlike else
                    "more training images, data.augment.*, fewer epochs" if few else
                    "data.augment.*, optimizer.weight_decay, epochs (fewer)"),
        evidence={"ratios": ratios, "epochs": [e for e, _, _ in window], "train_images": images},
    )]


# Median fall (log ratio since epoch 1) of the optimised components below which every component is
# slow together: healthy short runs from scratch fell 0.25-0.42 by epoch 3 and 0.44-0.64 by epoch 4
# (scripts/fault_bank.py; a mask head at 1/20 of the lr: 0.25, 0.37); weight decay 0.1: 0.15 and
# 0.16. A fine-tuned start falls 0.10 and 0.26: a flagged setting there would be confirmed by it.
HEALTHY_MEDIAN_FALL = 0.2


def optimizer_in_behaviour(history, weights, num_classes: int, cfg: DiagnosticsConfig, context: RunContext) -> list[Diagnosis]:
    """Confirms or withdraws the start's out-of-range optimizer settings (``optimizer_range`` warnings) by the
    behaviour at ``lag_min_epoch`` and the epoch after: every component slow together (median fall since
    epoch 1 below ``HEALTHY_MEDIAN_FALL``, or a loss still near its chance value) at either confirms it;
    falling as healthy runs at both withdraws it (info)."""
    flagged = sorted(str(subject) for kind, subject in context.start_findings if kind == "optimizer_range")
    first = max(cfg.lag_min_epoch, 2)
    epoch = _epoch(history)
    if not flagged or epoch not in (first, first + 1) or len(history) < 2:
        return []
    optimised = _optimised(weights)
    chances = chance_values(num_classes)

    def judged(h: Sequence[Mapping[str, Any]]) -> tuple[bool, float, dict[str, float], dict[str, float]] | None:
        falls = _falls(h, optimised)
        if not falls:
            return None
        median = statistics.median(falls.values())
        near = {c: h[-1][loss_tag("train", c)] for c in chances if c in falls
                and h[-1][loss_tag("train", c)] >= (1 - 2 * cfg.chance_tolerance) * chances[c]}
        return median < HEALTHY_MEDIAN_FALL or bool(near), median, falls, near

    now = judged(history)
    if now is None:
        return []
    slow, median, falls, near = now
    if not slow:
        # Withdrawn only after two epochs as healthy runs; one slow epoch confirms it.
        before = judged([r for r in history if int(r["epoch"]) <= first]) if epoch == first + 1 else None
        if epoch == first or (before is not None and before[0]):
            return []
    what = ", ".join(flagged)
    near_text = ("; still at chance: " + ", ".join(f"{c} {v:.3f}" for c, v in near.items())) if near else ""
    return [Diagnosis(
        kind="optimizer_confirmed" if slow else "optimizer_withdrawn", components=tuple(falls), subject=what,
        section="optimizer-out-of-range", epoch=_epoch(history), severity="warning" if slow else "info",
        message=(f"The optimizer settings flagged at start ({what}) "
                 + (f"show in training: every component slow together, median fall {math.expm1(-median):+.0%} since "
                    f"epoch {history[0]['epoch']} (healthy short runs: {math.expm1(-HEALTHY_MEDIAN_FALL):+.0%} or more){near_text}."
                    if slow else
                    f"do not show in training so far: median fall {math.expm1(-median):+.0%} since epoch "
                    f"{history[0]['epoch']}, as healthy runs.")),
        cause="the out-of-range setting holds every head back (weight decay pulls the weights to 0, a too low lr)" if slow else "",
        config_key=", ".join(f"optimizer.{k}" if k in ("weight_decay", "lr") else k for k in flagged) if slow else None,
        evidence={"median_fall": math.expm1(-median), "falls": {c: math.expm1(-v) for c, v in falls.items()},
                  "near_chance": near},
    )]


# Monitors that read the run's context (lrs, class counts, the start's findings) beside the history.
CONTEXT_MONITORS = (lagging_classes, metric_disparity)


# Monitors of a loss trend: they read only the epochs past the first ``min_steps`` optimizer steps.
TREND_MONITORS = (stuck_at_chance, stalled_or_rising, train_val_gap, unoptimised_rising)
# Monitors of a level (dominance, per-class AP): from ``min_epoch`` with ``patience_epochs``.
LEVEL_MONITORS = (dominant_component,)


# ------------------------------------------------------------------------ iteration-level spikes
# The groups of the default parameter groups -> the components whose gradient reaches them first.
GROUP_COMPONENTS: dict[str, tuple[str, ...]] = {
    "rpn": ("loss_objectness", "loss_rpn_box_reg"),
    "heads": ("loss_classifier", "loss_box_reg", "loss_mask"),
}
SPIKE_KEY = "optimizer.lr, scheduler.warmup_iters or optimizer.clip_grad_norm"


def _set_components(name: str) -> tuple[str, ...]:
    """The components a gradient-norm set (``module.roi_heads_mask_predictor``, ``heads``) is trained by."""
    by_module = tuple(c for c in LOSS_COMPONENTS if name in {"module." + m.replace(".", "_") for m in PRODUCERS[c]})
    return by_module or GROUP_COMPONENTS.get(name, ())


def iteration_spikes(
    epoch: int,
    *,
    loss: tuple[float, int, Mapping[str, float]] | None,
    loss_reference: tuple[float, Mapping[str, float]] | None,
    grad_norms: Mapping[str, tuple[float, int]],
    grad_references: Mapping[str, float],
    window: int,
    config: DiagnosticsConfig | None = None,
) -> list[Diagnosis]:
    """Spikes in one window of ``window`` iterations (between two read-backs), before they become a NaN.

    ``loss``: the window's largest weighted total, its iteration and the raw components there;
    ``loss_reference``: the lowest window-mean total of the run so far and the component means of that
    window. ``grad_norms``: per set, the window's largest measured norm and its iteration;
    ``grad_references``: per set, the median of its recent windows' mean norms. A spike is a value
    ``spike_loss_factor`` (``spike_grad_factor``) times its reference or more; the loss spike names the
    components that rose most against their own reference.
    """
    cfg = config if config is not None else DiagnosticsConfig()
    out: list[Diagnosis] = []
    if loss is not None and loss_reference is not None and cfg.spike_loss_factor > 0:
        value, iteration, parts = loss
        ref, ref_parts = loss_reference
        if ref > 0 and math.isfinite(value) and value >= cfg.spike_loss_factor * ref:
            rises = {c: parts[c] / ref_parts[c] for c in parts if ref_parts.get(c, 0) > 0 and math.isfinite(parts[c])}
            top = max(rises.values(), default=0.0)
            named = tuple(c for c in LOSS_COMPONENTS if c in rises and rises[c] >= max(0.5 * top, 1.0))
            detail = ", ".join(f"{c} {parts[c]:.4g} ({rises[c]:.1f}x)" for c in named)
            out.append(Diagnosis(
                kind="loss_spike", components=named, subject="loss", section="iteration-spikes", epoch=epoch,
                message=(f"Loss spike in epoch {epoch} at iteration {iteration}: total {value:.4g} is "
                         f"{value / ref:.1f}x the run's lowest mean over {window} iteration{'s' if window != 1 else ''} ({ref:.4g}); "
                         f"rose most: {detail or 'no single component'}."),
                cause=("a step too large for the loss surface (learning rate, a warmup too short, no gradient "
                       "clipping); if it recurs at a low lr, a batch with unusual targets in that component"),
                config_key=SPIKE_KEY,
                evidence={"iteration": iteration, "total": value, "reference": ref, "ratio": value / ref,
                          "components": dict(parts), "component_ratios": rises},
            ))
    if cfg.spike_grad_factor > 0:
        for name, (value, iteration) in grad_norms.items():
            ref = grad_references.get(name)
            if not ref or ref <= 0 or not math.isfinite(value) or value < cfg.spike_grad_factor * ref:
                continue
            out.append(Diagnosis(
                kind="grad_norm_spike", components=_set_components(name), subject=name, section="iteration-spikes",
                epoch=epoch,
                message=(f"Gradient-norm spike in epoch {epoch} at iteration {iteration}: grad_norm/{name} "
                         f"{value:.4g} is {value / ref:.1f}x its recent mean ({ref:.4g})."),
                cause=("the update of these parameters was about to jump: a too high learning rate for them or no "
                       "gradient clipping; a NaN or a divergence often follows"),
                config_key=SPIKE_KEY,
                evidence={"iteration": iteration, "grad_norm": value, "reference": ref, "ratio": value / ref},
            ))
    return out


def settled(history: Sequence[Mapping[str, Any]], steps_per_epoch: float | None, min_steps: int) -> list[Mapping[str, Any]]:
    """The epochs that start after ``min_steps`` optimizer steps (all when ``steps_per_epoch`` is unknown)."""
    if not steps_per_epoch:
        return list(history)
    return [r for r in history if (int(r["epoch"]) - 1) * steps_per_epoch >= min_steps]


VAL_PREFIXES = ("loss/val", "mAP/", "eval/")  # what an evaluation measured


def comparable_evaluations(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``history`` without the evaluations measured on another set than the latest one (``eval.subset``'s
    fixed subset vs the full val set): their losses and APs are another measure, and the switch to
    the full set at the last epoch is no trend. Runs without a subset are returned unchanged."""
    evaluated = [r for r in history if "eval/images" in r]
    if not evaluated:
        return list(history)
    latest = on_full_val_set(evaluated[-1])
    return [r if "eval/images" not in r or on_full_val_set(r) == latest
            else {k: v for k, v in r.items() if not k.startswith(VAL_PREFIXES)} for r in history]


def diagnose(
    history: Sequence[Mapping[str, Any]],
    *,
    loss_weights: Mapping[str, float] | None = None,
    num_classes: int,
    config: DiagnosticsConfig | None = None,
    confusions: Sequence[Mapping[str, Any]] = (),
    steps_per_epoch: float | None = None,
    context: RunContext | None = None,
) -> list[Diagnosis]:
    """Every monitor's findings for the latest epoch of ``history``. ``num_classes``: object classes
    (K, background excluded); ``confusions``: the confusion matrices of the latest evaluations, oldest
    first; ``steps_per_epoch``: optimizer steps per epoch (None: every epoch counts as settled).
    Evaluations are compared only with those on the same set (``comparable_evaluations``)."""
    cfg = config if config is not None else DiagnosticsConfig()
    history = comparable_evaluations(history)
    weights = {c: float((loss_weights or {}).get(c, 1.0)) for c in LOSS_COMPONENTS}
    found: list[Diagnosis] = []
    trend = settled(history, steps_per_epoch, cfg.min_steps)
    context = context if context is not None else RunContext()
    if trend and history and trend[-1]["epoch"] == history[-1]["epoch"]:
        for monitor in TREND_MONITORS:
            found.extend(monitor(trend, weights, num_classes, cfg))
        # Relative falls are judged from epoch 1 (every component shares its transient); the first
        # evaluation's val/train ratio from the first settled one.
        named = {c for d in found for c in d.components}
        found.extend(d for d in lagging_component(history, weights, num_classes, cfg, context) if not set(d.components) & named)
        found.extend(optimizer_in_behaviour(history, weights, num_classes, cfg, context))
        found.extend(first_evaluation_gap(trend, weights, num_classes, cfg, context))
        found.extend(overfitting(trend, weights, num_classes, cfg, context))
    for monitor in LEVEL_MONITORS:
        found.extend(monitor(history, weights, num_classes, cfg))
    for monitor in CONTEXT_MONITORS:
        found.extend(monitor(history, weights, num_classes, cfg, context))
    if confusions:
        found.extend(confused_with_another(history, confusions, num_classes, cfg))
    return [d for d in found if not muted(d, cfg.ignore)]


# What a run checks (start-of-run audit, dataset checks, monitors), named in the "Diagnosis summary".
CHECKS = (
    "frozen or slow producer", "zero loss weight", "anchor fit", "optimizer ranges", "masks and boxes agree",
    "validation like training", "rare classes", "iteration spikes", "divergence", "stuck at chance",
    "rising or stalled", "lagging component", "train/val gap", "first evaluation gap", "dominant component",
    "segm vs bbox AP", "small vs large AP", "lagging class", "confused classes", "per-image losses",
    "training labels", "overfitting",
)
SEVERITY_RANK = {"warning": 0, "info": 1}


def rank_findings(findings: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Findings (``Diagnosis.to_json`` objects) ranked as the run's summary and ``inspect_runs`` show
    them: warnings first, then by strength (how far past its threshold), then earliest first."""
    def strength(f: Mapping[str, Any]) -> float:
        value = f.get("strength")
        return float(value) if isinstance(value, (int, float)) else 1.0

    return sorted(findings, key=lambda f: (SEVERITY_RANK.get(f.get("severity"), 2), -strength(f),
                                           f.get("epoch") if isinstance(f.get("epoch"), int) else 0))


def as_key(value: Any) -> Any:
    """A ``Diagnosis.key`` read back from JSON (lists inside it as tuples again)."""
    return tuple(as_key(v) for v in value) if isinstance(value, (list, tuple)) else value


def finding_key(finding: Mapping[str, Any]) -> tuple[Any, ...]:
    """A finding's identity (``Diagnosis.key``), from its JSON (``Diagnosis.to_json``)."""
    if finding.get("kind") in SPIKE_KINDS:
        return (finding.get("kind"), finding.get("subject"), finding.get("epoch"))
    return (finding.get("kind"), tuple(finding.get("components") or ()), finding.get("subject"))


def no_longer_found(finding: Mapping[str, Any], last_found: Mapping[tuple[Any, ...], int], epochs: int) -> str | None:
    """"no longer found at epochs a-b" for a monitor finding (epoch >= 1) whose last epoch in
    ``last_found`` is before ``epochs``; None when it held to the end or nothing is known."""
    last = last_found.get(finding_key(finding)) if finding.get("epoch") else None
    if last is None or last >= epochs:
        return None
    return f"no longer found at epoch {epochs}" if last + 1 == epochs else f"no longer found at epochs {last + 1}-{epochs}"


def format_summary(findings: Sequence[Mapping[str, Any]], *, epochs: int, checks: int = len(CHECKS),
                   last_found: Mapping[tuple[Any, ...], int] | None = None) -> str:
    """The run's closing "Diagnosis summary" block from its findings (``Diagnosis.to_json`` objects):
    warnings first, then by strength (how far past its threshold), or "no findings". ``last_found``:
    the last epoch each monitor finding (by ``Diagnosis.key``) still held; one that no longer held at
    the last epoch says so (a class confused at epoch 2 and fine at the end is history, not a fault)."""
    head = f"Diagnosis summary ({checks} checks over {epochs} epoch{'s' if epochs != 1 else ''}; {DOC}):"
    if not findings:
        return f"{head} no findings."
    ranked = rank_findings(findings)
    warnings = sum(f.get("severity") == "warning" for f in ranked)
    last_found = last_found or {}
    notes = [no_longer_found(f, last_found, epochs) for f in ranked]
    gone = sum(bool(n) and f.get("severity") == "warning" for f, n in zip(ranked, notes))
    lines = [f"{head} {warnings} warning{'s' if warnings != 1 else ''}, {len(ranked) - warnings} other"
             + (f"; {gone} of the warnings no longer held at epoch {epochs}" if gone else "")]
    for i, (f, note) in enumerate(zip(ranked, notes), 1):
        where = ("start" if not f.get("epoch") else f"epoch {f['epoch']}") + (f"; {note}" if note else "")
        about = ", ".join(f.get("components") or []) or (f.get("subject") or "")
        lines.append(f"  {i}. [{f.get('severity')}] {f.get('kind')} ({about}; {where}): {f.get('message', '')}")
    return "\n".join(lines)
