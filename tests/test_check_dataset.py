"""The dataset checker: report text and exit status (0 training can start, 1 it would fail, 2 bad input)."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from maskrcnn_coco.cli.check_dataset import main

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
    assert f"  - train: annotation file not found: {tmp_path}/annotations/instances_train2017.json (data.train_annotations)" in capsys.readouterr().out
