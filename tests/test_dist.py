"""``utils/dist.py``: distributed training on CPU with gloo, torchrun end to end, and the reductions
checked in spawned processes."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS

from conftest import ENTRY, TINY_OVERRIDES

pytestmark = pytest.mark.slow  # several processes each

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
ROWS = {  # per rank: the scripted loss rows of its batches
    0: [[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.0, 1.0, 0.0, 1.0]],
    1: [[5.0, 6.0, 7.0, 8.0, 9.0], [7.0, 0.0, 1.0, 2.0, 3.0]],
}


def _rank_main(rank, world, init_file, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from helpers import ScriptedLosses, scripted_loader

    from maskrcnn_coco.engine import FitSettings, train_one_epoch

    model = ScriptedLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    means = train_one_epoch(model, opt, scripted_loader(ROWS[rank]), "cpu", 1, settings=FitSettings(print_freq=1))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(means))
    torch_dist.destroy_process_group()


def test_epoch_means_are_reduced_over_all_ranks(tmp_path):
    """Each rank trains its own batches; every rank returns the mean over all batches of all ranks."""
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    every_row = ROWS[0] + ROWS[1]
    expected = {k: sum(r[i] for r in every_row) / len(every_row) for i, k in enumerate(LOSS_COMPONENTS)}
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == pytest.approx(expected)


class JitteredOracle(torch.nn.Module):
    """The ground truth moved by 0-2 px by image id, each object also found with a wrong class, all
    scored alike (ties across images): COCO metrics strictly between 0 and 1, from any shard."""

    def __init__(self, loader):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.batches = [targets for _, targets in loader]

    def forward(self, images, targets=None):
        if self.training:
            return dict.fromkeys(LOSS_COMPONENTS, self.p + 0.5)
        out = []
        for t in self.batches.pop(0):
            shift = int(t["image_id"]) % 3
            boxes = t["boxes"] + torch.tensor([1.0, 0.0, 1.0, 2.0]) * shift
            masks = torch.roll(t["masks"], shift, dims=-1)[:, None].float()
            wrong = t["labels"] % 3 + 1
            out.append({"boxes": torch.cat([boxes, boxes]), "labels": torch.cat([t["labels"], wrong]),
                        "scores": torch.full((2 * len(boxes),), 0.5), "masks": torch.cat([masks, masks])})
        return out


def _eval_rank_main(rank, world, init_file, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from maskrcnn_coco.data.coco import build_data
    from maskrcnn_coco.engine.evaluate import evaluate
    from maskrcnn_coco.utils.dist import gather_objects_to_main

    from conftest import tiny_data_cfg

    data = build_data(tiny_data_cfg(), seed=0, progress=False)  # the val loader holds this rank's shard
    model = JitteredOracle(data.val_loader)
    _, metrics = evaluate(model, data.val_loader, "cpu", mapping=data.mapping, progress=False)
    gathered = gather_objects_to_main({"rank": rank})
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "gathered": gathered}))
    torch_dist.destroy_process_group()


def test_distributed_evaluation_gathers_on_rank_0_and_equals_one_process(tmp_path, tiny_data):
    """Two gloo ranks: only rank 0 receives the shards; every rank's metrics (and confusion matrix)
    are those of one process over the whole validation set."""
    from maskrcnn_coco.engine.evaluate import evaluate

    mp.spawn(_eval_rank_main, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    _, expected = evaluate(JitteredOracle(tiny_data.val_loader), tiny_data.val_loader, "cpu", mapping=tiny_data.mapping,
                           progress=False)
    assert 0 < expected["segm"]["AP"] < 1 and 0 < expected["bbox"]["AP"] < 1
    expected = json.loads(json.dumps(expected))  # as the ranks wrote it (NaN included)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["gathered"] for r in ranks] == [[{"rank": 0}, {"rank": 1}], None]
    for got in ranks:
        assert got["metrics"].keys() == expected.keys()
        for key, values in expected.items():
            if key in ("bbox", "segm"):
                assert got["metrics"][key].keys() == values.keys()
                assert all(v == got["metrics"][key][k] or (math.isnan(v) and math.isnan(got["metrics"][key][k]))
                           for k, v in values.items()), key
            else:
                assert got["metrics"][key] == values


def run_torchrun(args, cwd, nproc=2, timeout=300, **popen):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, f"--nproc_per_node={nproc}", "--standalone", str(ENTRY), *args]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **popen)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed next to this Python")
def test_torchrun_two_processes_write_one_run(tmp_path):
    runs = tmp_path / "runs"
    # Validation batches of 1: batched convolutions of other sizes round differently, and the
    # barely trained tiny model's scores sit near its thresholds.
    args = [*TINY_OVERRIDES, "data.num_val=5", "data.val_batch_size=1", "epochs=2", "device=cpu", f"runs_dir={runs}"]
    proc = run_torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One console block per epoch (rank 0 only), one run folder, one event file, one checkpoint folder.
    assert proc.stdout.count("Epoch 1/2\n") == 1 and proc.stdout.count("Epoch 2/2\n") == 1
    assert "World size 2, total batch 4" in proc.stdout
    (run_dir,) = (runs / "maskrcnn").iterdir()
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in run_dir.rglob("checkpoints")] == ["checkpoints"]
    state = torch.load(run_dir / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])  # the module, not the DDP wrapper

    # The metrics equal a single-process evaluation of the saved weights on the whole val set.
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    from helpers import compose_cfg

    from maskrcnn_coco.cli.experiment import build_components
    from maskrcnn_coco.engine.evaluate import evaluate

    parts = build_components(compose_cfg("data.num_val=5", "data.val_batch_size=1", "device=cpu"), progress=False)
    parts.model.load_state_dict(state["model"])
    val_losses, metrics = evaluate(parts.model, parts.data.val_loader, "cpu", mapping=parts.mapping, progress=False)
    assert len(parts.data.val_loader.dataset) == 5
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50"):
            assert history[-1][f"mAP/{iou_type}_{name}"] == pytest.approx(metrics[iou_type][name], abs=1e-9)
    # Validation losses: weighted by images over the ranks. Their RPN/RoI samplers draw per batch,
    # and the batches differ between 1 and 2 processes, so they agree closely but not exactly.
    for k in LOSS_COMPONENTS:
        assert history[-1][f"loss/val_{k}"] == pytest.approx(val_losses[k], rel=0.1, abs=1e-3)

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/train_total")] == [1, 2]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed next to this Python")
def test_sigterm_to_torchrun_then_resume_auto_with_one_process(tmp_path):
    runs = tmp_path / "runs"
    args = [*TINY_OVERRIDES, "data.num_train=64", "epochs=2", "device=cpu", "print_freq=1", "tracker=none", f"runs_dir={runs}"]
    proc = run_torchrun(args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("Device:"):
            break
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGTERM)  # what SLURM does to the job step: every process gets it
    _, err = proc.communicate(timeout=120)
    assert "Stopped by SIGTERM in epoch 1, iteration" in err, err[-3000:]
    interrupted = list(runs.rglob("interrupted.pth"))
    assert len(interrupted) == 1  # rank 0 only
    state = torch.load(interrupted[0], map_location="cpu", weights_only=True)
    assert state["epoch_progress"]["iterations"] > 0

    from conftest import run_entry

    resumed = run_entry([*args, "resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {interrupted[0]}" in resumed.stdout and "Epoch 2/2" in resumed.stdout
