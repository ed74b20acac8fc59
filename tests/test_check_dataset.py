"""The dataset checker: report text and exit status (0 training can start, 1 it would fail, 2 bad input)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskrcnn_coco.analysis import fault_bank
from maskrcnn_coco.cli.check_dataset import main
from maskrcnn_coco.data.shapes import ShapesParams, ensure_shapes_dataset

from conftest import REPO, square_ann, write_coco_dataset

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "unicorn"}]


def messy_dataset(root):
    """Train: a NaN box, a 2-point polygon, a truncated image, no 'unicorn'. Val: clean."""
    images = [{"id": i, "file_name": f"{i}.png", "height": 48, "width": 64} for i in (1, 2, 3)]
    train = [
        square_ann(1, 1, 1, 4, 4, 10),
        {**square_ann(2, 1, 2, 20, 20, 8), "bbox": [float("nan"), 20, 8, 8]},
        {**square_ann(3, 2, 2, 20, 20, 8), "segmentation": [[20, 20, 28, 28]]},
        square_ann(4, 2, 1, 30, 4, 10),
        square_ann(5, 3, 2, 4, 4, 10),
    ]
    train_dir, train_ann = write_coco_dataset(root, CATS, images, train, split="train")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(train_dir / "3.png")
    data = (train_dir / "3.png").read_bytes()
    (train_dir / "3.png").write_bytes(data[: len(data) // 2])
    val_dir, val_ann = write_coco_dataset(root, CATS, images[:2], [square_ann(1, 1, 1, 4, 4, 10)], split="val")
    return ["data=coco", f"data.root={root}", f"data.train_images={train_dir}", f"data.val_images={val_dir}",
            f"data.train_annotations={train_ann}", f"data.val_annotations={val_ann}"]


@pytest.mark.slow
def test_script_reports_every_problem_and_fails_on_an_undecodable_image(tmp_path):
    overrides = messy_dataset(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_dataset.py"), "--no-progress", *overrides],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr
    assert "images: 3 listed, 3 selected, 3 used for training; annotations: 5 (0 crowd)" in out
    assert "  invalid annotations (skipped by training and evaluation): 2\n" in out
    assert "    bad bbox: 1\n      ann 2 (image 1 (1.png)): bbox [nan, 20, 8, 8] has NaN/Inf" in out
    assert "    bad segmentation: 1\n      ann 3 (image 2 (2.png)): polygon with 2 points [20, 20, 28, 28] (needs >= 3)" in out
    assert "  unusable images (stop training): 1\n    undecodable image: 1\n" in out
    assert "      image 3 (3.png): cannot be decoded (OSError: image file is truncated" in out
    assert "categories without a training instance (1): 'unicorn' (id 3)" in out
    assert "val: " in out and "images: 2 listed, 2 selected, 2 used; annotations: 1 (0 crowd)\n  no problems found" in out
    assert out.rstrip().endswith(
        "Training would fail:\n  - train: 1 unusable images with data.on_invalid=error, e.g. image 3 (3.png): cannot be "
        "decoded (OSError: image file is truncated) (fix them, or set data.on_invalid=drop to skip them)"
    )


def test_drop_no_decode_and_clean_data_exit_zero(tmp_path, capsys):
    overrides = messy_dataset(tmp_path)
    assert main(["--no-progress", *overrides, "data.on_invalid=drop"]) == 0
    out = capsys.readouterr().out
    assert "3 listed, 3 selected, 2 used for training" in out
    assert "unusable images (dropped (data.on_invalid=drop)): 1" in out and out.rstrip().endswith("OK: training can start with this data.")
    # The validated index is written for training (data.index_cache=auto: beside the annotations).
    written = re.search(r"Index for training written \(data.index_cache\): (\S+), (\S+)\n", out)
    assert written and all((Path(folder) / "meta.pkl").is_file() for folder in written.groups())
    assert main(["--no-progress", *overrides, "data.on_invalid=drop", "data.index_cache=off"]) == 0
    assert "Index for training written" not in capsys.readouterr().out
    # Without decoding, the truncated file goes unnoticed (training would find it when loading it).
    assert main(["--no-progress", "--no-decode", *overrides]) == 0
    assert "images: existence only (--no-decode)" in capsys.readouterr().out


def test_missing_images_and_no_usable_images_exit_one(tmp_path, capsys):
    overrides = messy_dataset(tmp_path)
    (tmp_path / "val" / "2.png").unlink()
    assert main(["--no-progress", *overrides]) == 1
    assert "  - val: 1 unusable images with data.on_invalid=error, e.g. image 2 (2.png): not found in" in capsys.readouterr().out
    assert main(["--no-progress", *overrides, "data.on_invalid=drop"]) == 0
    assert "missing file: 1\n      image 2 (2.png): not found in" in capsys.readouterr().out
    (tmp_path / "val" / "1.png").unlink()
    assert main(["--no-progress", *overrides, "data.on_invalid=drop"]) == 1
    assert "  - val: no usable images" in capsys.readouterr().out


def test_bad_input_exits_two(tmp_path, capsys):
    assert main(["data=coco"]) == 2
    assert "Error: Missing required config value: data.root" in capsys.readouterr().err
    assert main(["data=coco", f"data.root={tmp_path}", "data.on_invalid=skip"]) == 2
    assert "Error: data.on_invalid='skip': use one of error, drop" in capsys.readouterr().err
    assert main(["data=coco", f"data.root={tmp_path}", "--no-progress"]) == 1  # no annotation file: the data's fault
    assert (f"Training would fail:\n  - Annotation file not found: {tmp_path}/annotations/instances_train2017.json (COCO 2017), "
            f"{tmp_path}/train/_annotations.coco.json (Roboflow) or {tmp_path}/annotations/instances_default.json (CVAT COCO 1.0)"
            in capsys.readouterr().out)


def test_masks_off_their_boxes_and_a_darker_validation_split_warn(tmp_path, capsys):
    params = ShapesParams(num_train=40, num_val=20, image_size=64, seed=0, min_objects=1, max_objects=4)
    shapes = ensure_shapes_dataset(params, tmp_path / "cache", progress=False)
    assert main(["--no-progress", *fault_bank.data_overrides(shapes)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"  no problems found\n  EXIF: 0 of 40 images carry a rotation \(data.exif=apply\)\n  masks on their boxes \(in-box share of the mask and box/mask-box IoU, \d+ "
                     r"annotations\): 0 below 0.8, 0 below 0.7 \(warns above 3% below 0.7\)\n  statistics: 40 images \(median "
                     r"64x64 px\), .*\(40 images decoded in", out)
    assert "validation against training: no difference beyond the thresholds\n" in out and "Warnings" not in out
    assert main(["--no-progress", "--no-decode", *fault_bank.data_overrides(shapes), "data.max_train_images=19"]) == 0
    out = capsys.readouterr().out
    assert "statistics: 19 images (median 64x64 px)" in out and "pixels not sampled" in out
    assert "validation against training: not compared (fewer than 20 images in a split)\n" in out

    planted = fault_bank.plant(shapes, tmp_path / "planted", fault_bank.Fault("masks_off", 0.6, plant=fault_bank.shift_masks))
    fault_bank.darken_images(planted.val_images, json.loads(planted.val_annotations.read_text()), 0.35)
    assert main(["--no-progress", "--examples", "2", *fault_bank.data_overrides(planted)]) == 0
    out = capsys.readouterr().out
    train = out[:out.index("\nval: ")]
    counts = re.search(r"  masks on their boxes \(in-box share of the mask and box/mask-box IoU, (\d+) annotations\): (\d+) below 0.8, "
                       r"(\d+) below 0.7 \(warns above 3% below 0.7\)\n    worst \(in-box share / IoU\): image (\d+) ann (\d+): "
                       r"(0\.\d\d) / (0\.\d\d); image \d+ ann \d+: 0\.\d\d / 0\.\d\d\n", train)
    assert counts, train
    measured, below_08, below_07 = (int(g) for g in counts.groups()[:3])
    assert measured > 80 and below_07 > 0.9 * measured and below_08 >= below_07
    image_id, ann_id = int(counts[4]), int(counts[5])
    anns = json.loads(planted.train_annotations.read_text())["annotations"]
    assert any(a["id"] == ann_id and a["image_id"] == image_id for a in anns)
    warnings = out[out.index("Warnings (the data is used as it is"):]
    assert f"  - train: {planted.train_annotations}: masks that do not lie on their boxes: {below_07} of {measured} annotations" in warnings
    assert f"worst, in-box share / IoU: image {image_id} ann {ann_id}: {counts[6]} / {counts[7]}" in warnings
    assert "  - validation images are much darker than training: mean pixel 0.1" in warnings
    assert "validation against training: 1 difference (below)" in out
    assert out.rstrip().endswith("OK: training can start with this data.")


def test_strict_fails_when_training_would_change_the_data(tmp_path, capsys):
    """labelme's export: the '_background_' placeholder is left out and its paths are fine: training can
    start (0), but --strict says what training would change (1)."""
    from test_exports import labelme

    images, path = labelme(tmp_path)
    overrides = ["data=coco", f"data.root={tmp_path}", f"data.train_images={images}", f"data.val_images={images}",
                 f"data.train_annotations={path}", f"data.val_annotations={path}"]
    assert main(["--no-progress", *overrides]) == 0
    out = capsys.readouterr().out
    assert "'_background_' (id 0: a background placeholder)" in out and "EXIF: 0 of 3 images carry a rotation" in out
    assert main(["--no-progress", "--strict", *overrides]) == 1
    out = capsys.readouterr().out
    assert "--strict: training would skip or change:\n  - train: 1 placeholder categories left out\n" in out
