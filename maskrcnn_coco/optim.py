"""Named parameter groups with per-group learning-rate multipliers, optimizers and LR schedules.

Groups are keyed by module-name prefixes, matched at a ``.`` boundary (``roi_heads`` matches
``roi_heads.box_head.fc6.weight``, not ``roi_headsX``). Every trainable parameter must land in
exactly one group; frozen parameters are skipped. Default placement (``conf/optimizer/*.yaml``):

* ``backbone``: ``backbone`` (ResNet body + FPN) at ``lr``
* ``rpn``: ``rpn`` at ``lr`` (a group of its own, so its lr and gradient norm are visible; move the
  ``rpn`` prefix into ``heads`` to train it at the heads' rate)
* ``heads``: ``roi_heads`` (box and mask heads and predictors) at ``lr * head_lr_multiplier``
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from maskrcnn_coco.errors import ConfigError, UserError

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


class ParamGroupError(UserError, ValueError):
    """Parameter groups that overlap or leave a trainable parameter without a group."""


def default_groups(head_lr_multiplier: float) -> dict[str, dict[str, Any]]:
    return {
        "backbone": {"prefixes": ["backbone"], "lr_mult": 1.0},
        "rpn": {"prefixes": ["rpn"], "lr_mult": 1.0},
        "heads": {"prefixes": ["roi_heads"], "lr_mult": head_lr_multiplier},
    }


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
    specs = {name: _checked_spec(name, spec) for name, spec in (groups or default_groups(head_lr_multiplier)).items()}
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
        print(format_parameter_groups(groups))
    factory = instantiate(cfg.factory, _convert_="all")
    return factory(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(
    iteration: int,
    *,
    name: str,
    total_iters: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr_factor: float = 0.0,
) -> float:
    """The multiplier of every group's base lr at ``iteration`` (0-based).

    ``warmup(i) * schedule(i)`` where ``warmup(i) = warmup_factor + (1 - warmup_factor) * i / warmup_iters``
    for ``i < warmup_iters`` (else 1) and ``schedule`` is ``1`` (constant),
    ``gamma ** (number of milestones <= i)`` (multistep) or
    ``min_lr_factor + (1 - min_lr_factor) * (1 + cos(pi * i / total_iters)) / 2`` (cosine).
    """
    warm = 1.0
    if iteration < warmup_iters:
        warm = warmup_factor + (1.0 - warmup_factor) * iteration / warmup_iters
    if name == "constant":
        main = 1.0
    elif name == "multistep":
        main = gamma ** bisect.bisect_right(list(milestones), iteration)
    elif name == "cosine":
        progress = min(iteration, total_iters) / max(total_iters, 1)
        main = min_lr_factor + (1.0 - min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ConfigError(f"scheduler.name={name!r}: use constant, multistep or cosine")
    return warm * main


class _Factor:
    """Picklable lr lambda (LambdaLR saves callable objects' state in its state dict)."""

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs

    def __call__(self, iteration: int) -> float:
        return lr_factor(iteration, **self.kwargs)


def build_lr_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, iters_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration warmup + multistep/cosine; milestones in ``cfg`` are in epochs (fractions allowed).

    One factor multiplies every group's own base lr, so each group keeps its multiplier throughout.
    """
    if cfg.name not in ("constant", "multistep", "cosine"):
        raise ConfigError(f"scheduler.name={cfg.name!r}: use constant, multistep or cosine")
    factor = _Factor(
        name=cfg.name,
        total_iters=iters_per_epoch * epochs,
        warmup_iters=cfg.warmup_iters,
        warmup_factor=cfg.warmup_factor,
        milestones=sorted(round(m * iters_per_epoch) for m in cfg.milestones),
        gamma=cfg.gamma,
        min_lr_factor=cfg.min_lr_factor,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
