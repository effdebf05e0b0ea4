"""A dask.distributed cluster of local processes on 127.0.0.1, for the build on Beam's DaskRunner.

    with local_cluster(n_workers=2) as cluster:
        ... --runner=DaskRunner --dask_client_address={cluster.address} ...
        cluster.peak_rss_mib()   # each worker's peak resident memory so far

One `dask scheduler` and n `dask worker` processes (one worker process with one
thread each), started from this environment's `dask` command with this
checkout on PYTHONPATH, so that the workers import the same pipeline code as
the process that submits it. Each runs in a process group of its own; leaving
the with-block, by its end or by an exception, stops every group and kills
what has not stopped within a timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

from alexnet_tf.data_service import free_ports
from benchmarks.measure import REPO


class ClusterError(RuntimeError):
    """The cluster did not start (the reason and the tail of the failing process's log in the message)."""


def _dask_command() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "dask")
    if not os.path.exists(path):
        raise ClusterError(f"no `dask` command beside {sys.executable}: pip install -e '.[dask]'")
    return path


def dask_flags(address: str) -> list[str]:
    """The build flags that run it on the dask.distributed scheduler at `address`."""
    return ["--runner=DaskRunner", f"--dask_client_address={address}"]


class LocalCluster:
    """The processes of a running local cluster; made by `local_cluster`."""

    def __init__(self, n_workers: int, repo: str, memory_limit: str, log_dir: str):
        self.n_workers = n_workers
        self.log_dir = log_dir
        self.port, = free_ports(1)
        self.address = f"tcp://127.0.0.1:{self.port}"
        self._env = {**os.environ,
                     "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
        self._repo = repo
        self._procs: list[subprocess.Popen] = []
        self._peaks: dict[int, float] = {}
        self._memory_limit = memory_limit
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="cluster-rss", daemon=True)

    def start(self) -> None:
        """Starts the scheduler and the workers (`wait_for_workers` waits for them to register)."""
        self.scheduler = self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                     "--no-dashboard")
        for i in range(self.n_workers):
            self.workers.append(self._start(
                f"worker-{i}", "worker", self.address, "--name", f"worker-{i}", "--nworkers", "1", "--nthreads", "1",
                "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", self._memory_limit))
        self._poller.start()

    def _start(self, name: str, *argv: str) -> subprocess.Popen:
        with open(os.path.join(self.log_dir, f"{name}.log"), "w") as log:
            # A session of its own: the terminal's Ctrl-C reaches only the driver, which then stops the cluster
            # in order, and the process group holds whatever the command starts (the nanny's worker).
            proc = subprocess.Popen([_dask_command(), *argv], cwd=self._repo, env=self._env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._procs.append(proc)
        return proc

    def log_tail(self, name: str, chars: int = 2000) -> str:
        """The last `chars` characters of a process's log (`scheduler`, `worker-0`, ...)."""
        with open(os.path.join(self.log_dir, f"{name}.log"), errors="replace") as f:
            return f.read()[-chars:]

    @property
    def worker_pids(self) -> list[int]:
        """The process id of each `dask worker` command (its process group holds the worker it starts)."""
        return [p.pid for p in self.workers]

    def wait_for_workers(self, timeout: float) -> None:
        """Returns once all the workers have registered with the scheduler.

        Raises:
          ClusterError: A process exited, or the workers were not all there within `timeout` seconds.
        """
        from distributed import Client

        deadline = time.monotonic() + timeout
        client = None
        try:
            while client is None:
                self._check_running()
                try:
                    client = Client(self.address, timeout=2)
                except OSError:
                    if time.monotonic() > deadline:
                        raise ClusterError(f"the scheduler did not listen on {self.address} in {timeout:.0f} s; "
                                           f"its log ends:\n{self.log_tail('scheduler')}") from None
            while len(client.scheduler_info(n_workers=-1)["workers"]) < self.n_workers:
                self._check_running()
                if time.monotonic() > deadline:
                    have = len(client.scheduler_info(n_workers=-1)["workers"])
                    raise ClusterError(f"{have} of {self.n_workers} workers registered in {timeout:.0f} s; "
                                       f"worker-0's log ends:\n{self.log_tail('worker-0')}")
                time.sleep(0.2)
        finally:
            if client is not None:
                client.close()

    def _check_running(self) -> None:
        for name, proc in (("scheduler", self.scheduler), *((f"worker-{i}", p) for i, p in enumerate(self.workers))):
            if proc.poll() is not None:
                raise ClusterError(f"dask {name} exited with {proc.returncode} while starting; its log ends:\n"
                                   f"{self.log_tail(name)}")

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in self.workers:
                try:
                    root = psutil.Process(proc.pid)
                    rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
                except psutil.Error:
                    continue  # Gone (killed) or exiting between the listing and the reading.
                self._peaks[proc.pid] = max(self._peaks.get(proc.pid, 0.0), rss)
            self._stop.wait(0.2)

    def peak_rss_mib(self) -> list[float]:
        """Each worker's peak resident memory so far (MiB), its whole process tree (nanny and worker) together."""
        return [self._peaks.get(p.pid, 0.0) for p in self.workers]

    def kill_worker(self, index: int) -> None:
        """Kills worker `index` at once (SIGKILL to its process group: the nanny cannot restart it)."""
        proc = self.workers[index]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """Stops every process: SIGTERM to each command, then SIGKILL to each process group.

        The workers go first, each given up to `timeout` seconds to close (the
        nanny stops the worker it started), so that none outlives the scheduler
        and retries it; then the scheduler; then whatever is left in any group.
        """
        self._stop.set()
        for group in (self.workers, [self.scheduler] if self.scheduler else []):
            for proc in group:
                proc.terminate()
            deadline = time.monotonic() + timeout
            for proc in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:  # A group outlives its first process while a child of it lingers.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._poller.is_alive():
            self._poller.join(timeout=5)

@contextlib.contextmanager
def local_cluster(n_workers: int = 2, *, repo: str = REPO, memory_limit: str = "0", timeout: float = 120.0,
                  log_dir: str | None = None) -> Iterator[LocalCluster]:
    """A scheduler and `n_workers` workers on 127.0.0.1, stopped on leaving the block.

    Args:
      n_workers: Worker processes, each of one thread.
      repo: The checkout the workers import the pipeline from (PYTHONPATH, and their working folder).
      memory_limit: `dask worker --memory-limit` ("0": no limit; "2GiB").
      timeout: Seconds to wait for all the workers to register.
      log_dir: Where each process's output goes (`scheduler.log`, `worker-<i>.log`); default a temporary folder,
        removed afterwards.

    Yields:
      The running `LocalCluster` (its `address`, `worker_pids`, `peak_rss_mib()`, `kill_worker(i)`).

    Raises:
      ClusterError: It did not start (the reason in one line, then the log's tail).
    """
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dask-cluster-"))
        os.makedirs(log_dir, exist_ok=True)
        cluster = LocalCluster(n_workers, repo, memory_limit, log_dir)
        try:
            cluster.start()
            cluster.wait_for_workers(timeout)
            yield cluster
        finally:
            cluster.stop()  # What did start, however far starting got.
