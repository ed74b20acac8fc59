"""The benchmark command finishes on a tiny config and writes its JSON report."""

import json

import pytest
import torch

from maskrcnn_coco.benchmark.cli import JSON_KEYS, cli, main
from maskrcnn_coco.engine.eval_step import STAGES

from conftest import TINY_OVERRIDES


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_benchmark_smoke_writes_the_json_report(tmp_path, capsys, restore_threads):
    out = tmp_path / "bench.json"
    code = main(["--iters", "2", "--repeats", "1", "--warmup", "0", "--eval-batches", "1", "--output", str(out), *TINY_OVERRIDES])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report) == set(JSON_KEYS)
    assert report["meta"]["device"] == "cpu" and report["meta"]["threads"] == 1 and report["meta"]["amp_modes"] == ["off", "bf16"]
    for mode in ("off", "bf16"):
        entry = report["train"][mode]
        assert entry["bit_identical"] is True  # ours and the bare loop trained the same weights
        assert {"ours", "bare", "ratio"} <= set(entry) and entry["ratio"]["wall"]["median"] > 0
        assert entry["ours"]["images_per_s"]["median"] > 0 and len(entry["ours"]["cpu_s"]) == 1
    assert report["train"]["off"]["overhead"]["grad_norm_update_ms"] > 0
    iteration_log = report["train"]["off"]["iteration_log"]  # the iter/ scalars' read-back, timed alone
    assert iteration_log["read_back_us"]["wall"] > 0 and iteration_log["estimated_ratio"] > 1
    assert report["eval"]["metrics_equal"] is True and report["eval"]["ratio"]["cpu"]["median"] > 0
    stages = report["eval"]["stages"]
    assert set(STAGES) | {"to COCO", "COCOeval", "losses_over_rest"} == set(stages)
    assert all(stages[n]["wall"]["median"] > 0 for n in STAGES) and stages["losses_over_rest"]["median"] > 0
    assert 0 < report["data"]["fraction"] < 1
    assert report["cocoeval"]["identical"] is True and "pycocotools" in report["cocoeval"]["backends"]
    assert {"fused", "foreach", "for_loop"} <= set(report["optimizer"])
    text = capsys.readouterr().out
    assert "bit-identical: True" in text and f"Wrote {out}" in text and "iteration log per read-back" in text
    assert "no exact val loss can bring the ratio below" in text


def test_benchmark_rejects_unknown_sections(capsys):
    assert main(["--sections", "train,warp"]) == 2
    assert "--sections" in capsys.readouterr().err
    assert callable(cli)
