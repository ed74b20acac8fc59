"""TensorBoard's CUSTOM SCALARS layout: charts that put related tags of the one vocabulary together.

* ``Losses``: per component, train and validation on one chart (``loss/train_<c>`` + ``loss/val_<c>``),
  and ``total`` (``loss/train_total`` + ``loss/val``);
* ``Optimisation``: every learning-rate group on one chart (``lr/.*``), every grad-norm group on another;
* ``COCO AP``: segm and bbox AP on one chart, and AP50 on another.

Each entry is a regular expression that TensorBoard matches from the start of a tag; the layout
names only what the run logged (``custom_scalars_layout(tags)``), so no chart stays empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS, TRAIN_ONLY_TOTAL, TRAIN_TOTAL, VAL_TOTAL, loss_tag

Layout = dict[str, dict[str, list]]


def _exact(tag: str) -> str:
    return re.escape(tag) + "$"


def layout_spec() -> dict[str, dict[str, list[str]]]:
    """``{category: {chart: [tag regex, ...]}}`` before filtering by what a run logged."""
    losses = {"total": [_exact(TRAIN_TOTAL), _exact(TRAIN_ONLY_TOTAL), _exact(VAL_TOTAL)]}
    losses.update({name: [_exact(loss_tag("train", name)), _exact(loss_tag("val", name))] for name in LOSS_COMPONENTS})
    return {
        "Losses (train vs val)": losses,
        "Optimisation": {"lr (all groups)": [r"lr/.*"], "grad_norm (all groups)": [r"grad_norm/.*"]},
        "COCO AP": {
            "AP (segm, bbox)": [_exact("mAP/segm_AP"), _exact("mAP/bbox_AP")],
            "AP50 (segm, bbox)": [_exact("mAP/segm_AP50"), _exact("mAP/bbox_AP50")],
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
