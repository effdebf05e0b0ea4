"""benchmarks/dask_cluster.py: a scheduler and workers on 127.0.0.1 that import this checkout and leave nothing behind."""

from __future__ import annotations

import importlib.util
import os
import time

import psutil
import pytest

from benchmarks.dask_cluster import ClusterError, local_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _processes(cluster) -> list[psutil.Process]:
    """The scheduler, each worker command and everything they started."""
    roots = [psutil.Process(p.pid) for p in [cluster.scheduler, *cluster.workers]]
    return roots + [c for r in roots for c in r.children(recursive=True)]


def _running(processes) -> list[str]:
    """Those still running (a zombie has ended; init reaps it)."""
    left = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline()[:4])}")
        except psutil.NoSuchProcess:
            pass
    return left


def _workers_seen(address: str) -> int:
    from distributed import Client

    with Client(address, timeout=10) as client:
        return len(client.scheduler_info(n_workers=-1)["workers"])


def test_workers_import_this_checkout_and_nothing_is_left(tmp_path):
    with local_cluster(2, log_dir=str(tmp_path)) as cluster:
        processes = _processes(cluster)
        assert len(processes) >= 5  # Scheduler, two worker commands, the worker process each starts.
        from distributed import Client

        with Client(cluster.address, timeout=10) as client:
            specs = client.run(importlib.util.find_spec, "pipelines")
        # Not another copy the environment has installed: the workers run the code being tested.
        assert sorted(s.origin for s in specs.values()) == [os.path.join(REPO, "pipelines", "__init__.py")] * 2
        peaks = cluster.peak_rss_mib()
        assert len(peaks) == 2 and all(p > 20 for p in peaks), peaks  # A Python interpreter with dask loaded.
    assert _running(processes) == []
    assert (tmp_path / "scheduler.log").exists() and (tmp_path / "worker-1.log").exists()


def test_a_killed_worker_leaves_and_an_exception_still_stops_the_rest():
    with pytest.raises(RuntimeError, match="the body failed"):
        with local_cluster(2) as cluster:
            processes = _processes(cluster)
            cluster.kill_worker(0)
            assert _running(p for p in processes if p.pid == cluster.worker_pids[0]) == []
            deadline = time.monotonic() + 60
            while _workers_seen(cluster.address) != 1:  # The scheduler notices the closed connection.
                assert time.monotonic() < deadline, "the scheduler still lists the killed worker after 60 s"
                time.sleep(0.5)
            raise RuntimeError("the body failed")
    assert _running(processes) == []


def test_a_worker_that_cannot_start_is_a_cluster_error_and_nothing_is_left():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ClusterError, match=r"^dask worker-0 exited with \d+ while starting; its log ends:"):
        with local_cluster(1, memory_limit="not-a-size"):
            pass
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert _running(started) == []


@pytest.mark.parametrize("output, workers", [
    ("build_tfrecords: wrote out/metadata.json (10 classes, 12.0 s)\n  workers: 2 processes on 1 host wrote the 6 "
     "shards\n  train: 120 read = 119 written in 4 shards", 2),
    ("build_tfrecords: runner DaskRunner on the Dask cluster at tcp://127.0.0.1:8786: 3 workers, 3 threads\n"
     "  Workers = 1\n", 1),
    ("build_tfrecords: runner DaskRunner on the Dask cluster at tcp://127.0.0.1:8786: 3 workers, 3 threads", None),
    ("build_tfrecords: wrote out/metadata.json (10 classes, 12.0 s)\n  train: 120 read = 119 written", None),
])
def test_the_worker_count_is_read_from_a_builds_summary(output, workers):
    from benchmarks.cluster_build import workers_in_summary

    assert workers_in_summary(output) == workers


@pytest.mark.slow  # An ImageNet-shaped sample of 1,050 images built twice: a few minutes on 2 cores.
def test_cluster_build_finds_the_same_dataset_on_both_runners(tmp_path):
    import json

    from benchmarks import cluster_build

    out = tmp_path / "cluster-build.json"
    assert cluster_build.main(["--images", "1000", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["same"] and result["differences"] == []
    assert result["local"]["images"] == result["dask"]["images"] == 1050
    assert len(result["dask"]["workers_peak_rss_mib"]) == 2
