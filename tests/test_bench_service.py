"""`make bench-service` at its smallest, and its cores-per-GPU arithmetic."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import data_service as bench


def test_cores_per_gpu_divides_each_precisions_best_rate_per_gpu(tmp_path):
    (tmp_path / "gpu-2x-h100.json").write_text(json.dumps({
        "device": {"count": 2},
        "train_synthetic": {"float16": {"128": {"images_per_second": 8000.0}, "256": {"images_per_second": 10000.0}},
                            "float32": {"128": {"images_per_second": None, "error": "out of memory"}}}}))
    rows = bench.cores_per_gpu(1000.0, str(tmp_path))
    assert rows == [{"source": "gpu-2x-h100.json", "precision": "float16", "gpu_images_per_second": 5000.0,
                     "service_cores": 5.0}]


@pytest.mark.slow  # Builds a sample and starts two local services: about a minute on 2 cores.
def test_bench_service_measures_every_stream(tmp_path):
    out = tmp_path / "service.json"
    r = bench.run(["--per_class", "8", "--batch", "8", "--batches", "4", "--runs", "2", "--warmup", "1",
                   "--passes", "10", "--output", str(out)])
    assert json.loads(out.read_text())["local"]["images_per_second"] == r["local"]["images_per_second"]
    for n in (1, 2):
        s = r[f"service_{n}_workers"]
        assert s["images_per_second"] > 0 and len(s["windows"]) == 2
        assert all(w["images"] == 32 and w["worker_cpu_seconds"] > 0 for w in s["windows"])
        assert math.isclose(r[f"ratio_service_{n}_workers_vs_local"],
                            s["images_per_second"] / r["local"]["images_per_second"])
    assert r["images_per_second_per_service_core"] == max(
        r[f"service_{n}_workers"]["images_per_worker_cpu_second"] for n in (1, 2))
    assert "| tf.data service, 2 workers |" in bench.table(r)
