"""``maskrcnn-predict`` (``scripts/predict.py``, ``cli/predict.py``): images of any PIL mode and EXIF
orientation loaded as training loads them, one picture per image, one COCO results JSON equal to the
Python API's, a contact sheet; an unreadable file skipped in one line (exit 1); no image: one Error line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image
from test_inference import trained_run, val_images

from maskrcnn_coco import load_model, predict
from maskrcnn_coco.cli.predict import IMAGES_FILE, PREDICTIONS_FILE, SHEET_NAME, collect_images, main, picture_names
from maskrcnn_coco.data.exif import frame_for, load_oriented
from maskrcnn_coco.inference import load_image

from conftest import REPO

SCRIPT = REPO / "scripts" / "predict.py"
ROTATE_90_CW = 6  # EXIF orientation: displayed turned 90 degrees clockwise


def run_main(*args):
    return run_cli(main, [*args, "--no-progress"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def images(run_dir, tmp_path_factory):
    """A folder of one shapes image in many PIL modes, an EXIF-rotated JPEG, a broken PNG and a text file."""
    folder = tmp_path_factory.mktemp("predict_inputs")
    with Image.open(val_images(run_dir)[0]) as source:
        rgb = source.convert("RGB")
    rgb.save(folder / "a_rgb.png")
    rgb.convert("L").save(folder / "b_grey.png")
    rgb.convert("LA").save(folder / "c_grey_alpha.png")
    rgb.convert("P").save(folder / "d_palette.png")
    rgb.convert("RGBA").save(folder / "e_rgba.png")
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(folder / "f_deep.png")  # I;16
    rgb.convert("CMYK").save(folder / "g_cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = ROTATE_90_CW
    rgb.crop((0, 0, 64, 48)).save(folder / "h_rotated.jpg", exif=exif)  # stored 64x48, displayed 48x64
    (folder / "z_broken.png").write_bytes((folder / "a_rgb.png").read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def predicted(run_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("predicted")
    status, stdout, stderr = run_main("--weights", run_dir / "checkpoints" / "last.pth", "--input", images,
                                      "--output", out, "--score-threshold", "0.1", "--batch-size", "1")
    return status, stdout, stderr, out


def test_every_readable_image_is_predicted_and_the_broken_one_skipped_in_one_line(images, predicted):
    status, stdout, stderr, out = predicted
    assert status == 1  # a file was skipped
    assert stderr.startswith(f"Skipped {images / 'z_broken.png'}: cannot be read (") and stderr.count("\n") == 1
    assert "Traceback" not in stdout + stderr
    assert "Predicted 8 images" in stdout and "images/s" in stdout and "skipped 1 unreadable file" in stdout
    index = json.loads((out / IMAGES_FILE).read_text())
    assert [image["id"] for image in index["images"]] == list(range(1, 9))
    assert [image["file_name"] for image in index["images"]] == [str(p) for p in sorted(images.glob("[a-h]_*"))]
    assert index["categories"] == [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]


def test_results_json_is_the_python_apis_result(run_dir, images, predicted):
    _, _, _, out = predicted
    results = json.loads((out / PREDICTIONS_FILE).read_text())
    index = {image["id"]: image for image in json.loads((out / IMAGES_FILE).read_text())["images"]}
    assert results and all(r["score"] >= 0.1 for r in results)
    for r in results:
        assert r["segmentation"]["size"] == [index[r["image_id"]]["height"], index[r["image_id"]]["width"]]
    paths = [index[i]["file_name"] for i in sorted(index)]
    api = predict(load_model(run_dir / "checkpoints" / "last.pth"), paths, score_threshold=0.1, batch_size=1)
    assert results == [r for image_id, p in zip(sorted(index), api) for r in p.to_coco(image_id)]


def test_modes_and_exif_orientation_load_as_in_training(images, predicted):
    _, _, _, out = predicted
    index = {image["file_name"]: image for image in json.loads((out / IMAGES_FILE).read_text())["images"]}
    for path in sorted(images.glob("[a-h]_*")):
        image = index[str(path)]
        trained = load_oriented(path, frame_for(path, image["width"], image["height"]))  # the training loader's
        assert np.array_equal(np.asarray(load_image(path)), np.asarray(trained)), path.name
    rotated = index[str(images / "h_rotated.jpg")]
    assert (rotated["width"], rotated["height"]) == (48, 64)  # as displayed
    with Image.open(out / rotated["picture"]) as picture:
        assert picture.size == (192, 256)  # enlarged x4 (--min-side 256), in the displayed frame
    grey = np.asarray(load_image(images / "f_deep.png"))
    assert grey.shape == (64, 64, 3) and np.array_equal(grey[..., 0], np.asarray(Image.open(images / "b_grey.png")))


def test_pictures_and_contact_sheet_show_the_detections(images, predicted):
    _, _, _, out = predicted
    index = json.loads((out / IMAGES_FILE).read_text())["images"]
    results = json.loads((out / PREDICTIONS_FILE).read_text())
    drawn = next(image for image in index if image["detections"])
    assert drawn["detections"] == sum(1 for r in results if r["image_id"] == drawn["id"])
    with Image.open(out / drawn["picture"]) as picture, Image.open(images / "a_rgb.png") as raw:
        enlarged = np.asarray(raw.convert("RGB").resize((256, 256), Image.NEAREST))
        assert picture.size == (256, 256) and not np.array_equal(np.asarray(picture.convert("RGB")), enlarged)
    with Image.open(out / SHEET_NAME) as sheet:
        assert sheet.width >= 3 * 256 and sheet.height > 3 * 256  # 3 x 3 tiles, their captions and the colour key


def test_inputs_folders_globs_and_no_image_at_all(images, tmp_path, run_dir):
    assert collect_images([str(images / "*.png"), str(images / "a_rgb.png")]) == sorted(images.glob("*.png"))
    assert picture_names([images / "a.png", images / "sub" / "a.jpg", images / "contact_sheet.png"]) == [
        "a.png", "a_2.png", "contact_sheet_2.png"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    weights = run_dir / "checkpoints" / "last.pth"
    for args, expected in (
        (["--input", tmp_path / "empty"], f"Error: no image found in {tmp_path / 'empty'}"),
        (["--input", tmp_path / "nothing_*.png"], f"Error: no image found in {tmp_path / 'nothing_*.png'}"),
        (["--input", tmp_path / "missing.png"], f"Error: --input {tmp_path / 'missing.png'}: no such file or folder"),
    ):
        status, _, err = run_main("--weights", weights, "--output", tmp_path / "out", *args)
        assert status == 2 and err.startswith(expected) and err.count("\n") == 1, err
    status, _, err = run_main("--weights", tmp_path / "nope.pth", "--output", tmp_path / "out", "--input", images)
    assert status == 2 and err == f"Error: Weights file not found: {tmp_path / 'nope.pth'}\n"
    # A bare state dict of our small model, away from its run: nothing says how to build it.
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(weights, map_location="cpu", weights_only=True)["model"], bare)
    # A file torch.load refuses (its message spans many lines): still one line.
    refused = tmp_path / "refused.pth"
    torch.save({"model": {}, "extra": object()}, refused)
    for path, expected in ((bare, "does not say which model it belongs to"), (refused, "Could not read weights file")):
        status, _, err = run_main("--weights", path, "--output", tmp_path / "out", "--input", images)
        assert status == 2 and err.startswith("Error: ") and expected in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_script_help_and_a_real_call_with_a_glob(run_dir, images, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: predict.py") and "--score-threshold" in proc.stdout
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--weights", str(run_dir / "checkpoints" / "last.pth"),
                           "--input", str(images / "*.png"), "--output", str(out), "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr  # z_broken.png skipped
    assert len(json.loads((out / IMAGES_FILE).read_text())["images"]) == 6 and (out / SHEET_NAME).is_file()
