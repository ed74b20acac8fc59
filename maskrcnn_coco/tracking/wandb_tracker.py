"""Weights & Biases backend (``pip install 'maskrcnn_coco[wandb]'``): ``tracker=[tensorboard,wandb]``.

One W&B run per training run, named after the run folder: the resolved config as the run's config,
every scalar under the same tag (``loss/val_loss_mask``; W&B groups charts by the part before
``/``) at ``step=epoch``, sent once per epoch. ``mode: offline`` (the default in
``conf/tracker/wandb.yaml``) needs no account and no network: the run is written under
``<run folder>/wandb/offline-run-*`` and uploaded later with ``wandb sync <that folder>``;
``tracker.backends.wandb.mode=online`` streams it (after ``wandb login``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from maskrcnn_coco.tracking.backends import failed_run, import_optional


class WandbTracker:
    """The W&B run is started lazily, at the first call (``log_hyperparams`` before training)."""

    def __init__(
        self,
        log_dir: str | Path,
        project: str = "maskrcnn",
        mode: str = "offline",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
    ):
        self._wandb = import_optional("wandb", "wandb")
        self.log_dir = Path(log_dir)
        self.project, self.mode, self.entity, self.group = project, mode, entity, group
        self.name = name or self.log_dir.name
        self.tags = list(tags)
        self.run: Any = None
        self._step: int | None = None
        self._pending: dict[str, float] = {}

    def _start(self, config: Mapping[str, Any] | None = None) -> Any:
        if self.run is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.run = self._wandb.init(
                project=self.project, entity=self.entity, group=self.group, name=self.name, tags=self.tags,
                dir=str(self.log_dir), mode=self.mode, config=dict(config or {}),
                # console="off": W&B leaves stdout/stderr alone (no capture, no wrapped streams).
                settings=self._wandb.Settings(console="off", silent=True),
            )
        elif config:
            self.run.config.update(dict(config), allow_val_change=True)
        return self.run

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self._start(params)
        overrides = getattr(params, "overrides", ())
        if overrides:
            self.run.summary["overrides"] = " ".join(overrides)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        self._step = step
        self._pending[tag] = float(value)

    def flush(self) -> None:
        if self._pending:
            self._start().log(self._pending, step=self._step)
            self._pending = {}

    def close(self) -> None:
        if self.run is None and not self._pending:
            return
        failed = failed_run()
        self.flush()
        self.run.finish(exit_code=1 if failed else 0)
        self.run = None
