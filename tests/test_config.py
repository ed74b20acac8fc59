import re
from dataclasses import fields, is_dataclass
from typing import get_type_hints

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from maskrcnn_coco.analysis.sweep import register_resolvers
from maskrcnn_coco.config import (
    AMP_MODES,
    EVAL_BACKENDS,
    LOSS_COMPONENTS,
    OPTIMIZER_IMPLS,
    CocoDataConfig,
    Config,
    OptimizerConfig,
    ShapesDataConfig,
    SmallModelConfig,
    register_configs,
    validate_config,
)
from maskrcnn_coco.data.coco import resolve_paths
from maskrcnn_coco.solver.param_groups import check_head_multiplier
from maskrcnn_coco.utils.errors import ConfigError

from conftest import REPO


def compose_config(overrides=(), hydra_config=False):
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def test_default_config_has_the_documented_keys():
    cfg = compose_config()
    assert OmegaConf.get_type(cfg.data) is ShapesDataConfig
    assert OmegaConf.get_type(cfg.model) is SmallModelConfig
    assert cfg.model.min_size == cfg.data.image_size == 128
    for key in ("epochs", "seed", "device", "optimizer.lr", "data.batch_size", "optimizer.head_lr_multiplier",
                "scheduler.warmup_iters"):
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None, key
    assert "clip_grad_norm" in cfg.optimizer and cfg.optimizer.clip_grad_norm is None  # no clipping by default
    assert set(cfg.loss.weights) == set(LOSS_COMPONENTS)
    assert cfg.optimizer.groups.heads.lr_mult == cfg.optimizer.head_lr_multiplier


def test_coco_paths_follow_the_root():
    cfg = compose_config(["data=coco", "data.root=/data/coco", "model=maskrcnn_r50_fpn"])
    assert OmegaConf.get_type(cfg.data) is CocoDataConfig
    assert cfg.data.train_images == "/data/coco/train2017"
    assert cfg.data.val_annotations == "/data/coco/annotations/instances_val2017.json"
    assert cfg.model.arch == "maskrcnn_r50_fpn" and cfg.model.min_size == 800
    cfg = compose_config(["data=coco", "data.root=/d", "data.val_images=/elsewhere/val"])
    assert cfg.data.val_images == "/elsewhere/val" and cfg.data.train_images == "/d/train2017"
    assert cfg.model.arch == "small" and cfg.model.min_size == 512  # COCO-like sizes without data.image_size


# amp=true: the old top-level switch, now train.amp (off|bf16|fp16|auto); an unknown key like any other.
@pytest.mark.parametrize("override", ["optimizer.lrr=1", "data.batch_size=two", "loss.weights.loss_maks=2", "seed=1.5", "amp=true"])
def test_bad_overrides_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


def test_head_lr_sweep_config():
    cfg = compose_config(["+sweep=head_lr"], hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params["optimizer.head_lr_multiplier"] == "1,3,10,30"
    assert "multirun" in cfg.hydra.sweep.dir
    assert cfg.hydra.callbacks.sweep_summary._target_ == "maskrcnn_coco.analysis.sweep.SweepSummaryCallback"


@pytest.mark.parametrize("value, expected", [("10", 10.0), ("0.5", 0.5), ("null", None)])
def test_clip_grad_norm_composes_to_a_float_or_none(value, expected):
    clip = compose_config([f"optimizer.clip_grad_norm={value}"]).optimizer.clip_grad_norm
    assert clip == expected and type(clip) is type(expected)


def test_clip_grad_norm_rejects_a_non_number():
    with pytest.raises(ConfigCompositionException, match=re.escape("optimizer.clip_grad_norm=abc")) as err:
        compose_config(["optimizer.clip_grad_norm=abc"])
    assert "Value 'abc' of type 'str' could not be converted to Float" in str(err.value.__cause__)
    assert "optimizer.clip_grad_norm" in str(err.value.__cause__)


def test_unknown_data_name_is_a_config_error():
    message = re.escape("data.name='other'")
    composed = compose_config(["data=coco", "data.root=/x", "data.name=other"]).data
    structured = OmegaConf.structured(CocoDataConfig(root="/x", name="other"))
    for cfg in (composed, structured):
        with pytest.raises(ConfigError, match=message) as err:
            resolve_paths(cfg, progress=False)
        assert "data=shapes" in str(err.value) and "data=coco" in str(err.value)


def test_head_multiplier_through_the_interpolation_passes():
    cfg = compose_config(["optimizer.head_lr_multiplier=5"])
    assert cfg.optimizer.groups.heads.lr_mult == 5.0
    check_head_multiplier(cfg.optimizer)
    cfg = compose_config(["optimizer.groups.heads.lr_mult=5", "optimizer.head_lr_multiplier=5"])
    check_head_multiplier(cfg.optimizer)  # a literal that agrees is fine
    check_head_multiplier(compose_config().optimizer)


def test_a_literal_heads_lr_mult_that_disagrees_is_rejected():
    cfg = compose_config(["optimizer.groups.heads.lr_mult=5"])
    with pytest.raises(ConfigError) as err:
        check_head_multiplier(cfg.optimizer)
    message = str(err.value)
    assert "optimizer.groups.heads.lr_mult=5" in message and "optimizer.head_lr_multiplier=1" in message
    assert "set optimizer.head_lr_multiplier=5 instead" in message


def test_a_head_multiplier_without_a_heads_group_is_rejected():
    # roi_heads moved into the backbone group so every parameter still has a group.
    moved = ["~optimizer.groups.heads", "optimizer.groups.backbone.prefixes=[backbone,roi_heads]"]
    cfg = compose_config([*moved, "optimizer.head_lr_multiplier=3"])
    assert set(cfg.optimizer.groups) == {"backbone", "rpn"}
    with pytest.raises(ConfigError, match=re.escape("optimizer.head_lr_multiplier=3 has no effect")) as err:
        check_head_multiplier(cfg.optimizer)
    assert "['backbone', 'rpn']" in str(err.value)
    check_head_multiplier(compose_config(moved).optimizer)  # multiplier 1: nothing to apply, nothing logged wrong


# One bad value per field rule (tests/test_config.py checks that every rule has a row here).
BAD_VALUES = [
    ("epochs=0", "epochs=0: must be at least 1"),
    ("print_freq=0", "print_freq=0: must be at least 1"),
    ("optimizer.lr=0", "optimizer.lr=0.0: must be positive"),
    ("optimizer.clip_grad_norm=0", "optimizer.clip_grad_norm=0.0: must be positive (or null)"),
    ("optimizer.impl=magic", "optimizer.impl=magic: must be one of auto, fused, foreach, for_loop"),
    ("optimizer.scale_lr=sqrt", "optimizer.scale_lr=sqrt: must be none or linear"),
    ("optimizer.reference_batch_size=0", "optimizer.reference_batch_size=0: must be at least 1"),
    ("data.batch_size=0", "data.batch_size=0: must be at least 1"),
    ("data.val_batch_size=0", "data.val_batch_size=0: must be at least 1 (or null: same as data.batch_size)"),
    ("data.num_workers=-1", "data.num_workers=-1: must be 0 or more, or auto"),
    ("data.num_workers=many", "data.num_workers=many: must be 0 or more, or auto"),
    ("data.exif=rotate", "data.exif=rotate: must be apply or ignore"),
    ("data.crowd=drop", "data.crowd=drop: must be ignore or train"),
    ("eval.mask_threshold=-0.1", "eval.mask_threshold=-0.1: must be between 0 (included) and 1, e.g. 0.5"),
    ("data.augment.hflip_prob=1.5", "data.augment.hflip_prob=1.5: must be a probability in [0, 1]"),
    ("data.augment.vflip_prob=-0.1", "data.augment.vflip_prob=-0.1: must be a probability in [0, 1]"),
    ("data.augment.scale_range=[1.2,0.8]",
     "data.augment.scale_range=[1.2, 0.8]: must be [min, max] with 0 < min <= max, e.g. [0.8,1.2] (or null)"),
    ("data.augment.scale_range=[0.8]", "data.augment.scale_range=[0.8]: must be [min, max]"),
    ("scheduler.warmup_iters=-1", "scheduler.warmup_iters=-1: must be 0 or more"),
    ("diagnostics.per_image_images=-1", "diagnostics.per_image_images=-1: must be at least 0"),
    ("diagnostics.label_check_images=-1", "diagnostics.label_check_images=-1: must be at least 0"),
    ("vis.num_images=-1", "vis.num_images=-1: must be at least 0"),
    ("vis.score_threshold=1.5", "vis.score_threshold=1.5: must be a probability in [0, 1]"),
    ("vis.max_detections=0", "vis.max_detections=0: must be at least 1"),
    ("eval.every_n_epochs=0", "eval.every_n_epochs=0: must be at least 1"),
    ("eval.backend=fast", "eval.backend=fast: must be one of auto, pycocotools, faster_coco_eval"),
    ("eval.subset=0", "eval.subset=0: must be at least 1 (or null: the full set every time)"),
    ("checkpoint.every_n_epochs=-1", "checkpoint.every_n_epochs=-1: must be 0 (no epoch_NNN.pth) or more"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0: must be at least 1 (or null: keep all)"),
    ("checkpoint.every_n_iters=0", "checkpoint.every_n_iters=0: must be at least 1 (or null)"),
    ("train.max_loss=0", "train.max_loss=0.0: must be positive (or null)"),
    ("train.max_loss_factor=1", "train.max_loss_factor=1.0: must be above 1 (or null)"),
    ("train.amp=fp32", "train.amp=fp32: must be auto or one of off, bf16, fp16"),
    ("train.grad_norm_every=0", "train.grad_norm_every=0: must be at least 1"),
    ("model.box_positive_fraction=0", "model.box_positive_fraction=0.0: must be in (0, 1], e.g. 0.25"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES)
def test_a_value_breaking_its_fields_rule_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(compose_config([override]))


def test_every_field_rule_is_exercised():
    def rule_keys(schema, prefix=""):
        hints = get_type_hints(schema)
        for f in fields(schema):
            if is_dataclass(hints[f.name]):
                yield from rule_keys(hints[f.name], f"{prefix}{f.name}.")
            elif "rule" in f.metadata:
                yield f"{prefix}{f.name}"

    assert set(rule_keys(Config)) == {override.partition("=")[0] for override, _ in BAD_VALUES}


@pytest.mark.parametrize("overrides", [
    [],
    ["data=coco", "data.root=/data/coco", "model=maskrcnn_r50_fpn", "optimizer=adamw"],
    ["data.num_workers=auto", "data.val_batch_size=null", "data.augment.scale_range=[0.8,1.2]", "train.amp=bf16",
     "eval.backend=pycocotools", "optimizer.impl=foreach", "optimizer.scale_lr=linear", "optimizer.clip_grad_norm=10",
     "checkpoint.keep_last=null", "checkpoint.every_n_epochs=0", "checkpoint.every_n_iters=50", "train.max_loss=null",
     "train.max_loss_factor=null", "scheduler.warmup_iters=0", "data.augment.hflip_prob=1"],
    ["vis.num_images=0", "vis.score_threshold=0", "vis.max_detections=1"],
    ["eval.subset=1", "eval.subset=null"],
])
def test_working_values_pass_the_field_rules(overrides):
    validate_config(compose_config(overrides))


def test_field_rules_check_any_node_of_the_schema():
    with pytest.raises(ConfigError, match=re.escape("optimizer.lr=-1.0: must be positive")):
        validate_config(OptimizerConfig(lr=-1.0), prefix="optimizer.")
    # An untyped node is checked against the schema given; a value it lacks reads as null.
    with pytest.raises(ConfigError, match=re.escape("optimizer.lr=null: must be positive")):
        validate_config(OmegaConf.create({"impl": "auto"}), OptimizerConfig, "optimizer.")


def test_choices_spelled_in_the_config_are_their_owners():
    from maskrcnn_coco.engine.settings import AMP_DTYPES
    from maskrcnn_coco.evaluation.coco_eval import BACKENDS
    from maskrcnn_coco.solver import param_groups

    assert tuple(AMP_DTYPES) == AMP_MODES
    assert BACKENDS == EVAL_BACKENDS
    assert param_groups.OPTIMIZER_IMPLS is OPTIMIZER_IMPLS


def test_config_keys_and_amp_resolution():
    from hydra import compose, initialize_config_dir

    from maskrcnn_coco.analysis.sweep import register_resolvers
    from maskrcnn_coco.cli.experiment import cpu_has_bf16, resolve_amp
    from maskrcnn_coco.config import config_dir, register_configs, validate_config
    from maskrcnn_coco.data.coco import resolve_num_workers
    from maskrcnn_coco.utils.errors import ConfigError

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["train.amp=bf16", "data.num_workers=auto", "eval.backend=pycocotools"])
        validate_config(cfg)
        assert resolve_amp(cfg, torch.device("cpu")) == "bf16"
        off = compose("config", overrides=["train.amp=off"])
        assert off.train.amp == "off"
        default = compose("config")
        assert default.train.amp == "auto" and default.train.grad_norm_every == 10
        assert resolve_amp(default, torch.device("cuda")) == "off"  # no mode measured on CUDA: off unless asked
        assert resolve_amp(default, torch.device("cpu")) == ("bf16" if cpu_has_bf16() else "off")
        for bad in (["train.amp=fp32"], ["eval.backend=fast"], ["optimizer.impl=magic"], ["data.num_workers=-1"],
                    ["train.grad_norm_every=0"]):
            with pytest.raises(ConfigError):
                validate_config(compose("config", overrides=bad))
    assert 0 <= resolve_num_workers("auto") <= 8 and resolve_num_workers(3) == 3


@pytest.mark.parametrize("native, device, expected", [
    (True, "cpu", "train.amp=auto: bf16 (this CPU computes in bf16 natively)"),
    (False, "cpu", "train.amp=auto: off, fp32 (this CPU has no native bf16, AVX512-BF16 or AMX, and emulated bf16"),
    (False, "cuda", "train.amp=auto: off, fp32 (no mode is chosen automatically on this device: set train.amp=bf16 or fp16)"),
])
def test_amp_auto_says_why_it_chose_its_mode(monkeypatch, caplog, native, device, expected):
    """A run on a CPU without native bf16 takes several times the README's bf16 time: the start says why."""
    import logging

    from omegaconf import OmegaConf

    from maskrcnn_coco.cli import experiment

    monkeypatch.setattr(experiment, "cpu_has_bf16", lambda: native)
    with caplog.at_level(logging.INFO, logger=experiment.log.name):
        mode = experiment.resolve_amp(OmegaConf.create({"train": {"amp": "auto"}}), torch.device(device))
    assert mode == ("bf16" if native and device == "cpu" else "off")
    assert caplog.messages == [m for m in caplog.messages if m.startswith(expected)] and len(caplog.messages) == 1
