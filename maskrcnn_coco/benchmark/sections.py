"""The data and optimizer sections: seconds per training batch from the loader, one optimizer step per implementation."""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch

from maskrcnn_coco.benchmark.setup import Setup
from maskrcnn_coco.benchmark.timing import Timing, timed
from maskrcnn_coco.solver.param_groups import OPTIMIZER_IMPLS, build_optimizer
from maskrcnn_coco.utils.errors import ConfigError


def bench_data(setup: Setup, args: argparse.Namespace, train: dict[str, Any] | None) -> dict[str, Any]:
    if setup.train_loader is None:
        return {"skipped": "synthetic data: no loader to time"}
    per_batch = Timing()
    for _ in range(args.repeats):
        it = iter(setup.train_loader)
        for _ in range(args.iters):
            _, wall, cpu = timed(lambda it=it: next(it, None), torch.device("cpu"))
            per_batch.add(wall, cpu)
    out: dict[str, Any] = {"num_workers": setup.train_loader.num_workers, "per_batch": per_batch.summary()}
    off = (train or {}).get("off")
    if off is not None and per_batch.wall:
        iter_s = off["ours"]["wall"]["median"] / args.iters
        data_s = statistics.median(per_batch.wall)
        out["iteration_s"] = iter_s
        out["fraction"] = data_s / (data_s + iter_s)  # of an iteration that loads in the main process
    return out


def bench_optimizer(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    model = setup.model
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in params)}
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    snapshot = copy.deepcopy(model.state_dict())
    for impl in OPTIMIZER_IMPLS[1:]:
        cfg = copy.deepcopy(setup.cfg.optimizer)
        cfg.impl = impl
        try:
            opt = build_optimizer(cfg, model, verbose=False)
        except (ConfigError, RuntimeError) as err:
            out[impl] = {"skipped": str(err)}
            continue
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()  # state (momentum buffers) allocated outside the timing
        steps = Timing()
        for _ in range(args.repeats):
            _, wall, cpu = timed(lambda opt=opt: [opt.step() for _ in range(args.iters)], setup.device)
            steps.add(wall / args.iters, cpu / args.iters)
        out[impl] = {"step": steps.summary()}
        model.load_state_dict(snapshot)
    for p in params:
        p.grad = None
    return out
