"""The bare per-image loop that `make bench` measures the build against."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

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


def test_cpu_flags_read_avx512_from_cpuinfo():
    from benchmarks.measure import cpu_flags

    line = "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
    two = f"processor\t: 0\nmodel name\t: Intel Xeon\n{line}\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
    assert cpu_flags(two) == {"model": "Intel Xeon", "avx2": True, "avx512": True, "avx512_bf16": True}
    # avx512bw alone is not AVX-512 Foundation; AMD's EPYC without AVX-512 says avx2 only.
    assert cpu_flags("model name\t: AMD EPYC\nflags\t\t: avx avx2 avx512bw\n") == {
        "model": "AMD EPYC", "avx2": True, "avx512": False, "avx512_bf16": False}
    assert cpu_flags("") == {"model": "", "avx2": False, "avx512": False, "avx512_bf16": False}


@pytest.mark.slow
def test_dask_measurement_on_two_workers_keeps_the_other_results(tmp_path):
    # The smallest ImageNet-shaped input (1,050 images), one run of each runner.
    output = tmp_path / "build.json"
    earlier = {"date": "2026-11-23T02:54:19Z", "machine": {"cores": 2}, "limit": {"ratio": 0.87}}
    output.write_text(json.dumps(earlier))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.build", "--only", "dask", "--images", "1",
                           "--repeats", "1", "--output", str(output)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(output.read_text())
    x = result["dask"]
    assert x["images"] == 1050 and x["workers"] == 2
    assert x["ratio"] == pytest.approx(x["dask"]["images_per_second"] / x["local"]["images_per_second"])
    assert len(x["dask"]["worker_peak_rss_mib"]) == 2 and min(x["dask"]["worker_peak_rss_mib"]) > 50
    assert x["dask"]["driver_peak_rss_mib"] > 0 and x["local"]["peak_rss_mib"] > 0
    assert set(result["machine"]["cpu"]) == {"model", "avx2", "avx512", "avx512_bf16"}
    # Not measured this time: kept, with the date and machine of its own run.
    assert result["limit"] == {"date": earlier["date"], "machine": earlier["machine"], "ratio": 0.87}
    assert "DaskRunner (2 workers) vs local runner" in proc.stdout and "AVX512_BF16" in proc.stdout
