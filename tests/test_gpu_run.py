"""`benchmarks/gpu_run.sh`: every step of the GPU run, in CPU mode, into one folder; a failing step is recorded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_run.sh")
STEPS = ["gpucheck", "gpu_tests", "records", "bench", "report"]


def _run(out, *args, **env):
    return subprocess.run(["bash", SCRIPT, *args, str(out)], cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def _steps(out) -> dict:
    with open(out / "steps.json") as f:
        summary = json.load(f)
    return summary, {s["name"]: s for s in summary["steps"]}


def _positive(x, what):
    assert x is not None and math.isfinite(x) and x > 0, f"{what}: {x}"


@pytest.fixture(scope="module")
def cpu_run(built, tmp_path_factory):
    """(process, output folder) of the CPU mode on the built sample, its GPU check made to fail with exit 3."""
    tmp = tmp_path_factory.mktemp("gpu-run")
    check = tmp / "failing_check.py"
    check.write_text("import sys\nprint('the check found a fault')\nsys.exit(3)\n")
    out = tmp / "out"
    return _run(out, "--cpu", DATA_DIR=built[0], GPUCHECK=str(check)), out


def test_every_step_leaves_its_log_and_exit_status_and_a_failing_one_stops_nothing(cpu_run):
    proc, out = cpu_run
    assert proc.returncode == 1, proc.stderr[-3000:]  # One step failed.
    summary, steps = _steps(out)
    assert [s["name"] for s in summary["steps"]] == STEPS and summary["cpu_mode"] is True
    assert steps["gpucheck"]["status"] == 3 and summary["failed"] == 1
    for name in STEPS[1:]:
        assert steps[name]["status"] == 0, (name, (out / f"{name}.log").read_text()[-3000:])
    for name in STEPS:
        assert (out / f"{name}.log").stat().st_size > 0, name
        assert steps[name]["budget_s"] > 0 and steps[name]["seconds"] <= steps[name]["budget_s"]
    assert "the check found a fault" in (out / "gpucheck.log").read_text()
    assert " passed" in (out / "gpu_tests.log").read_text() or " skipped" in (out / "gpu_tests.log").read_text()
    assert len((out / "summary.txt").read_text().splitlines()) == len(STEPS)
    # The later steps ran after the failing one: the measurements are there.
    assert (out / "gpu.json").exists() and (out / "gpu-table.md").exists()


def test_the_result_has_every_row_of_the_gpu_run_with_positive_figures(cpu_run, built):
    _, out = cpu_run
    r = json.loads((out / "gpu.json").read_text())
    batches = [str(b) for b in r["per_replica_batches"]]
    assert r["model"] == "tiny" and batches
    assert r["machine"]["cores"] == os.cpu_count() and r["host_cores"] == os.cpu_count()
    assert r["date"] and "built_for" in r and {"cuda", "cudnn"} <= set(r["built_for"])
    assert r["device"]["kind"] == "CPU" and r["device"]["count"] == 0
    assert r["data"]["data_dir"] == built[0]
    _positive(r["matmul"]["tflops"], "matmul")
    assert r["matmul"]["dtype"] == "bfloat16"
    _positive(r["flops_per_train_image"], "flops per image")

    assert set(r["train_synthetic"]) == set(gpu_report.PRECISIONS)  # float32/16, bfloat16, each with and without XLA.
    best = r["best_precision"]
    assert best in gpu_report.PRECISIONS
    for key, rows in r["train_synthetic"].items():
        assert sorted(rows) == sorted(batches), key
        for b, row in rows.items():
            _positive(row["images_per_second"], f"{key}/{b}")
            assert row["mfu"] == pytest.approx(row["images_per_second"] * r["flops_per_train_image"]
                                               / (r["matmul"]["tflops"] * 1e12))
    split = r["train_split"]
    assert split["gpu_split"] == 2 and split["replicas"] == 2 and list(split["rows"]) == [best]
    for b in batches:
        row = split["rows"][best][b]
        assert row["global_batch"] == 2 * int(b)
        _positive(row["images_per_second"], "split")
        _positive(row["mfu"], "split mfu")
        real = r["train_records"][best][b]
        _positive(real["images_per_second"], "records")
        _positive(real["mfu"], "records mfu")
        synthetic = r["train_synthetic"][best][b]["images_per_second"]
        assert real["vs_synthetic"] == pytest.approx(real["images_per_second"] / synthetic)
        stream = r["input_stream"][b]
        assert stream["images_per_second_per_core"] == pytest.approx(stream["images_per_second"] / os.cpu_count())
        assert stream["vs_train_synthetic"] == pytest.approx(stream["images_per_second"] / synthetic)
    for b, row in r["serving"].items():
        _positive(row["images_per_second"], f"serving/{b}")


def test_the_table_and_the_named_copy_are_made_from_the_result(cpu_run):
    _, out = cpu_run
    r = json.loads((out / "gpu.json").read_text())
    assert (out / "gpu-table.md").read_text() == gpu_report.table(r) + "\n"
    assert json.loads((out / gpu_report.result_file_name(r)).read_text()) == r
    table = [line for line in (out / "gpu-table.md").read_text().splitlines() if line.startswith("|")]
    batches = len(r["per_replica_batches"])
    # Header, 6 precisions, split, records, input stream (each per batch), serving.
    assert len(table) == 2 + (6 + 1 + 1 + 1) * batches + len(r["serving"])
    assert any("2 replicas on one GPU (gpu_split=2)" in line for line in table)
    assert "MFU: model FLOPs" in (out / "gpu-table.md").read_text()


def test_an_absent_check_is_said_and_a_missing_result_is_a_failed_report(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, STEPS="gpucheck report", GPUCHECK=str(tmp_path / "nowhere.py"))
    assert proc.returncode == 1, proc.stderr
    summary, steps = _steps(out)
    assert list(steps) == ["gpucheck", "report"]
    assert steps["gpucheck"]["status"] == 0 and steps["gpucheck"]["note"] == "absent"
    assert "nowhere.py is absent" in (out / "gpucheck.log").read_text()
    assert steps["report"]["status"] == 1 and "no " in (out / "report.log").read_text()


@pytest.mark.parametrize("args, env, message", [
    ((), {}, "usage: bash benchmarks/gpu_run.sh"),
    (("extra",), {}, "usage: bash benchmarks/gpu_run.sh"),
    ((), {"STEPS": "bench tea"}, "unknown step tea"),
    ((), {"PYTHON": "/nonexistent/python"}, "no Python at PYTHON=/nonexistent/python"),
])
def test_bad_use_is_one_clear_line_and_exit_2(tmp_path, args, env, message):
    command = ["bash", SCRIPT, *args] + ([] if args == () and not env else [str(tmp_path / "o")])
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, **env})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # Refused before anything is written.


@pytest.mark.slow  # The ImageNet-shaped sample (1,000 classes, 1,050 images) generated and built: ~25 s on 2 cores.
def test_the_records_step_builds_the_imagenet_shaped_sample_on_every_core(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, "--cpu", STEPS="records")
    assert proc.returncode == 0, (out / "records.log").read_text()[-3000:]
    _, steps = _steps(out)
    assert list(steps) == ["records"] and steps["records"]["status"] == 0
    log = (out / "records.log").read_text()
    assert f"records: built with {os.cpu_count()} cores" in log
    assert "train: 1000 read = 1000 written" in log and "validation: 50 read = 50 written" in log, log[-2000:]
