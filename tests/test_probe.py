"""The loss probe: exact components, per-level sums, untouched model, diagnoses, files and errors."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import SWEEP_JOB
from hydra.core.override_parser.overrides_parser import OverridesParser

from maskrcnn_coco.cli.probe import main, quote_override_value
from maskrcnn_coco.config import LOSS_COMPONENTS
from maskrcnn_coco.engine import move_to_device
from maskrcnn_coco.probe.core import check_per_level_sums, probe_batch, run_probe
from maskrcnn_coco.probe.report import format_batch, format_comparison, write_reports

from conftest import REPO, TINY_MODEL_OVERRIDES, TINY_OVERRIDES, square_ann, write_coco_dataset

PROBE_ARGS = [a for a in TINY_OVERRIDES if a != "progress=false"] + ["--no-progress"]


def first_batch(loader):
    images, targets = next(iter(loader))
    return move_to_device(images, targets, torch.device("cpu"))


def test_raw_components_equal_the_models_own_losses(tiny_model, tiny_data):
    images, targets = first_batch(tiny_data.train_loader)
    record = probe_batch(tiny_model, images, targets, seed=7)
    torch.manual_seed(7)
    tiny_model.train()
    with torch.no_grad():
        expected = tiny_model(images, targets)
    for k in LOSS_COMPONENTS:
        assert record["loss_components"][k] == float(expected[k]), k
    assert record["loss_components"]["total"] == pytest.approx(sum(float(v) for v in expected.values()))


@pytest.mark.slow
def test_per_level_contributions_sum_to_each_component(tiny_model, tiny_data):
    records = run_probe(tiny_model, tiny_data.train_loader, "cpu", num_batches=3, progress=False)
    assert len(records) == 3
    for record in records:
        assert check_per_level_sums(record) == []
        for k in LOSS_COMPONENTS:
            levels = record["per_level_losses"][k]
            assert set(levels) == {"0", "1", "pool"}
            assert sum(levels.values()) == pytest.approx(record["loss_components"][k], abs=1e-5, rel=1e-5)
        # The RoI heads pool from levels 0 and 1 only; the RPN uses all three.
        assert record["per_level_losses"]["loss_mask"]["pool"] == 0.0
        stats = record["batch_stats"]
        assert sum(s["gt_objects"] for s in stats["per_level_stats"]) == stats["total_objects"] > 0
        assert sum(s["positive_anchors"] for s in stats["per_level_stats"]) == record["sampling"]["rpn_positive_anchors"]
        assert record["normalization_factors"]["loss_objectness"] == record["sampling"]["rpn_sampled_anchors"]
        assert record["normalization_factors"]["loss_mask"] == record["sampling"]["roi_positive_proposals"]


def box_only_batch(loader, box_only):
    """The loader's first batch with the masks of ``box_only(image, instance)`` all zero, as the data
    side gives an annotation without a segmentation."""
    images, targets = first_batch(loader)
    targets = [{**t, "masks": t["masks"].clone()} for t in targets]
    for i, t in enumerate(targets):
        for j in range(len(t["masks"])):
            if box_only(i, j):
                t["masks"][j] = 0
    return images, targets


def assert_mask_parts_sum_to_the_models_loss(model, images, targets):
    """Probe one batch through ``run_probe``: loss_mask is the model's own, its per-level parts sum to
    it and no per-level mismatch is reported; returns the record."""
    (record,) = run_probe(model, [(images, targets)], "cpu", num_batches=1, progress=False)
    torch.manual_seed(0)  # run_probe's seed for batch 0
    model.train()
    with torch.no_grad():
        expected = model(images, [dict(t) for t in targets])
    assert record["loss_components"]["loss_mask"] == float(expected["loss_mask"])
    levels = record["per_level_losses"]["loss_mask"]
    assert sum(levels.values()) == pytest.approx(record["loss_components"]["loss_mask"], abs=1e-5, rel=1e-5)
    assert check_per_level_sums(record) == []
    assert not [w for w in record["warnings"] if w["kind"] == "per_level_mismatch"]
    return record


def test_mask_parts_sum_to_loss_mask_with_half_the_instances_box_only(tiny_model, tiny_data):
    images, targets = box_only_batch(tiny_data.train_loader, lambda i, j: j % 2 == 1)
    record = assert_mask_parts_sum_to_the_models_loss(tiny_model, images, targets)
    sampling = record["sampling"]
    # The ground-truth boxes are proposals too, so both kinds of instance have positives.
    masked, box_only = sampling["mask_positive_proposals"], sampling["mask_box_only_proposals"]
    assert masked > 0 and box_only > 0 and masked + box_only == sampling["roi_positive_proposals"]
    assert record["normalization_factors"]["loss_mask"] == masked
    assert f"{masked} positive proposals (x mask pixels); {box_only} box-only positives skipped" in format_batch(record)


def test_mask_parts_are_zero_when_no_instance_has_a_mask(tiny_model, tiny_data):
    images, targets = box_only_batch(tiny_data.train_loader, lambda i, j: True)
    record = assert_mask_parts_sum_to_the_models_loss(tiny_model, images, targets)
    assert record["loss_components"]["loss_mask"] == 0.0
    assert set(record["per_level_losses"]["loss_mask"].values()) == {0.0}
    sampling = record["sampling"]
    assert sampling["mask_positive_proposals"] == 0 == record["normalization_factors"]["loss_mask"]
    assert sampling["mask_box_only_proposals"] == sampling["roi_positive_proposals"] > 0
    # A zero by construction, not a value outside loss_mask's usual range.
    assert not [w for w in record["warnings"] if "loss_mask" in w["components"]]


def test_torchvisions_roi_heads_keep_torchvisions_mask_parts_on_box_only_data(tiny_model, tiny_data):
    """Plain RoIHeads train a box-only instance's empty mask as background: every positive counts."""
    from torchvision.models.detection.roi_heads import RoIHeads

    tiny_model.roi_heads.__class__ = RoIHeads
    images, targets = box_only_batch(tiny_data.train_loader, lambda i, j: j % 2 == 1)
    record = assert_mask_parts_sum_to_the_models_loss(tiny_model, images, targets)
    assert record["sampling"]["mask_box_only_proposals"] == 0
    assert record["sampling"]["mask_positive_proposals"] == record["sampling"]["roi_positive_proposals"]


@pytest.mark.slow
def test_model_is_bit_identical_after_a_probe(tiny_model, tiny_data):
    tiny_model.eval()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    run_probe(tiny_model, tiny_data.train_loader, "cpu", num_batches=2, progress=False)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not tiny_model.training and not any(m.training for m in tiny_model.modules())


@pytest.mark.slow
def test_constant_predictions_and_dominance_are_diagnosed(tiny_model, tiny_data):
    images, targets = first_batch(tiny_data.train_loader)
    heavy = probe_batch(tiny_model, images, targets, loss_weights={"loss_objectness": 1000.0})
    dominant = [w for w in heavy["warnings"] if w["kind"] == "dominant"]
    assert dominant and dominant[0]["components"] == ["loss_objectness"]
    assert "loss.weights.loss_objectness" in dominant[0]["message"] and "anchor sizes" in dominant[0]["message"]
    assert heavy["weighted_components"]["loss_objectness"] == pytest.approx(1000 * heavy["loss_components"]["loss_objectness"])

    with torch.no_grad():
        for p in tiny_model.roi_heads.box_predictor.parameters():
            p.zero_()
    record = probe_batch(tiny_model, images, targets)
    codes = {w["kind"] for w in record["warnings"]}
    assert "constant_predictions" in codes
    # A zeroed 4-class classifier gives exactly ln(4).
    assert record["loss_components"]["loss_classifier"] == pytest.approx(math.log(4), rel=1e-5)


@pytest.mark.parametrize("box, problem", [([5.0, 5.0, 5.0, 20.0], "non-positive width/height"), ([5.0, float("nan"), 20.0, 20.0], "NaN/Inf")])
def test_invalid_boxes_reaching_the_model_are_named_not_fatal(tiny_model, tiny_data, box, problem):
    """A custom loader may hand the model boxes our pipeline would have dropped."""
    images, targets = first_batch(tiny_data.train_loader)
    targets[1]["boxes"][0] = torch.tensor(box)
    record = probe_batch(tiny_model, images, targets)
    flagged = [w for w in record["warnings"] if w["kind"] in ("invalid_ground_truth", "non_finite")]
    assert flagged and targets[1]["image_id"] in flagged[0]["image_ids"]
    assert f"image {targets[1]['image_id']} box 0" in flagged[0]["message"] and problem in flagged[0]["message"]


def nan_dataset(tmp_path):
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (11, 12)]
    anns = [
        square_ann(1, 11, 1, 8, 8, 20),
        square_ann(2, 11, 2, 36, 30, 16),
        {**square_ann(3, 12, 1, 10, 12, 24), "bbox": [10.0, float("nan"), 24.0, 24.0]},  # planted NaN
        square_ann(4, 12, 2, 40, 40, 14),
    ]
    img_dir, ann_file = write_coco_dataset(tmp_path, cats, images, anns)
    return [f"data.train_images={img_dir}", f"data.val_images={img_dir}",
            f"data.train_annotations={ann_file}", f"data.val_annotations={ann_file}"]


@pytest.mark.slow
def test_planted_nan_box_gives_a_warning_naming_the_image(tmp_path, capsys):
    data = ["data=coco", f"data.root={tmp_path}", "data.batch_size=2", "data.num_workers=0", *nan_dataset(tmp_path)]
    out_dir = tmp_path / "probe"
    code = main(["--num-batches", "1", "--output-dir", str(out_dir), "--no-progress", *data, *TINY_MODEL_OVERRIDES,
                 "model.min_size=64", "model.max_size=64"])
    assert code == 0, capsys.readouterr().err
    (record,) = json.loads((out_dir / "loss_components.json").read_text())
    assert sorted(record["image_ids"]) == [11, 12]
    nan_warnings = [w for w in record["warnings"] if w["kind"] == "invalid_annotation"]
    assert [w["image_ids"] for w in nan_warnings] == [[12]]
    assert "image 12 annotation 3" in nan_warnings[0]["message"] and "NaN" in nan_warnings[0]["message"]
    assert all(math.isfinite(record["loss_components"][k]) for k in LOSS_COMPONENTS)
    assert "image 12 annotation 3" in capsys.readouterr().out


@pytest.mark.slow
def test_files_are_identical_for_the_same_seed_and_carry_the_run(tmp_path, capsys):
    outputs = []
    for name in ("a", "b"):
        code = main(["--num-batches", "2", "--seed", "3", "--output-dir", str(tmp_path / name), "--verbose", *PROBE_ARGS])
        assert code == 0
        outputs.append(tmp_path / name)
    out = capsys.readouterr().out
    assert "per-level loss" in out and "Mean over 2 batches" in out
    for fname in ("loss_components.json", "loss_components.csv"):
        assert (outputs[0] / fname).read_bytes() == (outputs[1] / fname).read_bytes()
    assert (outputs[0] / "loss_components.png").read_bytes()[:4] == b"\x89PNG"

    records = json.loads((outputs[0] / "loss_components.json").read_text())
    assert isinstance(records, list) and [r["batch_idx"] for r in records] == [0, 1]
    for key in ("batch_stats", "loss_components", "scaling_coefficients", "weighted_components",
                "normalization_factors", "per_level_losses", "warnings", "image_ids", "config_overrides", "weights"):
        assert key in records[0], key
    assert "seed=3" in records[0]["config_overrides"] and records[0]["seed"] == 3
    level = records[0]["batch_stats"]["per_level_stats"][0]
    assert set(level) >= {"level", "grid", "anchors", "gt_objects", "object_density", "positive_anchors"}

    rows = list(csv.DictReader((outputs[0] / "loss_components.csv").open()))
    assert len(rows) == 2
    header = list(rows[0])
    assert header[:9] == ["batch_idx", "batch_size", "total_objects", "total_loss", *LOSS_COMPONENTS]
    assert header[9:14] == [f"{k}_weight" for k in LOSS_COMPONENTS]
    assert header[14:19] == [f"{k}_weighted" for k in LOSS_COMPONENTS]
    assert float(rows[0]["total_loss"]) == pytest.approx(records[0]["weighted_components"]["total"])
    assert "seed=3" in rows[0]["config_overrides"]

    # A different seed changes the data order and the sampling.
    assert main(["--num-batches", "1", "--seed", "4", "--output-dir", str(tmp_path / "c"), *PROBE_ARGS]) == 0
    other = json.loads((tmp_path / "c" / "loss_components.json").read_text())
    assert other[0]["loss_components"] != records[0]["loss_components"]


@pytest.mark.slow
def test_weights_and_compare(tmp_path, tiny_data, capsys):
    from maskrcnn_coco.modeling.build import build_model

    from conftest import tiny_model_cfg

    model = build_model(tiny_model_cfg(), 4)
    with torch.no_grad():
        for p in model.roi_heads.box_predictor.parameters():
            p.zero_()
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "zeroed.pth")
    assert main(["--num-batches", "2", "--output-dir", str(tmp_path / "random"), *PROBE_ARGS]) == 0
    assert main(["--num-batches", "2", "--weights", str(tmp_path / "zeroed.pth"), "--output-dir", str(tmp_path / "loaded"), *PROBE_ARGS]) == 0
    loaded = json.loads((tmp_path / "loaded" / "loss_components.json").read_text())
    assert loaded[0]["weights"] == str(tmp_path / "zeroed.pth")
    assert loaded[0]["loss_components"]["loss_classifier"] == pytest.approx(math.log(4), rel=1e-5)
    capsys.readouterr()

    assert main(["--compare", str(tmp_path / "random"), str(tmp_path / "loaded" / "loss_components.csv")]) == 0
    table = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith("loss_")}
    assert set(lines) == set(LOSS_COMPONENTS)
    random_cls = json.loads((tmp_path / "random" / "loss_components.json").read_text())
    mean_a = sum(r["loss_components"]["loss_classifier"] for r in random_cls) / 2
    assert float(lines["loss_classifier"][1]) == pytest.approx(mean_a, abs=1e-4)
    assert float(lines["loss_classifier"][2]) == pytest.approx(math.log(4), abs=1e-4)
    assert float(lines["loss_classifier"][3].rstrip("*")) == pytest.approx(math.log(4) / mean_a, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "no_such_config"], "Error: Config 'no_such_config' not found in"),
        (["--weights", "/nonexistent/weights.pth"], "Error: Weights file not found: /nonexistent/weights.pth"),
        (["data=coco", "data.root=/nonexistent/coco"], "Error: Annotation file not found: /nonexistent/coco/annotations/instances_train2017.json"),
        (["--compare", "/nonexistent/a", "/nonexistent/b"], "Error: No probe output at /nonexistent/a"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, args, message):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "probe_losses.py"), "--num-batches", "1", "--no-progress", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(message), proc.stderr


@pytest.mark.slow
def test_experiment_yaml_and_backbone_weights(tmp_path):
    """--config takes a YAML elsewhere that builds on the training config; groups still come from conf/."""
    import torchvision

    exp = tmp_path / "my_experiment.yaml"
    exp.write_text("defaults:\n  - config\n  - _self_\nloss:\n  weights:\n    loss_mask: 3.0\n")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "out"
    assert main(["--config", str(exp), "--backbone-weights", str(tmp_path / "r18.pth"), "--num-batches", "1",
                 "--format", "json", "--output-dir", str(out), *PROBE_ARGS]) == 0
    (record,) = json.loads((out / "loss_components.json").read_text())
    assert record["scaling_coefficients"]["loss_mask"] == 3.0
    assert record["weighted_components"]["loss_mask"] == pytest.approx(3.0 * record["loss_components"]["loss_mask"])
    assert record["backbone_weights"] == str(tmp_path / "r18.pth") and record["config"] == str(exp)
    assert not (out / "loss_components.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["maskrcnn_r50_fpn", "maskrcnn_r50_fpn_v2"])
def test_per_level_sums_on_torchvision_models(tiny_data, arch):
    from omegaconf import OmegaConf

    from maskrcnn_coco.config import ModelConfig
    from maskrcnn_coco.modeling.build import build_model

    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(arch=arch, min_size=64, max_size=64, rpn_post_nms_top_n_train=100,
                                           box_batch_size_per_image=64))
    model = build_model(cfg, tiny_data.mapping.num_classes)
    (record,) = run_probe(model, tiny_data.train_loader, "cpu", num_batches=1, progress=False)
    assert check_per_level_sums(record) == []
    assert [s["level"] for s in record["batch_stats"]["per_level_stats"]] == ["0", "1", "2", "3", "pool"]
    assert not [w for w in record["warnings"] if w["kind"] in ("per_level_mismatch", "constant_predictions")]


@pytest.mark.slow
def test_the_json_carries_its_schema_and_findings_are_diagnoses(tmp_path, capsys):
    """Every JSON record has ``schema`` (2); its findings have the fields of a diagnostics.jsonl line."""
    from maskrcnn_coco.analysis.diagnostics import FINDING_FIELDS
    from maskrcnn_coco.probe.report import SCHEMA, load_records

    out = tmp_path / "probe"
    assert main(["--num-batches", "1", "--format", "json", "--output-dir", str(out), *PROBE_ARGS,
                 "loss.weights.loss_objectness=1000"]) == 0
    assert "warning:dominant x1" in capsys.readouterr().out
    (record,) = json.loads((out / "loss_components.json").read_text())
    assert SCHEMA == 2 and record["schema"] == SCHEMA
    (dominant,) = [w for w in record["warnings"] if w["kind"] == "dominant"]
    assert set(dominant) == set(FINDING_FIELDS)
    assert (dominant["severity"], dominant["batch"], dominant["epoch"]) == ("warning", 0, None)
    assert dominant["components"] == ["loss_objectness"] and dominant["image_ids"] == record["image_ids"]
    assert dominant["config_key"] == "loss.weights.loss_objectness" and dominant["evidence"]["weight"] == 1000.0
    assert dominant["message"].endswith("(see docs/LOSS_BREAKDOWN.md#dominant-component)")
    assert load_records(out)[0]["schema"] == SCHEMA


def fake_record(batch_idx, box_reg, roi_pos, level_box_reg):
    """A probe record with only what the comparison reads: components, per level, sampling."""
    components = dict.fromkeys(LOSS_COMPONENTS, 0.5) | {"loss_box_reg": box_reg}
    return {
        "batch_idx": batch_idx,
        "loss_components": {**components, "total": sum(components.values())},
        "weighted_components": {**components, "total": sum(components.values())},
        "per_level_losses": {k: {"0": components[k], "1": 0.0} for k in LOSS_COMPONENTS} | {"loss_box_reg": level_box_reg},
        "sampling": {"rpn_sampled_anchors": 512, "rpn_positive_anchors": 20, "roi_sampled_proposals": 1024,
                     "roi_positive_proposals": roi_pos, "mask_positive_proposals": roi_pos},
        "batch_stats": {"per_level_stats": [{"level": "0", "positive_anchors": 12}, {"level": "1", "positive_anchors": 8}]},
    }


def test_compare_shows_the_sampling_beside_each_ratio():
    """box_reg 1.42x "worse" after training, while the positive proposals went from 28 to 111."""
    a = [fake_record(0, 0.1, 28, {"0": 0.1, "1": 0.0})]
    b = [fake_record(0, 0.142, 111, {"0": 0.142, "1": 0.0})]
    table = format_comparison(a, b, "loss_random", "loss_trained", verbose=True)
    (row,) = [line for line in table.splitlines() if line.startswith("loss_box_reg ")]
    assert row.split()[3] == "1.42*" and "RoI pos/sampled proposals 28/1024 -> 111/1024" in row
    (note,) = [line for line in table.splitlines() if line.startswith("  loss_box_reg:")]
    # Per positive: 0.142 * 1024 / 111 against 0.1 * 1024 / 28.
    assert "positives per sampled x3.96 (28 -> 111 per batch)" in note
    assert f"per positive, B/A = {0.142 * 28 / (0.1 * 111):.2f}" in note
    (objectness,) = [line for line in table.splitlines() if line.startswith("loss_objectness ")]
    assert "*" not in objectness and "RPN pos/sampled anchors 20/512 -> 20/512" in objectness
    # A ratio of 0/0 is a dash, never nan; the RPN's per-level rows carry their positive anchors.
    (level_1,) = [line for line in table.splitlines() if line.strip().startswith("loss_box_reg@1")]
    assert level_1.split()[-1] == "\u2014" and "nan" not in table
    assert "RPN positive anchors 12 -> 12" in table
    assert "A: loss_random" in table.splitlines()[0] and "B: loss_trained" in table.splitlines()[0]


def test_verbose_levels_say_which_rule_places_an_object(tiny_model, tiny_data):
    images, targets = first_batch(tiny_data.train_loader)
    record = probe_batch(tiny_model, images, targets)
    levels = record["batch_stats"]["per_level_stats"]
    total = record["batch_stats"]["total_objects"]
    assert sum(s["gt_objects"] for s in levels) == sum(s["gt_objects_roi"] for s in levels) == total
    # Objects sit on the level of the nearest anchor size (16, 32, 64 px here), where the RPN matches them.
    sizes = torch.cat([t["boxes"] for t in targets]).float()
    side = ((sizes[:, 2] - sizes[:, 0]) * (sizes[:, 3] - sizes[:, 1])).sqrt()
    expected = torch.bincount((side.log2() - torch.tensor([[4.0, 5.0, 6.0]]).T).abs().argmin(dim=0), minlength=3)
    assert [s["gt_objects"] for s in levels] == expected.tolist()
    text = format_batch(record, verbose=True)
    header = next(line for line in text.splitlines() if line.strip().startswith("level"))
    assert header.split() == ["level", "stride", "grid", "anchors", "gt(anch)", "density", "pos", "anch", "gt(RoI)"]
    assert "gt(anch): objects whose size sqrt(w*h) is nearest this level's anchor sizes" in text
    assert "pos anch: anchors the RPN sampler drew as positive here" in text
    assert "gt(RoI): objects whose box the RoI pooler maps here" in text


def test_the_plot_names_its_weights_and_split(tiny_model, tiny_data, tmp_path):
    from PIL import Image

    records = run_probe(tiny_model, tiny_data.val_loader, "cpu", num_batches=1, progress=False)
    weights = "runs/maskrcnn/multirun/x/0_optimizer.head_lr_multiplier=1/checkpoints/last.pth"
    run = {"config": "config", "weights": weights, "backbone_weights": None, "seed": 0, "split": "val"}
    png = next(p for p in write_reports(records, run, tmp_path, "json") if p.suffix == ".png")
    title = Image.open(png).text["Title"]
    assert f"weights: {weights}" in title and "split: val" in title and "1 batch" in title


def test_quoted_override_values_read_back_exactly():
    parser = OverridesParser.create()
    for value in (f"{SWEEP_JOB}/checkpoints/last.pth", "a,b/[c]/{d} e/it's", "C:\\runs\\x=1\\", "a\\'b", "''", "\\"):
        (override,) = parser.parse_overrides([f"model.weights={quote_override_value(value)}"])
        assert override.value() == value, value


def test_val_split_normalises_with_running_statistics(tiny_model, tiny_data):
    """--split val: BatchNorm on its running statistics, as the run's evaluation; train: batch statistics."""
    from maskrcnn_coco.engine.eval_step import loss_mode

    tiny_model.train()
    with torch.no_grad():
        tiny_model(*first_batch(tiny_data.train_loader))  # running statistics away from their init
    images, targets = first_batch(tiny_data.val_loader)
    record = probe_batch(tiny_model, images, targets, seed=5, statistics="running")
    torch.manual_seed(5)
    with torch.no_grad(), loss_mode(tiny_model):
        expected = tiny_model(images, targets)
    assert [record["loss_components"][k] for k in LOSS_COMPONENTS] == [float(expected[k]) for k in LOSS_COMPONENTS]
    assert record["normalisation"] == {"statistics": "running", "batchnorm_layers": 20, "initial_running_stats": 0}
    train = probe_batch(tiny_model, images, targets, seed=5)
    assert train["normalisation"]["statistics"] == "batch"
    assert train["loss_components"]["loss_objectness"] != record["loss_components"]["loss_objectness"]


def test_a_fresh_models_split_comparison_says_its_running_statistics_are_initial():
    from maskrcnn_coco.probe.report import format_split_comparison

    train = [fake_record(0, 0.1, 28, {"0": 0.1, "1": 0.0})]
    val = [{**fake_record(0, 0.1, 28, {"0": 0.1, "1": 0.0}),
            "normalisation": {"statistics": "running", "batchnorm_layers": 20, "initial_running_stats": 20}}]
    text = format_split_comparison(train, val)
    assert "[note] val ran on running statistics, and 20 of 20 BatchNorm layers still hold their initial" in text
    assert "[note]" not in format_split_comparison(train, [{**val[0], "normalisation": {**val[0]["normalisation"],
                                                                                         "initial_running_stats": 0}}])


@pytest.mark.slow
def test_per_image_rows_and_the_images_whose_loss_stands_out(tmp_path, capsys):
    """--per-image: each image's components in the JSON, the outliers on the console and a contact sheet.
    Weights whose mask logits are +10 everywhere make loss_mask the share of each box its mask leaves
    empty; image 12's masks are shifted half a box off (within the annotation check's tolerance)."""
    from maskrcnn_coco.modeling.build import build_model
    from maskrcnn_coco.probe.report import format_per_image

    from conftest import tiny_model_cfg

    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in range(10, 16)]
    anns = []
    for im in images:
        for j, (x, y, s, c) in enumerate([(6, 8, 20, 1), (34, 30, 22, 2)]):
            ann = square_ann(100 * im["id"] + j, im["id"], c, x, y, s)
            if im["id"] == 12:
                d = s / 2
                ann["segmentation"] = [[x + d, y + d, x + s + d, y + d, x + s + d, y + s + d, x + d, y + s + d]]
            anns.append(ann)
    img_dir, ann_file = write_coco_dataset(tmp_path, cats, images, anns)
    data = ["data=coco", f"data.root={tmp_path}", "data.batch_size=2", "data.num_workers=0",
            f"data.train_images={img_dir}", f"data.val_images={img_dir}",
            f"data.train_annotations={ann_file}", f"data.val_annotations={ann_file}"]
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(), 3)
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.zero_()
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(10.0)
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "confident.pth")
    out = tmp_path / "probe"
    code = main(["--num-batches", "3", "--per-image", "--split", "val", "--weights", str(tmp_path / "confident.pth"),
                 "--output-dir", str(out), "--no-progress", *data, *TINY_MODEL_OVERRIDES,
                 "model.min_size=64", "model.max_size=64"])
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    records = json.loads((out / "loss_components.json").read_text())
    rows = [row for r in records for row in r["per_image"]]
    assert sorted(row["image_id"] for row in rows) == list(range(10, 16))
    for r in records:
        assert [row["image_id"] for row in r["per_image"]] == r["image_ids"]
        assert r["normalisation"]["statistics"] == "running"
    loss_mask = {row["image_id"]: row["loss_mask"] for row in rows}
    assert max(loss_mask, key=loss_mask.get) == 12 and loss_mask[12] > 2 * sorted(loss_mask.values())[2]
    assert "images whose loss_mask stands far above the rest (images with objects):" in text
    (line,) = [line for line in text.splitlines() if line.strip().startswith("image 12 ")]
    assert f"{loss_mask[12]:.4f} = " in line and "2 objects" in line
    assert format_per_image(records) in text
    assert (out / "annotations_to_check.png").read_bytes()[:4] == b"\x89PNG"
