"""What a run logs as hyperparameters: the resolved config, and the short list a table compares runs by.

Trackers receive the whole resolved config through ``log_hyperparams`` (MLflow params, the W&B
config, the text shown in TensorBoard). A comparison table (TensorBoard's HParams tab) shows only
``key_hparams``: the keys a sweep varies, then the other keys overridden on the command line, then the
curated ``KEY_HPARAMS``; overridden keys count only when they are hyperparameters (``is_hyperparameter``:
not under ``INFRASTRUCTURE_KEYS``, and a value that is no path). ``experiment.run_training`` passes the
overrides and swept keys in as ``Hyperparams.overrides`` (Hydra's ``overrides.task``) and
``Hyperparams.swept`` (``analysis.sweep.task_swept_keys``). Its metric columns are ``HPARAM_METRICS``.

How TensorBoard (2.21) orders and ticks the HParams columns, which decides what a user sees:

* the backend sorts the experiment's ``hparam_infos`` by ``(not differs, name)`` whatever order they were
  written in (``plugins/hparams/backend_context.py``, ``_sort_and_reduce_to_hparams_limit``);
* the HParams tab ticks ("shows") the first five of them after a stable sort putting ``differs`` first,
  and the first five ``metric_infos`` in the order written (``_computeHParams`` / ``_computeMetrics``
  of ``tf-hparams-query-pane`` in ``webfiles.zip``);
* ``differs`` is read from the experiment summary when a run wrote one (we do, at close; torch's
  ``hparams()`` leaves it false, so the columns came out alphabetical), and only computed from the runs'
  values when none did. ``experiment_summary`` therefore sets ``differs`` on the keys that tell runs
  apart (``KeyHparams.differs``), so the swept keys are ticked by default;
* with several runs (a sweep's jobs) the backend takes the experiment summary of the first run it finds
  (``_find_experiment_tag``): the jobs of one sweep write the same keys and ``differs``, so any will do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from maskrcnn_coco.config import LOSS_COMPONENTS
from maskrcnn_coco.tracking.scalars import DEFAULT_OBJECTIVE, TRAIN_TOTAL, VAL_TOTAL, loss_tag

# The hyperparameters every run shows in a comparison table, whatever was overridden.
KEY_HPARAMS = (
    "optimizer.lr",
    "optimizer.head_lr_multiplier",
    "data.batch_size",
    "epochs",
    "model.arch",
    "data.name",
    *(f"loss.weights.{name}" for name in LOSS_COMPONENTS),
    "seed",
)

# Metric columns of the HParams table (each scalar tag's last value), in display order: TensorBoard
# ticks the first five; then each component's final train and val loss, side by side.
HPARAM_METRICS = tuple(dict.fromkeys((
    DEFAULT_OBJECTIVE, "mAP/segm_AP50", "mAP/bbox_AP", VAL_TOTAL, TRAIN_TOTAL,
    *(loss_tag(split, name) for name in LOSS_COMPONENTS for split in ("train", "val")),
)))

# Overridden keys (and everything under them) that say where and how a run executes, not what it
# learns: never hyperparameters, even when overridden or swept.
INFRASTRUCTURE_KEYS = (
    "hydra", "sweep", "tracker", "hooks",                      # launcher, sweep preset, backends, instruments
    "runs_dir", "resume", "device", "progress", "print_freq",  # where, from what, on what, how verbose
    "checkpoint", "diagnostics", "objective",                  # when to save, what to warn about, what to report
    "data.num_workers", "data.cache_dir", "eval.backend", "train.grad_norm_every",
)


def looks_like_path(value: Any) -> bool:
    """A string naming a location (``/data/coco``, ``~/runs``, ``ckpt\\last.pth``, a URL): a path, not a setting."""
    return isinstance(value, str) and (value.startswith("~") or "/" in value or "\\" in value)


def is_hyperparameter(key: str, value: Any) -> bool:
    """Whether an overridden ``key=value`` belongs in a comparison table: not under
    ``INFRASTRUCTURE_KEYS`` (group overrides such as ``hydra/launcher`` included) and not a path."""
    name = key.replace("/", ".")
    if any(name == prefix or name.startswith(f"{prefix}.") for prefix in INFRASTRUCTURE_KEYS):
        return False
    return not looks_like_path(value)


class Hyperparams(dict):
    """The resolved config (a plain dict to every tracker), ``overrides``, the command-line overrides
    that produced it (e.g. ``["optimizer.lr=0.01", "tracker=all"]``), and ``swept``, the keys the
    multirun it belongs to varies (empty outside a sweep)."""

    def __init__(self, config: Mapping[str, Any], overrides: Iterable[str] = (), swept: Iterable[str] = ()):
        super().__init__(config)
        self.overrides = tuple(overrides)
        self.swept = tuple(swept)


class KeyHparams(dict):
    """``{key: value}`` for a comparison table, in display order; ``differs``: the keys that tell this
    run apart from its neighbours (TensorBoard's ``HParamInfo.differs``, which it shows first)."""

    def __init__(self, values: Mapping[str, Any], differs: Iterable[str] = ()):
        super().__init__(values)
        self.differs = tuple(differs)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"optimizer.lr": 0.02, ...}`` with scalar values (others as strings)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def task_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (``hydra.overrides.task``); [] outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``["+a.b=1", "tracker=all", "~c"]`` -> ``{"a.b": "1", "tracker": "all"}`` (deletions left out)."""
    parsed: dict[str, str] = {}
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep or key.startswith("~"):
            continue
        parsed[key.lstrip("+").split("@", 1)[0]] = value
    return parsed


def key_hparams(params: Mapping[str, Any], overrides: Sequence[str] | None = None,
                swept: Sequence[str] | None = None) -> KeyHparams:
    """The comparison table's hyperparameters, flat: the swept keys, the other overridden keys, then
    ``KEY_HPARAMS``; overridden and swept keys only where ``is_hyperparameter``. ``overrides`` and
    ``swept`` default to ``params.overrides`` and ``params.swept`` (a ``Hyperparams``).

    An overridden config group or dict (``data=coco``, ``optimizer=adamw``) shows its value as written;
    an overridden leaf its resolved value. ``differs``: the swept keys in a sweep (what tells its jobs
    apart; keys every job overrides alike do not), else the overridden ones (what sets this run apart
    from the defaults)."""
    overrides = getattr(params, "overrides", ()) if overrides is None else overrides
    swept = getattr(params, "swept", ()) if swept is None else swept
    flat = flatten_params(params)
    written = parse_overrides(overrides)
    chosen = {}
    for key in dict.fromkeys([*swept, *written]):
        if key in flat or key in written:
            value = flat.get(key, written.get(key))
            if is_hyperparameter(key, value):
                chosen[key] = value
    differs = [key for key in swept if key in chosen] if swept else list(chosen)
    selected = {key: chosen[key] for key in differs}
    selected.update(chosen)
    selected.update({key: flat[key] for key in KEY_HPARAMS if key in flat and key not in selected})
    return KeyHparams(selected, differs)


def experiment_summary(selected: Mapping[str, Any], metrics: Iterable[str]):
    """TensorBoard's HParams experiment summary (a ``Summary`` proto) for ``selected`` (``key_hparams``)
    and the metric ``tags``, in order: torch's ``hparams()`` with ``differs`` set on ``selected.differs``
    (torch leaves it false), so TensorBoard lists and ticks those columns first."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams

    experiment, _, _ = hparams(dict(selected), dict.fromkeys(metrics, 0.0))
    differs = set(getattr(selected, "differs", ()))
    plugin = experiment.value[0].metadata.plugin_data
    content = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
    for info in content.experiment.hparam_infos:
        info.differs = info.name in differs
    plugin.content = content.SerializeToString()
    return experiment
