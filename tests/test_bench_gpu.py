"""`python -m benchmarks.gpu`: stops cleanly without a GPU; with --allow_cpu, the whole code path on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from benchmarks import gpu_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
HAS_GPU = bool(tf.config.list_physical_devices("GPU"))
# The tiniest run: a two-layer stand-in for AlexNet, batch 4 a replica, 2 steps x 2 runs.
TINY = ["--allow_cpu", "--model=tiny", "--matmul_n=128", "--batches=4", "--steps=2", "--runs=2", "--warmup_steps=1",
        "--serving_batches=1,2", "--num_classes=10"]


def _bench(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _results_files():
    """{name: (size, mtime)} of benchmarks/results, to see that nothing there was written."""
    if not os.path.isdir(RESULTS):
        return {}
    return {n: (os.stat(os.path.join(RESULTS, n)).st_size, os.stat(os.path.join(RESULTS, n)).st_mtime_ns)
            for n in os.listdir(RESULTS)}


def _assert_rate(row, name):
    rate = row["images_per_second"]
    assert rate is not None and math.isfinite(rate) and rate > 0, f"{name}: {row}"


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the command would run the full benchmark")
def test_without_a_gpu_it_says_so_exits_0_and_writes_nothing():
    before = _results_files()
    proc = _bench()
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no GPU found" in lines[0], proc.stdout
    assert _results_files() == before


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the command would run the full benchmark")
def test_on_the_cpu_it_refuses_to_write_into_benchmarks_results(built):
    before = _results_files()
    proc = _bench(*TINY, f"--data_dir={built[0]}", f"--output={os.path.join(RESULTS, 'gpu-cpu.json')}")
    assert proc.returncode != 0
    assert "must lie outside benchmarks/results" in proc.stderr, proc.stderr[-3000:]
    assert _results_files() == before


@pytest.mark.slow  # Every row of the benchmark on a tiny net: ~20 s on 2 cores.
def test_allow_cpu_measures_every_row_and_prints_the_table(built, tmp_path):
    before = _results_files()
    out = tmp_path / "gpu.json"
    proc = _bench(*TINY, f"--data_dir={built[0]}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())

    assert r["device"]["kind"] == ("GPU" if HAS_GPU else "CPU")
    assert r["tensorflow"] == tf.__version__
    assert r["host_cores"] == os.cpu_count()
    assert (r["model"], r["steps"], r["runs"], r["per_replica_batches"]) == ("tiny", 2, 2, [4])
    global_batch = 4 * r["replicas"]
    assert r["replicas"] >= 1
    assert set(r["train_synthetic"]) == set(gpu_report.PRECISIONS)
    for key, rows in r["train_synthetic"].items():
        assert set(rows) == {"4"} and rows["4"]["global_batch"] == global_batch
        _assert_rate(rows["4"], f"train_synthetic/{key}")
    best = r["best_precision"]
    assert r["train_synthetic"][best]["4"]["images_per_second"] == max(
        rows["4"]["images_per_second"] for rows in r["train_synthetic"].values())
    assert set(r["train_records"]) == {best}
    assert r["train_records"][best]["4"]["global_batch"] == global_batch
    _assert_rate(r["train_records"][best]["4"], "train_records")
    assert r["train_split"]["replicas"] == 2 and r["train_split"]["rows"][best]["4"]["global_batch"] == 8
    _assert_rate(r["train_split"]["rows"][best]["4"], "train_split")
    assert r["input_stream"]["4"]["global_batch"] == global_batch
    _assert_rate(r["input_stream"]["4"], "input_stream")
    assert set(r["serving"]) == {"1", "2"}
    for batch, row in r["serving"].items():
        _assert_rate(row, f"serving/{batch}")

    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| measure |") and set(table[1]) <= set("|-")
    assert len(table) == 2 + 6 + 1 + 1 + 1 + 2  # Header, synthetic x6, split, records, input stream, serving x2.
    records_row = next(line for line in table if line.startswith("| train, real records"))
    assert "x |" in records_row  # The real / synthetic ratio.
    assert "input stream (" in records_row or f"{r['device']['kind']} (" in records_row  # Which side limits.
    assert _results_files() == before


def test_an_out_of_memory_row_is_null_with_its_reason_and_the_run_goes_on():
    from benchmarks import gpu

    def oom():
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[256,96,55,55]")

    row = gpu.measure("a row", oom, global_batch=256)
    assert row["images_per_second"] is None and row["global_batch"] == 256
    assert row["error"].startswith("out of memory: OOM when allocating")

    def broken():
        raise tf.errors.InternalError(None, None, "ptxas exited with a fault\nmore lines")

    failed = gpu.measure("another row", broken, global_batch=128)
    assert failed["images_per_second"] is None and failed["error"] == "failed: InternalError: ptxas exited with a fault"
    late = gpu.measure("a late row", broken, deadline=0.0, global_batch=128)  # time.monotonic() is past 0.
    assert late["error"].startswith("skipped:") and "seconds" not in late
    rows = {"train_synthetic": {"float32": {"128": failed, "256": row}}, "serving": {"1": late}}
    assert gpu.failed_rows(rows) == ["train_synthetic/float32/128"]  # Out of memory or time is no failure.
    ok = {"global_batch": 128, "images_per_second": 1000.0}
    result = {"train_synthetic": {"float16_xla": {"128": ok, "256": dict(ok, images_per_second=2000.0)}},
              "train_records": {"float16_xla": {"128": dict(ok, images_per_second=900.0), "256": row}},
              "input_stream": {"128": dict(ok, images_per_second=500.0), "256": ok}, "serving": {},
              "device": {"kind": "GPU", "name": "Some GPU", "count": 1}, "tensorflow": tf.__version__,
              "host_cores": 16, "replicas": 1, "model": "alexnet", "steps": 20, "runs": 5}
    lines = gpu_report.table(result).splitlines()
    oom_line = next(line for line in lines if line.startswith("| train, real records") and "| 256 |" in line)
    assert "null (out of memory)" in oom_line and "x |" not in oom_line
    fine_line = next(line for line in lines if line.startswith("| train, real records") and "| 128 |" in line)
    assert "| 0.90x |" in fine_line and "input stream (input alone 500 vs synthetic 1,000 img/s)" in fine_line


def test_the_paper_nets_training_flops_are_counted_from_its_kernels():
    from alexnet_tf import model
    from benchmarks import gpu_rows

    # The tiny net by hand: conv1 is 11x11x3 -> 8 at 55x55 positions ((227 - 11) / 4 + 1), fc8 8 -> 10;
    # forward and backward are 3 passes of 2 FLOPs per multiply-add.
    assert gpu_rows.count_train_flops(gpu_rows.tiny_net(10)) == 3 * 2 * (55 * 55 * 11 * 11 * 3 * 8 + 8 * 10)
    counted = gpu_rows.count_train_flops(model.build_alexnet(1000, dtype="float32"))
    assert counted == pytest.approx(gpu_rows.ALEXNET_TRAIN_FLOPS_PER_IMAGE, rel=0.005)
    ungrouped = gpu_rows.count_train_flops(model.build_alexnet(1000, grouped=False, dtype="float32"))
    assert ungrouped > counted * 1.2  # conv2, conv4, conv5 see all channels without the paper's two groups.
    assert gpu_rows.train_flops_per_image("alexnet", 1000) == gpu_rows.ALEXNET_TRAIN_FLOPS_PER_IMAGE


def test_the_best_precision_is_the_fastest_at_the_largest_batch_and_mfu_uses_the_matmul_rate():
    from benchmarks import gpu

    def row(rate):
        return {"global_batch": 1, "images_per_second": rate}

    synthetic = {"float32": {"128": row(900.0), "256": row(1000.0)},
                 "float16_xla": {"128": row(5000.0), "256": row(None)},
                 "bfloat16_xla": {"128": row(4000.0), "256": row(3000.0)}}
    assert gpu.best_precision(synthetic) == "bfloat16_xla"  # float16_xla ran out of memory at 256.
    assert gpu.best_precision({"float32": {"128": row(None)}}) == gpu_report.DEFAULT_BEST
    result = {"matmul": {"tflops": 500.0}, "flops_per_train_image": 4e9, "train_synthetic": synthetic,
              "train_records": {"float32": {"128": row(500.0)}}, "train_split": {"rows": {"float32": {"128": row(2.5e4)}}}}
    gpu.add_mfu(result)
    assert synthetic["float32"]["256"]["mfu"] == pytest.approx(1000 * 4e9 / 500e12)
    assert result["train_split"]["rows"]["float32"]["128"]["mfu"] == pytest.approx(0.2)
    assert synthetic["float16_xla"]["256"]["mfu"] is None
    result["matmul"]["tflops"] = None  # The matmul was not measured: no MFU, rather than a made-up one.
    gpu.add_mfu(result)
    assert result["train_records"]["float32"]["128"]["mfu"] is None


def test_render_prints_the_table_and_copies_the_result_under_its_results_name(tmp_path):
    result = {"device": {"kind": "GPU", "name": "NVIDIA H200", "count": 1, "driver": "580.1", "driver_cuda": "13.0"},
              "tensorflow": tf.__version__, "host_cores": 16, "replicas": 1, "model": "alexnet", "steps": 10,
              "runs": 3, "flops_per_train_image": 4.35e9, "matmul": {"n": 8192, "tflops": 700.0},
              "train_synthetic": {"bfloat16_xla": {"256": {"global_batch": 256, "images_per_second": 20000.0,
                                                           "mfu": 0.124}}},
              "best_precision": "bfloat16_xla"}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(result))
    proc = _bench(f"--render={path}", f"--copy_to={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "gpu-1x-nvidia-h200.json").read_text()) == result
    assert (tmp_path / "out" / "gpu-table.md").read_text() == proc.stdout
    assert "| train, synthetic data | bfloat16, XLA | 256 | 256 | 20,000 | 12.4% |" in proc.stdout
    assert "1x NVIDIA H200 (driver 580.1, CUDA 13.0)" in proc.stdout and "700.0 TFLOP/s" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--precisions=float8"], "expected some of float32"),
    (["--copy_to=/tmp/x"], "--copy_to goes with --render"),
    (["--budget_s=-1"], "--budget_s must be 0"),
    (["--split=0"], "must be at least 1"),
])
def test_bad_flags_are_one_clear_error(args, message):
    proc = _bench(*args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
