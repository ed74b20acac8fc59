"""Helpers shared by several test files: scripted models and loaders, a stubbed ``fit`` harness,
synthetic histories, in-process runs and messy COCO files. Fixtures live in conftest.py."""

import contextlib
import io

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from maskrcnn_coco.analysis.sweep import register_resolvers
from maskrcnn_coco.config import LOSS_COMPONENTS, AugmentConfig, OptimizerConfig, default_param_groups, register_configs
from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine import FitSettings, GradNormMeter

from conftest import REPO, TINY_OVERRIDES, square_ann, write_coco_dataset


# ------------------ scripted losses (test_loop, test_monitors, test_fit, test_checkpoint, test_dist)
class ScriptedLosses(nn.Module):
    """Returns loss_k = w * c_k with c_k taken from the batch, so means and gradients are known."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, images, targets=None):
        values = targets[0]["scripted"]
        return {k: self.w * values[i] for i, k in enumerate(LOSS_COMPONENTS)}


def scripted_loader(rows):
    return [([torch.zeros(3, 4, 4)], [{"image_id": i, "scripted": torch.tensor(row)}]) for i, row in enumerate(rows)]


# ---------------------------------------- ground truth as detections (test_evaluate, test_coco_eval)
class Oracle(nn.Module):
    """Returns the ground truth as detections (eval) and fixed losses (train).

    ``evaluate`` calls ``model(images)`` without targets in eval mode, so the oracle is told the
    image ids in loader order up front (the validation loader does not shuffle).
    """

    def __init__(self, loader):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.batches = [targets for _, targets in loader]

    def forward(self, images, targets=None):
        if self.training:
            return dict.fromkeys(LOSS_COMPONENTS, self.p + 0.5)
        truth = self.batches.pop(0)
        return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                 "masks": t["masks"][:, None].float()} for t in truth]


# --------- fit on two parameter groups, evaluation stubbed (test_fit, test_checkpoint, test_writers)
HEADS_COMPONENTS = LOSS_COMPONENTS[:3]  # driven by the `heads` parameter, the rest by `backbone`


class TwoGroupLosses(nn.Module):
    """loss_k = c_k with d loss_k / d param = c_k: values and gradients known whatever the lr.

    The first three components depend on ``heads``, the last two on ``backbone``.
    """

    def __init__(self):
        super().__init__()
        self.backbone = nn.Parameter(torch.zeros(()))
        self.heads = nn.Parameter(torch.zeros(()))

    def forward(self, images, targets=None):
        c = targets[0]["scripted"]
        out = {}
        for i, k in enumerate(LOSS_COMPONENTS):
            p = self.heads if k in HEADS_COMPONENTS else self.backbone
            out[k] = c[i] + (p - p.detach()) * c[i]
        return out


class CountingLoader(list):
    """A list of batches that counts how often it was iterated (one pass per epoch)."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


ROWS = [[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 0.0, 1.0, -2.0, 1.0]]
WEIGHTS = {"loss_mask": 2.0, "loss_objectness": 0.5}
VAL_LOSSES = {"loss_classifier": 0.5, "loss_box_reg": 0.25, "loss_mask": 1.0, "loss_objectness": 0.125, "loss_rpn_box_reg": 0.0625}
METRICS = {"bbox": {"AP": 0.5, "AP50": 0.75, "AP75": 0.25, "APs": 0.5, "APm": 0.5, "APl": float("nan")},
           "segm": {"AP": 0.25, "AP50": 0.5, "AP75": 0.125, "APs": 0.25, "APm": 0.25, "APl": float("nan")}}


def two_group_setup():
    model = TwoGroupLosses()
    # heads listed first: the `lr` tag must still be the backbone group's.
    opt = torch.optim.SGD([{"params": [model.heads], "lr": 0.1, "name": "heads"},
                           {"params": [model.backbone], "lr": 0.01, "name": "backbone"}], lr=0.01)
    return model, opt


MAPPING = CategoryMapping([{"id": 1, "name": "a"}])


def run_fit(stub, *, epochs, eval_every=1, hooks=(), run_dir=None, **kwargs):
    from maskrcnn_coco.engine import fit

    model, opt = two_group_setup()
    train = CountingLoader(scripted_loader(ROWS))
    stub.train_loader = train
    val = ["val batches"]
    settings = FitSettings(epochs=epochs, eval_every=eval_every, loss_weights=WEIGHTS, progress=False, **kwargs)
    history = fit(model, opt, train, val, settings, None if run_dir is not None else [GradNormMeter(), *hooks],
                  run_dir=run_dir, mapping=MAPPING)
    return history, train, val


# ---- the tiny model's optimizer and batches (test_loop, test_monitors, test_eval_step, test_solver)
def sgd_config(impl="auto", **factory):
    return OmegaConf.merge(OmegaConf.structured(OptimizerConfig), {
        "lr": 0.01, "impl": impl, "groups": default_param_groups(1.0),
        "factory": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, **factory},
    })


def batches_of(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


# ----------------------------------- synthetic histories and spikes (test_diagnostics, test_writers)
def make_history(rows, val_rows=None, extra=None):
    """rows: per epoch, the five train components (tuple in LOSS_COMPONENTS order or a dict)."""
    history = []
    for e, row in enumerate(rows, start=1):
        values = row if isinstance(row, dict) else dict(zip(LOSS_COMPONENTS, row))
        record = {"epoch": e, **{f"loss/train_{c}": v for c, v in values.items()}}
        if val_rows is not None:
            val = val_rows[e - 1]
            val = val if isinstance(val, dict) else dict(zip(LOSS_COMPONENTS, val))
            record.update({f"loss/val_{c}": v for c, v in val.items()})
        record.update((extra or {}).get(e, {}))
        history.append(record)
    return history


def falling(n, start=(0.8, 0.4, 0.6, 0.2, 0.05), rate=0.8, **fixed):
    """n epochs where every component falls by ``rate`` per epoch, except ``fixed`` ones (lists of values)."""
    rows = []
    for e in range(n):
        row = {c: s * rate**e for c, s in zip(LOSS_COMPONENTS, start)}
        row.update({c: values[e] for c, values in fixed.items()})
        rows.append(row)
    return rows


PARTS = dict.fromkeys(LOSS_COMPONENTS, 0.2)


# -------------------- in-process runs and their checkpoints (test_experiment, test_train, test_dist)
def compose_cfg(*overrides):
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*TINY_OVERRIDES, "tracker=none", *overrides])


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


# ------------------------------------------------ a sweep job's folder name (test_train, test_probe)
SWEEP_JOB = "runs/maskrcnn/multirun/2026-01-01_00-00-00/0_optimizer.head_lr_multiplier=1"


# ---------------------------------------- COCO files with messy data (test_data_coco, test_validate)
CATS = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
NO_AUG = AugmentConfig(hflip_prob=0.0)


def noise_png(path, width=64, height=48, seed=0):
    """A PNG that compresses badly, so that cutting it short really truncates the pixel data."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def simple_dataset(tmp_path, split="train", n=2, anns=None, cats=CATS):
    images = [{"id": i, "file_name": f"{i}.png", "height": 48, "width": 64} for i in range(1, n + 1)]
    anns = anns if anns is not None else [square_ann(i, i, 3, 4, 4, 10) for i in range(1, n + 1)]
    return write_coco_dataset(tmp_path, cats, images, anns, split=split)


def run_cli(main, argv):
    """A command's ``main`` in process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()
