"""``utils/provenance.py``: every run records what produced it (commit, versions, device, command)."""

import json
import shutil
import subprocess

import pytest
import torch

from maskrcnn_coco.utils import provenance
from maskrcnn_coco.utils.provenance import collect_provenance, git_state, provenance_line, record_provenance

from conftest import REPO

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
FIELDS = {"start_time", "command", "hostname", "version", "python", "torch", "torchvision", "cuda", "platform",
          "device", "device_name", "world_size"}


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@needs_git
def test_fields_in_this_checkout():
    if subprocess.run(["git", "ls-files", "--error-unmatch", "maskrcnn_coco/__init__.py"], cwd=REPO,
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("the tests run from a copy of the code that is no git checkout")
    info = collect_provenance(torch.device("cpu"), 1)
    assert set(info) == FIELDS | {"git_commit", "git_dirty"}
    assert info["git_commit"] == git("rev-parse", "HEAD", cwd=REPO)
    assert info["git_dirty"] is bool(git("status", "--porcelain", "--untracked-files=no", cwd=REPO))
    assert info["torch"] == torch.__version__ and info["device"] == "cpu" and info["device_name"]
    assert info["world_size"] == 1 and "T" in info["start_time"]
    json.dumps(info)  # JSON-ready as it is


def test_outside_a_checkout_the_git_fields_are_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "SOURCE_DIR", tmp_path)
    monkeypatch.chdir(tmp_path)
    info = collect_provenance("cpu", 2)
    assert set(info) == FIELDS and info["world_size"] == 2
    assert "no git checkout" in provenance_line(info)


def test_without_a_git_binary_the_git_fields_are_left_out(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on it
    assert git_state(REPO) == {}


@needs_git
def test_dirty_means_a_tracked_file_was_modified(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    (repo / "train.py").write_text("lr = 0.02\n")
    git("add", "train.py", cwd=repo)
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "first", cwd=repo)
    commit = git("rev-parse", "HEAD", cwd=repo)
    assert git_state(repo) == {"git_commit": commit, "git_dirty": False}
    (repo / "notes.txt").write_text("untracked files do not make a checkout dirty\n")
    assert git_state(repo)["git_dirty"] is False
    (repo / "train.py").write_text("lr = 0.2\n")
    assert git_state(repo) == {"git_commit": commit, "git_dirty": True}
    # Code installed into an untracked folder of a checkout (a venv inside a repository) is not its code.
    (repo / ".venv" / "pkg").mkdir(parents=True)
    (repo / ".venv" / "pkg" / "__init__.py").write_text("")
    assert git_state(repo / ".venv" / "pkg") == {}


def test_record_writes_the_file_logs_the_text_and_one_line(tmp_path, caplog):
    caplog.set_level("INFO", logger="maskrcnn_coco")
    texts = []
    info = record_provenance(tmp_path, "cpu", 1, lambda tag, text, step: texts.append((tag, text, step)))
    assert json.loads((tmp_path / "provenance.json").read_text()) == info
    ((tag, text, step),) = texts
    assert (tag, step) == ("provenance", 0) and f"| torch | `{torch.__version__}` |" in text
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Provenance:")]
    assert f"torch {torch.__version__}" in line and "cpu (" in line


def test_record_on_other_ranks_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance.dist, "is_main_process", lambda: False)
    assert record_provenance(tmp_path, "cpu", 2) is None
    assert not (tmp_path / "provenance.json").exists()


@pytest.mark.slow
def test_a_run_records_its_provenance(tmp_path, caplog):
    from helpers import compose_cfg
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from maskrcnn_coco.cli.experiment import run_training

    caplog.set_level("INFO", logger="maskrcnn_coco")
    run_dir = tmp_path / "run"
    run_training(compose_cfg(f"runs_dir={tmp_path}", "epochs=1", "tracker=tensorboard", "device=cpu"), run_dir)
    info = json.loads((run_dir / "provenance.json").read_text())
    assert info["device"] == "cpu" and info["world_size"] == 1 and info["torch"] == torch.__version__
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    (event,) = acc.Tensors("provenance/text_summary")
    assert event.step == 0 and info["start_time"] in event.tensor_proto.string_val[0].decode()
    assert sum(r.getMessage().startswith("Provenance:") for r in caplog.records) == 1
