"""Weights & Biases backend (``pip install 'maskrcnn_coco[wandb]'``): ``tracker=[tensorboard,wandb]``.

One W&B run per training process, named after the run folder: the resolved config as the run's config,
every scalar under the same tag (``loss/val_loss_mask``; W&B groups charts by the part before ``/``),
sent at each flush (every read-back and every epoch). ``mode: offline`` (the default in
``conf/tracker/wandb.yaml``) needs no account and no network: the run is written under
``<run folder>/wandb/offline-run-*`` and uploaded later with ``wandb sync <that folder>``;
``tracker.backends.wandb.mode=online`` streams it (after ``wandb login``).

Two step axes. W&B keeps one step counter per run (``_step``) and drops a point logged with a step
below its last one, so ``step=`` is never passed: each row carries its own x value instead, declared
with ``define_metric``: ``iter`` (hidden) for the ``iter/*`` tags (the global iteration), ``epoch`` for
every other tag (each tag declared when first seen, besides the ``iter/*`` glob). Iteration rows and
epoch rows then interleave without a point lost, and each chart plots its tag against its own axis.

* Images (``log_image``): ``wandb.Image`` in the epoch's row: a media panel with a step slider.
* Text (``log_text``, the diagnostics' findings): ``wandb.Html`` (the markdown as preformatted text) in
  the epoch's row: an HTML media panel per tag, one entry per epoch (the run summary would keep the last
  text only).
* Files (``log_artifact``; at close the run folder's ``RUN_SUMMARY_FILES``): copied into the run's
  files folder and ``run.save``'d, offline too (they are uploaded by ``wandb sync``); prediction
  images and confusion matrices already come as images.

Resume: every process is its own W&B run (W&B cannot continue an offline run: syncing a second offline
run with the same id replaces the first), tagged ``resumed``. It gets the carried epoch history first,
so each W&B run's epoch curves are whole; its iteration curves start after the checkpoint's step.
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskrcnn_coco.tracking.backends import (
    EPOCH_AXIS,
    ITER_AXIS,
    RUN_SUMMARY_FILES,
    failed_run,
    import_optional,
    log_history,
    run_files,
    step_axis,
)
from maskrcnn_coco.tracking.scalars import ITER_PREFIX

if TYPE_CHECKING:
    import torch


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
        artifacts: Sequence[str] = RUN_SUMMARY_FILES,
    ):
        self._wandb = import_optional("wandb", "wandb")
        self.log_dir = Path(log_dir)
        self.project, self.mode, self.entity, self.group = project, mode, entity, group
        self.name = name or self.log_dir.name
        self.tags = list(tags)
        self.artifacts = tuple(artifacts)
        self.run: Any = None
        # One row per (axis, step), in the order first written: {"epoch": 3, tag: value, ...}.
        self._pending: dict[tuple[str, int], dict[str, Any]] = {}
        self._defined: set[str] = set()

    def _start(self, config: Mapping[str, Any] | None = None) -> Any:
        if self.run is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.run = self._wandb.init(
                project=self.project, entity=self.entity, group=self.group, name=self.name, tags=self.tags,
                dir=str(self.log_dir), mode=self.mode, config=dict(config or {}),
                # console="off": W&B leaves stdout/stderr alone (no capture, no wrapped streams).
                settings=self._wandb.Settings(console="off", silent=True),
            )
            self.run.define_metric(ITER_AXIS, hidden=True)
            self.run.define_metric(ITER_PREFIX + "*", step_metric=ITER_AXIS)
            self.run.define_metric(EPOCH_AXIS)
        elif config:
            self.run.config.update(dict(config), allow_val_change=True)
        return self.run

    def _put(self, tag: str, value: Any, step: int) -> None:
        self._pending.setdefault((step_axis(tag), int(step)), {})[tag] = value

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self._start(params)
        overrides = getattr(params, "overrides", ())
        if overrides:
            self.run.summary["overrides"] = " ".join(overrides)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self._put(tag, float(value), step)

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self._put(tag, self._wandb.Image(image.detach().cpu().permute(1, 2, 0).numpy()), step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._put(tag, self._wandb.Html("<pre>" + html.escape(text) + "</pre>", inject=False), step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (under ``artifact_path``) or a folder's contents (under ``artifact_path``, else the
        folder's name) into the run's files."""
        run, path = self._start(), Path(path)
        if path.is_dir():
            files = [(p, p.relative_to(path)) for p in sorted(path.rglob("*")) if p.is_file()]
            target = Path(run.dir) / (artifact_path or path.name)
        else:
            files, target = [(path, Path(path.name))], Path(run.dir) / (artifact_path or "")
        for source, relative in files:
            dest = target / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)  # a copy: the run folder's file may change after this
            run.save(str(dest), base_path=run.dir, policy="now")

    def resume(self, epoch: int, global_step: int, history: Sequence[Mapping[str, Any]]) -> None:
        """A new W&B run continuing a checkpoint: the carried epoch history first (module docstring)."""
        run = self._start()
        run.tags = (*(run.tags or ()), "resumed")
        log_history(self, history)

    def flush(self) -> None:
        if not self._pending:
            return
        run = self._start()
        for (axis, step), row in self._pending.items():
            for tag in row.keys() - self._defined:
                # Each tag named, not only the iter/* glob: a glob's "*" need not cross a "/" (iter/lr/heads).
                run.define_metric(tag, step_metric=axis)
                self._defined.add(tag)
            run.log({axis: step, **row})  # no step=: the row's own axis value places it
        self._pending = {}

    def close(self) -> None:
        if self.run is None and not self._pending:
            return
        failed = failed_run()
        self.flush()
        for path in run_files(self.log_dir, self.artifacts):
            relative = path.relative_to(self.log_dir)
            if path.is_dir():
                self.log_artifact(path, relative.as_posix())
            else:
                self.log_artifact(path, None if relative.parent == Path(".") else relative.parent.as_posix())
        self.run.finish(exit_code=1 if failed else 0)
        self.run = None
