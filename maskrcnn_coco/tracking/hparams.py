"""What a run logs as hyperparameters: the resolved config, and the short list a table compares runs by.

Trackers receive the whole resolved config through ``log_hyperparams`` (MLflow params, the W&B
config, the text shown in TensorBoard). A comparison table (TensorBoard's HParams tab) shows only
``key_hparams``: the curated ``KEY_HPARAMS`` plus every key overridden on the command line, which
``experiment.run_training`` passes in as ``Hyperparams.overrides`` (Hydra's ``overrides.task``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from maskrcnn_coco.config import LOSS_COMPONENTS

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


class Hyperparams(dict):
    """The resolved config (a plain dict to every tracker) and ``overrides``, the command-line
    overrides that produced it (e.g. ``["optimizer.lr=0.01", "tracker=all"]``)."""

    def __init__(self, config: Mapping[str, Any], overrides: Iterable[str] = ()):
        super().__init__(config)
        self.overrides = tuple(overrides)


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


def key_hparams(params: Mapping[str, Any], overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """``KEY_HPARAMS`` and every overridden key, flat. ``overrides`` default to ``params.overrides``
    (a ``Hyperparams``). An overridden config group or dict (``data=coco``, ``tracker=[a,b]``) shows
    its value as written; an overridden leaf its resolved value."""
    if overrides is None:
        overrides = getattr(params, "overrides", ())
    flat = flatten_params(params)
    selected = {key: flat[key] for key in KEY_HPARAMS if key in flat}
    for key, written in parse_overrides(overrides).items():
        selected[key] = flat.get(key, written)
    return selected
