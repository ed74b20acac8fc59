"""``engine/writers.py``: the console block, metrics.jsonl, the diagnostics file, the per-class line
and the order of the default hooks."""

import dataclasses
import json
import logging
import math
from types import SimpleNamespace

from helpers import PARTS, VAL_LOSSES, falling, make_history, run_fit

from maskrcnn_coco.analysis.diagnostics import DIAGNOSTICS_FILE, iteration_spikes
from maskrcnn_coco.config import DiagnosticsConfig
from maskrcnn_coco.data.coco import CategoryMapping
from maskrcnn_coco.engine import format_epoch_summary
from maskrcnn_coco.engine.writers import format_class_aps
from maskrcnn_coco.tracking.scalars import epoch_scalars


def test_console_block_matches_the_documented_format():
    train = {"loss_classifier": 0.1456, "loss_box_reg": 0.1234, "loss_mask": 0.3890, "loss_objectness": 0.0567, "loss_rpn_box_reg": 0.1087}
    val = {"loss_classifier": 0.2, "loss_box_reg": 0.2, "loss_mask": 0.3123, "loss_objectness": 0.1, "loss_rpn_box_reg": 0.1}
    metrics = {"bbox": {"AP": 0.6543, "AP50": 0.8901}, "segm": {"AP": 0.2134, "AP50": 0.4567}}
    scalars = epoch_scalars({"train_loss": train, "val_loss": val, "metrics": metrics})
    text = format_epoch_summary(5, 20, scalars, "runs/maskrcnn/x/checkpoints/epoch_005.pth")
    assert text == (
        "Epoch 5/20\n"
        "📊 Training Losses:\n"
        "   Total: 0.8234\n"
        "   loss_box_reg: 0.1234\n"
        "   loss_classifier: 0.1456\n"
        "   loss_mask: 0.3890\n"
        "   loss_objectness: 0.0567\n"
        "   loss_rpn_box_reg: 0.1087\n"
        "📈 Validation Loss: 0.9123\n"
        "📦 Box mAP: 0.6543 (AP50: 0.8901)\n"
        "🎭 Mask mAP: 0.2134 (AP50: 0.4567)\n"
        "💾 Saved checkpoint: runs/maskrcnn/x/checkpoints/epoch_005.pth"
    )
    weighted = format_epoch_summary(1, 1, epoch_scalars({"train_loss": train, "loss_weights": {"loss_mask": 2.0}}))
    assert weighted.splitlines()[2] == "   Total: 1.2124"  # 0.8234 + 0.3890


def test_the_per_class_line_under_the_epoch_block():
    scalars = {"mAP/segm_AP": 0.5, "mAP/segm_AP_class_circle": 0.712, "mAP/segm_AP_class_square": 0.69, "mAP/bbox_AP_class_circle": 0.8}
    assert format_class_aps(scalars) == "🏷️ AP per class (segm): circle 0.712 | square 0.690"
    many = {f"mAP/bbox_AP_class_c{i}": i / 100 for i in range(80)}
    assert format_class_aps(many) == "🏷️ AP per class (bbox), lowest 5 of 80: c0 0.000 | c1 0.010 | c2 0.020 | c3 0.030 | c4 0.040"
    assert format_class_aps({"mAP/segm_AP": 0.5}) is None


def test_metrics_jsonl_has_one_object_per_epoch_and_nan_as_null(stub_evaluate, tmp_path):
    stub_evaluate.val_losses = {**VAL_LOSSES, "loss_mask": float("nan")}
    history, _, _ = run_fit(stub_evaluate, epochs=2, run_dir=tmp_path)  # the default hooks
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text

    def no_constants(name):
        raise AssertionError(f"non-JSON constant {name} in metrics.jsonl")

    lines = [json.loads(line, parse_constant=no_constants) for line in text.splitlines()]
    assert len(lines) == 2 == len(history)
    for line, record in zip(lines, history):
        assert next(iter(line)) == "epoch" and set(line) == set(record)
        assert math.isnan(record["loss/val_loss_mask"]) and math.isnan(record["loss/val"])
        assert line["loss/val_loss_mask"] is None and line["loss/val"] is None
        assert line["loss/val_loss_box_reg"] == 0.25 and line["mAP/bbox_AP50"] == 0.75
        assert {k: v for k, v in line.items() if v is not None} == {
            k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))
        }
    assert [line["epoch"] for line in lines] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_001.pth", "epoch_002.pth", "last.pth"]


def test_the_sink_logs_each_finding_once_and_writes_jsonl(tmp_path, caplog):
    # The engine's diagnostics hook (engine/sinks.py's DiagnosticsSink, now engine/writers.py's DiagnosticsWriter).
    from maskrcnn_coco.analysis.diagnostics import FINDING_FIELDS, Diagnosis
    from maskrcnn_coco.engine.hooks import EpochResult
    from maskrcnn_coco.engine.writers import DIAGNOSTICS_FILE
    from maskrcnn_coco.engine.writers import DiagnosticsWriter as DiagnosticsSink

    caplog.set_level(logging.WARNING, logger="maskrcnn_coco")
    start = Diagnosis(kind="zero_weight", components=("loss_mask",), message="m.", cause="c", config_key="loss.weights.loss_mask",
                      section="not-optimised")
    sink = DiagnosticsSink(tmp_path, start=[start])
    mapping = CategoryMapping([{"id": i, "name": n} for i, n in enumerate(["circle", "square", "triangle"], 1)])
    state = SimpleNamespace(history=[], mapping=mapping, global_step=0)
    sink.before_fit(state)
    rows = falling(4, start=(1.39, 0.14, 1.0, 0.69, 0.03), rate=0.98)
    for e, row in enumerate(rows, start=1):
        record = {"train_loss": row, "loss_weights": {"loss_objectness": 50.0}}
        state.history.append(make_history([row])[0] | {"epoch": e})
        state.global_step += 10
        sink.after_epoch(state, EpochResult(epoch=e, record=record, scalars={}))
    lines = [json.loads(line) for line in (tmp_path / DIAGNOSTICS_FILE).read_text().splitlines()]
    assert [(line["epoch"], line["kind"], line["components"]) for line in lines] == [
        (0, "zero_weight", ["loss_mask"]), (2, "dominant", ["loss_objectness"])]
    assert set(lines[1]) == set(FINDING_FIELDS) and lines[1]["severity"] == "warning"
    assert lines[1]["evidence"]["weight"] == 50.0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("loss_objectness dominates")  # the start finding is the caller's to log

    # The run's closing block: both findings ranked, warnings first, on the console and as tracker text.
    texts = []
    sink.tracker = SimpleNamespace(log_text=lambda tag, text, step: texts.append((tag, text, step)))
    caplog.set_level(logging.INFO, logger="maskrcnn_coco")
    state.epoch = 4
    sink.after_fit(state)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Diagnosis summary")]
    assert summary and summary[0].splitlines()[0].endswith("2 warnings, 0 other")
    assert [line.split("] ")[1].split(" ")[0] for line in summary[0].splitlines()[1:]] == ["zero_weight", "dominant"] or \
        [line.split("] ")[1].split(" ")[0] for line in summary[0].splitlines()[1:]] == ["dominant", "zero_weight"]
    assert texts[-1][0] == "diagnostics/summary" and "Diagnosis summary" in texts[-1][1] and texts[-1][2] == 4


def test_a_healthy_run_ends_with_no_findings_and_the_number_of_checks(tmp_path, caplog):
    from maskrcnn_coco.analysis.diagnostics import CHECKS
    from maskrcnn_coco.engine.writers import DiagnosticsWriter

    caplog.set_level(logging.INFO, logger="maskrcnn_coco")
    writer = DiagnosticsWriter(tmp_path)
    state = SimpleNamespace(epoch=5, history=[])
    writer.before_fit(state)
    writer.after_fit(state)
    assert f"Diagnosis summary ({len(CHECKS)} checks over 5 epochs; docs/LOSS_BREAKDOWN.md): no findings." in caplog.text


def test_a_spike_is_reported_once_per_epoch_and_subject(tmp_path):
    from maskrcnn_coco.engine.writers import DiagnosticsWriter

    def spike(epoch, component):
        return iteration_spikes(epoch, loss=(9.0, 5, PARTS | {component: 8.2}), loss_reference=(1.0, PARTS),
                                grad_norms={}, grad_references={}, window=1)[0]

    sink = DiagnosticsWriter(tmp_path)
    for finding in (spike(1, "loss_mask"), spike(1, "loss_classifier"), spike(2, "loss_mask")):
        sink.on_finding(None, finding)
    lines = [json.loads(line) for line in (tmp_path / DIAGNOSTICS_FILE).read_text().splitlines()]
    assert [(line["epoch"], line["components"]) for line in lines] == [(1, ["loss_mask"]), (2, ["loss_mask"])]


def test_default_sinks_put_diagnostics_after_the_console_block(tmp_path):
    from maskrcnn_coco.engine.writers import default_hooks as default_sinks

    names = [type(s).__name__ for s in default_sinks(tmp_path)]
    assert names.index("DiagnosticsWriter") == names.index("ConsoleSummary") + 1
    off = [type(s).__name__ for s in default_sinks(tmp_path, diagnostics=DiagnosticsConfig(enabled=False))]
    assert "DiagnosticsWriter" not in off and "ConfusionWriter" in off


def test_a_finding_cites_the_images_whose_per_image_loss_stands_out():
    from maskrcnn_coco.analysis.diagnostics import Diagnosis
    from maskrcnn_coco.engine.writers import cite_images

    finding = Diagnosis(kind="metric_disparity", components=("loss_mask",), message="segm far below bbox.", cause="c",
                        config_key=None, section="metric-disparity", epoch=4)
    per_image = {"epoch": 4, "sheet": "/run/annotations_to_check_epoch_004.png",
                 "outliers": {"loss_mask": [{"image_id": 12}, {"image_id": 57}], "loss_classifier": [{"image_id": 3}]}}
    cited = cite_images(finding, per_image)
    assert cited.image_ids == (12, 57)
    assert cited.message.endswith("Annotations to check: images 12, 57 (annotations_to_check_epoch_004.png).")
    assert cite_images(dataclasses.replace(finding, components=("loss_box_reg",)), per_image) .image_ids == ()


def test_the_per_image_losses_come_with_the_training_set_and_can_be_off(tmp_path):
    from maskrcnn_coco.config import DiagnosticsConfig
    from maskrcnn_coco.engine.per_image import PerImageLosses
    from maskrcnn_coco.engine.writers import default_hooks

    hooks = default_hooks(tmp_path, train_dataset=list(range(100)), diagnostics=DiagnosticsConfig())
    (hook,) = [h for h in hooks if isinstance(h, PerImageLosses)]
    assert len(hook.indices) == 24
    assert not [h for h in default_hooks(tmp_path, train_dataset=list(range(100)), diagnostics=DiagnosticsConfig(per_image_images=0))
                if isinstance(h, PerImageLosses)]
    assert not [h for h in default_hooks(tmp_path) if isinstance(h, PerImageLosses)]


def test_the_summary_says_which_findings_no_longer_held_at_the_end(tmp_path, caplog, monkeypatch):
    """Measured: a default run (seed 3, warmup 100) warned at epoch 2 that 'triangle' was taken for
    'square' (segm AP 0.069); by epoch 5 its AP was 0.594 and the rule quiet, yet the closing summary
    listed the warning as if it stood. Now it says the finding no longer held; one that still holds
    at the end is unmarked; the epochs survive a resume."""
    from maskrcnn_coco.analysis.diagnostics import Diagnosis
    from maskrcnn_coco.engine import writers
    from maskrcnn_coco.engine.hooks import EpochResult

    def finding(kind, subject, epoch):
        return Diagnosis(kind=kind, components=("loss_classifier",), message=f"{kind} {subject}.", cause="c",
                         config_key=None, section="s", epoch=epoch, subject=subject)

    held = {1: [], 2: ["confused_class", "lagging_class"], 3: ["lagging_class"], 4: ["lagging_class"], 5: ["lagging_class"]}
    monkeypatch.setattr(writers, "diagnose", lambda history, **kw: [finding(k, "triangle", len(history)) for k in held[len(history)]])
    writer = writers.DiagnosticsWriter(tmp_path)
    mapping = CategoryMapping([{"id": i, "name": n} for i, n in enumerate(["circle", "square", "triangle"], 1)])
    state = SimpleNamespace(history=[], mapping=mapping, global_step=0, epoch=0)
    writer.before_fit(state)
    for epoch in range(1, 4):
        state.history.append({"epoch": epoch})
        state.epoch, state.global_step = epoch, 10 * epoch
        writer.after_epoch(state, EpochResult(epoch=epoch, record={}, scalars={}))
    resumed = writers.DiagnosticsWriter(tmp_path)
    resumed.load_state_dict(json.loads(json.dumps(writer.state_dict())))
    for epoch in (4, 5):
        state.history.append({"epoch": epoch})
        state.epoch = epoch
        resumed.after_epoch(state, EpochResult(epoch=epoch, record={}, scalars={}))
    caplog.set_level(logging.INFO, logger="maskrcnn_coco")
    resumed.after_fit(state)
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Diagnosis summary")]
    lines = summary.splitlines()
    assert lines[0].endswith("2 warnings, 0 other; 1 of the warnings no longer held at epoch 5")
    assert [line.split(": ")[0] for line in lines[1:]] == [
        "  1. [warning] confused_class (loss_classifier; epoch 2; no longer found at epochs 3-5)",
        "  2. [warning] lagging_class (loss_classifier; epoch 2)"]
    # The run folder keeps the epochs too, for inspect_runs (tests/test_inspect_runs.py reads them back).
    saved = json.loads((tmp_path / "diagnostics_last_found.json").read_text())
    assert saved["epoch"] == 5 and sorted(saved["last_found"]) == [
        [["confused_class", ["loss_classifier"], "triangle"], 2], [["lagging_class", ["loss_classifier"], "triangle"], 5]]
    # An older checkpoint has no epochs: nothing is marked rather than everything.
    old = writers.DiagnosticsWriter(tmp_path)
    old.load_state_dict({k: v for k, v in writer.state_dict().items() if k != "last_found"})
    assert old.last_found == {}
