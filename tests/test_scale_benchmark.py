"""``scripts/scale_benchmark.py`` on a tiny synthetic set: every case runs and reports its numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "scale_benchmark.py"


@pytest.mark.slow
def test_scale_benchmark_reports_start_up_index_size_and_node_memory(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--images", "40", "--val-images", "8", "--ranks", "2",
                           "--batches", "2", "--workers", "1", "--data-dir", str(tmp_path / "data"), "--output", str(out)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (size,) = json.loads(out.read_text())["sizes"]
    assert size["images"] == 40 and size["annotations_mb"] > 0
    for case in ("off", "first", "cached"):
        row = size["startup"][case]
        assert row["train_images"] == 40 and row["val_images"] == 8 and row["peak_rss_mb"] > 0
        assert row["first_batch_s"] >= row["imports_s"] + row["build_s"] > 0
        node = size["node"][f"2_{case}"]
        assert sorted(r["rank"] for r in node["ranks"]) == [0, 1]
        assert node["node_pss_mb"] == pytest.approx(sum(r["pss_mb"] + r["workers_pss_mb"] for r in node["ranks"]))
        assert all(r["workers_pss_mb"] > 0 for r in node["ranks"])  # one loader worker per rank was measured
    assert size["index_mb"]["records"] > 0 and size["index_mb"]["ground_truth"] > 0
    assert "N=40 start-up, cache cached: first batch" in proc.stdout and "node of 2 ranks x 1 workers, cache cached" in proc.stdout
