"""`make rehearsal` at its smallest: every stage of the chain at ImageNet's width (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cluster import REPO


@pytest.mark.slow
def test_rehearsal_runs_every_stage_at_1000_classes(tmp_path):
    out = tmp_path / "rehearsal.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.rehearsal", "--train_per_class=1", "--val_images=40", "--steps=2",
         "--batch_size=4", "--work_dir", str(tmp_path / "work"), "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["stages"]) == ["sample", "build", "verify", "train", "evaluate", "export", "serve"]
    for stage in result["stages"].values():
        assert stage["seconds"] > 0 and stage["peak_rss_mib"] > 50
    # 1000 records over 1024 default shards: at least 32 a shard -> 31.
    assert result["shards"] == {"train": 31, "validation": 1}
    assert result["evaluation"]["num_examples"] == 40 and "ten_crops" not in result["evaluation"]  # --noten_crops
    assert len(result["stages"]["serve"]["top5"]) == 5
    hours = result["projected_build_hours"]
    assert hours["2"] > hours["16"] > hours["64"] > 0
    assert "| build |" in proc.stdout and "projected build" in proc.stdout
