"""``engine/loop.py``: ``train_one_epoch``. Epoch means, weighted gradients, non-finite losses, clipping,
bit for bit a bare torchvision loop, host reads only every ``print_freq`` iterations, autocast."""

import contextlib
import math
from collections import Counter

import pytest
import torch
from helpers import ScriptedLosses, batches_of, scripted_loader, sgd_config
from omegaconf import OmegaConf
from torch import nn

from maskrcnn_coco.config import LOSS_COMPONENTS, SchedulerConfig
from maskrcnn_coco.engine import FitSettings, GradNormMeter, train_one_epoch
from maskrcnn_coco.engine.loop import move_to_device
from maskrcnn_coco.engine.monitors import DivergenceGuard, IterationTimer, SpikeMonitor
from maskrcnn_coco.solver.param_groups import build_optimizer
from maskrcnn_coco.solver.schedule import build_lr_scheduler


class Recorder(nn.Module):
    """Wraps a model and keeps every loss dict it returns in training mode."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seen = []

    def forward(self, images, targets=None):
        out = self.model(images, targets)
        if self.training:
            self.seen.append({k: float(v.detach()) for k, v in out.items()})
        return out


@pytest.mark.slow
def test_train_one_epoch_returns_the_mean_of_each_component(tiny_model, tiny_data):
    model = Recorder(tiny_model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    result = train_one_epoch(model, opt, tiny_data.train_loader, "cpu", 1, settings=FitSettings(print_freq=1))
    assert list(result) == list(LOSS_COMPONENTS)  # exactly the five, no total
    assert len(model.seen) == len(tiny_data.train_loader) == 4
    for name in LOSS_COMPONENTS:
        expected = sum(batch[name] for batch in model.seen) / len(model.seen)
        assert result[name] == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_scripted_means_and_weighted_gradient():
    rows = [[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 0.0, 1.0, 0.0, 1.0]]
    model = ScriptedLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: w stays 1, gradients still computed
    weights = {"loss_mask": 2.0, "loss_objectness": 0.5}
    result = train_one_epoch(model, opt, scripted_loader(rows), "cpu", 1, settings=FitSettings(loss_weights=weights))
    assert result == {"loss_classifier": 2.0, "loss_box_reg": 1.0, "loss_mask": 2.0, "loss_objectness": 2.0, "loss_rpn_box_reg": 3.0}
    # The last step's gradient is d/dw of the weighted sum for the last batch: 3 + 0 + 2*1 + 0.5*0 + 1.
    assert float(model.w.grad) == pytest.approx(6.0)


def test_non_finite_loss_names_iteration_component_and_images():
    rows = [[1.0] * 5, [1.0, 1.0, float("nan"), 1.0, 1.0], [1.0] * 5]
    model = ScriptedLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(FloatingPointError) as err:
        train_one_epoch(model, opt, scripted_loader(rows), "cpu", 3, settings=FitSettings(print_freq=2))
    message = str(err.value)
    assert "epoch 3, iteration 1" in message and "loss_mask" in message and "image ids [1]" in message
    # One component failed: the images' annotations come first, the learning rate second.
    assert "Only this component failed" in message
    assert message.index("annotations") < message.index("optimizer.lr")


def test_every_component_non_finite_points_at_the_learning_rate_first():
    rows = [[1.0] * 5, [float("inf")] * 5]
    model = ScriptedLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(FloatingPointError) as err:
        train_one_epoch(model, opt, scripted_loader(rows), "cpu", 1, settings=FitSettings(print_freq=1))
    message = str(err.value)
    assert "Every component failed at once" in message
    assert message.index("optimizer.lr") < message.index("annotations")


# ------------------------------------------------------------------------------------------ clipping
class LinearLosses(nn.Module):
    """loss_classifier = 3 a, loss_box_reg = 4 b (the rest 0): gradient (3, 4), global norm 5."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, images, targets=None):
        zero = 0.0 * (self.a + self.b)
        return {"loss_classifier": 3.0 * self.a, "loss_box_reg": 4.0 * self.b,
                "loss_mask": zero, "loss_objectness": zero, "loss_rpn_box_reg": zero}


@pytest.mark.parametrize("clip, expected_step", [(None, (3.0, 4.0)), (2.5, (1.5, 2.0)), (100.0, (3.0, 4.0))])
def test_clipping_bounds_the_global_norm_and_norms_are_recorded_before(clip, expected_step):
    model = LinearLosses()
    opt = torch.optim.SGD([{"params": [model.a], "name": "a"}, {"params": [model.b], "name": "b"}], lr=1.0, momentum=0.0)
    meter = GradNormMeter.from_optimizer(opt)
    train_one_epoch(model, opt, scripted_loader([[0.0] * 5]), "cpu", 1, [meter], settings=FitSettings(clip_grad_norm=clip))
    # One SGD step at lr 1 moves each parameter by minus its (clipped) gradient: the global norm
    # (3, 4) -> 5 is scaled to `clip`, not each group to `clip` on its own.
    after = (float(model.a.detach()), float(model.b.detach()))
    assert after == pytest.approx((-expected_step[0], -expected_step[1]), rel=1e-5)
    assert (float(model.a.grad), float(model.b.grad)) == pytest.approx(expected_step, rel=1e-5)
    assert meter.compute() == pytest.approx({"a": 3.0, "b": 4.0})  # before clipping


# ----------------------------------------------------------------------- training = bare torchvision
def scheduler(optimizer, iters):
    return build_lr_scheduler(OmegaConf.structured(SchedulerConfig(warmup_iters=2, milestones=[0.5])), optimizer, iters, 2)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["auto", "for_loop"])
def test_train_one_epoch_is_bit_identical_to_a_bare_torchvision_loop(tiny_model, tiny_data, impl):
    """Everything fit adds (group and module gradient norms, divergence guard, timer, read-backs)
    leaves the training bit for bit the bare loop's: losses, weights, BN buffers, gradients."""
    model, batches = tiny_model, batches_of(tiny_data.train_loader)
    start, rng = snapshot(model), torch.random.get_rng_state()

    optimizer = build_optimizer(sgd_config(impl), model, verbose=False)
    assert optimizer.defaults.get("fused") is (True if impl == "auto" else None)  # auto: fused SGD on CPU
    meter = GradNormMeter.from_optimizer(optimizer, model=model, every=1)
    ours = train_one_epoch(model, optimizer, batches, "cpu", 1, [meter, DivergenceGuard(factor=1e4), IterationTimer(), SpikeMonitor()],
                           settings=FitSettings(print_freq=2), lr_scheduler=scheduler(optimizer, len(batches)))
    assert set(meter.compute()) >= {"backbone", "rpn", "heads", "module.rpn_head", "module.roi_heads_mask_predictor"}
    ours_state, ours_grads = snapshot(model), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.load_state_dict(start)
    torch.random.set_rng_state(rng)
    optimizer = build_optimizer(sgd_config(impl), model, verbose=False)
    sched = scheduler(optimizer, len(batches))
    model.train()
    sums = torch.zeros(len(LOSS_COMPONENTS))
    for images, targets in batches:
        images, targets = move_to_device(images, targets, torch.device("cpu"))
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sched.step()
        sums += torch.stack([loss_dict[k] for k in LOSS_COMPONENTS]).detach()
    bare = dict(zip(LOSS_COMPONENTS, (sums / len(batches)).tolist()))

    assert ours == bare
    assert_same(ours_state, snapshot(model))
    bare_grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, bare_grads))


# ------------------------------------------------------------------------ no per-iteration host sync
class FiveHeads(nn.Module):
    """A tiny model with the loss-producing modules' names; its forward reads nothing back."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.rpn = nn.Module()
        self.rpn.head = nn.Linear(4, 2)
        self.roi_heads = nn.Module()
        self.roi_heads.box_head = nn.Linear(4, 4)
        self.roi_heads.box_predictor = nn.Linear(4, 2)
        self.roi_heads.mask_head = nn.Linear(4, 4)
        self.roi_heads.mask_predictor = nn.Linear(4, 1)

    def forward(self, images, targets=None):
        f = self.backbone(torch.stack(images)).mean((0, 2, 3))
        obj, rpn_box = self.rpn.head(f)
        cls, box = self.roi_heads.box_predictor(self.roi_heads.box_head(f))
        mask = self.roi_heads.mask_predictor(self.roi_heads.mask_head(f))[0]
        return {"loss_objectness": obj.square(), "loss_rpn_box_reg": rpn_box.square(), "loss_classifier": cls.square(),
                "loss_box_reg": box.square(), "loss_mask": mask.square()}


HOST_READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def counting_host_reads():
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def host_reads(n_iterations, print_freq=8):
    torch.manual_seed(0)
    model = FiveHeads()
    optimizer = torch.optim.SGD([{"params": list(model.backbone.parameters()), "name": "backbone"},
                                 {"params": list(model.rpn.parameters()) + list(model.roi_heads.parameters()), "name": "heads"}],
                                lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / 4))
    batches = [([torch.rand(3, 8, 8), torch.rand(3, 8, 8)], [{"image_id": 2 * i}, {"image_id": 2 * i + 1}])
               for i in range(n_iterations)]
    meter = GradNormMeter.from_optimizer(optimizer, model=model, every=1)
    assert "module.roi_heads_box_head" in meter.groups
    from maskrcnn_coco.engine.monitors import PeriodicCheckpoint
    from maskrcnn_coco.engine.writers import ProgressBar

    hooks = [meter, DivergenceGuard(factor=1e4), IterationTimer(), PeriodicCheckpoint(10**6), ProgressBar()]
    settings = FitSettings(loss_weights={"loss_mask": 2.0}, clip_grad_norm=10.0, print_freq=print_freq)
    with counting_host_reads() as counts:
        train_one_epoch(model, optimizer, batches, "cpu", 1, hooks, settings=settings, lr_scheduler=sched)
    return sum(counts.values()), dict(counts)


def test_train_one_epoch_reads_back_only_every_print_freq_iterations():
    """Host reads (item/tolist/cpu/numpy/int/float/bool of a tensor) grow with N / print_freq, not N:
    8 and 12 iterations (one read-back point each, plus the epoch's end) read back the same number of
    times; the first iteration's loss is read once per run for the divergence guard."""
    n8, by_kind = host_reads(8)
    n12, _ = host_reads(12)
    n16, _ = host_reads(16)
    assert n8 > 0, by_kind
    assert n12 == n8, (n8, n12)
    assert n8 < n16 <= 2 * n8, (n8, n16)


# ----------------------------------------------------------------------------------------------- amp
@pytest.mark.slow
def test_bf16_autocast_trains_on_cpu(tiny_model, tiny_data):
    batches = batches_of(tiny_data.train_loader, 2)
    optimizer = build_optimizer(sgd_config(), tiny_model, verbose=False)
    losses = train_one_epoch(tiny_model, optimizer, batches, "cpu", 1, settings=FitSettings(amp="bf16"))
    assert all(math.isfinite(v) for v in losses.values())
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())
    with pytest.raises(ValueError, match=r"train\.amp"):
        train_one_epoch(tiny_model, optimizer, batches, "cpu", 1, settings=FitSettings(amp="fp8"))
