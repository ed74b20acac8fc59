"""The benchmark command finishes on a tiny config and writes its JSON report."""

import json

import pytest
import torch

from maskrcnn_coco.benchmark.cli import JSON_KEYS, PRESETS, TINY, apply_preset, build_parser, cli, main
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


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_gpu_preset_tiny_on_cpu_writes_one_json_with_every_headline(tmp_path, capsys, restore_threads):
    """``--preset gpu --tiny`` (what CI runs so the GPU check cannot rot): every section, one JSON whose
    ``summary`` holds each number the GPU check reports; the GPU-only values are null or skipped here."""
    from maskrcnn_coco.cli.experiment import cpu_has_bf16
    from maskrcnn_coco.data.coco import resolve_num_workers

    out = tmp_path / "gpu_check.json"
    assert main(["--preset", "gpu", "--tiny", "--device", "cpu", "--output", str(out), *TINY_OVERRIDES]) == 0
    report = json.loads(out.read_text())
    assert set(report) == set(JSON_KEYS)
    assert report["meta"]["preset"] == "gpu" and report["meta"]["tiny"] is True
    assert report["meta"]["sections"] == PRESETS["gpu"]["sections"].split(",")
    summary = report["summary"]
    off = summary["train"]["off"]
    assert off["ours_images_per_s"] > 0 and off["bare_images_per_s"] > 0 and off["bit_identical"] is True
    assert off["peak_memory_mb"] is None and summary["peak_memory_mb"] is None  # no CUDA: null, not 0
    assert summary["train"]["fp16"] == {"skipped": "no CUDA"}
    assert ("ours_images_per_s" in summary["train"]["bf16"]) is cpu_has_bf16()
    # The data wait: our data=coco loader on JPEG files at COCO sizes, data.num_workers=auto.
    assert summary["data_workers"] == resolve_num_workers("auto") and 0 <= summary["data_wait_share"] < 1
    assert summary["data_loader_images_per_s"] > 0
    assert {tuple(s) for s in report["data"]["image_sizes"]} >= {(640, 480), (480, 640)}
    assert summary["eval_ratio_wall"] > 0 and summary["eval_metrics_equal"] is True
    jpeg = summary["jpeg_images_per_s"]
    assert jpeg["pil"]["wall"] > 0 and jpeg["decode_jpeg"]["cpu"] > 0 and summary["jpeg_faster"] in ("pil", "decode_jpeg")
    assert report["jpeg"]["files"] == TINY["jpeg_files"] and report["jpeg"]["same_shape"] is True
    checkpoint = report["checkpoint"]
    assert summary["checkpoint_save_s"] > 0 and summary["checkpoint_mb"] == checkpoint["file_mb"]
    # Weights and SGD momentum, as a run's checkpoint holds them (plus the config and a few kB of state).
    assert checkpoint["file_mb"] >= checkpoint["weights_mb"] + checkpoint["optimizer_mb"] > 1.9 * checkpoint["weights_mb"]
    assert not list(tmp_path.glob("bench_checkpoint_*"))  # the written checkpoints are removed
    assert summary["budget_s"] == 480 and summary["within_budget"] is True
    text = capsys.readouterr().out
    assert "train fp16                   skipped: no CUDA" in text and "decode_jpeg x" in text and "budget 480 s: met" in text


def test_a_preset_fills_only_the_flags_not_given():
    args, extra = apply_preset(build_parser(), ["--preset", "gpu", "--iters", "4", "model=small"])
    assert args.iters == 4 and args.repeats == PRESETS["gpu"]["repeats"] and args.loader == "coco" and extra == ["model=small"]
    tiny, _ = apply_preset(build_parser(), ["--preset", "gpu", "--tiny"])
    assert (tiny.iters, tiny.jpeg_files, tiny.sections) == (TINY["iters"], TINY["jpeg_files"], PRESETS["gpu"]["sections"])
    plain, _ = apply_preset(build_parser(), [])
    assert plain.preset is None and plain.loader == "config" and plain.iters == 6
    with pytest.raises(SystemExit):
        apply_preset(build_parser(), ["--tiny"])


# torchvision 0.29 deprecates its decoders (benchmark/jpeg.py says so); the section measures them while they exist.
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_jpeg_section_decodes_the_same_coco_sized_files_both_ways(tmp_path, restore_threads):
    import argparse

    from maskrcnn_coco.benchmark.jpeg import DECODERS, bench_jpeg, write_jpegs

    torch.set_num_threads(1)
    result = bench_jpeg(argparse.Namespace(jpeg_files=2, repeats=2), lambda line: None)
    assert result["files"] == 2 and result["same_shape"] is True and result["max_abs_diff"] <= 8
    for name in DECODERS:
        assert len(result[name]["wall_s"]) == 2 and result[name]["images_per_s"]["median"] > 0
    assert result["faster"]["cpu"] in DECODERS and result["ratio"]["cpu"]["median"] > 0
    paths = write_jpegs(tmp_path, 2)
    assert [tuple(DECODERS[name](p).shape) for name in DECODERS for p in paths] == [(3, 480, 640), (3, 640, 480)] * 2
