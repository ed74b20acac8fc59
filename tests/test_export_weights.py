"""``maskrcnn-export-weights`` (``scripts/export_weights.py``, ``cli/export_weights.py``): the weights alone
(no optimizer, RNG or history), about half a checkpoint, that load, predict and evaluate like the
checkpoint without its run folder."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from helpers import run_cli
from test_evaluate_cli import evaluation_tags, newest
from test_evaluate_cli import run_main as eval_main
from test_inference import session_cache, trained_run, val_images

from maskrcnn_coco import load_model, predict
from maskrcnn_coco.analysis.history import read_history
from maskrcnn_coco.cli.evaluate import METRICS_FILE
from maskrcnn_coco.cli.export_weights import SUFFIX, main

from conftest import TINY_OVERRIDES

EXPORT_KEYS = {"format", "format_version", "model", "num_classes", "categories", "model_config"}


def run_main(*args):
    return run_cli(main, args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The run's last.pth exported outside its run folder: (exit status, stdout, the file)."""
    path = tmp_path_factory.mktemp("export") / "deploy.pth"
    with session_cache(tmp_path_factory):
        status, out, _ = run_main("--weights", run_dir / "checkpoints" / "last.pth", "--output", path)
    return status, out, path


def test_the_export_holds_the_weights_alone_and_says_the_size_ratio(run_dir, exported):
    status, out, path = exported
    source = run_dir / "checkpoints" / "last.pth"
    assert status == 0
    ratio = path.stat().st_size / source.stat().st_size
    assert re.search(rf"{ratio:.2f}x the {source.stat().st_size / 1e6:.1f} MB of {source}", out), out
    assert ratio < 0.55  # SGD momentum (as large as the weights), RNG, history are left behind
    written = torch.load(path, map_location="cpu", weights_only=True)
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    assert set(written) == EXPORT_KEYS and written["format"] == "maskrcnn_coco.weights"
    assert written["model"].keys() == ckpt["model"].keys()
    assert all(torch.equal(written["model"][k], v) for k, v in ckpt["model"].items())
    assert written["model_config"] == ckpt["model_config"] and written["categories"] == ckpt["categories"]


def test_the_export_loads_and_predicts_like_the_checkpoint(run_dir, exported):
    _, _, path = exported
    image = val_images(run_dir)[2]
    from_export, from_checkpoint = load_model(path), load_model(run_dir / "checkpoints" / "last.pth")
    assert from_export.names == from_checkpoint.names and from_export.model_config == from_checkpoint.model_config
    assert predict(from_export, image, score_threshold=0.0)[0].detections == predict(from_checkpoint, image, score_threshold=0.0)[0].detections


def test_the_export_evaluates_like_the_run_without_its_folder(run_dir, exported, tmp_path):
    """No run folder: the default config with the run's data overrides; the model from the embedded model_config."""
    _, _, path = exported
    data = [o for o in TINY_OVERRIDES if o.startswith("data.")]
    status, _, err = eval_main("--weights", path, "--output", tmp_path, "--check-images", 0, *data)
    assert status == 0, err
    written = json.loads((newest(tmp_path) / METRICS_FILE).read_text())
    assert written["weights_kind"] == "weights"
    assert evaluation_tags(written["scalars"]) == evaluation_tags(read_history(run_dir)[-1])


def test_default_output_beside_the_checkpoint_and_one_error_line(run_dir, tmp_path):
    copy = tmp_path / "epoch.pth"
    shutil.copyfile(run_dir / "checkpoints" / "last.pth", copy)
    status, out, _ = run_main("--weights", copy)
    assert status == 0 and (tmp_path / f"epoch{SUFFIX}").is_file() and out.startswith(f"Wrote {tmp_path / ('epoch' + SUFFIX)}: ")
    for args, expected in ((["--weights", tmp_path / "nope.pth"], f"Error: Weights file not found: {tmp_path / 'nope.pth'}\n"),
                           (["--weights", copy, "--output", copy], f"Error: --output {copy} is the source file itself: choose another path\n")):
        status, out, err = run_main(*args)
        assert status == 2 and err == expected and out == ""
