"""The build on Beam's DaskRunner: a dask.distributed scheduler and two worker processes on 127.0.0.1.

Same bytes as the local runner (every shard, the mean image, metadata.json but
its times), work on both workers, a worker killed mid-build, and a scheduler
that is not there.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

import pytest

from benchmarks.cluster_build import workers_in_summary
from benchmarks.dask_cluster import dask_flags, local_cluster
from conftest import build
from pipelines import verify_tfrecords

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = ["--train_shards=4", "--validation_shards=2"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}


def _build_command(sample, out, *flags) -> list[str]:
    return [sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", sample["output_dir"],
            "--output_dir", str(out), *SHARDS, *flags]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("build_tfrecords: error:")]


def _assert_one_line_failure(proc) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(_error_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def local_records(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    build(sample["output_dir"], out, *SHARDS)
    return str(out)


def _assert_same(out, local_records) -> None:
    differences, files = verify_tfrecords.compare(str(out), local_records)
    assert differences == [], "\n".join(differences[:20])
    assert files == len(verify_tfrecords.dataset_files(local_records))


@pytest.fixture(scope="module")
def dask_build(sample, tmp_path_factory):
    """(output folder, the build's finished process, tasks each worker ran) of the sample built on 2 workers."""
    from distributed import Client

    out = tmp_path_factory.mktemp("dask") / "records"
    with local_cluster(2, log_dir=str(tmp_path_factory.mktemp("cluster"))) as cluster:
        with Client(cluster.address, timeout=10) as client:
            client.get_task_stream()  # Starts the scheduler's record of every task and the worker it ran on.
            proc = subprocess.run(_build_command(sample, out, *dask_flags(cluster.address)), cwd=REPO, env=ENV,
                                  capture_output=True, text=True, timeout=900)
            names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
            tasks = collections.defaultdict(list)
            for t in client.get_task_stream():
                tasks[names.get(t["worker"], t["worker"])].append(str(t["key"]))
    return out, proc, tasks


@pytest.mark.slow  # A cluster and two builds of the sample: about a minute on 2 cores.
def test_dask_runner_writes_the_local_runners_records(dask_build, local_records):
    out, proc, _ = dask_build
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(out, local_records)


@pytest.mark.slow
def test_both_workers_apply_the_pipelines_dofns(dask_build):
    _, proc, tasks = dask_build
    assert proc.returncode == 0, proc.stderr[-3000:]
    # DaskRunner runs each ParDo's bundles as `apply_dofn_to_bundle` tasks (maybe fused with their neighbours).
    dofn_tasks = {w: sum("apply_dofn_to_bundle" in k for k in keys) for w, keys in tasks.items()}
    assert sorted(dofn_tasks) == ["worker-0", "worker-1"] and all(dofn_tasks.values()), dofn_tasks


@pytest.mark.slow
def test_the_builds_summary_counts_the_workers_that_wrote_shards(dask_build):
    _, proc, tasks = dask_build
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Shard writes follow their inputs' data, so on a loaded machine one worker may write them all; the count is
    # of processes that wrote shards, never more than the workers that ran the pipeline's steps.
    workers = workers_in_summary(proc.stderr)
    ran = [w for w, keys in tasks.items() if any("apply_dofn_to_bundle" in k for k in keys)]
    assert workers is not None and 1 <= workers <= len(ran) == 2, proc.stderr[-2000:]


@pytest.mark.slow  # A cluster, a build cut short and up to two more: a few minutes on 2 cores.
def test_a_worker_killed_mid_build_gives_the_same_records_or_a_one_line_error(sample, local_records, tmp_path):
    from distributed import Client

    out = tmp_path / "records"
    with local_cluster(2, log_dir=str(tmp_path / "cluster")) as cluster:
        with Client(cluster.address, timeout=10) as client:
            proc = subprocess.Popen(_build_command(sample, out, *dask_flags(cluster.address)), cwd=REPO, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                killed = None
                while killed is None and proc.poll() is None:  # Worker 1, once it runs a task.
                    busy = {w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
                            if client.processing([a]).get(a)}
                    if "worker-1" in busy:
                        cluster.kill_worker(1)
                        killed = time.monotonic()
                    time.sleep(0.05)
                _, stderr = proc.communicate(timeout=600)
            finally:
                proc.kill()
                proc.wait()
        assert killed is not None, "the build ended before worker-1 ran a task; nothing was tested"
        if proc.returncode == 0:
            _assert_same(out, local_records)
            return
        _assert_one_line_failure(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr))
        rerun = subprocess.run(_build_command(sample, out, "--overwrite", *dask_flags(cluster.address)), cwd=REPO,
                               env=ENV, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same(out, local_records)


@pytest.mark.slow  # Starts a cluster of its own: about 20 s.
def test_a_cluster_without_the_project_is_named_in_one_line_before_anything_is_written(sample, tmp_path):
    # The scheduler and workers' Python finds another `pipelines` first: as where alexnet-tf is not installed.
    shadow = tmp_path / "elsewhere"
    (shadow / "pipelines").mkdir(parents=True)
    (shadow / "pipelines" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'pipelines'\")\n")
    out = tmp_path / "records"
    with local_cluster(2, repo=str(shadow)) as cluster:
        proc = subprocess.run(_build_command(sample, out, *dask_flags(cluster.address)), cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=300)
    _assert_one_line_failure(proc)
    error, = _error_lines(proc.stderr)
    assert "cannot run the build's code" in error and "No module named 'pipelines'" in error, error
    assert "install alexnet-tf and pip install 'alexnet-tf[dask]' there" in error, error
    assert not out.exists()
