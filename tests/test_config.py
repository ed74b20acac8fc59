import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from maskrcnn_coco.config import LOSS_COMPONENTS, CocoDataConfig, ShapesDataConfig, SmallModelConfig, register_configs

from conftest import REPO


def compose_config(overrides=(), hydra_config=False):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def test_default_config_has_the_documented_keys():
    cfg = compose_config()
    assert OmegaConf.get_type(cfg.data) is ShapesDataConfig
    assert OmegaConf.get_type(cfg.model) is SmallModelConfig
    assert cfg.model.min_size == cfg.data.image_size == 128
    for key in ("epochs", "seed", "device", "optimizer.lr", "data.batch_size", "optimizer.head_lr_multiplier",
                "optimizer.clip_grad_norm", "scheduler.warmup_iters"):
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None or key == "optimizer.clip_grad_norm"
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


@pytest.mark.parametrize("override", ["optimizer.lrr=1", "data.batch_size=two", "loss.weights.loss_maks=2", "seed=1.5"])
def test_bad_overrides_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


def test_head_lr_sweep_config():
    cfg = compose_config(["+sweep=head_lr"], hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params["optimizer.head_lr_multiplier"] == "1,3,10,30"
    assert "multirun" in cfg.hydra.sweep.dir
    assert cfg.hydra.callbacks.sweep_summary._target_ == "maskrcnn_coco.analysis.sweep.SweepSummaryCallback"
