"""Reading runs back (scripts/inspect_runs.py): the tables, CSV and plot agree with the event files,
and TensorBoard's own server shows the same values."""

import csv
import json
import math
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskrcnn_coco.analysis.diagnostics import Diagnosis
from maskrcnn_coco.analysis.inspect import DIAGNOSTICS_FILE, find_runs, load_runs, plot_runs, run_names, summarise
from maskrcnn_coco.analysis.runs import read_scalars
from maskrcnn_coco.analysis.sweep import register_resolvers
from maskrcnn_coco.cli.inspect_runs import main
from maskrcnn_coco.config import LOSS_COMPONENTS, register_configs

from conftest import REPO, TINY_OVERRIDES

COMPONENT_TAGS = [f"loss/{split}_{c}" for split in ("train", "val") for c in LOSS_COMPONENTS]
TABLE_TAGS = ["loss/train_total", "loss/val", *COMPONENT_TAGS, "mAP/segm_AP", "mAP/bbox_AP"]
# Four training images, two validation images: two iterations per epoch.
FAST = [*TINY_OVERRIDES, "data.num_train=4", "data.num_val=2", "tracker=tensorboard", "epochs=2"]
FINDING = Diagnosis(
    "stalled", ("loss_mask",), "loss_mask stalled.", "the mask head learns too slowly", "optimizer.head_lr_multiplier",
    "stalled", epoch=2, evidence={"values": [0.91, 0.9], "relative_change": -0.011},
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real 2-epoch runs in one folder: ``a`` (defaults) and ``b`` (another lr), with a finding
    (and an unknown key, a record of another shape and a broken line) in b's diagnostics.jsonl."""
    from maskrcnn_coco.cli.experiment import run_training

    root = tmp_path_factory.mktemp("inspect")
    register_configs()
    register_resolvers()
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine, torch's threads spinning against other processes made
    # these two runs take 66 s instead of 11 s.
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MASKRCNN_COCO_CACHE", str(tmp_path_factory.getbasetemp() / "shapes_cache"))
            for name, extra in (("a", []), ("b", ["optimizer.lr=0.005"])):
                with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                    cfg = compose("config", overrides=[*FAST, f"runs_dir={root}", *extra])
                run_training(cfg, root / name)
    finally:
        torch.set_num_threads(threads)
    with (root / "b" / DIAGNOSTICS_FILE).open("a") as f:
        f.write(json.dumps({**FINDING.to_json(), "added_later": {"x": 1}}) + "\n")
        f.write(json.dumps({"epoch": 1, "kind": "custom", "component": "loss_objectness"}) + "\n")
        f.write("{not json\n")
    return root


def accumulated(run_dir):
    """{tag: [(step, value)]} straight from EventAccumulator (the reader TensorBoard uses)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def blocks(text):
    """{run name: [lines]} of the printed tables."""
    out, name = {}, None
    for line in text.splitlines():
        if line.startswith("== "):
            name = line.split(" ==")[0][3:]
            out[name] = []
        elif name and line.strip():
            out[name].append(line)
    return out


def row(lines, tag):
    (line,) = [ln for ln in lines if ln.split()[:1] == [tag]]
    return line


@pytest.mark.slow
def test_the_tables_show_first_best_last_of_every_component_as_the_event_files_hold_them(runs, capsys):
    assert main([str(runs)]) == 0
    out = capsys.readouterr().out
    tables = blocks(out)
    assert list(tables) == ["a", "b"]
    for name, lines in tables.items():
        events = accumulated(runs / name)
        assert events == read_scalars(runs / name)
        for tag in TABLE_TAGS:
            points = events[tag]
            values = [v for _, v in points]
            pick = max if tag.startswith("mAP/") else min
            best = pick(values)
            cells = row(lines, tag).split()
            first, best_value, best_epoch, last = cells[1:5]
            assert float(first) == pytest.approx(values[0], rel=5e-4, abs=1e-12)
            assert float(best_value) == pytest.approx(best, rel=5e-4, abs=1e-12)
            assert int(best_epoch) == points[values.index(best)][0]
            assert float(last) == pytest.approx(values[-1], rel=5e-4, abs=1e-12)
            change = values[-1] - values[0]
            word = "flat" if abs(change) <= 0.02 * max(abs(values[0]), abs(values[-1])) else (
                "falling" if change < 0 else "rising")
            assert cells[6] == word, row(lines, tag)
    # A healthy tiny run: no warning; batch 2 at the shipped lr is an info line of the optimizer audit.
    a = "\n".join(tables["a"])
    found = [json.loads(line) for line in (runs / "a" / "diagnostics.jsonl").read_text().splitlines() if line.strip()]
    assert all(f["severity"] == "info" for f in found)
    assert ("diagnostics: none" in a) if not found else a.count(" · info") == len(found)
    b = "\n".join(tables["b"])
    assert "diagnostics: 2 findings (1 unreadable line skipped)" in b
    assert "epoch 2 · stalled · loss_mask · change optimizer.head_lr_multiplier" in b
    assert "cause: the mask head learns too slowly" in b and "relative_change=-0.011" in b
    assert "epoch 1 · custom · loss_objectness" in b


@pytest.mark.slow
def test_csv_rows_are_every_scalar_of_every_run(runs, tmp_path, capsys):
    path = tmp_path / "out" / "runs.csv"
    assert main([str(runs / "b"), str(runs / "a"), "--csv", str(path)]) == 0
    assert f"CSV: {path}" in capsys.readouterr().out
    with path.open() as f:
        reader = csv.reader(f)
        assert next(reader) == ["run", "tag", "epoch", "value"]
        rows = [(r, tag, int(e), float(v)) for r, tag, e, v in reader]
    expected = [(name, tag, step, value) for name in ("b", "a")
                for tag, points in sorted(read_scalars(runs / name).items()) for step, value in points]
    assert rows == expected
    assert {tag for _, tag, _, _ in rows} >= set(TABLE_TAGS)


@pytest.mark.slow
def test_plot_has_a_panel_per_component_and_names_the_runs(runs, tmp_path, capsys):
    path = tmp_path / "runs.png"
    title = plot_runs(load_runs([runs]), path)
    assert title == "2 runs: a, b"
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert main([str(runs / "a"), "--plot", str(tmp_path / "one.png")]) == 0
    assert "Plot: " in capsys.readouterr().out and (tmp_path / "one.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_path_without_a_run_is_one_error_line_and_exit_2(runs, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main([str(runs / "a"), str(empty)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("Error: ") and str(empty) in line
    assert main([str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    # The script as a user runs it (in this process: a new interpreter would mostly import torch).
    monkeypatch.setattr(sys, "argv", ["inspect_runs.py", str(empty)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "scripts" / "inspect_runs.py"), run_name="__main__")
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


def write_history(run_dir, losses):
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "loss/train_loss_mask": v, "mAP/segm_AP": None}) for e, v in enumerate(losses, 1)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_runs_are_found_below_a_folder_in_job_order_and_named_apart(tmp_path, capsys):
    """A runs/maskrcnn-like tree: two sweeps with equally named jobs, runs without an event file."""
    for sweep in ("s1", "s2"):
        for job in ("0_optimizer.lr=0.1", "1_optimizer.lr=0.2", "10_optimizer.lr=0.3"):
            write_history(tmp_path / "multirun" / sweep / job, [1.0, 0.5])
    write_history(tmp_path / "2026-01-01_00-00-00", [1.0, 0.9, 0.95])
    (tmp_path / "2026-01-01_00-00-00" / ".hydra").mkdir()
    (tmp_path / "multirun" / "s1" / "sweep_summary.csv").write_text("")
    found = find_runs(tmp_path / "multirun" / "s1")
    assert [p.name for p in found] == ["0_optimizer.lr=0.1", "1_optimizer.lr=0.2", "10_optimizer.lr=0.3"]
    everything = find_runs(tmp_path)
    assert len(everything) == 7
    names = run_names(everything)
    assert "s1/0_optimizer.lr=0.1" in names and "s2/0_optimizer.lr=0.1" in names and "2026-01-01_00-00-00" in names
    assert find_runs(tmp_path / "2026-01-01_00-00-00" / "metrics.jsonl") == [tmp_path / "2026-01-01_00-00-00"]
    assert main([str(tmp_path / "2026-01-01_00-00-00")]) == 0
    out = capsys.readouterr().out
    assert "read from metrics.jsonl (no event file)" in out and "no diagnostics.jsonl" in out
    cells = row(out.splitlines(), "loss/train_loss_mask").split()
    assert cells[1:5] == ["1", "0.9", "2", "0.95"]
    assert cells[5:] == ["↓", "falling", "-5.0%", "↑", "rose", "+5.6%"]


def test_summary_trend_best_and_last_epoch():
    s = summarise([(1, 1.0), (2, 0.5), (3, 0.6)], "loss/train_loss_mask")
    assert (s.first, s.best, s.last) == ((1, 1.0), (2, 0.5), (3, 0.6))
    assert (s.trend, s.last_step, s.worse) == ("falling", "rising", False)
    assert s.change == pytest.approx(-0.4) and s.last_step_change == pytest.approx(0.2)
    assert summarise([(1, 1.0), (2, 1.01)], "loss/val").trend == "flat"
    assert summarise([(1, 1.0), (2, 1.01)], "loss/val", tol=0.001).trend == "rising"
    up = summarise([(1, 0.2), (2, 0.1), (3, float("nan"))], "mAP/segm_AP")
    assert up.best == (1, 0.2) and up.last == (2, 0.1) and up.worse
    one = summarise([(4, 0.3)], "mAP/segm_AP")
    assert one.trend is None and one.first == one.last == (4, 0.3)
    assert summarise([(1, 0.001)], "lr").best is None
    assert summarise([(1, math.inf)], "loss/val") is None


def test_flat_is_the_monitors_threshold_and_probe_findings_read_back():
    """One threshold of "no change" (diagnostics.fall_rel) and one finding type (Diagnosis.to_json)."""
    from maskrcnn_coco.analysis.inspect import DEFAULT_FLAT_TOL, format_diagnostic
    from maskrcnn_coco.config import DiagnosticsConfig

    assert DiagnosticsConfig().fall_rel == DEFAULT_FLAT_TOL
    info = Diagnosis("zero_weight", ("loss_mask",), "batch 3: loss_mask is not optimised.", "", None, "not-optimised",
                     epoch=None, severity="info", batch=3, image_ids=(7, 9))
    head, cause = format_diagnostic(info.to_json())
    assert head.strip() == "batch 3 · zero_weight · info · loss_mask"
    assert cause.strip().startswith("cause: batch 3: loss_mask is not optimised.")
    assert format_diagnostic(FINDING.to_json())[0].strip().startswith("epoch 2 · stalled · loss_mask")


def test_the_diagnostics_file_name_is_the_one_the_sink_writes():
    from maskrcnn_coco.engine import writers  # the engine's diagnostics hook (was engine/sinks.py)

    assert DIAGNOSTICS_FILE == writers.DIAGNOSTICS_FILE


# ------------------------------------------------------------------------- TensorBoard's own server
def free_loopback_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(opener, url):
    with opener.open(url, timeout=5) as response:
        return json.loads(response.read().decode())


@pytest.mark.slow
def test_tensorboard_server_serves_the_values_read_scalars_returns(runs, tmp_path):
    """``tensorboard --logdir <run>`` on a loopback port: its scalars data API gives every tag with
    the same (step, value) pairs as ``read_scalars``."""
    run_dir = runs / "a"
    expected = read_scalars(run_dir)
    port = free_loopback_port()
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    log_path = tmp_path / "tensorboard.log"
    with log_path.open("w") as log:
        # A session of its own, so the data server it starts goes with it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        served, last_error = None, None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"tensorboard exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                tags = get_json(opener, f"{base}/data/plugin/scalars/tags")
                # The run itself, not its comparison sub-runs (train/, val/, groups/<group>/: compare/ cards only).
                own = [(name, run_tags) for name, run_tags in tags.items()
                       if name not in ("train", "val") and not name.startswith("groups/")]
                if len(own) == 1:
                    (run_name, run_tags), = own
                    if set(run_tags) == set(expected):
                        served = {}
                        for tag in expected:
                            query = urllib.parse.urlencode({"run": run_name, "tag": tag})
                            served[tag] = [(step, value) for _, step, value in
                                           get_json(opener, f"{base}/data/plugin/scalars/scalars?{query}")]
                        if served == expected:
                            break
            except OSError as err:  # not listening yet, or still loading
                last_error = err
            time.sleep(0.5)
        assert served is not None, f"no scalars served within 180 s ({last_error}):\n{log_path.read_text()[-3000:]}"
        assert served == expected
        runs = get_json(opener, f"{base}/data/runs")
        assert sorted(r for r in runs if not r.startswith("groups/")) == sorted([run_name, "train", "val"])
        assert {"groups/backbone", "groups/heads"} <= set(runs)
        for tag in COMPONENT_TAGS:
            assert served[tag] == expected[tag] and len(served[tag]) == 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_inspect_marks_a_finding_that_no_longer_held_as_the_runs_summary_does(tmp_path):
    """diagnostics_last_found.json (written by the diagnostics hook every epoch) read back: the
    transient is marked, the finding that held to the end is not, and a run without the file
    (older than it) marks nothing."""
    from maskrcnn_coco.analysis.inspect import format_diagnostics, load_run

    def finding(kind, epoch):
        return {"epoch": epoch, "kind": kind, "severity": "warning", "components": ["loss_classifier"],
                "subject": "triangle", "message": kind, "cause": "c", "strength": 1.0}

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "loss/train_total": 1.0 / e}) + "\n" for e in range(1, 6)))
    (run / DIAGNOSTICS_FILE).write_text(json.dumps(finding("confused_class", 2)) + "\n" + json.dumps(finding("lagging_class", 2)) + "\n")
    old = "\n".join(format_diagnostics(load_run(run)))
    assert "no longer" not in old
    (run / "diagnostics_last_found.json").write_text(json.dumps({"epoch": 5, "last_found": [
        [["confused_class", ["loss_classifier"], "triangle"], 2], [["lagging_class", ["loss_classifier"], "triangle"], 5]]}))
    lines = format_diagnostics(load_run(run))
    assert "    epoch 2 · confused_class · no longer found at epochs 3-5 · loss_classifier · triangle" in lines
    assert "    epoch 2 · lagging_class · loss_classifier · triangle" in lines
