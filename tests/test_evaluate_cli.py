"""``maskrcnn-eval`` (``scripts/evaluate.py``, ``cli/evaluate.py``): a run's last checkpoint reproduces the
run's last epoch to the last digit; every file it writes is read back and checked against the others;
torchvision COCO weights are evaluated in COCO's label space; bad input is one ``Error:`` line."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import run_cli
from omegaconf import OmegaConf
from test_inference import COCO_DOG, R50_SMALL_INPUT, coco_r50_state_dict, session_cache, trained_run

from maskrcnn_coco.analysis.diagnostics import json_safe
from maskrcnn_coco.analysis.history import read_history
from maskrcnn_coco.analysis.inspect import NoRunError, find_runs
from maskrcnn_coco.cli.evaluate import (
    CONFUSION_STEM,
    METRICS_FILE,
    PER_CLASS_FILE,
    RESULTS_FILE,
    TO_CHECK_FILE,
    TO_CHECK_SHEET,
    build_parser,
    main,
    prepare,
)
from maskrcnn_coco.data.coco import load_coco, resolve_paths
from maskrcnn_coco.evaluation.coco_eval import coco_metrics
from maskrcnn_coco.inference import RUN_CONFIG

from conftest import ENTRY, REPO, TINY_OVERRIDES, square_ann, write_coco_dataset

SCRIPT = REPO / "scripts" / "evaluate.py"
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def evaluation_tags(scalars):
    """The tags an evaluation measures: val losses and COCO metrics."""
    return {k: v for k, v in scalars.items() if k.startswith(("loss/val", "mAP/"))}


def newest(folder):
    return max((folder / "eval").iterdir(), key=lambda p: p.name)


def run_main(*args):
    """``main`` in process: (exit status, stdout, stderr)."""
    return run_cli(main, ["--no-progress", *args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(run_dir, tmp_path_factory):
    """One evaluation of the run's ``last.pth``: (exit status, stdout, its folder)."""
    with session_cache(tmp_path_factory):
        status, out, _ = run_main("--weights", run_dir / "checkpoints" / "last.pth", "--check-images", 2)
    return status, out, newest(run_dir)


def test_the_last_checkpoint_reproduces_the_runs_last_epoch(run_dir, evaluated):
    status, out, folder = evaluated
    assert status == 0
    last = read_history(run_dir)[-1]
    written = json.loads((folder / METRICS_FILE).read_text())
    assert evaluation_tags(written["scalars"]) == evaluation_tags(last)  # every tag, to the last digit
    assert len(evaluation_tags(last)) >= 20 and last["loss/val"] > 0
    assert f"📈 Validation Loss: {last['loss/val']:.4f}" in out
    assert f"   loss_mask: {last['loss/val_loss_mask']:.4f}" in out
    assert f"📦 Box mAP: {last['mAP/bbox_AP']:.4f} (AP50: {last['mAP/bbox_AP50']:.4f})" in out
    assert "🏷️ AP per class (segm): circle" in out and "images/s" in out
    assert "Epoch" not in out and "Training Losses" not in out  # the evaluation part of the block only
    assert folder.parent == run_dir / "eval" and written["weights_kind"] == "checkpoint" and written["speed"]["images"] == 4


def test_the_results_file_is_what_the_metrics_were_computed_from(evaluated):
    _, _, folder = evaluated
    written = json.loads((folder / METRICS_FILE).read_text())
    results = json.loads((folder / RESULTS_FILE).read_text())
    coco = load_coco(written["annotations"])
    assert results and {r["category_id"] for r in results} <= set(coco.cats)
    for r in results:
        image = coco.imgs[r["image_id"]]
        assert r["segmentation"]["size"] == [image["height"], image["width"]] and len(r["bbox"]) == 4
    rescored = coco_metrics(coco, results, sorted(coco.imgs))
    assert json_safe(rescored) == written["metrics"]


def test_per_class_table_confusion_and_images_to_check_agree(evaluated):
    _, _, folder = evaluated
    written = json.loads((folder / METRICS_FILE).read_text())
    confusion = json.loads((folder / f"{CONFUSION_STEM}.json").read_text())
    matrix = np.array(confusion["matrix"])
    k = len(confusion["category_ids"])
    with (folder / PER_CLASS_FILE).open() as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["circle", "square", "triangle"]
    for i, row in enumerate(rows):
        ap = written["metrics"]["segm"][f"AP_class_{row['name']}"]
        assert float(row["segm_AP"]) == pytest.approx(ap, abs=0) if ap is not None else row["segm_AP"] == ""
        assert int(row["instances"]) == matrix[i].sum() and int(row["missed"]) == matrix[i, k]
        assert int(row["false_positives"]) == matrix[k, i]
    to_check = json.loads((folder / TO_CHECK_FILE).read_text())
    assert to_check and [e["errors"] for e in to_check] == sorted((e["errors"] for e in to_check), reverse=True)
    names = confusion["ground_truth"][:k]
    for j, name in enumerate(names):
        assert sum(1 for e in to_check for d in e["false_positives"] if d["name"] == name) == matrix[k, j]
        assert sum(1 for e in to_check for d in e["missed"] if d["name"] == name) == matrix[j, k]
    assert sum(len(e["wrong_class"]) for e in to_check) == matrix[:k, :k].sum() - np.trace(matrix[:k, :k])
    assert all(isinstance(d["annotation_id"], int) for e in to_check for d in e["missed"])
    assert (folder / f"{CONFUSION_STEM}.png").stat().st_size > 0 and (folder / TO_CHECK_SHEET).stat().st_size > 0


def test_an_evaluation_folder_is_not_taken_for_a_run(run_dir, evaluated):
    _, _, folder = evaluated
    assert read_history(folder) == []
    with pytest.raises(NoRunError):
        find_runs(folder)
    assert find_runs(run_dir) == [run_dir]


def test_another_annotation_file_by_override(run_dir, tmp_path):
    """Another annotation file (here the training split's, as COCO-format files: data=coco): its 8 images,
    the run's model, written under --output."""
    train = resolve_paths(OmegaConf.load(run_dir / RUN_CONFIG).data, progress=False)
    files = [f"data.{split}_{kind}={train[f'train_{kind}']}" for split in ("train", "val") for kind in ("images", "annotations")]
    status, _, err = run_main("--weights", run_dir / "checkpoints" / "last.pth", "--output", tmp_path, "--check-images", 0,
                              "data=coco", f"data.root={train['train_images'].parent}", "data.num_workers=0", *files)
    assert status == 0, err
    written = json.loads((newest(tmp_path) / METRICS_FILE).read_text())
    assert written["annotations"] == str(train["train_annotations"]) and written["speed"]["images"] == 8
    assert written["config"]["model"]["fpn_channels"] == 16  # the run's model, from its folder
    assert not (newest(tmp_path) / TO_CHECK_SHEET).exists()
    # --split train: the same files, read by the run's own data config as validation reads images.
    parts = prepare(build_parser().parse_args(["--weights", str(run_dir / "checkpoints" / "last.pth"), "--split", "train"]), [])
    assert parts["files"] == {"val_images": train["train_images"], "val_annotations": train["train_annotations"]}
    assert len(parts["dataset"]) == 8 and parts["cfg"].data.name == "shapes"


def coco_root(root):
    """A tiny COCO-format root whose category ids are COCO's (3 car, 18 dog): both splits, two images."""
    cats = [{"id": 3, "name": "car"}, {"id": COCO_DOG, "name": "dog"}]
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (1, 2)]
    anns = [square_ann(1, 1, COCO_DOG, 8, 8, 24), square_ann(2, 2, 3, 20, 16, 30), square_ann(3, 2, COCO_DOG, 2, 40, 16)]
    images_dir, annotations = write_coco_dataset(root, cats, images, anns, split="val")
    return ["data=coco", f"data.root={root}", f"data.train_images={images_dir}", f"data.train_annotations={annotations}",
            f"data.val_images={images_dir}", f"data.val_annotations={annotations}", "data.num_workers=0"]


@pytest.mark.slow  # a ResNet-50 Mask R-CNN built twice and evaluated: several seconds on a CPU
def test_a_torchvision_coco_state_dict_is_evaluated_in_cocos_label_space(tmp_path, tmp_path_factory):
    weights = coco_r50_state_dict(tmp_path_factory)
    data = coco_root(tmp_path / "coco")
    small = [f"model.{k}={v}" for k, v in R50_SMALL_INPUT.items()]
    parts = prepare(build_parser().parse_args(["--weights", str(weights)]), [*data, *small])
    assert parts["cfg"].model.arch == "maskrcnn_r50_fpn"  # recognised from the keys: no model= needed
    assert parts["mapping"].coco_ids == list(range(1, 91))
    _, targets = next(iter(parts["loader"]))
    assert [t["labels"].tolist() for t in targets] == [[COCO_DOG], [3, COCO_DOG]]  # targets in the model's label space

    status, out, err = run_main("--weights", weights, "--output", tmp_path / "out", *data, *small)
    assert status == 0, err
    folder = newest(tmp_path / "out")
    results = json.loads((folder / RESULTS_FILE).read_text())
    assert results and {r["category_id"] for r in results} == {COCO_DOG}  # output 18 is COCO's dog, as written
    written = json.loads((folder / METRICS_FILE).read_text())
    assert written["weights_kind"] == "state_dict" and math.isfinite(written["scalars"]["loss/val_loss_classifier"])
    assert set(written["metrics"]["bbox"]) >= {"AP_class_car", "AP_class_dog"}
    assert "🏷️ AP per class (segm): car" in out


@pytest.mark.parametrize("case", ["missing", "architecture", "categories", "shapes_file"])
def test_bad_input_is_one_error_line(run_dir, tmp_path, case):
    last = run_dir / "checkpoints" / "last.pth"
    args = {
        "missing": ["--weights", tmp_path / "nope.pth"],
        "architecture": ["--weights", last, "model=maskrcnn_r50_fpn"],
        "categories": ["--weights", last, *coco_root(tmp_path / "coco")],
        "shapes_file": ["--weights", last, "data.val_annotations=other.json"],
    }[case]
    status, _, err = run_main(*args)
    assert status == 2 and err.count("\n") == 1 and err.startswith("Error: ")
    expected = {
        "missing": f"Error: Weights file not found: {tmp_path / 'nope.pth'}",
        "architecture": f"Error: {last} does not fit the model built as model.arch=maskrcnn_r50_fpn; missing from the file: ",
        "categories": "has categories the model does not predict (18 'dog')",
        "shapes_file": "add data=coco data.root=<folder> to evaluate COCO-format files",
    }[case]
    assert expected in err and "Traceback" not in err
    if case == "architecture":
        assert "of another shape: " in err and "(e.g. backbone.body." in err  # the small model's ResNet-18 body


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed next to this Python")
def test_a_real_run_then_the_script_alone_and_under_torchrun(tmp_path):
    """Trained by the entry point (Hydra writes the run folder), evaluated in one process (the run's last
    epoch to the last digit) and by the script in two under torchrun (the same metrics; the val losses
    to sampling noise, rank 0 alone reporting)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = subprocess.run([sys.executable, str(ENTRY), *TINY_OVERRIDES, "epochs=1", "tracker=none", "vis.num_images=0",
                            "diagnostics.enabled=false", f"runs_dir={tmp_path}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600, check=False)
    assert train.returncode == 0, train.stderr
    [run] = (tmp_path / "maskrcnn").iterdir()
    last = read_history(run)[-1]
    status, _, err = run_main("--weights", run / "checkpoints" / "last.pth")  # one process: in this one
    assert status == 0, err
    assert evaluation_tags(json.loads((newest(run) / METRICS_FILE).read_text())["scalars"]) == evaluation_tags(last)
    out = tmp_path / "two"
    two = subprocess.run([TORCHRUN, "--nproc_per_node=2", "--standalone", str(SCRIPT), "--weights",
                          str(run / "checkpoints" / "last.pth"), "--output", str(out), "--no-progress"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert two.returncode == 0, two.stderr
    written = json.loads((newest(out) / METRICS_FILE).read_text())
    assert written["world_size"] == 2 and two.stdout.count("📈 Validation Loss") == 1  # rank 0 alone reports
    # COCO metrics: the same detections, gathered in image order: exact. Val losses: the RPN and RoI samplers
    # draw per batch on each rank, so the draws differ from one process's; the losses agree to sampling noise.
    for tag, value in evaluation_tags(last).items():
        assert written["scalars"][tag] == (pytest.approx(value, rel=0.02, abs=1e-3) if tag.startswith("loss/") else value), tag
