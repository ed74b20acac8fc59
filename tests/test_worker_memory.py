"""The synthetic COCO generator (``benchmark.coco_synth``) and ``scripts/worker_memory.py`` on a tiny set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from maskrcnn_coco.benchmark.coco_synth import (
    COCO_CATEGORY_IDS,
    UNUSED_COCO_IDS,
    SynthParams,
    ensure_synthetic_coco,
    make_annotations,
)
from maskrcnn_coco.data.coco import load_coco
from maskrcnn_coco.data.validate import validate_annotations

from conftest import REPO

SCRIPT = REPO / "scripts" / "worker_memory.py"


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    params = SynthParams(num_train=200, num_val=10, seed=3)
    return params, ensure_synthetic_coco(params, tmp_path_factory.mktemp("synth"), threads=4)


def test_generator_has_cocos_statistics(small_set):
    _, paths = small_set
    data = json.loads(paths.train_annotations.read_text())
    ids = [c["id"] for c in data["categories"]]
    assert len(ids) == 80 and set(ids) == set(range(1, 91)) - set(UNUSED_COCO_IDS) == set(COCO_CATEGORY_IDS)
    assert len(data["images"]) == 200
    per_image = len(data["annotations"]) / len(data["images"])
    assert 6.3 < per_image < 8.3, per_image  # Poisson(7.3): the mean of 200 images is within +-0.6 (3 sigma)
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    assert {a["image_id"] for a in data["annotations"]} == {im["id"] for im in data["images"]}  # no image left empty
    images = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        (polygon,) = ann["segmentation"]
        assert 20 <= len(polygon) // 2 <= 60 and len(polygon) % 2 == 0
        xs, ys = polygon[0::2], polygon[1::2]
        image = images[ann["image_id"]]
        assert min(xs) >= 0 and min(ys) >= 0 and max(xs) <= image["width"] and max(ys) <= image["height"]
        x, y, w, h = ann["bbox"]
        assert (x, y) == (min(xs), min(ys)) and w > 0 and h > 0
        assert abs(x + w - max(xs)) < 0.011 and abs(y + h - max(ys)) < 0.011
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0


def test_generator_files_match_the_json_and_pass_validation(small_set):
    _, paths = small_set
    for ann_file, folder in ((paths.train_annotations, paths.train_images), (paths.val_annotations, paths.val_images)):
        coco = load_coco(ann_file)
        report = validate_annotations(coco)
        assert report.invalid == [] and report.repaired == []
        names = set()
        for image in coco.imgs.values():
            with Image.open(folder / image["file_name"]) as im:
                assert im.size == (image["width"], image["height"])
            names.add(image["file_name"])
        assert len(names) == len(coco.imgs)  # each image its own file name
    sizes = {(im["width"], im["height"]) for im in load_coco(paths.train_annotations).imgs.values()}
    assert len(sizes) > 1  # landscape and portrait, so aspect-ratio grouping has several groups


def test_generator_is_deterministic_and_cached(small_set, tmp_path):
    params, paths = small_set
    assert make_annotations(params, "val") == make_annotations(params, "val")
    assert make_annotations(SynthParams(num_train=5, seed=1)) != make_annotations(SynthParams(num_train=5, seed=2))
    stamp = paths.train_annotations.stat().st_mtime_ns
    assert ensure_synthetic_coco(params, paths.root.parent) == paths
    assert paths.train_annotations.stat().st_mtime_ns == stamp  # re-used, not rewritten
    assert json.loads(paths.train_annotations.read_text()) == make_annotations(params, "train")


@pytest.mark.slow  # the script in a subprocess, which starts a child per worker count and 2 loader workers
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc smaps_rollup")
def test_worker_memory_script_on_a_tiny_set(tmp_path):
    output = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "200", "--val-images", "10", "--workers", "2", "--epochs", "1",
         "--every", "10", "--data-dir", str(tmp_path / "data"), "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr and "invalid" not in proc.stderr, proc.stderr  # the set builds cleanly

    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("epoch"))
    assert header.split() == ["epoch", "batch", "time_s", "w0_images", "w0_uss_mb", "w0_pss_mb",
                              "w1_images", "w1_uss_mb", "w1_pss_mb", "main_rss_mb", "main_uss_mb"]
    growth_header = next(line for line in lines if line.lstrip().startswith("worker"))
    assert growth_header.split() == ["worker", "images", "uss_first_mb", "uss_last_mb", "uss_growth_mb", "pss_last_mb",
                                     "pss_growth_mb", "uss_kb_per_image", "uss_kb_per_dataset_image"]
    assert [line.split()[0] for line in lines[lines.index(growth_header) + 1:][:2]] == ["w0", "w1"]
    assert any(line.startswith("-- start-up (build_data):") and "peak RSS" in line for line in lines)

    result = json.loads(output.read_text())
    (run,) = result["runs"]
    assert run["workers"] == 2 and run["train_images"] == 200 and run["batches_per_epoch"] == 50
    points = run["points"]
    assert [p["batch"] for p in points] == [1, 10, 20, 30, 40, 50]
    assert all(p[f"w{i}_uss_mb"] > 0 and p[f"w{i}_pss_mb"] > 0 for p in points for i in (0, 1))
    assert points[-1]["w0_images"] + points[-1]["w1_images"] == 200
    assert [g["worker"] for g in run["growth"]] == [0, 1] and all(g["images"] > 0 for g in run["growth"])
    assert run["build_s"] > 0 and run["main_peak_rss_mb"] > 0
