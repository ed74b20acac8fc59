"""How TensorBoard shows the one vocabulary: the CUSTOM SCALARS layout and the train/val comparison sub-runs.

TensorBoard colours lines by RUN, everywhere: in the Time Series and Scalars tabs every tag of a run has
the run's colour, and a CUSTOM SCALARS multiline chart too takes its colours from the runs
(``DataSeriesColorScale`` parses the run out of the series name ``tag (run)``); the tags of one run on
one multiline chart are told apart by marker symbol and by the "Matches" legend under the chart.
Two consequences:

* train and val of a loss component in two colours need two runs: ``TensorBoardTracker`` writes each
  per-epoch loss once more, under ``compare/<component>`` (``compare_pair``), into the sub-runs
  ``<log_dir>/train`` and ``<log_dir>/val`` (Keras' TensorBoard callback writes ``train``/``validation``
  runs the same way): the card ``compare/loss_mask`` then shows ``<run>/train`` and ``<run>/val`` in two
  colours. The run's own event file keeps every tag where it is (``loss/train_loss_mask``, ``loss/val_loss_mask``).
* learning-rate and gradient-norm groups in distinct colours need a run per group, too: each
  ``lr/<group>``, ``grad_norm/<group>``, ``iter/lr/<group>`` and ``iter/grad_norm/<group>`` is written
  once more (``group_pair``) into the sub-run ``<log_dir>/groups/<group>`` as ``compare/lr``,
  ``compare/grad_norm``, ``compare/iter_lr`` and ``compare/iter_grad_norm``: one card each, one colour
  per group. A run then lists ``train``, ``val`` and ``groups/<group>`` beside it in TensorBoard's run
  selector (filter runs with a regex such as ``^[^/]*$`` to see the runs alone, or
  ``TensorBoardTracker(group_runs=False)``, ``tracker.backends.tensorboard.group_runs=false``); the
  CUSTOM SCALARS charts ``lr (all groups)`` and ``grad_norm (all groups)`` keep them on one chart of
  the run itself (one colour, one symbol per group).

The layout (``custom_scalars_layout(tags)``) has these categories:

* ``Losses (train vs val)``: per component, train and validation on one chart (``loss/train_<c>`` +
  ``loss/val_<c>``), and ``total`` (``loss/train_total`` + ``loss/val``);
* ``Optimisation``: every learning-rate group on one chart (``lr/.*``), every grad-norm group on another;
* ``COCO AP``: segm and bbox AP on one chart, AP50 on another, and how many val images each
  evaluation used (``eval/images`` beside ``eval/val_images``: fewer on ``eval.subset``'s epochs);
* ``Iterations``: the ``iter/`` window means (step = global iteration): losses, lr groups, grad-norm
  sets, time per iteration, memory.

Each entry is a regular expression that TensorBoard matches from the start of a tag; the layout
names only what the run logged, so no chart stays empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from maskrcnn_coco.tracking.scalars import (
    ITER_PREFIX,
    LOSS_COMPONENTS,
    TRAIN_ONLY_TOTAL,
    TRAIN_TOTAL,
    VAL_TOTAL,
    loss_tag,
)

Layout = dict[str, dict[str, list]]

COMPARE_PREFIX = "compare/"
SPLITS = ("train", "val")  # the comparison sub-runs, <log_dir>/train and <log_dir>/val
COMPARE_TOTAL = COMPARE_PREFIX + "loss_total"

# Per-epoch loss tag -> (sub-run, comparison tag): one card per component, one line per split.
_PAIRS: dict[str, tuple[str, str]] = {
    TRAIN_TOTAL: ("train", COMPARE_TOTAL),
    TRAIN_ONLY_TOTAL: ("train", COMPARE_TOTAL),
    VAL_TOTAL: ("val", COMPARE_TOTAL),
    **{loss_tag(split, name): (split, COMPARE_PREFIX + name) for split in SPLITS for name in LOSS_COMPONENTS},
}


def compare_pair(tag: str) -> tuple[str, str] | None:
    """``(split, comparison tag)`` of a per-epoch loss tag, e.g. ``loss/val_loss_mask`` ->
    ``("val", "compare/loss_mask")`` and ``loss/train_total`` -> ``("train", "compare/loss_total")``;
    None for any other tag."""
    return _PAIRS.get(tag)


GROUPS_DIR = "groups"  # the per-group sub-runs, <log_dir>/groups/<group>
_GROUP_PREFIXES = (  # longest first: iter/lr/ before lr/
    (ITER_PREFIX + "grad_norm/", COMPARE_PREFIX + "iter_grad_norm"),
    (ITER_PREFIX + "lr/", COMPARE_PREFIX + "iter_lr"),
    ("grad_norm/", COMPARE_PREFIX + "grad_norm"),
    ("lr/", COMPARE_PREFIX + "lr"),
)


def group_pair(tag: str) -> tuple[str, str] | None:
    """``(sub-run, comparison tag)`` of a per-group lr or gradient-norm tag, e.g. ``iter/lr/heads`` ->
    ``("groups/heads", "compare/iter_lr")`` and ``grad_norm/backbone`` -> ``("groups/backbone",
    "compare/grad_norm")``; None for any other tag (``lr`` alone included)."""
    for prefix, compare_tag in _GROUP_PREFIXES:
        if tag.startswith(prefix) and len(tag) > len(prefix):
            return f"{GROUPS_DIR}/{tag[len(prefix):]}", compare_tag
    return None


def _exact(tag: str) -> str:
    return re.escape(tag) + "$"


def layout_spec() -> dict[str, dict[str, list[str]]]:
    """``{category: {chart: [tag regex, ...]}}`` before filtering by what a run logged."""
    losses = {"total": [_exact(TRAIN_TOTAL), _exact(TRAIN_ONLY_TOTAL), _exact(VAL_TOTAL)]}
    losses.update({name: [_exact(loss_tag("train", name)), _exact(loss_tag("val", name))] for name in LOSS_COMPONENTS})
    it = re.escape(ITER_PREFIX)
    return {
        "Losses (train vs val)": losses,
        "Optimisation": {"lr (all groups)": [r"lr/.*"], "grad_norm (all groups)": [r"grad_norm/.*"]},
        "COCO AP": {
            "AP (segm, bbox)": [_exact("mAP/segm_AP"), _exact("mAP/bbox_AP")],
            "AP50 (segm, bbox)": [_exact("mAP/segm_AP50"), _exact("mAP/bbox_AP50")],
            # eval.subset: the AP above was measured on eval/images of eval/val_images; a step up to
            # the full set explains a jump in the two charts above.
            "val images evaluated": [_exact("eval/images"), _exact("eval/val_images")],
        },
        "Iterations (window means, step = iteration)": {
            "losses": [it + r"loss_.*"],
            "lr (all groups)": [it + r"lr/.*"],
            "grad_norm (all sets)": [it + r"grad_norm/.*"],
            "time per iteration (s)": [it + r"time_.*"],
            "memory (MiB)": [it + r"memory/.*"],
        },
    }


def custom_scalars_layout(tags: Iterable[str]) -> Layout:
    """The layout for ``SummaryWriter.add_custom_scalars``, keeping only regexes that match a logged
    tag (and charts and categories left with one)."""
    tags = list(tags)
    layout: Layout = {}
    for category, charts in layout_spec().items():
        kept = {}
        for title, regexes in charts.items():
            matching = [r for r in regexes if any(re.match(r, t) for t in tags)]
            if matching:
                kept[title] = ["Multiline", matching]
        if kept:
            layout[category] = kept
    return layout
