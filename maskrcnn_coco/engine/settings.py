"""``FitSettings``: the values ``fit`` and ``train_one_epoch`` run by, built once from the config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from maskrcnn_coco.config import AMP_MODES

# The autocast dtype of each train.amp mode (the modes are the config's choices).
AMP_DTYPES: dict[str, torch.dtype | None] = dict(zip(AMP_MODES, (None, torch.bfloat16, torch.float16)))


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` (``off``, ``bf16``, ``fp16``); None for off."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"train.amp={amp!r}: use one of {', '.join(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The GradScaler ``train.amp`` needs on ``device``: one for fp16 (its range is narrow), else None."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


@dataclass
class FitSettings:
    """How to train and evaluate: everything that is a value, not an object the run builds.

    ``loss_weights``: the optimised loss is ``sum(w_k * loss_k)`` (missing: 1). ``amp``: the forward
    pass under autocast in ``bf16``/``fp16`` (``off``: none); ``scaler`` (a ``GradScaler``, needed for
    fp16) scales the loss. ``print_freq``: the read-back period (iterations between two host reads of
    device values: the progress line, spikes, the divergence check). Evaluation every ``eval_every``
    epochs and at the last, with val losses unless ``compute_val_loss`` is off; with ``eval_subset``
    (N), epochs before the last are evaluated on N val images chosen once from ``seed``
    (``engine.evaluate.subset_loader``), the last on the full set.
    """

    epochs: int = 1
    device: str | torch.device = "cpu"
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    amp: str = "off"
    scaler: torch.amp.GradScaler | None = None
    clip_grad_norm: float | None = None
    print_freq: int = 20
    eval_every: int = 1
    compute_val_loss: bool = True
    mask_threshold: float = 0.5
    eval_backend: str = "auto"
    progress: bool = True
    eval_subset: int | None = None
    seed: int = 0  # the run's: draws eval_subset's images

    def __post_init__(self) -> None:
        amp_dtype(self.amp)  # a clear error for an unknown mode
        for name in ("epochs", "print_freq", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitSettings({name}={getattr(self, name)}): must be at least 1")
        if self.eval_subset is not None and self.eval_subset < 1:
            raise ValueError(f"FitSettings(eval_subset={self.eval_subset}): must be at least 1 (or None: the full set)")

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, amp: str, loss_weights: Mapping[str, float]) -> FitSettings:
        """From the composed run config (``device`` and ``amp`` already resolved from ``auto``)."""
        return cls(
            epochs=cfg.epochs, device=device, loss_weights=dict(loss_weights), amp=amp, scaler=grad_scaler(amp, device),
            clip_grad_norm=cfg.optimizer.clip_grad_norm, print_freq=cfg.print_freq, eval_every=cfg.eval.every_n_epochs,
            compute_val_loss=cfg.eval.val_loss, mask_threshold=cfg.eval.mask_threshold, eval_backend=cfg.eval.backend,
            eval_subset=cfg.eval.subset, seed=cfg.seed, progress=cfg.progress,
        )
