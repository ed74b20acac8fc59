"""Named parameter groups with per-group learning-rate multipliers, and the optimizer built from them.

Groups are keyed by module-name prefixes, matched at a ``.`` boundary (``roi_heads`` matches
``roi_heads.box_head.fc6.weight``, not ``roi_headsX``). Every trainable parameter must land in
exactly one group; frozen parameters are skipped. Default placement (``default_param_groups`` in
``maskrcnn_coco.config``, the one definition):

* ``backbone``: ``backbone`` (ResNet body + FPN) at ``lr``
* ``rpn``: ``rpn`` at ``lr`` (a group of its own, so its lr and gradient norm are visible; move the
  ``rpn`` prefix into ``heads`` to train it at the heads' rate)
* ``heads``: ``roi_heads`` (box and mask heads and predictors) at ``lr * head_lr_multiplier``
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from maskrcnn_coco.config import OPTIMIZER_IMPLS, default_param_groups
from maskrcnn_coco.utils.errors import ConfigError, UserError

log = logging.getLogger(__name__)

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


class ParamGroupError(UserError, ValueError):
    """Parameter groups that overlap or leave a trainable parameter without a group."""


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _check_prefixes(groups: Mapping[str, Mapping[str, Any]]) -> None:
    owners = [(p, g) for g, spec in groups.items() for p in spec["prefixes"]]
    for i, (p1, g1) in enumerate(owners):
        for p2, g2 in owners[i + 1:]:
            if g1 != g2 and (_matches(p1, p2) or _matches(p2, p1)):
                raise ParamGroupError(
                    f"Parameter groups overlap: prefix {p1!r} of group {g1!r} and prefix {p2!r} of group "
                    f"{g2!r} match the same parameters. Give each module to exactly one group "
                    f"(e.g. replace {min(p1, p2, key=len)!r} by its sub-modules)."
                )


GROUP_KEYS = {"prefixes", "lr_mult", "weight_decay"}


def _checked_spec(name: str, spec: Any) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise ParamGroupError(f"Parameter group {name!r} must be a mapping with keys {sorted(GROUP_KEYS)}, got {spec!r}")
    unknown = set(spec) - GROUP_KEYS
    if unknown:
        raise ParamGroupError(f"Parameter group {name!r} has unknown key(s) {sorted(unknown)}; allowed: {sorted(GROUP_KEYS)}")
    prefixes = spec.get("prefixes")
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
        raise ParamGroupError(f"Parameter group {name!r} needs a non-empty list of module-name prefixes, got {prefixes!r}")
    try:
        lr_mult = float(spec.get("lr_mult", 1.0))
        wd = spec.get("weight_decay")
        wd = None if wd is None else float(wd)
    except (TypeError, ValueError):
        raise ParamGroupError(f"Parameter group {name!r}: lr_mult and weight_decay must be numbers, got {dict(spec)}") from None
    return {"prefixes": list(prefixes), "lr_mult": lr_mult, "weight_decay": wd}


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, NORM_TYPES) or p_name == "bias":
                names.add(full)
    return names


def get_parameter_groups(
    model: nn.Module,
    lr: float,
    head_lr_multiplier: float = 10.0,
    weight_decay: float = 1e-4,
    *,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
    no_weight_decay_norm_bias: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: ``[{"params", "lr", "weight_decay", "name", "group", "lr_mult"}, ...]``.

    ``groups`` maps a group name to ``{"prefixes": [...], "lr_mult": float, "weight_decay": float|None}``;
    by default backbone and rpn at ``lr`` and ``roi_heads`` at ``lr * head_lr_multiplier``. With
    ``no_weight_decay_norm_bias`` each group is split in two, the second (``<group>_no_wd``) holding
    norm-layer weights and biases at weight decay 0; both carry ``group=<group>``. Use as
    ``torch.optim.SGD(get_parameter_groups(model, lr=5e-3, head_lr_multiplier=10.0), momentum=0.9)``.
    """
    if isinstance(groups, DictConfig):
        groups = OmegaConf.to_container(groups, resolve=True)  # type: ignore[assignment]
    specs = {name: _checked_spec(name, spec) for name, spec in (groups or default_param_groups(head_lr_multiplier)).items()}
    _check_prefixes(specs)

    no_decay = _no_decay_names(model) if no_weight_decay_norm_bias else set()
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for p_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owners = [g for g, spec in specs.items() if any(_matches(p_name, p) for p in spec["prefixes"])]
        if not owners:
            raise ParamGroupError(
                f"Trainable parameter {p_name!r} matches no parameter group's prefixes "
                f"({ {g: list(s['prefixes']) for g, s in specs.items()} }); add its module to a group"
            )
        if len(owners) > 1:
            raise ParamGroupError(f"Trainable parameter {p_name!r} matches several groups: {owners}")
        buckets.setdefault((owners[0], p_name in no_decay), []).append(param)

    result = []
    for name, spec in specs.items():
        mult = spec["lr_mult"]
        wd = weight_decay if spec["weight_decay"] is None else spec["weight_decay"]
        for is_no_decay in (False, True):
            params = buckets.get((name, is_no_decay))
            if not params:
                continue
            result.append(
                {
                    "params": params,
                    "lr": lr * mult,
                    "weight_decay": 0.0 if is_no_decay else wd,
                    "name": f"{name}_no_wd" if is_no_decay else name,
                    "group": name,
                    "lr_mult": mult,
                }
            )
    return result


def format_parameter_groups(param_groups: Sequence[Mapping[str, Any]]) -> str:
    """A table of what each group holds: group, tensors, parameters, lr, weight decay."""
    header = f"{'group':<18} {'tensors':>8} {'parameters':>12} {'lr':>10} {'weight decay':>13}"
    lines = ["Parameter groups:", header, "-" * len(header)]
    for pg in param_groups:
        n = sum(p.numel() for p in pg["params"])
        lines.append(f"{pg.get('name', '?'):<18} {len(pg['params']):>8} {n:>12,} {pg['lr']:>10.3g} {pg['weight_decay']:>13.3g}")
    return "\n".join(lines)


def build_optimizer(cfg: Any, model: nn.Module, verbose: bool = True) -> torch.optim.Optimizer:
    """``cfg.factory`` (a Hydra partial such as ``torch.optim.SGD``) completed with the groups and lr."""
    groups = get_parameter_groups(
        model,
        lr=cfg.lr,
        head_lr_multiplier=cfg.head_lr_multiplier,
        weight_decay=cfg.weight_decay,
        groups=cfg.groups,
        no_weight_decay_norm_bias=cfg.no_weight_decay_norm_bias,
    )
    if verbose:
        log.info("%s", format_parameter_groups(groups))
    factory = instantiate(cfg.factory, _convert_="all")
    impl = implementation_kwargs(factory, groups, getattr(cfg, "impl", "auto"))
    return factory(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **impl)


def implementation_kwargs(factory: Any, groups: Sequence[Mapping[str, Any]], impl: str = "auto") -> dict[str, bool]:
    """The ``fused``/``foreach`` keywords for ``optimizer.impl``. ``auto`` is ``fused=True`` when the
    class takes it (SGD, Adam, AdamW, Adagrad) and every parameter is a floating-point tensor on a
    device with fused kernels (CPU and CUDA in recent torch), else torch's own default. A ``fused``
    or ``foreach`` key in ``optimizer.factory`` wins over ``impl``."""
    if impl not in OPTIMIZER_IMPLS:
        raise ConfigError(f"optimizer.impl={impl!r}: use one of {', '.join(OPTIMIZER_IMPLS)}")
    keywords = getattr(factory, "keywords", {}) or {}
    if "fused" in keywords or "foreach" in keywords:
        return {}
    cls = getattr(factory, "func", factory)
    try:
        accepts = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        accepts = {}
    name = getattr(cls, "__name__", str(cls))
    if impl == "for_loop":
        return {"foreach": False} if "foreach" in accepts else {}
    if impl == "foreach":
        if "foreach" not in accepts:
            raise ConfigError(f"optimizer.impl=foreach: {name} has no foreach implementation")
        return {"foreach": True}
    if impl == "fused":
        if "fused" not in accepts:
            raise ConfigError(f"optimizer.impl=fused: {name} has no fused implementation (use auto, foreach or for_loop)")
        return {"fused": True}
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    params = [p for g in groups for p in g["params"]]
    fusable = "fused" in accepts and bool(params) and all(
        p.device.type in supported and torch.is_floating_point(p) for p in params
    )
    return {"fused": True} if fusable else {}



def group_name(param_group: Mapping[str, Any], index: int) -> str:
    """The logical group of an optimizer param group: ``group`` (set by get_parameter_groups,
    shared by ``heads`` and ``heads_no_wd``), else ``name``, else its index."""
    return str(param_group.get("group", param_group.get("name", index)))


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current lr per named group (``group``/``name`` keys; else the group index)."""
    lrs: dict[str, float] = {}
    for i, pg in enumerate(optimizer.param_groups):
        lrs.setdefault(group_name(pg, i), float(pg["lr"]))
    return lrs


def check_head_multiplier(cfg: Any) -> None:
    """``optimizer.head_lr_multiplier`` must be the multiplier in effect (it is logged as a hyperparameter).

    It reaches the ``heads`` group through the interpolation in ``optimizer.groups.heads.lr_mult``;
    a literal ``lr_mult`` there that disagrees, or a multiplier with no ``heads`` group to act on,
    would log a value that was never applied.
    """
    groups = cfg.groups
    mult = float(cfg.head_lr_multiplier)
    heads = groups.get("heads") if groups is not None else None
    if heads is None:
        if mult != 1.0:
            raise ConfigError(
                f"optimizer.head_lr_multiplier={mult:g} has no effect: optimizer.groups has no 'heads' group "
                f"(groups: {sorted(groups or {})}); set lr_mult on your own groups instead"
            )
        return
    if isinstance(heads, DictConfig) and OmegaConf.is_interpolation(heads, "lr_mult"):
        return
    lr_mult = heads.get("lr_mult", 1.0)
    try:
        lr_mult = float(lr_mult)
    except (TypeError, ValueError):
        return  # _checked_spec reports it with the group's name
    if lr_mult != mult:
        raise ConfigError(
            f"optimizer.groups.heads.lr_mult={lr_mult:g} disagrees with optimizer.head_lr_multiplier={mult:g}: "
            f"set optimizer.head_lr_multiplier={lr_mult:g} instead (it is what the heads group uses and what is logged)"
        )
