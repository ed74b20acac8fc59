"""MLflow backend (``pip install 'maskrcnn_coco[mlflow]'``): ``tracker=[tensorboard,mlflow]``.

One MLflow run per training run, in the experiment ``experiment_name``:

* params: the flattened resolved config (``optimizer.lr``, ``data.augment.hflip_prob``, ...), and
  the command-line overrides as the run's ``overrides`` tag;
* metrics: every scalar under the same tag as in TensorBoard (``loss/val_loss_mask``,
  ``mAP/segm_AP``, ``lr/heads``), at ``step=epoch``, sent once per epoch (at ``flush``);
* artifacts at close: the run folder's summary files (``metrics.jsonl``, ``.hydra/*.yaml``,
  ``train.log``), never checkpoints; the run ends FINISHED, or FAILED when training raised.

Where it goes: ``tracking_uri`` when set (a server ``http://host:5000``, ``databricks``, any MLflow
URI), else ``$MLFLOW_TRACKING_URI``, else a local store shared by all runs under ``store_dir``
(``runs_dir`` in ``conf/tracker/mlflow.yaml``): ``sqlite:///<store_dir>/mlflow.db`` with artifacts in
``<store_dir>/mlartifacts``, MLflow's own default backend (its ``./mlruns`` file store refuses to
open unless ``MLFLOW_ALLOW_FILE_STORE=true``). View it with
``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from maskrcnn_coco.tracking.backends import failed_run, import_optional
from maskrcnn_coco.tracking.hparams import flatten_params

# The run folder's summary files logged as artifacts at close (those that exist).
DEFAULT_ARTIFACTS = ("metrics.jsonl", "metrics.csv", "hparams.json", ".hydra/config.yaml", ".hydra/overrides.yaml", "train.log")

# MLflow accepts alphanumerics, underscores, dashes, periods, spaces, colons and slashes in names.
_NOT_ALLOWED = re.compile(r"[^\w\-. :/]")


def mlflow_key(name: str) -> str:
    """A tag or config key as an MLflow metric/param name: other characters become ``_``."""
    return _NOT_ALLOWED.sub("_", name)


def local_store_uri(store_dir: str | Path) -> str:
    """``sqlite:////abs/path/mlflow.db``: the local store in ``store_dir``."""
    return "sqlite:///" + str((Path(store_dir) / "mlflow.db").resolve())


class MLflowTracker:
    """The run is created lazily, at the first call (``log_hyperparams`` before training)."""

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
        self._pending: list[Any] = []

    def _run(self) -> tuple[Any, str]:
        if self.run_id is None:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            if self.local:
                self.store_dir.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(self.tracking_uri)
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                location = (self.store_dir / "mlartifacts").resolve().as_uri() if self.local else None
                try:
                    experiment_id = client.create_experiment(self.experiment_name, artifact_location=location)
                except MlflowException:  # created meanwhile by a parallel sweep job
                    experiment_id = client.get_experiment_by_name(self.experiment_name).experiment_id
            tags = {"run_dir": str(self.log_dir.resolve())}
            self.run_id = client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
            self._client = client
        return self._client, self.run_id

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        client, run_id = self._run()
        flat = {mlflow_key(k): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten_params(params).items()}
        tags = [RunTag("overrides", " ".join(getattr(params, "overrides", ())))]
        client.log_batch(run_id, params=[Param(k, v) for k, v in flat.items()], tags=tags)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        self._pending.append(Metric(mlflow_key(tag), float(value), int(time.time() * 1000), int(step)))

    def flush(self) -> None:
        if self._pending:
            client, run_id = self._run()
            client.log_batch(run_id, metrics=self._pending)
            self._pending = []

    def close(self) -> None:
        if self.run_id is None and not self._pending:
            return
        failed = failed_run()
        self.flush()
        client, run_id = self._run()
        for name in self.artifacts:
            path = self.log_dir / name
            if path.is_file():
                parent = str(Path(name).parent)
                client.log_artifact(run_id, str(path), artifact_path=None if parent == "." else parent)
        client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
        self.run_id, self._client = None, None
