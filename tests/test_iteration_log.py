"""``engine/iteration_log.py``: one host read per read-back point, shared by the progress line and the
``iter/`` scalars; the window means, lrs, times, memory and gradient norms the trackers receive."""

import logging
import re
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from helpers import MAPPING, ROWS, WEIGHTS, scripted_loader, sgd_config, two_group_setup

from maskrcnn_coco.data.coco import build_data
from maskrcnn_coco.engine import (
    FitSettings,
    GradNormMeter,
    Hook,
    IterationTimer,
    TrackerWriter,
    default_hooks,
    fit,
    iteration_log,
)
from maskrcnn_coco.engine.iteration_log import LATEST_KEY, IterationLog, MemoryReader
from maskrcnn_coco.engine.loop import TrainingStopped, train_one_epoch
from maskrcnn_coco.engine.state import EpochProgress, TrainingState
from maskrcnn_coco.engine.writers import SHORT_NAMES, ProgressBar
from maskrcnn_coco.modeling.build import build_model
from maskrcnn_coco.solver.param_groups import build_optimizer, group_lrs
from maskrcnn_coco.tracking.backends import NullTracker
from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS, iteration_scalars

from conftest import tiny_data_cfg, tiny_model_cfg

ITER_LOSS_TAGS = [f"iter/{c}" for c in LOSS_COMPONENTS] + ["iter/loss_total"]


class Recorder(NullTracker):
    """A tracker that keeps every call: ``{tag: [(step, value), ...]}``."""

    def __init__(self):
        self.scalars = {}

    def log_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def steps(self, tag):
        return [s for s, _ in self.scalars.get(tag, [])]

    def at(self, tag):
        return dict(self.scalars[tag])


class StepRecorder(Hook):
    """Each step's components, gradient norms (device copies: reading them here would be a host sync
    per iteration) and group lrs (host values), by global step."""

    main_process_only = False

    def __init__(self):
        self.state = None
        self.components, self.grad_norms, self.lrs = {}, {}, {}

    def before_epoch(self, state):
        self.state = state  # the host reads' clock: the global step at each read

    def after_step(self, state):
        self.components[state.global_step] = state.step_components.clone()
        if state.step_grad_norms is not None:
            self.grad_norms[state.global_step] = state.step_grad_norms.clone()
        self.lrs[state.global_step] = group_lrs(state.optimizer)


def window_mean(values, after, upto):
    rows = [values[s] for s in sorted(values) if after < s <= upto]
    return torch.stack(rows).double().mean(0).tolist()


@contextmanager
def host_reads(recorder):
    """Every device-to-host read during the block, as (calling file, global step at the call)."""
    reads = []
    names = ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(original):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            reads.append((caller, recorder.state.global_step if recorder.state is not None else 0))
            return original(self, *args, **kwargs)
        return counted

    for n, original in originals.items():
        setattr(torch.Tensor, n, wrap(original))
    try:
        yield reads
    finally:
        for n, original in originals.items():
            setattr(torch.Tensor, n, original)


def old_progress_values(components, n, weights):
    """What ProgressBar showed before the IterationLog: its own float32 running means and total."""
    sums = torch.zeros(len(LOSS_COMPONENTS))
    for c in components[:n]:
        sums += c  # the loop's accumulation, in its order
    means = sums / n
    *values, total = torch.cat([means, (means * weights).sum()[None]]).tolist()
    return {**{SHORT_NAMES[k]: f"{v:.3f}" for k, v in zip(LOSS_COMPONENTS, values)}, "total": f"{total:.3f}"}


LINE = re.compile(r"^Epoch (\d+) \[(\d+)/4\] (.*?) lr=\S+ data=\d+ms iter=\d+ms \|")


def test_the_tags_of_the_iter_namespace():
    tags = iteration_scalars({
        "loss": dict(zip(LOSS_COMPONENTS, [1.0, 2.0, 3.0, 4.0, 5.0])), "loss_weights": {"loss_mask": 2.0},
        "lr": {"backbone": 0.01, "heads": 0.02}, "grad_norm": {"heads": 1.5, "module.rpn_head": 0.5},
        "time": {"data": 0.01, "iter": 0.2}, "images_per_s": 40.0,
        "memory": {"main_rss_mb": 900.0, "workers_uss_mb": 100.0, "workers_pss_mb": 150.0},
    })
    assert tags == {
        "iter/loss_classifier": 1.0, "iter/loss_box_reg": 2.0, "iter/loss_mask": 3.0, "iter/loss_objectness": 4.0,
        "iter/loss_rpn_box_reg": 5.0, "iter/loss_total": 18.0, "iter/lr/backbone": 0.01, "iter/lr/heads": 0.02,
        "iter/grad_norm/heads": 1.5, "iter/grad_norm/module.rpn_head": 0.5, "iter/time_data": 0.01,
        "iter/time_iter": 0.2, "iter/images_per_s": 40.0, "iter/memory/main_rss_mb": 900.0,
        "iter/memory/workers_uss_mb": 100.0, "iter/memory/workers_pss_mb": 150.0,
    }
    assert iteration_scalars({}) == {}


@pytest.mark.slow
def test_a_tiny_fit_logs_window_means_at_every_read_back_with_one_host_read(tmp_path, caplog):
    # 8 images in batches of 2: 4 iterations an epoch; print_freq=3: read-backs at iterations 3 and 4
    # (the epoch's end) of each epoch, global steps 3, 4, 7, 8. One loader worker: its memory is logged.
    data = build_data(tiny_data_cfg(num_workers=1), seed=0, progress=False)
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(), data.mapping.num_classes)
    optimizer = build_optimizer(sgd_config(), model, verbose=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 / (1 + i))  # a new lr every step
    settings = FitSettings(epochs=2, print_freq=3, loss_weights=WEIGHTS, progress=True)
    tracker, recorder = Recorder(), StepRecorder()
    hooks = [*default_hooks(tmp_path, settings, tracker), recorder]
    (log_hook,) = [h for h in hooks if isinstance(h, IterationLog)]
    log_hook.memory = MemoryReader(workers_share=1.0)  # the workers at every read-back, for the test
    caplog.set_level(logging.INFO, logger="maskrcnn_coco")
    with host_reads(recorder) as reads:
        history = fit(model, optimizer, data.train_loader, None, settings, hooks, mapping=data.mapping, lr_scheduler=scheduler)
    read_backs = [3, 4, 7, 8]

    # Tags at the read-back points, step = global step; the epoch tags unchanged, no iter/ tag among them.
    for tag in [*ITER_LOSS_TAGS, "iter/time_data", "iter/time_iter", "iter/images_per_s", "iter/memory/main_rss_mb",
                "iter/memory/workers_uss_mb", "iter/memory/workers_pss_mb", *(f"iter/lr/{g}" for g in group_lrs(optimizer))]:
        assert tracker.steps(tag) == read_backs, tag
    assert not any(t.startswith("iter/memory/cuda") for t in tracker.scalars)
    assert [tracker.steps("loss/train_total")] == [[1, 2]] and not any(k.startswith("iter/") for r in history for k in r)

    # Window means: the mean of the per-iteration components since the previous read-back.
    weights = torch.tensor([WEIGHTS.get(c, 1.0) for c in LOSS_COMPONENTS])
    for prev, step in zip([0, *read_backs], read_backs):
        expected = window_mean(recorder.components, prev, step)
        assert [tracker.at(f"iter/{c}")[step] for c in LOSS_COMPONENTS] == pytest.approx(expected, rel=1e-5)
        total = sum(WEIGHTS.get(c, 1.0) * v for c, v in zip(LOSS_COMPONENTS, expected))
        assert tracker.at("iter/loss_total")[step] == pytest.approx(total, rel=1e-5)
        norms = window_mean(recorder.grad_norms, prev, step)
        meter = next(h for h in hooks if isinstance(h, GradNormMeter))
        assert [tracker.at(f"iter/grad_norm/{g}")[step] for g in meter.groups] == pytest.approx(norms, rel=1e-4)
        for group, lr in recorder.lrs[step].items():
            assert tracker.at(f"iter/lr/{group}")[step] == lr
        assert tracker.at("iter/images_per_s")[step] > 0
        assert tracker.at("iter/time_iter")[step] >= tracker.at("iter/time_data")[step] >= 0
        for name in ("main_rss_mb", "workers_uss_mb", "workers_pss_mb"):
            assert tracker.at(f"iter/memory/{name}")[step] > 0
    assert tracker.at("iter/memory/main_rss_mb")[3] > 100  # a process with torch in it: MiB, not bytes or pages

    # The progress line: at iteration 3 of each epoch, the same numbers the old ProgressBar computed.
    lines = [LINE.match(r.getMessage()) for r in caplog.records if r.name == "maskrcnn_coco.engine.progress"]
    assert [(m.group(1), m.group(2)) for m in lines if m] == [("1", "3"), ("2", "3")]
    for m, first in zip(lines, (1, 5)):
        shown = dict(kv.split("=") for kv in m.group(3).split())
        epoch_components = [recorder.components[s] for s in range(first, first + 4)]
        assert shown == old_progress_values(epoch_components, 3, weights)

    check_host_reads(reads, read_backs)


def check_host_reads(reads, read_backs):
    """The IterationLog's one host read per read-back point, none by the progress line, and no read of
    the engine between the read-back points (global step 1: the divergence guard's reference, once per
    run). Reads inside the model (torchvision's own) and the loader are not the engine's."""
    ours = [step for caller, step in reads if caller.endswith("iteration_log.py")]
    assert ours == read_backs
    assert not [r for r in reads if r[0].endswith("writers.py")]
    engine = {step for caller, step in reads if "maskrcnn_coco/engine/" in caller}
    assert engine <= {1, *read_backs}, sorted({r for r in reads if r[1] not in read_backs})


def resume_rows(n=7):
    return [[float(i + 1), 0.5 * i, 1.0, 2.0 + i, 0.25] for i in range(n)]


def test_a_resumed_partial_epoch_starts_its_first_window_where_it_resumed(caplog):
    # Iterations 0-1 were trained before the stop; the resumed process trains 2-6. print_freq=3:
    # read-backs at 3 (a window of one iteration: the 3rd), 6 (4th-6th) and the epoch's end (7th).
    rows = resume_rows()
    model, optimizer = two_group_setup()
    tracker = Recorder()
    state = TrainingState(model, optimizer, None, None, MAPPING, 1)
    state.progress = EpochProgress(2, [sum(r[i] for r in rows[:2]) for i in range(len(LOSS_COMPONENTS))], 2)
    state.global_step = 2
    hooks = [GradNormMeter(), IterationTimer(), IterationLog(), ProgressBar(), TrackerWriter(tracker)]
    caplog.set_level(logging.INFO, logger="maskrcnn_coco")
    train_one_epoch(model, optimizer, scripted_loader(rows)[2:], "cpu", 1, hooks,
                    settings=FitSettings(print_freq=3, loss_weights=WEIGHTS), state=state)
    assert tracker.steps("iter/loss_mask") == [3, 6, 7]
    for c, col in zip(LOSS_COMPONENTS, zip(*rows)):
        got = tracker.at(f"iter/{c}")
        assert got[3] == pytest.approx(col[2]) and got[6] == pytest.approx(sum(col[3:6]) / 3) and got[7] == pytest.approx(col[6])
    # The progress line's running means still count the iterations before the stop.
    line = next(r.getMessage() for r in caplog.records if r.name == "maskrcnn_coco.engine.progress")
    assert re.match(r"Epoch 1 \[3/\d+\] cls=2\.000 box=0\.500 mask=1\.000 obj=3\.000 rpn=0\.250 total=", line), line
    # The gradient norms measured since the resume: TwoGroupLosses' heads norm is |c0 + c1 + 2 c2|.
    heads = [abs(r[0] + r[1] + 2 * r[2]) for r in rows]  # loss_mask weighs 2
    assert tracker.at("iter/grad_norm/heads")[3] == pytest.approx(heads[2])
    assert tracker.at("iter/grad_norm/heads")[6] == pytest.approx(sum(heads[3:6]) / 3)


def test_a_step_boundary_stop_does_not_cut_the_window():
    # A stop at iteration 2 (a periodic checkpoint) and the epoch continued in the same process: the
    # window at the read-back (iteration 3) still holds the 3 iterations since the epoch began.
    rows = resume_rows()

    class StopOnce(Hook):
        def after_step(self, state):
            if state.n_batches == 2 and state.global_step == 2:
                state.request_boundary("checkpoint")

    model, optimizer = two_group_setup()
    tracker = Recorder()
    state = TrainingState(model, optimizer, None, None, MAPPING, 1)
    hooks = [GradNormMeter(), IterationTimer(), IterationLog(), StopOnce(), TrackerWriter(tracker)]
    settings = FitSettings(print_freq=3)
    with pytest.raises(TrainingStopped):
        train_one_epoch(model, optimizer, scripted_loader(rows), "cpu", 1, hooks, settings=settings, state=state)
    train_one_epoch(model, optimizer, scripted_loader(rows)[2:], "cpu", 1, hooks, settings=settings, state=state)
    assert state.latest[LATEST_KEY].window_iterations == 1  # the epoch's end: the 7th iteration alone
    got = tracker.at("iter/loss_classifier")
    assert got == pytest.approx({3: (1 + 2 + 3) / 3, 6: (4 + 5 + 6) / 3, 7: 7.0})


def test_the_scalars_read_back_from_a_tensorboard_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from maskrcnn_coco.tracking.backends import TensorBoardTracker

    class Loader(list):
        pass

    model, optimizer = two_group_setup()
    rows = [ROWS[i % 2] for i in range(10)]
    tracker, recorder = TensorBoardTracker(tmp_path / "tb"), StepRecorder()
    settings = FitSettings(epochs=2, print_freq=3, loss_weights=WEIGHTS, progress=True)
    with host_reads(recorder) as reads:
        fit(model, optimizer, Loader(scripted_loader(rows)), None, settings,
            [*default_hooks(tmp_path, settings, tracker), recorder], mapping=MAPPING)
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0}).Reload()
    steps = [3, 6, 9, 10, 13, 16, 19, 20]  # 10 iterations an epoch: 3, 6, 9 and the end
    check_host_reads(reads, steps)
    for tag in [*ITER_LOSS_TAGS, "iter/lr/heads", "iter/lr/backbone", "iter/grad_norm/heads", "iter/time_iter"]:
        assert [e.step for e in acc.Scalars(tag)] == steps, tag
    mask = {e.step: e.value for e in acc.Scalars("iter/loss_mask")}
    assert mask[3] == pytest.approx((3 + 1 + 3) / 3) and mask[10] == pytest.approx(1.0)  # ROWS alternate: mask 3, 1
    assert [e.step for e in acc.Scalars("loss/train_total")] == [1, 2]  # the epoch tags as before


def test_worker_memory_is_read_within_its_share_of_the_time(monkeypatch):
    calls = []

    def slow_read():
        calls.append(1)
        time.sleep(0.005)
        return {"workers_uss_mb": 1.0, "workers_pss_mb": 2.0}

    monkeypatch.setattr(MemoryReader, "read_workers", staticmethod(slow_read))
    reader = MemoryReader(workers_share=1e-3)  # 5 ms of reading: not again for 5 s
    reader.start(torch.device("cpu"))
    first, second = reader.read(), reader.read()
    assert first["workers_pss_mb"] == 2.0 and "workers_pss_mb" not in second and len(calls) == 1
    assert second["main_rss_mb"] > 0 and reader.last_workers_cost_s >= 0.005
    with pytest.raises(ValueError, match="workers_share"):
        MemoryReader(workers_share=0)


def test_no_workers_no_worker_tags(monkeypatch):
    # No loader worker among the children (another test's loader may still be alive in this process).
    monkeypatch.setattr(iteration_log, "loader_workers", lambda: [])
    assert MemoryReader.read_workers() == {}


def test_cuda_memory_is_the_windows_peak_and_the_reserved_memory(monkeypatch):
    # Host-side allocator queries only (no device sync); the peak restarts at every read.
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 8 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    reader = MemoryReader()
    reader.start(torch.device("cuda", 0))
    out = reader.read()
    assert out["cuda_max_allocated_mb"] == 3.0 and out["cuda_reserved_mb"] == 8.0
    assert resets == [torch.device("cuda", 0)] * 2  # at the epoch's start and after the read


def test_the_timer_window_means_and_images_per_second(monkeypatch):
    monkeypatch.setattr("maskrcnn_coco.engine.monitors.world_size", lambda: 4)
    timer = IterationTimer()
    for data_s, iter_s in ((0.1, 1.0), (0.3, 3.0)):
        timer.add(data_s, iter_s, images=2)
    assert timer.window() == pytest.approx({"data": 0.2, "iter": 2.0, "images_per_s": 2 * 2 * 4 / 4.0})
    timer.add(0.0, 0.5, images=2)
    assert timer.window() == pytest.approx({"data": 0.0, "iter": 0.5, "images_per_s": 2 * 4 / 0.5})
    assert timer.window() == {} and timer.compute() == pytest.approx({"data": 0.4 / 3, "iter": 4.5 / 3})
