"""MLflow backend (``pip install 'maskrcnn_coco[mlflow]'``): ``tracker=[tensorboard,mlflow]``.

One MLflow run per run folder, in the experiment ``experiment_name``:

* params: the flattened resolved config (``optimizer.lr``, ``data.augment.hflip_prob``, ...), and
  the command-line overrides as the run's ``overrides`` tag;
* metrics: every scalar under the same tag as in TensorBoard (``loss/val_loss_mask``,
  ``mAP/segm_AP``, ``lr/heads``, ``iter/loss_total``), sent at each flush. MLflow keeps a step per
  point of each metric, so the two step axes need nothing special: ``iter/`` metrics at the global
  iteration, the others at the epoch;
* images (``log_image``: predictions, confusion matrices): ``MlflowClient.log_image(key=tag, step=epoch)``,
  the run page's image panel with a step slider (files under the artifacts' ``images/``);
* text (``log_text``: diagnostics, provenance): ``text/<tag>_<step>.md`` artifacts;
* artifacts at close: the run folder's files (``RUN_SUMMARY_FILES``: ``metrics.jsonl``,
  ``.hydra/*.yaml``, ``train.log``, ``diagnostics.jsonl`` (and ``diagnostics_last_found.json``), the label-check and per-image JSONs; and
  ``RUN_IMAGE_FILES``: the confusion-matrix PNGs and the ``vis/`` folder of prediction images), never
  checkpoints; the run ends FINISHED, or FAILED when training raised.

The run is created at the first flush (params and early text wait for it), so that a resume can
first look for the run of its folder. Resume (``resume``): into the same folder, the MLflow run whose
``run_dir`` tag names the folder is continued (set RUNNING again) rather than a second one started;
each metric then skips the steps it already has (a crashed attempt's iteration points after the
checkpoint stay, the resumed run's points at those steps are not added: one point per step), and the
history epochs it lacks are logged. Changed config values (``epochs``, ``resume``) cannot change an
MLflow param: they are listed in the tag ``changed_on_resume``. Into a new folder: a new run, with the
carried history logged once.

Where it goes: ``tracking_uri`` when set (a server ``http://host:5000``, ``databricks``, any MLflow
URI), else ``$MLFLOW_TRACKING_URI``, else a local store shared by all runs under ``store_dir``
(``runs_dir`` in ``conf/tracker/mlflow.yaml``): ``sqlite:///<store_dir>/mlflow.db`` with artifacts in
``<store_dir>/mlartifacts``, MLflow's own default backend (its ``./mlruns`` file store refuses to
open unless ``MLFLOW_ALLOW_FILE_STORE=true``). View it with the MLflow UI, which the ``mlflow`` extra
(the client only) does not install: ``pip install 'maskrcnn_coco[mlflow-ui]'``, then
``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskrcnn_coco.tracking.backends import (
    EPOCH_AXIS,
    RUN_IMAGE_FILES,
    RUN_SUMMARY_FILES,
    failed_run,
    import_optional,
    log_history,
    run_files,
    step_axis,
)
from maskrcnn_coco.tracking.hparams import flatten_params

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The run folder's files logged as artifacts at close (globs; those that exist).
DEFAULT_ARTIFACTS = (*RUN_SUMMARY_FILES, *RUN_IMAGE_FILES)

# MLflow accepts alphanumerics, underscores, dashes, periods, spaces, colons and slashes in names.
_NOT_ALLOWED = re.compile(r"[^\w\-. :/]")
_NOT_IN_PATH = re.compile(r"[^\w\-./]")


def mlflow_key(name: str) -> str:
    """A tag or config key as an MLflow metric/param name: other characters become ``_``."""
    return _NOT_ALLOWED.sub("_", name)


def artifact_name(tag: str) -> str:
    """A tag as a relative artifact path (its ``/`` kept as folders, nothing that climbs out)."""
    return "/".join(p for p in _NOT_IN_PATH.sub("_", tag).split("/") if p not in ("", ".", "..")) or "_"


def local_store_uri(store_dir: str | Path) -> str:
    """``sqlite:////abs/path/mlflow.db``: the local store in ``store_dir``."""
    return "sqlite:///" + str((Path(store_dir) / "mlflow.db").resolve())


class MLflowTracker:
    """The run is created lazily, at the first flush (or found again by ``resume``)."""

    def __init__(
        self,
        log_dir: str | Path,
        tracking_uri: str | None = None,
        store_dir: str | Path | None = None,
        experiment_name: str = "maskrcnn",
        run_name: str | None = None,
        artifacts: Sequence[str] = DEFAULT_ARTIFACTS,
    ):
        import_optional("mlflow", "mlflow")
        self.log_dir = Path(log_dir)
        self.store_dir = Path(store_dir) if store_dir else self.log_dir
        self.local = not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(self.store_dir)
        self.experiment_name = experiment_name
        self.run_name = run_name or self.log_dir.name
        self.artifacts = tuple(artifacts)
        self.run_id: str | None = None
        self._client: Any = None
        self._experiment_id: str | None = None
        self._params: Mapping[str, Any] | None = None
        self._pending: list[Any] = []
        self._deferred: list[Callable[[Any, str], Any]] = []  # text and images sent before the run exists
        self._logged: dict[str, int] = {}  # a continued run: the last step each metric already has

    def _connect(self) -> Any:
        """The client and this experiment (created if missing): the first call that reaches the store."""
        if self._client is None:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            if self.local:
                self.store_dir.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(self.tracking_uri)
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                self._experiment_id = experiment.experiment_id
            else:
                location = (self.store_dir / "mlartifacts").resolve().as_uri() if self.local else None
                try:
                    self._experiment_id = client.create_experiment(self.experiment_name, artifact_location=location)
                except MlflowException:  # created meanwhile by a parallel sweep job
                    self._experiment_id = client.get_experiment_by_name(self.experiment_name).experiment_id
            self._client = client
        return self._client

    def _run(self) -> tuple[Any, str]:
        if self.run_id is None:
            client = self._connect()
            tags = {"run_dir": str(self.log_dir.resolve())}
            self.run_id = client.create_run(self._experiment_id, run_name=self.run_name, tags=tags).info.run_id
            self._started({})
        return self._client, self.run_id

    def _started(self, existing_params: Mapping[str, str]) -> None:
        """The params (those the run lacks) and the text and images that waited for the run."""
        if self._params is not None:
            self._send_params(self._params, existing_params)
        deferred, self._deferred = self._deferred, []
        for call in deferred:
            call(self._client, self.run_id)

    def _send_params(self, params: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        flat = {mlflow_key(k): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten_params(params).items()}
        tags = [RunTag("overrides", " ".join(getattr(params, "overrides", ())))]
        # An MLflow param never changes: what a resumed run changed (epochs, resume) goes to a tag.
        changed = [f"{k}: {existing[k]} -> {v}" for k, v in flat.items() if k in existing and existing[k] != v]
        if changed:
            tags.append(RunTag("changed_on_resume", "; ".join(changed)[:MAX_TAG_VAL_LENGTH]))
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        self._client.log_batch(self.run_id, params=new, tags=tags)

    def _send(self, call: Callable[[Any, str], Any]) -> None:
        if self.run_id is None:
            self._deferred.append(call)
        else:
            call(self._client, self.run_id)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self._connect()  # a store that cannot be reached fails here, at start
        self._params = params
        if self.run_id is not None:
            self._send_params(params, self._client.get_run(self.run_id).data.params)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        key = mlflow_key(tag)
        if key in self._logged and step <= self._logged[key]:
            return  # a continued run has this step already: one point per step
        self._pending.append(Metric(key, float(value), int(time.time() * 1000), int(step)))

    def log_text(self, tag: str, text: str, step: int) -> None:
        name = f"text/{artifact_name(tag)}_{step}.md"
        self._send(lambda client, run_id: client.log_text(run_id, text, name))

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        array = image.detach().cpu().permute(1, 2, 0).numpy()
        self._send(lambda client, run_id: client.log_image(run_id, array, key=mlflow_key(tag), step=int(step)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (under ``artifact_path``) or a folder's contents (under ``artifact_path``, else the
        folder's name)."""
        client, run_id = self._run()
        path = Path(path)
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path or path.name)
        else:
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    def _find_run(self) -> Any:
        """The newest MLflow run of this run folder (its ``run_dir`` tag), or None."""
        client, folder = self._connect(), str(self.log_dir.resolve())
        if "'" in folder:  # a quote cannot be escaped in a search filter: compare here
            runs = [r for r in client.search_runs([self._experiment_id], order_by=["attributes.start_time DESC"])
                    if r.data.tags.get("run_dir") == folder]
        else:
            runs = client.search_runs([self._experiment_id], filter_string=f"tags.run_dir = '{folder}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def resume(self, epoch: int, global_step: int, history: Sequence[Mapping[str, Any]]) -> None:
        """Continue this folder's MLflow run, or start one with the carried history (module docstring)."""
        if self.run_id is None:
            found = self._find_run()
            if found is None:
                self._run()
            else:
                client, self.run_id = self._client, found.info.run_id
                client.update_run(self.run_id, status="RUNNING")
                self._logged = {key: max(m.step for m in client.get_metric_history(self.run_id, key))
                                for key in found.data.metrics}
                later = sorted(k for k, s in self._logged.items() if step_axis(k) == EPOCH_AXIS and s > epoch)
                if later:
                    log.warning("MLflow run %s already has %s after epoch %d (logged before this resume from an "
                                "earlier checkpoint): those points stay, the new ones at the same steps are not "
                                "added; resume into a new run folder for clean curves.", self.run_id, later[:5], epoch)
                self._started(found.data.params)
        log_history(self, history)  # what the continued run has is skipped by log_scalar

    def flush(self) -> None:
        if self.run_id is None and not (self._pending or self._deferred):
            return
        client, run_id = self._run()
        if self._pending:
            client.log_batch(run_id, metrics=self._pending)
            self._pending = []

    def close(self) -> None:
        if self.run_id is None and self._params is None and not (self._pending or self._deferred):
            return
        failed = failed_run()
        self.flush()
        client, run_id = self._run()
        for path in run_files(self.log_dir, self.artifacts):
            relative = path.relative_to(self.log_dir)
            if path.is_dir():
                self.log_artifact(path, relative.as_posix())
            else:
                self.log_artifact(path, None if relative.parent == Path(".") else relative.parent.as_posix())
        client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
        self.run_id, self._client, self._logged = None, None, {}
