"""The build's runner settings (pipelines/runners.py), Beam's DaskRunner on a LocalCluster, and exact results.

The cluster of separate `dask scheduler` / `dask worker` processes is in
tests/test_dask_runner.py (slow).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _options(*args):
    from pipelines import runners

    return runners.beam_options(list(args), ["--output_dir"])


def _same(folder, other) -> None:
    """Every shard and the mean image byte-identical, metadata.json equal but its time fields."""
    from pipelines import verify_tfrecords

    differences, compared = verify_tfrecords.compare(str(folder), str(other))
    assert differences == [] and compared > 3


@pytest.mark.parametrize("name", ["DaskRunner", "daskrunner", "dask", "apache_beam.runners.dask.dask_runner.DaskRunner"])
def test_the_short_name_selects_beams_dask_runner_and_its_flags_are_accepted(name):
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners.dask.dask_runner import DaskOptions

    from pipelines import runners

    for args in ([f"--runner={name}"], ["--runner", name]):
        options = _options(*args, "--dask_client_address=tcp://127.0.0.1:1", "--dask_connection_timeout=7",
                           "--dask_npartitions=5")
        assert options.view_as(StandardOptions).runner == runners.DASK_RUNNER
        dask = options.view_as(DaskOptions)
        assert (dask.address, dask.timeout, dask.npartitions) == ("tcp://127.0.0.1:1", 7, 5)


def test_dask_flags_without_the_dask_runner_and_unknown_dask_flags_are_refused():
    from pipelines import runners

    with pytest.raises(runners.BuildError, match="options of --runner=DaskRunner"):
        _options("--dask_client_address=tcp://127.0.0.1:1")
    with pytest.raises(runners.BuildError, match=r"unknown flag\(s\): --dask_adress"):
        _options("--runner=DaskRunner", "--dask_adress=tcp://127.0.0.1:1")


def test_a_partition_count_per_worker_thread_unless_the_user_gives_one():
    from apache_beam.runners.dask.dask_runner import DaskOptions

    from pipelines import runners

    options = _options("--runner=DaskRunner")
    runners.DaskCluster(options).check()  # No address: Beam's local cluster, one thread a core.
    assert options.view_as(DaskOptions).npartitions == max(2, runners.DASK_PARTITIONS_PER_THREAD * os.cpu_count())
    options = _options("--runner=DaskRunner", "--dask_partition_size=3")
    runners.DaskCluster(options).check()
    assert options.view_as(DaskOptions).npartitions is None


def test_an_unreachable_scheduler_is_one_line_within_the_timeout(sample, tmp_path):
    from cluster import free_ports

    (port,) = free_ports(1)
    out = tmp_path / "out"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", sample["output_dir"],
         "--output_dir", str(out), "--runner=DaskRunner", f"--dask_client_address=tcp://127.0.0.1:{port}",
         "--dask_connection_timeout=2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"build_tfrecords: error: cannot reach the Dask scheduler at tcp://127.0.0.1:{port} "
                           "(waited 2 s; --dask_connection_timeout sets it)"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert time.monotonic() - started < 60


@pytest.fixture(scope="module")
def local_cluster():
    """A dask.distributed LocalCluster of two worker processes, one thread each."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  host="127.0.0.1") as cluster:
        yield cluster


@pytest.mark.slow
def test_the_dask_runner_writes_the_local_runners_bytes_on_both_workers(sample, built, local_cluster, tmp_path,
                                                                         capfd):
    from distributed import Client

    out = tmp_path / "dask"
    with Client(local_cluster.scheduler_address, timeout=10) as client:
        client.get_task_stream()  # Starts the scheduler's record of every task and the worker it ran on.
        build(sample["output_dir"], out, "--runner=DaskRunner",
              f"--dask_client_address={local_cluster.scheduler_address}")
        ran_dofns = {t["worker"] for t in client.get_task_stream() if "apply_dofn_to_bundle" in str(t["key"])}
    err = capfd.readouterr().err
    assert f"runner DaskRunner on the Dask cluster at {local_cluster.scheduler_address}: 2 workers, 2 threads" in err
    assert len(ran_dofns) == 2, ran_dofns  # The pipeline's steps ran on both workers.
    # The shard writes follow their inputs' data: on a loaded machine one worker may write them all.
    assert re.search(r"workers: [12] process(es)? on 1 host wrote the \d+ shards", err), err[-2000:]
    _same(out, built[0])  # Colour statistics included: exact sums.


def test_a_worker_running_other_build_code_is_refused_before_anything_is_written(sample, local_cluster, tmp_path,
                                                                                  monkeypatch):
    import PIL

    from pipelines import build_tfrecords

    monkeypatch.setattr(PIL, "__version__", "0.0-here")  # In this process (the driver) only.
    out = tmp_path / "out"
    with pytest.raises(build_tfrecords.BuildError) as e:
        build(sample["output_dir"], out, "--runner=DaskRunner",
              f"--dask_client_address={local_cluster.scheduler_address}")
    assert "runs other build code than this driver (Pillow " in str(e.value)
    assert "there, 0.0-here here" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_two_builds_with_other_worker_counts_write_the_same_metadata(sample, built, tmp_path):
    # Shards reach the colour statistics in another grouping and order; the sums are integers.
    from pipelines import build_tfrecords

    out = tmp_path / "two"
    build_tfrecords.run(["--imagenet_dir", sample["output_dir"], "--output_dir", str(out),
                         "--direct_running_mode=multi_threading", "--direct_num_workers=3"])
    _same(out, built[0])


@pytest.mark.parametrize("drop, message", [
    ("read", "validation: no count of the images read (a step of the pipeline did not run)"),
    ("sums", "train: no colour statistics (a step of the pipeline did not run)"),
    ("all", "the pipeline ended without writing its summary: the runner skipped its last step"),
])
def test_a_branch_a_runner_skipped_is_an_error_not_a_missing_file(sample, tmp_path, monkeypatch, drop, message):
    from pipelines import build_summary, build_tfrecords

    real = build_summary.read_summary

    def skipped(build_dir):
        path = os.path.join(build_dir, build_summary.SUMMARY_FILE)
        if drop == "all":
            os.remove(path)
        else:
            with open(path) as f:
                lines = [line for line in f
                         if json.loads(line)["kind"] != drop or json.loads(line).get("split") == "train"]
            with open(path, "w") as f:
                f.writelines(lines)
        return real(build_dir)

    monkeypatch.setattr(build_summary, "read_summary", skipped)
    out = tmp_path / "out"
    with pytest.raises(build_tfrecords.BuildError, match=re.escape(message)):
        build(sample["output_dir"], out)
    assert not os.path.exists(out / "metadata.json")


def test_the_clusters_own_failures_become_one_line_each():
    import types

    import distributed
    from distributed.comm.core import CommClosedError

    from pipelines import runners

    worker = types.SimpleNamespace(address="tcp://127.0.0.1:4000")
    died = runners.dask_error(distributed.KilledWorker(("apply_dofn_to_bundle-1f", 3), worker, 3))
    assert "Dask workers died while running a step of the build" in str(died)
    assert "tcp://127.0.0.1:4000" in str(died) and "rerun with --overwrite" in str(died)
    missing = runners.dask_error(ModuleNotFoundError("No module named 'pipelines'"))
    assert "cannot import the build's code (ModuleNotFoundError: No module named 'pipelines')" in str(missing)
    lost = runners.dask_error(CommClosedError("in <TCP (closed) ConnectionPool.gather local=tcp://127.0.0.1:5>"))
    assert str(lost).startswith("lost the Dask scheduler during the build (CommClosedError: ")
    gone = runners.dask_error(OSError("Timed out trying to connect to tcp://127.0.0.1:8786 after 30 s"))
    assert str(gone).startswith("lost the Dask scheduler during the build (OSError: Timed out trying to connect")
    for error in (died, missing, lost, gone):
        assert isinstance(error, runners.BuildError) and "\n" not in str(error)
    assert runners.dask_error(OSError(28, "No space left on device")) is None  # The build's own: handled elsewhere.
