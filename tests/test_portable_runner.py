"""The build on Beam's portable runner: a job service and SDK workers in processes of their own.

What a cluster needs is exercised here on loopback: the pipeline is submitted
to a job service (`local_job_service_main`), its transforms are pickled and
run by SDK workers that share no state with the driver (LOOPBACK: a worker in
the submitting process, serving the job service; EXTERNAL: workers that a
separate worker pool starts), and the records come out byte-identical to the
local runner's.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cluster import free_ports
from conftest import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def _serving(argv: list[str], port: int, env=None, timeout: float = 90):
    """Runs `python argv` until the with-block ends, once it accepts connections on port."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[1]} exited: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[1]} did not listen on {port} in {timeout} s")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _dataset(folder) -> tuple[dict, dict]:
    """({shard or mean image file: bytes}, metadata without its times and paths)."""
    files = {}
    for name in sorted(os.listdir(folder)):
        if name != "metadata.json":
            with open(os.path.join(folder, name), "rb") as f:
                files[name] = f.read()
    with open(os.path.join(folder, "metadata.json")) as f:
        meta = json.load(f)
    meta.pop("created")
    meta["build"].pop("seconds")
    return files, meta


@pytest.fixture(scope="module")
def local_build(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    build(sample["output_dir"], out, "--train_shards=4", "--validation_shards=2")
    return _dataset(out)


@pytest.mark.slow
@pytest.mark.parametrize("environment", ["LOOPBACK", "EXTERNAL"])
def test_portable_runner_writes_the_local_runners_records(environment, sample, local_build, tmp_path):
    job_port, pool_port = free_ports(2)
    out = tmp_path / "out"
    argv = ["-m", "pipelines.build_tfrecords", "--imagenet_dir", sample["output_dir"], "--output_dir", str(out),
            "--train_shards=4", "--validation_shards=2",
            "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}", f"--environment_type={environment}"]
    # The pool starts SDK workers with the first `python` on PATH: this environment's.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_serving(
            ["-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(job_port)], job_port))
        pool = None
        if environment == "EXTERNAL":
            pool = stack.enter_context(_serving(
                ["-m", "apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool_port)],
                pool_port, env=env))
            argv.append(f"--environment_config=localhost:{pool_port}")
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if pool is not None:  # The work ran in SDK worker processes that the pool started.
        assert "Starting worker with command" in pool.stderr.read()
    assert "staging" not in proc.stderr.lower()  # Workers use this environment: nothing is built or staged.
    files, meta = _dataset(out)
    local_files, local_meta = local_build
    assert sorted(files) == sorted(local_files)
    for name in files:
        assert files[name] == local_files[name], name
    local_meta["build"]["imagenet_dir"] = meta["build"]["imagenet_dir"]
    assert meta == local_meta


# -- what gets staged for which workers -------------------------------------------


def _setup_file(*args):
    from apache_beam.options.pipeline_options import SetupOptions

    from pipelines import build_tfrecords

    return build_tfrecords._beam_options(list(args)).view_as(SetupOptions).setup_file


@pytest.mark.parametrize("environment", ["LOOPBACK", "EXTERNAL", "PROCESS"])
def test_workers_in_the_users_environment_get_nothing_staged(environment):
    assert _setup_file("--runner=PortableRunner", "--job_endpoint=localhost:1",
                       f"--environment_type={environment}") is None


def test_dataflow_and_docker_workers_get_this_project_staged():
    pyproject = os.path.join(REPO, "pyproject.toml")
    assert _setup_file("--runner=DataflowRunner") == pyproject
    assert _setup_file("--runner=PortableRunner", "--job_endpoint=localhost:1") == pyproject  # DOCKER.
    assert _setup_file("--runner=DataflowRunner", "--setup_file=/x/setup.py") == "/x/setup.py"  # Theirs wins.


def test_staging_without_the_build_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from pipelines import build_tfrecords

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "build" else real(name, *a))
    with pytest.raises(build_tfrecords.BuildError, match="needs the 'build' package: pip install build"):
        build_tfrecords._beam_options(["--runner=DataflowRunner"])
