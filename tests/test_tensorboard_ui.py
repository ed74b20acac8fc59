"""What a user sees in TensorBoard (issue #21): a tiny real training run, served by a real
``tensorboard`` server, read back through the HTTP routes TensorBoard's own frontend calls.

Routes (tensorboard/plugins/*/*_plugin.py, core_plugin.py):

* ``/data/runs``: the run list;
* ``/data/plugin/scalars/tags`` -> ``{run: {tag: ...}}``; ``/data/plugin/scalars/scalars?run=&tag=`` ->
  ``[[wall_time, step, value], ...]``;
* ``/data/plugin/images/tags`` -> ``{run: {tag: {"samples": n}}}``; ``/data/plugin/images/images?run=&tag=``
  -> ``[{"step", "wall_time", "query"}]``, the picture at ``/data/plugin/images/individualImage?<query>``;
* ``/data/plugin/text/tags`` -> ``{run: [tag, ...]}``; ``/data/plugin/text/text?run=&tag=`` -> ``[{"step", "text"}]``.

Then ``scripts/tensorboard_screenshot.py`` photographs the same server's pages (when a Chromium is installed).
Everything but the URL check is ``slow`` (a training run in a subprocess, a server, a browser).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import time
import urllib.parse
import urllib.request

import pytest
from PIL import Image

from maskrcnn_coco.tracking.scalars import LOSS_COMPONENTS

from conftest import REPO, TINY_OVERRIDES, run_entry

SCRIPT = REPO / "scripts" / "tensorboard_screenshot.py"
EPOCHS, PRINT_FREQ = 2, 3
ITERATIONS = 4  # TINY_OVERRIDES: 8 training images, batch 2
# tracker=all: TensorBoard, and metrics.csv to compare what the server shows with what the run logged.
ARGS = [*TINY_OVERRIDES, f"epochs={EPOCHS}", f"print_freq={PRINT_FREQ}", "tracker=all", "scheduler.milestones=[1.5]"]
EPOCH_TAGS = ["loss/train_loss_mask", "loss/val_loss_mask", "loss/train_total", "loss/val", "mAP/segm_AP", "mAP/bbox_AP"]


def load_script():
    spec = importlib.util.spec_from_file_location("tensorboard_screenshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tb = load_script()


def read_back_steps(epochs: int, iterations: int, print_freq: int) -> list[int]:
    """The global iterations of the read-back points: every ``print_freq`` iterations of an epoch, and
    the epoch's last iteration when it ends a partial window."""
    per_epoch = list(range(print_freq, iterations + 1, print_freq))
    if iterations % print_freq:
        per_epoch.append(iterations)
    return [e * iterations + i for e in range(epochs) for i in per_epoch]


def get_bytes(base: str, route: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(base + route, timeout=10) as response:
        return response.read()


def snapshot(base: str) -> str:
    """Everything the tag routes list (and how many points the iteration curve has): equal on two
    polls when the server has loaded the run."""
    tags = {plugin: tb.get_json(base, f"/data/plugin/{plugin}/tags") for plugin in ("scalars", "images", "text")}
    counts = {run: len(tb.get_json(base, "/data/plugin/scalars/scalars", run=run, tag="iter/loss_mask"))
              for run, run_tags in tags["scalars"].items() if "iter/loss_mask" in run_tags}
    return json.dumps([tags, counts], sort_keys=True)


def run_loaded():
    """``ready`` for ``serve_tensorboard``: true once the run's text and images are listed and two
    polls in a row see the same snapshot."""
    previous = []

    def loaded(base: str) -> bool:
        now = snapshot(base)
        done = "provenance/text_summary" in now and "images/confusion_matrix" in now and previous[-1:] == [now]
        previous[:] = [now]
        return done

    return loaded


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny real run (``main_mlops.py`` in a subprocess) in ``<tmp>/runs/maskrcnn/<timestamp>``."""
    root = tmp_path_factory.mktemp("tb_ui")
    with pytest.MonkeyPatch.context() as mp:  # the shapes set in the session's temp folder, as conftest does
        mp.setenv("MASKRCNN_COCO_CACHE", str(tmp_path_factory.getbasetemp() / "shapes_cache"))
        proc = run_entry([*ARGS, f"runs_dir={root / 'runs'}"], cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (root / "runs" / "maskrcnn").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    """``tensorboard --logdir <runs folder>`` on a free loopback port, once it has loaded the run."""
    log_path = tmp_path_factory.mktemp("tb_server") / "tensorboard.log"
    with tb.serve_tensorboard(run.parent, timeout=180, log_path=log_path, ready=run_loaded()) as base:
        yield base


def csv_points(run_dir, tag: str) -> list[tuple[int, float]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["tag"] == tag]


def served_points(base: str, run: str, tag: str) -> list[tuple[int, float]]:
    return [(step, value) for _, step, value in tb.get_json(base, "/data/plugin/scalars/scalars", run=run, tag=tag)]


@pytest.mark.slow
def test_runs_list_the_run_its_train_and_val_and_its_group_comparison_runs(run, server):
    runs = tb.get_json(server, "/data/runs")
    assert run.name in runs
    from maskrcnn_coco.tracking.layout import SPLITS, compare_pair, group_pair

    scalars = tb.get_json(server, "/data/plugin/scalars/tags")
    groups = {group_pair(tag)[0] for tag in scalars[run.name] if group_pair(tag)}
    assert {"groups/backbone", "groups/heads"} <= groups
    assert sorted(runs) == sorted([run.name, *(f"{run.name}/{sub}" for sub in (*SPLITS, *groups))])
    lr_groups = [tag.split("/", 2)[2] for tag in scalars[run.name] if tag.startswith("iter/lr/")]
    assert lr_groups and {f"groups/{g}" for g in lr_groups} <= groups
    for group in lr_groups:  # lr groups: a run (a colour) each, the same points as the run's own tags
        sub = f"groups/{group}"
        assert served_points(server, f"{run.name}/{sub}", "compare/iter_lr") == \
            served_points(server, run.name, f"iter/lr/{group}")
    for component in LOSS_COMPONENTS:
        for split in SPLITS:
            compare_tag = f"compare/{component}"
            assert compare_pair(f"loss/{split}_{component}") == (split, compare_tag)
            assert compare_tag in scalars[f"{run.name}/{split}"]
            # The card compare/<component>: the same points as the run's own loss/<split>_<component>.
            assert served_points(server, f"{run.name}/{split}", compare_tag) == \
                served_points(server, run.name, f"loss/{split}_{component}")
    assert not any(t.startswith("compare/") for t in scalars[run.name])  # the run's own file: the vocabulary only


@pytest.mark.slow
def test_scalars_have_the_epoch_tags_and_the_iteration_curves(run, server):
    tags = tb.get_json(server, "/data/plugin/scalars/tags")[run.name]
    assert set(EPOCH_TAGS) <= set(tags)
    assert {f"loss/{split}_{c}" for split in ("train", "val") for c in LOSS_COMPONENTS} <= set(tags)
    assert any(t.startswith("lr/") for t in tags) and any(t.startswith("iter/lr/") for t in tags)
    assert {f"iter/{c}" for c in LOSS_COMPONENTS} | {"iter/loss_total", "iter/time_iter"} <= set(tags)
    for tag in EPOCH_TAGS:  # step = epoch, every epoch evaluated
        assert [step for step, _ in served_points(server, run.name, tag)] == list(range(1, EPOCHS + 1)), tag

    # One point per read-back (print_freq=3 in 4-iteration epochs: iterations 3 and 4 of each), at the
    # global iteration, with the values the run wrote (metrics.csv, the same tracker calls).
    expected_steps = read_back_steps(EPOCHS, ITERATIONS, PRINT_FREQ)
    assert expected_steps == [3, 4, 7, 8]
    for tag in ("iter/loss_mask", "iter/loss_total", "loss/train_loss_mask", "loss/val_loss_mask"):
        served = served_points(server, run.name, tag)
        assert [step for step, _ in served] == [step for step, _ in csv_points(run, tag)], tag
        assert [v for _, v in served] == pytest.approx([v for _, v in csv_points(run, tag)], rel=1e-6), tag
    assert [step for step, _ in served_points(server, run.name, "iter/loss_mask")] == expected_steps


@pytest.mark.slow
def test_images_show_the_predictions_and_the_confusion_matrix_of_every_evaluation(run, server):
    tags = tb.get_json(server, "/data/plugin/images/tags")[run.name]
    # One tag per drawn validation image (the files the run wrote) and the confusion matrix.
    image_ids = sorted(p.stem.removeprefix("image_") for p in (run / "vis" / "epoch_001").glob("image_*.png"))
    assert image_ids, "the run drew no prediction images"
    assert sorted(t for t in tags if t.startswith("images/predictions/")) == sorted(f"images/predictions/{i}" for i in image_ids)
    assert "images/confusion_matrix" in tags
    for tag in tags:
        assert tags[tag]["samples"] == 1
        images = tb.get_json(server, "/data/plugin/images/images", run=run.name, tag=tag)
        assert [image["step"] for image in images] == list(range(1, EPOCHS + 1)), tag  # >= 1 per evaluated epoch
        picture = Image.open(io.BytesIO(get_bytes(server, "/data/plugin/images/individualImage?" + images[-1]["query"])))
        if tag.startswith("images/predictions/"):  # the same picture as the run folder's file
            on_disk = Image.open(run / "vis" / f"epoch_{EPOCHS:03d}" / f"image_{tag.rsplit('/', 1)[1]}.png")
            assert picture.size == on_disk.size and picture.convert("RGB").tobytes() == on_disk.convert("RGB").tobytes()
        else:
            assert min(picture.size) > 100


@pytest.mark.slow
def test_text_has_the_provenance_the_config_and_the_diagnosis_summary(run, server):
    # torch's SummaryWriter.add_text(tag) writes the tag "<tag>/text_summary".
    tags = tb.get_json(server, "/data/plugin/text/tags")[run.name]
    assert {"provenance/text_summary", "config/text_summary"} <= set(tags)
    provenance = json.loads((run / "provenance.json").read_text())
    (entry,) = tb.get_json(server, "/data/plugin/text/text", run=run.name, tag="provenance/text_summary")
    assert entry["step"] == 0
    for field in ("version", "python", "torch", "device"):  # the markdown table, rendered as HTML
        assert f"<td>{field}</td>" in entry["text"] and str(provenance[field]) in entry["text"], field
    if "diagnostics/summary/text_summary" in tags:  # written at the end of fit by the diagnostics hook
        (summary,) = tb.get_json(server, "/data/plugin/text/text", run=run.name, tag="diagnostics/summary/text_summary")
        assert summary["step"] == EPOCHS and "Diagnosis summary" in summary["text"]


def test_urls_use_tensorboards_own_parameters():
    url = tb.timeseries_url("http://127.0.0.1:6006/", "loss_mask|iter/")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query == {"smoothing": ["0"], "tagFilter": ["loss_mask|iter/"], "forceSVG": ["true"]}
    assert url.endswith("#timeseries")
    assert tb.dashboard_url("http://h:1", "images", "images/predictions") == "http://h:1/#images&tagFilter=images%2Fpredictions"


@pytest.mark.slow
@pytest.mark.skipif(tb.find_chromium() is None, reason="no Chromium to take screenshots with")
def test_screenshot_script_photographs_the_three_pages(server, tmp_path, capsys):
    start = time.monotonic()
    assert tb.main(["--url", server, "--output", str(tmp_path), "--width", "1200", "--height", "800", "--timeout", "90"]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["images.png", "text.png", "timeseries_loss_mask.png"], f"{names} after {time.monotonic() - start:.0f} s"
    # Each page was captured once it had drawn (cards, decoded images, rendered text), not at the timeout.
    assert "WARNING" not in capsys.readouterr().err
    for name in names:
        picture = Image.open(tmp_path / name).convert("RGB")
        assert picture.size == (1200, 800)
        assert len(picture.getcolors(maxcolors=1 << 20) or []) > 50, f"{name} looks blank"
