"""Speed work that must not change results: the loop against a bare torchvision loop (bit for bit),
evaluation from one backbone pass (equal to the two-pass losses), no per-iteration host sync,
COCOeval backends, batched host copies, grouped batches, amp, optimizer implementations."""

import contextlib
import math
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from maskrcnn_coco.config import LOSS_COMPONENTS, OptimizerConfig, SchedulerConfig, default_param_groups
from maskrcnn_coco.engine.eval_step import STAGES, evaluate_batch, loss_mode, restored_modes, shares_features
from maskrcnn_coco.engine.evaluate import evaluate
from maskrcnn_coco.engine.loop import move_to_device, stack_losses, train_one_epoch
from maskrcnn_coco.engine.monitors import DivergenceGuard, GradNormMeter, IterationTimer, SpikeMonitor
from maskrcnn_coco.engine.settings import FitSettings
from maskrcnn_coco.evaluation.coco_eval import coco_metrics, predictions_to_coco, resolve_backend
from maskrcnn_coco.solver.param_groups import build_optimizer
from maskrcnn_coco.solver.schedule import build_lr_scheduler


def sgd_config(impl="auto", **factory):
    return OmegaConf.merge(OmegaConf.structured(OptimizerConfig), {
        "lr": 0.01, "impl": impl, "groups": default_param_groups(1.0),
        "factory": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, **factory},
    })


def scheduler(optimizer, iters):
    return build_lr_scheduler(OmegaConf.structured(SchedulerConfig(warmup_iters=2, milestones=[0.5])), optimizer, iters, 2)


def batches_of(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


# ------------------------------------------------------------------------------ training = bare torchvision
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


# ------------------------------------------------------------------------------ no per-iteration host sync
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


# ------------------------------------------------------------------------------ evaluation from one backbone pass
def two_pass(model, batches, seed=0):
    """The implementation before the shared pass: model(images, targets) under loss_mode, then model(images)."""
    sums, n, outputs = torch.zeros(len(LOSS_COMPONENTS)), 0, []
    with torch.random.fork_rng(devices=[]), restored_modes(model):
        torch.manual_seed(seed)
        for images, targets in batches:
            with loss_mode(model), torch.no_grad():
                sums += stack_losses(model(images, targets)) * len(images)
            n += len(images)
            model.eval()
            with torch.inference_mode():
                outputs.append(model(images))
    return dict(zip(LOSS_COMPONENTS, (sums / n).tolist())), outputs


@pytest.mark.parametrize("multi_scale", [False, True])
def test_evaluation_losses_and_detections_equal_the_two_pass_computation(tiny_model, tiny_data, multi_scale):
    model, batches = tiny_model, batches_of(tiny_data.val_loader)
    if multi_scale:  # a training-mode transform would pick one of these at random: two passes then
        model.transform.min_size = (56, 64)
    assert shares_features(model) is not multi_scale
    expected_losses, expected_outputs = two_pass(model, batches)

    val_losses, _ = evaluate(model, tiny_data.val_loader, "cpu", mapping=tiny_data.mapping, progress=False, compute_metrics=False)
    assert val_losses == expected_losses  # bit for bit
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for (images, targets), expected in zip(batches, expected_outputs):
            marks: list[str] = []  # the benchmark times these stages
            _, outputs = evaluate_batch(model, images, targets, mark=marks.append)
            assert marks == (["losses", "detections"] if multi_scale else list(STAGES))
            assert len(outputs) == len(expected) and sum(len(o["boxes"]) for o in outputs) > 0
            for got, want in zip(outputs, expected):
                assert got.keys() == want.keys()
                assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_rpn_head_runs_once_for_both_settings_unless_a_layer_depends_on_the_mode(tiny_model, tiny_data):
    model = tiny_model
    (images, targets), = batches_of(tiny_data.val_loader, 1)
    calls = []  # cls_logits runs once per FPN level each time the head really computes
    model.rpn.head.cls_logits.register_forward_pre_hook(lambda module, args: calls.append(1))
    evaluate_batch(model, images, targets, losses=False)
    once = len(calls)
    calls.clear()
    with torch.random.fork_rng(devices=[]):
        losses, outputs = evaluate_batch(model, images, targets)
    assert once > 0 and len(calls) == once and losses and outputs
    assert "forward" not in model.rpn.head.__dict__  # the cache is gone afterwards

    # A Dropout in the head acts differently in the loss setting (train mode): computed per setting.
    model.rpn.head.conv.append(nn.Dropout(0.5))
    calls.clear()
    with torch.random.fork_rng(devices=[]):
        evaluate_batch(model, images, targets)
    assert len(calls) == 2 * once


def test_torchvision_rpn_heads_are_shared(tiny_model):
    import torchvision

    from maskrcnn_coco.engine.eval_step import MODE_FREE_LAYERS

    for builder in (torchvision.models.detection.maskrcnn_resnet50_fpn, torchvision.models.detection.maskrcnn_resnet50_fpn_v2):
        head = builder(weights=None, weights_backbone=None, num_classes=3).rpn.head
        assert all(isinstance(m, MODE_FREE_LAYERS) for m in head.modules()), builder.__name__
    assert all(isinstance(m, MODE_FREE_LAYERS) for m in tiny_model.rpn.head.modules())


# ------------------------------------------------------------------------------ COCOeval backends, host copies
def per_image_reference(outputs, image_ids, mapping, mask_threshold=0.5):
    """predictions_to_coco before batching: four copies per image."""
    from pycocotools import mask as mask_utils

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        masks = out["masks"].detach()
        masks = (masks[:, 0] if masks.dim() == 4 else masks) > mask_threshold
        rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
        for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            results.append({"image_id": int(image_id), "category_id": mapping.to_coco_id(label), "bbox": box, "score": score,
                            "segmentation": {"size": rles[i]["size"], "counts": rles[i]["counts"].decode("ascii")}})
    return results


def random_outputs(sizes, counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = []
    for (h, w), n in zip(sizes, counts):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])], dim=1)
        outs.append({"boxes": boxes, "scores": torch.rand(n, generator=g), "labels": torch.randint(1, 4, (n,), generator=g),
                     "masks": torch.rand(n, 1, h, w, generator=g)})
    return outs


def test_predictions_to_coco_per_batch_equals_per_image_copies(tiny_data):
    outputs = random_outputs([(20, 30), (17, 9), (20, 30), (5, 40)], [3, 0, 5, 1])
    ids = [11, 12, 13, 14]
    assert predictions_to_coco(outputs, ids, tiny_data.mapping) == per_image_reference(outputs, ids, tiny_data.mapping)


def test_cocoeval_backends_give_identical_metrics(tiny_data):
    if resolve_backend("auto") != "faster_coco_eval":
        pytest.skip("faster-coco-eval is not installed")
    coco = tiny_data.val_loader.dataset.coco
    g = torch.Generator().manual_seed(1)
    results = []
    for ann in coco.anns.values():  # every object found, jittered, with a random score; some false positives
        x, y, w, h = ann["bbox"]
        jitter = (torch.rand(4, generator=g) - 0.5).tolist()
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": float(torch.rand(1, generator=g)),
                        "bbox": [x + 3 * jitter[0], y + 3 * jitter[1], w + 4 * jitter[2], h + 4 * jitter[3]],
                        "segmentation": ann["segmentation"]})
        results.append({**results[-1], "category_id": 1 + ann["category_id"] % 3, "score": 0.3 * results[-1]["score"]})
    ids = sorted(coco.imgs)
    a = coco_metrics(coco, results, ids, backend="pycocotools")
    b = coco_metrics(coco, results, ids, backend="faster_coco_eval")
    assert a.keys() == b.keys() == {"bbox", "segm"}
    for iou_type in a:
        assert a[iou_type].keys() == b[iou_type].keys()
        for k, v in a[iou_type].items():
            assert (math.isnan(v) and math.isnan(b[iou_type][k])) or v == b[iou_type][k], (iou_type, k)
    assert 0 < a["segm"]["AP"] < 1


# ------------------------------------------------------------------------------ gradient norms every N iterations
def test_grad_norms_are_the_mean_over_the_sampled_iterations():
    weight = nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([{"params": [weight], "name": "all"}], lr=0.0)

    class Scripted(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = weight

        def forward(self, images, targets):
            c = targets[0]["c"]
            return {k: self.w * c if k == "loss_mask" else self.w * 0.0 for k in LOSS_COMPONENTS}

    batches = [([torch.zeros(1)], [{"image_id": i, "c": torch.tensor(float(c))}]) for i, c in enumerate([1, 2, 3, 4, 5])]
    meter = GradNormMeter.from_optimizer(optimizer, every=2)
    train_one_epoch(Scripted(), optimizer, batches, "cpu", 1, [meter])
    assert meter.count == 3 and meter.compute() == pytest.approx({"all": (1 + 3 + 5) / 3})


def test_fit_records_module_grad_norms_lrs_and_loader_times(tiny_model, tiny_data):
    from maskrcnn_coco.engine import fit

    optimizer = build_optimizer(sgd_config(), tiny_model, verbose=False)
    history = fit(tiny_model, optimizer, tiny_data.train_loader, None, FitSettings(progress=False),
                  [GradNormMeter(every=2), IterationTimer()], mapping=tiny_data.mapping)
    (record,) = history
    modules = ["rpn_head", "roi_heads_box_head", "roi_heads_box_predictor", "roi_heads_mask_head", "roi_heads_mask_predictor"]
    for m in modules:
        assert record[f"grad_norm/module.{m}"] > 0
        assert record[f"lr/module.{m}"] == record["lr/rpn" if m == "rpn_head" else "lr/heads"]
    assert record["time/iter"] >= record["time/data"] >= 0


# ------------------------------------------------------------------------------ grouped batches
def test_grouped_order_keeps_batches_in_one_group_and_resumes_exactly():
    from maskrcnn_coco.data.samplers import TrainSampler, aspect_ratio_groups, group_batches

    assert aspect_ratio_groups([(640, 480), (480, 640), (100, 100), (1000, 100)], factor=0) == [1, 0, 1, 1]
    groups = [i % 3 == 0 for i in range(23)]
    order = list(range(23))
    batches = group_batches(order, groups, 4)
    assert sorted(i for b in batches for i in b) == order
    # 8 of group True, 15 of group False: 2 + 3 batches of one group, then the 3 left over (mixed, partial).
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 3]
    assert all(len({groups[i] for i in b}) == 1 for b in batches[:5])

    sampler = TrainSampler(23, seed=5, group_ids=groups, batch_size=4)
    sampler.set_epoch(2)
    whole = [i for i, _ in sampler]
    assert sorted(whole) == order and len(whole) == len(sampler) == 23
    assert all(len({groups[i] for i in whole[k:k + 4]}) == 1 for k in range(0, 16, 4))  # grouped batches first
    sampler.skip_next(8)  # two iterations trained
    assert [i for i, _ in sampler] == whole[8:]

    ranks = [TrainSampler(23, seed=5, group_ids=groups, batch_size=4, rank=r, world_size=2) for r in range(2)]
    shards = []
    for s in ranks:
        s.set_epoch(2)
        shards.append([i for i, _ in s])
    assert set(shards[0]) | set(shards[1]) == set(order)
    assert math.ceil(len(shards[0]) / 4) == math.ceil(len(shards[1]) / 4) == math.ceil(ranks[0].num_samples / 4)

    single = TrainSampler(23, seed=5, group_ids=[0] * 23, batch_size=4)  # one group: the plain order
    plain = TrainSampler(23, seed=5)
    single.set_epoch(2)
    plain.set_epoch(2)
    assert list(single) == list(plain)


# ------------------------------------------------------------------------------ amp, optimizer, config
def test_bf16_autocast_trains_on_cpu(tiny_model, tiny_data):
    batches = batches_of(tiny_data.train_loader, 2)
    optimizer = build_optimizer(sgd_config(), tiny_model, verbose=False)
    losses = train_one_epoch(tiny_model, optimizer, batches, "cpu", 1, settings=FitSettings(amp="bf16"))
    assert all(math.isfinite(v) for v in losses.values())
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())
    with pytest.raises(ValueError, match=r"train\.amp"):
        train_one_epoch(tiny_model, optimizer, batches, "cpu", 1, settings=FitSettings(amp="fp8"))


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
