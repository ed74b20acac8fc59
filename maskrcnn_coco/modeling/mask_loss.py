"""The mask loss for box-only annotations: instances whose ground-truth mask is all zero are skipped.

COCO exports from detection tools often carry a box without a ``segmentation``; the data side gives
such an instance an all-zero mask (a real mask is never empty). Those instances still train the RPN
and the box branch, but the positive proposals matched to them must not teach the mask head that the
object is background. ``masked_maskrcnn_loss`` weights each positive proposal's per-pixel BCE by its
instance's has-mask flag and divides by the number of flagged pixels (clamped to >= 1): no boolean
indexing, so no host sync beyond torchvision's own. With no flagged positive it is an exact 0 that
still reaches the mask head (zero gradients, not None), so DDP and the optimizer see every parameter.
With every instance masked it *is* torchvision's expression, picked by ``torch.where``: loss and
gradients are bit-identical to ``maskrcnn_loss`` on every device (a weighted sum divided by the count
is not: CUDA's mean multiplies by ``1/n``, and the backward rounds differently).

How it is wired in: torchvision's ``RoIHeads.forward`` calls the module-level
``torchvision.models.detection.roi_heads.maskrcnn_loss``. Overriding ``forward`` would copy ~100 lines
of torchvision; swapping that module attribute around each of our forwards would mutate a library
global per call (seen by other threads, e.g. ``DataParallel`` replicas or a plain torchvision model)
and bypass observers that already wrap it (``probe.core._recording`` wraps whatever is there when it
starts, so a swap inside our forward would hide the mask inputs from the probe). Instead, importing
this module replaces that attribute once with ``_dispatching_maskrcnn_loss``: torchvision's own
function unless a ``MaskedRoIHeads`` forward is running in the current context (a ``ContextVar``:
per thread, nests), then ours. Plain ``RoIHeads`` compute exactly what they did; wrappers of the
module attribute still see every call; nothing to lock or restore. ``use_masked_mask_loss`` swaps the
class of ``model.roi_heads`` (no parameters or buffers added: state_dicts and checkpoints unchanged).

The signature ``maskrcnn_loss(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs)`` and
its call in ``RoIHeads.forward`` are the same in torchvision 0.19 and 0.29 (only type comments
changed). Not TorchScript-able (``RoIHeads`` under ``torch.jit.script`` would not see the ContextVar).
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes

# torchvision's function, captured before the dispatcher takes its module attribute.
TORCHVISION_MASKRCNN_LOSS = tv_roi_heads.maskrcnn_loss

# The MaskedRoIHeads whose forward is running in this context (thread), if any.
_ACTIVE_HEADS: ContextVar[MaskedRoIHeads | None] = ContextVar("maskrcnn_coco_active_roi_heads", default=None)


def positive_has_mask(gt_masks: list[Tensor], mask_matched_idxs: list[Tensor]) -> Tensor:
    """Per positive proposal (all images concatenated): whether its ground-truth instance has a mask
    (a box-only instance has an all-zero mask)."""
    # ``any`` of a uint8 tensor is uint8 (where ``~`` is a bitwise not): made bool.
    return torch.cat([m.flatten(1).any(dim=1).bool()[idx] for m, idx in zip(gt_masks, mask_matched_idxs)])


def masked_maskrcnn_loss(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    mask_matched_idxs: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """torchvision's ``maskrcnn_loss`` over the positives whose instance has a mask, and the number of
    positives skipped for lack of one (a 0-dim tensor on the device: reading it is the caller's sync)."""
    m = mask_logits.shape[-1]
    labels = torch.cat([gl[idx] for gl, idx in zip(gt_labels, mask_matched_idxs)])
    targets = torch.cat([project_masks_on_boxes(gm, p, i, m) for gm, p, i in zip(gt_masks, proposals, mask_matched_idxs)])
    has_mask = positive_has_mask(gt_masks, mask_matched_idxs)
    skipped = (~has_mask).sum()
    if targets.numel() == 0:  # no positives: torchvision's zero (a shape test, no sync)
        return mask_logits.sum() * 0, skipped

    picked = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    every = F.binary_cross_entropy_with_logits(picked, targets)  # torchvision's expression, unchanged
    weight = has_mask[:, None, None].to(targets.dtype)
    pixels = (has_mask.sum() * (m * m)).clamp(min=1)
    flagged = F.binary_cross_entropy_with_logits(picked, targets, weight=weight, reduction="sum") / pixels
    # Selected on the device: the unselected branch gets a zero gradient, so both loss and gradients
    # are torchvision's bit for bit when every positive has a mask.
    return torch.where(has_mask.all(), every, flagged), skipped


def _dispatching_maskrcnn_loss(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    mask_matched_idxs: list[Tensor],
) -> Tensor:
    """``roi_heads.maskrcnn_loss`` after import: ours inside a ``MaskedRoIHeads`` forward, torchvision's
    everywhere else."""
    heads = _ACTIVE_HEADS.get()
    if heads is None:
        return TORCHVISION_MASKRCNN_LOSS(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs)
    loss, heads.last_mask_skipped = masked_maskrcnn_loss(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs)
    return loss


tv_roi_heads.maskrcnn_loss = _dispatching_maskrcnn_loss


class MaskedRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` whose mask loss skips instances without a mask (``masked_maskrcnn_loss``).

    ``last_mask_skipped``: the positive proposals of the last training forward matched to box-only
    instances, a 0-dim tensor on the device (never read here, so no sync); None before the first.
    """

    last_mask_skipped: Tensor | None = None

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        token = _ACTIVE_HEADS.set(self)
        try:
            return super().forward(features, proposals, image_shapes, targets)
        finally:
            _ACTIVE_HEADS.reset(token)


def use_masked_mask_loss(model: nn.Module) -> None:
    """Make ``model.roi_heads`` a ``MaskedRoIHeads`` in place (its class only: same modules, same
    parameters and state_dict keys)."""
    heads = model.roi_heads
    if isinstance(heads, MaskedRoIHeads):
        return
    if type(heads) is not RoIHeads:
        raise TypeError(
            f"model.roi_heads is a {type(heads).__qualname__}; the box-only mask loss replaces only "
            "torchvision's RoIHeads (a subclass may override what MaskedRoIHeads relies on)"
        )
    heads.__class__ = MaskedRoIHeads
