import logging
import math

import pytest
import torch
from helpers import sgd_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from maskrcnn_coco.analysis.sweep import register_resolvers
from maskrcnn_coco.config import SchedulerConfig, register_configs
from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.solver import (
    ParamGroupError,
    build_lr_scheduler,
    build_optimizer,
    format_parameter_groups,
    get_parameter_groups,
)
from maskrcnn_coco.solver.schedule import check_schedule

from conftest import REPO, tiny_model_cfg


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(tiny_model_cfg(), num_classes=4)


def ids(params):
    return [id(p) for p in params]


def test_groups_partition_the_trainable_parameters(model):
    groups = get_parameter_groups(model, lr=5e-3, head_lr_multiplier=10.0)
    assert [g["name"] for g in groups] == ["backbone", "rpn", "heads"]
    grouped = [i for g in groups for i in ids(g["params"])]
    trainable = ids(p for p in model.parameters() if p.requires_grad)
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(trainable)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].startswith("roi_heads.") for i in ids(groups[2]["params"]))
    assert all(names[i].startswith("backbone.") for i in ids(groups[0]["params"]))

    opt = torch.optim.SGD(groups, momentum=0.9)
    assert [pg["lr"] for pg in opt.param_groups] == pytest.approx([5e-3, 5e-3, 5e-2])


def test_frozen_parameters_are_skipped():
    model = build_model(tiny_model_cfg(trainable_backbone_layers=3), num_classes=4)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("backbone.body.layer1.") for n in frozen)
    assert any(n.startswith("backbone.body.conv1.") for n in frozen)
    grouped = {id(p) for g in get_parameter_groups(model, lr=0.01) for p in g["params"]}
    named = dict(model.named_parameters())
    assert not any(id(named[n]) in grouped for n in frozen)


def test_overlapping_prefixes_fail_with_a_clear_message(model):
    groups = {
        "backbone": {"prefixes": ["backbone"], "lr_mult": 1.0},
        "rpn": {"prefixes": ["rpn"], "lr_mult": 1.0},
        "heads": {"prefixes": ["roi_heads"], "lr_mult": 10.0},
        "mask_head": {"prefixes": ["roi_heads.mask_head"], "lr_mult": 30.0},
    }
    with pytest.raises(ParamGroupError, match=r"prefix 'roi_heads' of group 'heads' and prefix 'roi_heads.mask_head' of group 'mask_head'"):
        get_parameter_groups(model, lr=0.01, groups=groups)


def test_uncovered_parameter_is_named(model):
    groups = {"backbone": {"prefixes": ["backbone"]}, "heads": {"prefixes": ["roi_heads"]}}
    with pytest.raises(ParamGroupError, match=r"Trainable parameter 'rpn\.head\.conv\.0\.0\.weight' matches no parameter group"):
        get_parameter_groups(model, lr=0.01, groups=groups)


def test_separate_mask_head_group_and_no_weight_decay(model):
    groups = {
        "backbone": {"prefixes": ["backbone", "rpn"], "lr_mult": 1.0},
        "heads": {"prefixes": ["roi_heads.box_head", "roi_heads.box_predictor"], "lr_mult": 10.0},
        "mask_head": {"prefixes": ["roi_heads.mask_head", "roi_heads.mask_predictor"], "lr_mult": 30.0, "weight_decay": 0.0},
    }
    pgs = get_parameter_groups(model, lr=0.01, weight_decay=1e-4, groups=groups, no_weight_decay_norm_bias=True)
    by_name = {g["name"]: g for g in pgs}
    assert set(by_name) == {"backbone", "backbone_no_wd", "heads", "heads_no_wd", "mask_head", "mask_head_no_wd"}
    assert by_name["mask_head"]["lr"] == pytest.approx(0.3) and by_name["mask_head"]["weight_decay"] == 0.0
    assert by_name["heads"]["weight_decay"] == 1e-4 and by_name["heads_no_wd"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_wd = [names[id(p)] for g in pgs if g["name"].endswith("_no_wd") for p in g["params"]]
    assert all(n.endswith(".bias") or ".bn" in n or "downsample.1" in n for n in no_wd)
    assert all(g["group"] == g["name"].removesuffix("_no_wd") for g in pgs)
    table = format_parameter_groups(pgs)
    assert table.splitlines()[1].split() == ["group", "tensors", "parameters", "lr", "weight", "decay"]
    assert "mask_head_no_wd" in table


def scheduled_lrs(name, iterations, **kwargs):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    opt = torch.optim.SGD([
        {"params": model[0].parameters(), "lr": 0.01, "name": "backbone"},
        {"params": model[1].parameters(), "lr": 0.1, "name": "heads"},
    ], lr=0.01)
    cfg = OmegaConf.structured(SchedulerConfig(name=name, **kwargs))
    sched = build_lr_scheduler(cfg, opt, iters_per_epoch=10, epochs=4)
    seen = {}
    for it in range(max(iterations) + 1):
        if it in iterations:
            seen[it] = [pg["lr"] for pg in opt.param_groups]
        opt.step()
        sched.step()
    return seen


def test_warmup_then_multistep_for_every_group():
    seen = scheduled_lrs("multistep", [0, 5, 10, 19, 20, 29, 30], warmup_iters=10, warmup_factor=0.1, milestones=[2, 3], gamma=0.1)
    expected = {0: 0.1, 5: 0.55, 10: 1.0, 19: 1.0, 20: 0.1, 29: 0.1, 30: 0.01}
    for it, factor in expected.items():
        assert seen[it] == pytest.approx([0.01 * factor, 0.1 * factor]), it
        assert seen[it][1] / seen[it][0] == pytest.approx(10.0)


def test_warmup_then_cosine_for_every_group():
    seen = scheduled_lrs("cosine", [0, 4, 20, 30, 39], warmup_iters=5, warmup_factor=0.2, min_lr_factor=0.1)
    total = 40

    def cosine(i):
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / total))

    expected = {0: 0.2 * cosine(0), 4: (0.2 + 0.8 * 4 / 5) * cosine(4), 20: cosine(20), 30: cosine(30), 39: cosine(39)}
    for it, factor in expected.items():
        assert seen[it] == pytest.approx([0.01 * factor, 0.1 * factor]), it


def compose_config(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("choice, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizers_from_config(model, choice, cls, caplog):
    caplog.set_level(logging.INFO, logger="maskrcnn_coco")
    cfg = compose_config([f"optimizer={choice}", "optimizer.head_lr_multiplier=10"])
    opt = build_optimizer(cfg.optimizer, model)
    assert type(opt) is cls
    lrs = {pg["name"]: pg["lr"] for pg in opt.param_groups}
    assert lrs["heads"] == pytest.approx(10 * cfg.optimizer.lr) and lrs["backbone"] == pytest.approx(cfg.optimizer.lr)
    if choice == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.9
    assert "Parameter groups:" in caplog.text


def test_readme_group_overrides(model, capsys):
    """The README's examples: a separate mask-head group, and the RPN moved into the heads."""
    cfg = compose_config([
        "optimizer.head_lr_multiplier=10",
        "optimizer.groups.heads.prefixes=[roi_heads.box_head,roi_heads.box_predictor]",
        "+optimizer.groups.mask_head={prefixes:[roi_heads.mask_head,roi_heads.mask_predictor],lr_mult:30}",
    ])
    lrs = {pg["name"]: pg["lr"] for pg in build_optimizer(cfg.optimizer, model).param_groups}
    base = cfg.optimizer.lr
    assert lrs["mask_head"] == pytest.approx(30 * base) and lrs["heads"] == pytest.approx(10 * base)
    assert lrs["rpn"] == pytest.approx(base)

    cfg = compose_config(["optimizer.groups.heads.prefixes=[roi_heads,rpn]", "~optimizer.groups.rpn",
                          "optimizer.head_lr_multiplier=3"])
    opt = build_optimizer(cfg.optimizer, model)
    assert {pg["group"] for pg in opt.param_groups} == {"backbone", "heads"}
    rpn_ids = {id(p) for n, p in model.named_parameters() if n.startswith("rpn.")}
    heads = [pg for pg in opt.param_groups if pg["group"] == "heads"]
    assert rpn_ids <= {id(p) for pg in heads for p in pg["params"]}
    assert heads[0]["lr"] == pytest.approx(3 * cfg.optimizer.lr)


def test_group_specs_are_checked(model):
    with pytest.raises(ParamGroupError, match=r"group 'heads' has unknown key\(s\) \['lr_mul'\]"):
        get_parameter_groups(model, lr=0.1, groups={"heads": {"prefixes": ["roi_heads"], "lr_mul": 3}})
    with pytest.raises(ParamGroupError, match="needs a non-empty list of module-name prefixes"):
        get_parameter_groups(model, lr=0.1, groups={"heads": {"lr_mult": 3}})


def test_optimizer_implementation_choice():
    from maskrcnn_coco.utils.errors import ConfigError

    model = nn.Module()
    model.backbone = nn.Linear(3, 2)
    assert build_optimizer(sgd_config("auto"), model, verbose=False).defaults["fused"] is True
    assert build_optimizer(sgd_config("foreach"), model, verbose=False).defaults["foreach"] is True
    assert build_optimizer(sgd_config("for_loop"), model, verbose=False).defaults["foreach"] is False
    assert not build_optimizer(sgd_config("auto", foreach=True), model, verbose=False).defaults["fused"]  # factory wins
    rms = OmegaConf.merge(sgd_config("fused"), {"factory": {"_target_": "torch.optim.RMSprop", "momentum": 0.0}})
    with pytest.raises(ConfigError, match="no fused"):
        build_optimizer(rms, model, verbose=False)


def compose_default(*overrides):
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_default_schedule_fits_the_default_run(caplog):
    cfg = compose_default()
    iters = math.ceil(cfg.data.num_train / cfg.data.batch_size)
    with caplog.at_level(logging.WARNING, logger="maskrcnn_coco"):
        assert check_schedule(cfg.scheduler, iters, cfg.epochs) == []
    assert not caplog.records
