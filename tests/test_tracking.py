import csv
import inspect
import math

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from maskrcnn_coco.config import register_configs
from maskrcnn_coco.tracking import (
    KEY_HPARAMS,
    CompositeTracker,
    CSVTracker,
    ExperimentTracker,
    GuardedTracker,
    Hyperparams,
    NullTracker,
    TensorBoardTracker,
    flatten_params,
    log_training_metrics,
)
from maskrcnn_coco.tracking.hparams import HPARAM_METRICS, experiment_summary, is_hyperparameter, key_hparams
from maskrcnn_coco.tracking.scalars import epoch_scalars

from conftest import REPO

COMPONENTS = {"loss_classifier": 0.5, "loss_box_reg": 0.25, "loss_mask": 1.0, "loss_objectness": 0.125, "loss_rpn_box_reg": 0.0625}
METRICS = {"bbox": {"AP": 0.5, "AP50": 0.75, "AP75": 0.5, "APs": 0.25, "APm": 0.5, "APl": float("nan")},
           "segm": {"AP": 0.4, "AP50": 0.7, "AP75": 0.3, "APs": 0.2, "APm": 0.4, "APl": float("nan")}}


def read_scalars(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


class ListTracker:
    def __init__(self):
        self.scalars, self.params, self.closed = [], None, False

    def log_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def log_hyperparams(self, params):
        self.params = params

    def flush(self):
        pass

    def close(self):
        self.closed = True


PROTOCOL_METHODS = ("log_scalar", "log_hyperparams", "flush", "close")


def signature_shape(func):
    """Parameter names and kinds, without ``self``: what a caller of the protocol relies on."""
    params = list(inspect.signature(func).parameters.values())
    return [(p.name, p.kind) for p in params if p.name != "self"]


def test_protocol_methods_are_the_documented_four():
    declared = {name for name, value in vars(ExperimentTracker).items() if inspect.isfunction(value) and not name.startswith("_")}
    assert declared == set(PROTOCOL_METHODS)


@pytest.mark.parametrize("cls", [TensorBoardTracker, CSVTracker, NullTracker, CompositeTracker])
def test_shipped_backends_implement_the_protocol_signatures(cls):
    # isinstance on a runtime_checkable Protocol only checks that the names exist, so compare the
    # signatures themselves: a backend with log_scalar(tag, value) would pass isinstance and break fit.
    for name in PROTOCOL_METHODS:
        method = getattr(cls, name)
        assert inspect.isfunction(method), f"{cls.__name__}.{name} is not a method"
        assert signature_shape(method) == signature_shape(getattr(ExperimentTracker, name)), f"{cls.__name__}.{name}"


def test_an_object_missing_a_method_is_not_a_tracker(tmp_path):
    class NoClose:
        def log_scalar(self, tag, value, step):
            pass

        def log_hyperparams(self, params):
            pass

        def flush(self):
            pass

    assert not isinstance(NoClose(), ExperimentTracker)
    for tracker in (TensorBoardTracker(tmp_path), CSVTracker(tmp_path), NullTracker(), CompositeTracker([])):
        assert isinstance(tracker, ExperimentTracker)


class FailingClose(ListTracker):
    def __init__(self, message):
        super().__init__()
        self.message = message

    def close(self):
        self.closed = True
        raise OSError(self.message)


def test_composite_close_closes_every_tracker_then_raises_the_first_error():
    trackers = [FailingClose("first"), ListTracker(), FailingClose("second"), ListTracker()]
    with pytest.raises(OSError, match=r"^first$") as err:
        CompositeTracker(trackers).close()
    assert err.value.args == ("first",)
    assert [t.closed for t in trackers] == [True, True, True, True]


def test_epoch_scalars_of_a_full_record():
    record = {
        "train_loss": COMPONENTS,
        "val_loss": {**COMPONENTS, "loss_mask": 0.5},
        "loss_weights": {"loss_mask": 2.0, "loss_objectness": 0.0},
        "metrics": METRICS,
        "lr": {"heads": 0.1, "rpn": 0.02, "backbone": 0.01},  # backbone not first: `lr` is still its lr
        "grad_norm": {"backbone": 1.5, "heads": 0.25},
        "time": {"train_s": 12.5, "eval_s": 3.0},
    }
    assert epoch_scalars(record) == {
        # 0.5 + 0.25 + 2 * 1.0 + 0 * 0.125 + 0.0625
        "loss/train_total": 2.8125,
        "loss/train_loss_classifier": 0.5,
        "loss/train_loss_box_reg": 0.25,
        "loss/train_loss_mask": 1.0,
        "loss/train_loss_objectness": 0.125,
        "loss/train_loss_rpn_box_reg": 0.0625,
        "loss/val": 1.8125,  # the same with loss_mask 0.5
        "loss/val_loss_classifier": 0.5,
        "loss/val_loss_box_reg": 0.25,
        "loss/val_loss_mask": 0.5,
        "loss/val_loss_objectness": 0.125,
        "loss/val_loss_rpn_box_reg": 0.0625,
        "mAP/bbox_AP": 0.5, "mAP/bbox_AP50": 0.75, "mAP/bbox_AP75": 0.5, "mAP/bbox_APs": 0.25, "mAP/bbox_APm": 0.5,
        "mAP/segm_AP": 0.4, "mAP/segm_AP50": 0.7, "mAP/segm_AP75": 0.3, "mAP/segm_APs": 0.2, "mAP/segm_APm": 0.4,
        "lr": 0.01,
        "lr/heads": 0.1,
        "lr/rpn": 0.02,
        "lr/backbone": 0.01,
        "grad_norm/backbone": 1.5,
        "grad_norm/heads": 0.25,
        "time/train_s": 12.5,
        "time/eval_s": 3.0,
    }


def test_epoch_scalars_of_float_losses_and_partial_records():
    assert epoch_scalars({"train_loss": 0.9, "val_loss": 1.1, "lr": 0.02}) == {"loss/train": 0.9, "loss/val": 1.1, "lr": 0.02}
    # Without a backbone group `lr` is the first group's; empty or missing parts give no tags.
    assert epoch_scalars({"lr": {"heads": 0.1, "rpn": 0.02}}) == {"lr": 0.1, "lr/heads": 0.1, "lr/rpn": 0.02}
    assert epoch_scalars({"train_loss": {}, "val_loss": None, "metrics": {"bbox": None}, "lr": {}}) == {}


def test_dict_losses_are_logged_per_component_with_weighted_total(tmp_path):
    tb = TensorBoardTracker(tmp_path)
    log_training_metrics(tb, 3, COMPONENTS, COMPONENTS, METRICS, {"backbone": 0.01, "heads": 0.1},
                         loss_weights={"loss_mask": 2.0}, extra={"grad_norm/heads": 1.5})
    tb.close()
    scalars, _ = read_scalars(tmp_path)
    expected_total = sum(COMPONENTS.values()) + 1.0  # loss_mask counted twice
    assert scalars["loss/train_total"] == [(3, pytest.approx(expected_total))]
    assert scalars["loss/val"] == [(3, pytest.approx(expected_total))]
    for name, value in COMPONENTS.items():
        assert scalars[f"loss/train_{name}"] == [(3, pytest.approx(value))]
        assert scalars[f"loss/val_{name}"] == [(3, pytest.approx(value))]
    assert scalars["mAP/bbox_AP50"] == [(3, pytest.approx(0.75))]
    assert scalars["mAP/segm_AP"] == [(3, pytest.approx(0.4))]
    assert "mAP/segm_APl" not in scalars  # undefined (NaN) values are skipped
    assert scalars["lr"] == [(3, pytest.approx(0.01))]
    assert scalars["lr/heads"] == [(3, pytest.approx(0.1))]
    assert scalars["grad_norm/heads"] == [(3, pytest.approx(1.5))]
    assert "loss/train" not in scalars


def test_float_losses_are_backward_compatible(tmp_path):
    tb = TensorBoardTracker(tmp_path)
    log_training_metrics(tb, 1, 0.9, 1.1, None, 0.02)
    log_training_metrics(tb, 2, 0.8, None, {}, None)
    tb.close()
    scalars, _ = read_scalars(tmp_path)
    assert scalars["loss/train"] == [(1, pytest.approx(0.9)), (2, pytest.approx(0.8))]
    assert scalars["loss/val"] == [(1, pytest.approx(1.1))]
    assert scalars["lr"] == [(1, pytest.approx(0.02))]
    assert not any(tag.startswith("loss/train_") for tag in scalars)


def test_hyperparams_go_into_the_runs_own_event_file(tmp_path):
    tb = TensorBoardTracker(tmp_path)
    params = {"optimizer": {"lr": 0.02, "groups": {"heads": {"prefixes": ["roi_heads"]}}}, "epochs": 3, "model": {"weights": None}}
    tb.log_hyperparams(Hyperparams(params, overrides=["optimizer.groups.heads.prefixes=[roi_heads]", "model.weights=null"]))
    tb.log_scalar("loss/val", 1.0, 1)
    tb.close()
    for sub in (p for p in tmp_path.iterdir() if p.is_dir()):  # no stray sub-run (add_hparams would make one)
        sub_acc = EventAccumulator(str(sub))
        sub_acc.Reload()
        with pytest.raises(KeyError):
            sub_acc.PluginTagToContent("hparams")
    _, acc = read_scalars(tmp_path)
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(0.02)
    assert start.hparams["epochs"].number_value == 3
    assert start.hparams["optimizer.groups.heads.prefixes"].string_value == "['roi_heads']"
    assert start.hparams["model.weights"].string_value == "None"


def test_composite_fans_out_and_csv_reads_back(tmp_path):
    a, b = ListTracker(), CSVTracker(tmp_path)
    both = CompositeTracker([a, b])
    both.log_hyperparams({"seed": 1})
    log_training_metrics(both, 1, {"loss_mask": 0.5}, None, None, 0.1)
    both.close()
    assert a.closed and a.params == {"seed": 1}
    assert ("loss/train_loss_mask", 0.5, 1) in a.scalars
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert {(r["tag"], float(r["value"]), int(r["step"])) for r in rows} == {(t, v, s) for t, v, s in a.scalars}
    assert (tmp_path / "hparams.json").read_text().strip().startswith("{")


def test_flatten_params():
    assert flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": "None"}
    assert math.isclose(flatten_params({"x": 0.5})["x"], 0.5)


# ------------------------------------------------------------------ new backends, layout, HParams
@pytest.mark.parametrize("path", ["maskrcnn_coco.tracking.backends.GuardedTracker",
                                  "maskrcnn_coco.tracking.mlflow_tracker.MLflowTracker",
                                  "maskrcnn_coco.tracking.wandb_tracker.WandbTracker"])
def test_new_backends_implement_the_protocol_signatures(path):
    import importlib

    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)  # importable without the optional library
    for method in PROTOCOL_METHODS:
        assert signature_shape(getattr(cls, method)) == signature_shape(getattr(ExperimentTracker, method)), f"{name}.{method}"


EXTRAS = ("log_text", "log_image", "log_artifact", "resume")


@pytest.mark.parametrize("path", ["maskrcnn_coco.tracking.backends.TensorBoardTracker",
                                  "maskrcnn_coco.tracking.backends.CSVTracker",
                                  "maskrcnn_coco.tracking.backends.CompositeTracker",
                                  "maskrcnn_coco.tracking.backends.GuardedTracker",
                                  "maskrcnn_coco.tracking.mlflow_tracker.MLflowTracker",
                                  "maskrcnn_coco.tracking.wandb_tracker.WandbTracker"])
def test_optional_methods_have_the_extras_signatures(path):
    import importlib

    from maskrcnn_coco.tracking import TrackerExtras

    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    present = [m for m in EXTRAS if hasattr(cls, m)]
    for method in present:
        assert signature_shape(getattr(cls, method)) == signature_shape(getattr(TrackerExtras, method)), f"{name}.{method}"
    if name in ("CompositeTracker", "GuardedTracker"):  # wrappers forward every optional method
        assert present == list(EXTRAS)
    assert set(vars(TrackerExtras)) >= set(EXTRAS)


def test_optional_calls_skip_a_tracker_without_them_also_composed_and_guarded(tmp_path):
    import torch

    from maskrcnn_coco.tracking import log_artifact, log_image, log_text

    image = torch.zeros(3, 8, 6, dtype=torch.uint8)
    plain, tb = ListTracker(), TensorBoardTracker(tmp_path)
    guarded = GuardedTracker(ListTracker())
    for tracker in (plain, CompositeTracker([ListTracker(), tb]), guarded):
        log_text(tracker, "diagnostics/x", "**x**", 1)
        log_image(tracker, "images/predictions/7", image, 1)
        log_artifact(tracker, tmp_path)
    assert guarded.failed is None
    tb.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert [(e.step, e.width, e.height) for e in acc.Images("images/predictions/7")] == [(1, 6, 8)]


def test_images_and_text_reach_tensorboards_tabs_at_their_epoch(tmp_path):
    import torch

    tb = TensorBoardTracker(tmp_path)
    for epoch in (1, 2):
        tb.log_image("images/confusion", torch.full((3, 4, 5), 200, dtype=torch.uint8), epoch)
        tb.log_text("diagnostics/summary", f"epoch {epoch}", epoch)
    tb.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("images/confusion")] == [1, 2]
    assert [e.step for e in acc.Tensors("diagnostics/summary/text_summary")] == [1, 2]


def test_train_and_val_share_compare_cards_in_two_sub_runs_and_readers_see_one_run(tmp_path):
    """The compare/<component> card: the same tag in <run>/train and <run>/val (two runs, two colours);
    the run's own file keeps the vocabulary; run readers still find ONE run with the same tags."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    from maskrcnn_coco.analysis import read_scalars as read_run
    from maskrcnn_coco.analysis.inspect import find_runs

    run = tmp_path / "maskrcnn" / "run1"
    tb = TensorBoardTracker(run)
    log_training_metrics(tb, 1, COMPONENTS, {**COMPONENTS, "loss_mask": 0.75}, METRICS, 0.01)
    log_training_metrics(tb, 2, COMPONENTS, None, None, 0.01)  # an epoch without validation
    tb.close()
    main, _ = read_scalars(run)
    assert not any(tag.startswith("compare/") for tag in main)
    assert {"loss/train_loss_mask", "loss/val_loss_mask", "loss/train_total", "loss/val"} <= set(main)
    train, _ = read_scalars(run / "train")
    val, _ = read_scalars(run / "val")
    assert set(train) == {f"compare/{name}" for name in COMPONENTS} | {"compare/loss_total"}
    assert train["compare/loss_mask"] == [(1, 1.0), (2, 1.0)]
    assert val["compare/loss_mask"] == [(1, 0.75)] and val["compare/loss_total"] == main["loss/val"]
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    holding = sorted(r for r, tags in multiplexer.Runs().items() if "compare/loss_mask" in tags.get("tensors", []) + tags.get("scalars", []))
    assert holding == ["maskrcnn/run1/train", "maskrcnn/run1/val"]
    assert find_runs(tmp_path) == [run]
    assert set(read_run(run)) == set(main)


def test_lr_and_grad_norm_groups_get_a_sub_run_each_so_their_cards_have_a_colour_per_group(tmp_path):
    """compare/lr, compare/grad_norm and their iter/ forms: one tag in <run>/groups/<group> per group
    (TensorBoard colours by run); the run's own file keeps lr/<group> etc.; group_runs=False writes none."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    from maskrcnn_coco.analysis.inspect import find_runs
    from maskrcnn_coco.tracking.layout import group_pair

    assert group_pair("lr/heads") == ("groups/heads", "compare/lr")
    assert group_pair("iter/lr/module.rpn_head") == ("groups/module.rpn_head", "compare/iter_lr")
    assert group_pair("iter/grad_norm/backbone") == ("groups/backbone", "compare/iter_grad_norm")
    assert group_pair("grad_norm/backbone") == ("groups/backbone", "compare/grad_norm")
    assert group_pair("lr") is None and group_pair("lr/") is None and group_pair("loss/val") is None

    run = tmp_path / "maskrcnn" / "run1"
    tb = TensorBoardTracker(run)
    lr = {"backbone": 0.01, "heads": 0.1}
    log_training_metrics(tb, 1, COMPONENTS, None, None, lr, extra={"grad_norm/heads": 1.5, "grad_norm/backbone": 0.5})
    tb.log_scalar("iter/lr/heads", 0.05, 20)
    tb.log_scalar("iter/lr/backbone", 0.005, 20)
    tb.close()
    main, _ = read_scalars(run)
    assert {"lr/heads", "lr/backbone", "grad_norm/heads", "iter/lr/heads"} <= set(main)
    heads, _ = read_scalars(run / "groups" / "heads")
    backbone, _ = read_scalars(run / "groups" / "backbone")
    assert set(heads) == {"compare/lr", "compare/grad_norm", "compare/iter_lr"}
    assert heads["compare/lr"] == main["lr/heads"] and heads["compare/iter_lr"] == main["iter/lr/heads"]
    assert heads["compare/grad_norm"] == [(1, 1.5)] and backbone["compare/iter_lr"] == main["iter/lr/backbone"]
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    holding = sorted(r for r, tags in multiplexer.Runs().items() if "compare/lr" in tags.get("tensors", []) + tags.get("scalars", []))
    assert holding == ["maskrcnn/run1/groups/backbone", "maskrcnn/run1/groups/heads"]
    assert find_runs(tmp_path) == [run]

    off = tmp_path / "off"
    tb = TensorBoardTracker(off, group_runs=False)
    log_training_metrics(tb, 1, COMPONENTS, None, None, lr)
    tb.close()
    assert not (off / "groups").exists() and "lr/heads" in read_scalars(off)[0]


def test_layout_puts_iteration_tags_in_their_own_category():
    from maskrcnn_coco.tracking.layout import compare_pair, custom_scalars_layout

    tags = ["iter/loss_mask", "iter/loss_total", "iter/lr/heads", "iter/grad_norm/backbone", "iter/time_iter",
            "iter/memory/main_rss_mb", "lr/heads"]
    layout = custom_scalars_layout(tags)
    (iterations,) = [c for c in layout if c.startswith("Iterations")]
    assert set(layout[iterations]) == {"losses", "lr (all groups)", "grad_norm (all sets)", "time per iteration (s)",
                                       "memory (MiB)"}
    assert layout["Optimisation"] == {"lr (all groups)": ["Multiline", ["lr/.*"]]}  # lr/.* never matches iter/lr/
    assert compare_pair("loss/val") == ("val", "compare/loss_total")
    assert compare_pair("loss/train_loss_box_reg") == ("train", "compare/loss_box_reg")
    assert compare_pair("mAP/segm_AP") is None and compare_pair("iter/loss_mask") is None


def test_layout_charts_how_many_val_images_each_evaluation_used():
    from maskrcnn_coco.tracking.layout import custom_scalars_layout

    layout = custom_scalars_layout(["mAP/segm_AP", "eval/images", "eval/val_images"])
    assert layout["COCO AP"]["val images evaluated"] == ["Multiline", ["eval/images$", "eval/val_images$"]]
    assert "val images evaluated" not in custom_scalars_layout(["mAP/segm_AP"])["COCO AP"]  # nothing logged, no chart


def custom_scalars_layout_of(acc):
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = acc.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(events[-1].tensor_proto.string_val[0])  # TensorBoard shows the latest


def test_custom_scalars_layout_pairs_train_and_val_and_names_only_logged_tags(tmp_path):
    import re

    tb = TensorBoardTracker(tmp_path)
    lr = {"backbone": 0.01, "heads": 0.1, "rpn": 0.02}
    log_training_metrics(tb, 1, COMPONENTS, COMPONENTS, METRICS, lr, extra={"grad_norm/heads": 1.5, "grad_norm/rpn": 0.5})
    tb.close()
    scalars, acc = read_scalars(tmp_path)
    assert "custom_scalars__config__" in acc.PluginTagToContent("custom_scalars")
    layout = custom_scalars_layout_of(acc)
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    for name in COMPONENTS:
        assert charts[name] == [f"loss/train_{name}$", f"loss/val_{name}$"]
    assert charts["total"] == ["loss/train_total$", "loss/val$"]
    assert charts["lr (all groups)"] == ["lr/.*"] and charts["grad_norm (all groups)"] == ["grad_norm/.*"]
    assert charts["AP (segm, bbox)"] == ["mAP/segm_AP$", "mAP/bbox_AP$"]
    # Every regex names a logged tag (TensorBoard matches from the start of the tag).
    for title, regexes in charts.items():
        for regex in regexes:
            assert [t for t in scalars if re.match(regex, t)], (title, regex)
    assert sorted(t for t in scalars if re.match("lr/.*", t)) == ["lr/backbone", "lr/heads", "lr/rpn"]


def test_layout_leaves_out_charts_of_tags_never_logged(tmp_path):
    tb = TensorBoardTracker(tmp_path)
    log_training_metrics(tb, 1, {"loss_mask": 0.5}, None, None, None)  # no validation, no lr, no AP
    tb.close()
    _, acc = read_scalars(tmp_path)
    layout = custom_scalars_layout_of(acc)
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts == {"total": ["loss/train_total$"], "loss_mask": ["loss/train_loss_mask$"]}


def hparams_content(acc, tag):
    return plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")[tag])


def test_hparams_show_the_curated_keys_and_the_overridden_ones_with_final_metrics(tmp_path):
    register_configs()
    overrides = ["data.augment.vflip_prob=0.5", "optimizer.lr=0.01"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    tb = TensorBoardTracker(tmp_path)
    tb.log_hyperparams(Hyperparams(OmegaConf.to_container(cfg, resolve=True), overrides=overrides))
    log_training_metrics(tb, 1, COMPONENTS, COMPONENTS, METRICS, 0.01)
    log_training_metrics(tb, 2, COMPONENTS, COMPONENTS, {"segm": {"AP": 0.6}, "bbox": {"AP": 0.7}}, 0.01)
    tb.close()
    scalars, acc = read_scalars(tmp_path)

    start = hparams_content(acc, "_hparams_/session_start_info").session_start_info
    assert set(start.hparams) == {*KEY_HPARAMS, "data.augment.vflip_prob"}
    assert "data.augment.hflip_prob" not in start.hparams  # not overridden: only in the config text
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(0.01)
    assert start.hparams["data.augment.vflip_prob"].number_value == pytest.approx(0.5)
    assert start.hparams["model.arch"].string_value == cfg.model.arch
    assert "hflip_prob" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()

    experiment = hparams_content(acc, "_hparams_/experiment").experiment
    metric_tags = [m.name.tag for m in experiment.metric_infos]
    assert metric_tags[0] == "mAP/segm_AP"
    assert set(metric_tags) <= set(scalars)  # the HParams table reads each metric's last value from these
    assert {f"loss/{split}_{name}" for name in COMPONENTS for split in ("train", "val")} <= set(metric_tags)
    assert scalars["mAP/segm_AP"][-1] == (2, pytest.approx(0.6))
    assert {h.name for h in experiment.hparam_infos} == set(start.hparams)
    # The overridden keys are marked as differing: TensorBoard lists and ticks them first.
    assert sorted(h.name for h in experiment.hparam_infos if h.differs) == ["data.augment.vflip_prob", "optimizer.lr"]
    end = hparams_content(acc, "_hparams_/session_end_info").session_end_info
    assert end.status == 1  # STATUS_SUCCESS


# Overrides of a sweep job: infrastructure and paths beside the swept key and two real hyperparameters.
JOB_OVERRIDES = ["hydra/launcher=submitit_local", "hydra.run.dir=/tmp/x", "+sweep=head_lr", "tracker=all", "device=cpu",
                 "progress=false", "runs_dir=/tmp/runs", "data.num_workers=2", "data.cache_dir=/tmp/cache",
                 "checkpoint.keep_last=1", "diagnostics.enabled=false", "model.weights=/weights/r50.pth",
                 "epochs=1", "data.augment.vflip_prob=0.5", "optimizer.head_lr_multiplier=3"]


def composed_job_config():
    register_configs()
    composable = [o for o in JOB_OVERRIDES if not o.startswith(("hydra", "+sweep", "tracker"))]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=composable), resolve=True)


def test_key_hparams_leave_out_infrastructure_and_paths_and_put_the_swept_key_first():
    selected = key_hparams(composed_job_config(), JOB_OVERRIDES, swept=["optimizer.head_lr_multiplier"])
    assert list(selected)[:3] == ["optimizer.head_lr_multiplier", "epochs", "data.augment.vflip_prob"]
    assert set(selected) == {*KEY_HPARAMS, "data.augment.vflip_prob"}
    assert selected.differs == ("optimizer.head_lr_multiplier",)  # in a sweep: only what tells its jobs apart
    assert selected["optimizer.head_lr_multiplier"] == 3 and selected["epochs"] == 1
    # Outside a sweep every overridden hyperparameter sets the run apart, in command-line order.
    single = key_hparams(composed_job_config(), JOB_OVERRIDES)
    assert single.differs == ("epochs", "data.augment.vflip_prob", "optimizer.head_lr_multiplier")
    assert list(single)[:3] == list(single.differs)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("optimizer.lr", 0.01, True), ("optimizer", "adamw", True), ("model.weights", "DEFAULT", True),
    ("optimizer.groups.heads.prefixes", "['roi_heads']", True),
    ("data.root", "/data/coco", False), ("resume", "runs/x/last.pth", False), ("model.weights", "~/w.pth", False),
    ("data.train_annotations", "C:\\coco\\train.json", False), ("hydra/launcher", "submitit_local", False),
    ("hydra.sweeper.n_trials", 12, False), ("tracker", "all", False), ("tracker.backends.csv", "null", False),
    ("device", "cuda", False), ("progress", False, False), ("diagnostics.min_epoch", 3, False),
    ("data.num_workers", 4, False),
])
def test_is_hyperparameter(key, value, expected):
    assert is_hyperparameter(key, value) is expected


def test_hparam_metrics_add_each_components_train_and_val_loss_after_the_five_shown_by_default():
    from maskrcnn_coco.tracking import backends

    assert backends.HPARAM_METRICS is HPARAM_METRICS  # one owner: tracking.hparams
    assert HPARAM_METRICS[:5] == ("mAP/segm_AP", "mAP/segm_AP50", "mAP/bbox_AP", "loss/val", "loss/train_total")
    assert HPARAM_METRICS[5:] == tuple(f"loss/{split}_{name}" for name in COMPONENTS for split in ("train", "val"))


def ticked_by_default(experiment):
    """The HParams columns TensorBoard 2.21 shows without a click: the backend sorts ``hparam_infos`` by
    ``(not differs, name)``, the tab ticks the first five after a stable sort putting ``differs`` first."""
    from tensorboard.plugins.hparams import backend_context

    backend_context._sort_and_reduce_to_hparams_limit(experiment, 1000)  # the server's own sort
    infos = sorted(experiment.hparam_infos, key=lambda info: not info.differs)
    return [info.name for info in infos[:5]]


def test_experiment_summary_marks_the_swept_key_so_tensorboard_shows_it(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    selected = key_hparams(composed_job_config(), JOB_OVERRIDES, swept=["optimizer.head_lr_multiplier"])
    writer = SummaryWriter(str(tmp_path))
    writer.file_writer.add_summary(experiment_summary(selected, HPARAM_METRICS))
    writer.close()
    _, acc = read_scalars(tmp_path)
    experiment = hparams_content(acc, "_hparams_/experiment").experiment
    assert [info.name for info in experiment.hparam_infos if info.differs] == ["optimizer.head_lr_multiplier"]
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAM_METRICS)
    assert ticked_by_default(experiment)[0] == "optimizer.head_lr_multiplier"
    # torch's own summary leaves differs unset: the first five alphabetically, the swept key hidden.
    plain, _, _ = hparams(dict(selected), {})
    plain_experiment = plugin_data_pb2.HParamsPluginData.FromString(plain.value[0].metadata.plugin_data.content).experiment
    assert "optimizer.head_lr_multiplier" not in ticked_by_default(plain_experiment)


def test_hparams_session_of_a_run_that_raised_ends_as_failed(tmp_path):
    tb = TensorBoardTracker(tmp_path)
    tb.log_hyperparams({"seed": 0})
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("training failed")
        finally:
            tb.close()
    _, acc = read_scalars(tmp_path)
    assert hparams_content(acc, "_hparams_/session_end_info").session_end_info.status == 2  # STATUS_FAILURE


class RaisingTracker(ListTracker):
    def log_scalar(self, tag, value, step):
        raise ConnectionError("server down")


def test_a_raising_tracker_is_one_warning_and_the_others_keep_logging(caplog):
    raising, healthy = RaisingTracker(), ListTracker()
    both = CompositeTracker([GuardedTracker(raising, name="remote"), GuardedTracker(healthy, name="local")])
    both.log_hyperparams({"seed": 1})
    for epoch in (1, 2, 3):
        log_training_metrics(both, epoch, {"loss_mask": 0.5}, None, None, 0.1)
    both.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert len(warnings) == 1
    assert "'remote' failed in log_scalar" in warnings[0] and "ConnectionError: server down" in warnings[0]
    assert len(healthy.scalars) == 9 and healthy.closed and raising.closed


def test_a_guard_lets_stop_signals_through():
    class Stop(Exception):
        pass

    class Stopping(ListTracker):
        def flush(self):
            raise Stop

    with pytest.raises(Stop):
        GuardedTracker(Stopping(), propagate=(Stop,)).flush()


def test_bad_objective_is_rejected_before_training():
    from maskrcnn_coco.tracking.scalars import check_objective
    from maskrcnn_coco.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"objective\.metric='mAP/segm'"):
        check_objective("mAP/segm", "final")
    with pytest.raises(ConfigError, match=r"objective\.mode='last'"):
        check_objective("mAP/segm_AP", "last")
