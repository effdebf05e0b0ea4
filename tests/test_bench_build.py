"""The bare per-image loop that `make bench` measures the build against."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bare_loop_does_the_pipelines_per_image_work(built, sample):
    # Same images, same functions: the colour statistics agree to the last digits,
    # so the benchmark's limit is the pipeline's own work, not something lighter.
    out, meta = built
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bare_build", sample["output_dir"], "--processes", "2",
                           "--chunk", "7"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bare = json.loads(proc.stdout.strip().splitlines()[-1])
    assert bare["images"] == sum(s.num_read for s in meta.splits.values())
    listing = ("has no training images", "no validation number")  # Rejected by name, never decoded.
    assert bare["rejected"] == sum(1 for r in meta.rejected if not any(x in r.reason for x in listing))
    np.testing.assert_allclose(bare["mean_rgb"], meta.color_stats.mean_rgb, rtol=1e-12)
    assert bare["frameworks_loaded"] == []
