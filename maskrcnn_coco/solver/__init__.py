"""The solver: named parameter groups with lr multipliers, the optimizer, and the lr schedule."""

from maskrcnn_coco.solver.param_groups import (
    ParamGroupError,
    build_optimizer,
    check_head_multiplier,
    format_parameter_groups,
    get_parameter_groups,
    group_lrs,
    group_name,
)
from maskrcnn_coco.solver.schedule import build_lr_scheduler, lr_factor

__all__ = [
    "ParamGroupError",
    "build_lr_scheduler",
    "build_optimizer",
    "check_head_multiplier",
    "format_parameter_groups",
    "get_parameter_groups",
    "group_lrs",
    "group_name",
    "lr_factor",
]
