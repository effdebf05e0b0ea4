"""The build's Beam runner settings: local defaults, staging for remote workers, and Beam's DaskRunner.

`beam_options` turns the build's unknown arguments into Beam's
`PipelineOptions` (refusing flags neither the build nor Beam knows);
`DaskCluster` checks a dask.distributed cluster before the build starts and
turns the cluster's failures into one-line errors; `run` runs a pipeline and
releases what the runner started; `ShardWatch` shows progress where the
workers' own lines do not reach this console.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import sys
import threading
import time

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

from pipelines import transforms
from tfrecords import fileio, schema

log = logging.getLogger("pipelines.build_tfrecords")


class BuildError(RuntimeError):
    """The build cannot go on; the message says why (one line)."""


# Beam's loggers that log a failing bundle's traceback (in each worker that
# meets it) before the driver raises the same error.
BUNDLE_ERROR_LOGGERS = ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker")
LOCAL_RUNNERS = {None, "DirectRunner", "direct", "FnApiRunner", "BundleBasedDirectRunner"}
# Portable environments whose workers run a Python environment the user provides.
SHARED_ENVIRONMENTS = {"LOOPBACK", "EXTERNAL", "PROCESS"}
# Beam knows its DaskRunner only by this dotted name; the build also takes `DaskRunner` and `dask`.
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
DASK_NAMES = {"daskrunner", "dask", DASK_RUNNER.lower()}
# Without --dask_npartitions / --dask_partition_size, the list of read units
# becomes this many Dask partitions per worker thread (Beam's default puts up
# to 128 units in one partition: one worker would do all the work), and every
# later step keeps that many (twice that after a Flatten). Each GroupByKey is
# a shuffle of partitions x partitions tasks: on 2 one-thread workers, 16
# partitions took 42 s where 4 took 25 s for the same 3,150 images.
DASK_PARTITIONS_PER_THREAD = 2
DASK_INSTALL = "pip install 'alexnet-tf[dask]'"


def is_dask(runner: str | None) -> bool:
    return (runner or "").lower() in DASK_NAMES


def _dask_args(beam_args: list[str]) -> list[str]:
    """`beam_args` with `--runner=DaskRunner` (or `dask`) spelt as Beam's dotted name, and Dask's options loaded."""
    out, runner = [], None
    args = iter(beam_args)
    for a in args:
        if a == "--runner":
            a = f"--runner={next(args, '')}"
        if a.startswith("--runner="):
            runner = a.split("=", 1)[1]
            if is_dask(runner):
                a = f"--runner={DASK_RUNNER}"
        out.append(a)
    if is_dask(runner):
        try:
            import apache_beam.runners.dask.dask_runner  # noqa: F401  Registers --dask_* with PipelineOptions.
            import distributed  # noqa: F401
        except ImportError as e:
            raise BuildError(f"--runner=DaskRunner needs dask.distributed ({e}): {DASK_INSTALL}, here and on "
                             "the scheduler and every worker") from None
    elif any(a.startswith("--dask_") for a in out):
        raise BuildError("--dask_* flags are options of --runner=DaskRunner; add it, or drop them")
    return out


def _check_beam_flags(options: PipelineOptions, beam_args: list[str], ours: list[str]) -> None:
    """Stops on a flag that is neither this pipeline's (`ours`) nor any Beam option's.

    Beam itself only logs such flags and drops them, so `--train-shards=4`
    would build with the default shard count and exit 0.
    """
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # Its "Discarding unparseable args" would precede ours.
    try:
        known = set(options.get_all_options())
        unknown = set(options.get_all_options(retain_unknown_options=True)) - known
    finally:
        beam_log.setLevel(level)
    bad = [a for a in beam_args if a.startswith("-") and a.split("=")[0].lstrip("-").replace("-", "_") in unknown]
    if bad:
        hints = []
        for a in bad:
            close = difflib.get_close_matches(a.split("=")[0], ours, n=1, cutoff=0.8)
            hints.append(f"{a} (did you mean {close[0]}?)" if close else a)
        raise BuildError(f"unknown flag(s): {', '.join(hints)}; neither this pipeline's nor Beam's "
                         "(see --help, and Beam's PipelineOptions)")


def beam_options(beam_args: list[str], ours: list[str] = ()) -> PipelineOptions:
    """Beam's options from the build's unknown arguments, with the build's defaults for its runner."""
    beam_args = _dask_args(beam_args)
    options = PipelineOptions(beam_args)
    _check_beam_flags(options, beam_args, list(ours))
    runner = options.view_as(StandardOptions).runner
    direct = options.view_as(DirectOptions)
    if runner in LOCAL_RUNNERS:
        if not any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
            # Local workers print straight to this console: progress and problems only.
            options.view_as(WorkerOptions).default_sdk_harness_log_level = "WARNING"
        if not any(a.startswith("--sdk_harness_log_level_overrides") for a in beam_args):
            # A failing bundle is logged with its traceback by every worker that
            # meets it, and relayed; the driver reports the failure once.
            options.view_as(WorkerOptions).sdk_harness_log_level_overrides = dict.fromkeys(BUNDLE_ERROR_LOGGERS,
                                                                                           "CRITICAL")
        # All cores by default; the user's own --direct_* flags win.
        if not any(a.startswith("--direct_num_workers") for a in beam_args):
            direct.direct_num_workers = 0
        if not any(a.startswith("--direct_running_mode") for a in beam_args):
            direct.direct_running_mode = "multi_processing"
    elif is_dask(runner):
        # Dask workers import alexnet-tf from their own Python environment; nothing is staged.
        log.info("runner DaskRunner: the scheduler and workers import alexnet-tf from their own Python "
                 "environment (it must be installed there)")
    else:
        _stage_project(options, runner)
    return options


def _stage_project(options: PipelineOptions, runner: str) -> None:
    setup = options.view_as(SetupOptions)
    environment = (options.view_as(PortableOptions).environment_type or "").upper()
    if setup.setup_file or setup.extra_packages or setup.requirements_file:
        return  # The user's own staging.
    if environment in SHARED_ENVIRONMENTS:
        # LOOPBACK, EXTERNAL and PROCESS workers run a Python the user set up;
        # Beam installs nothing staged into it, so nothing is built or staged.
        log.info("runner %s with --environment_type=%s: workers import alexnet-tf from their own "
                 "Python environment (it must be installed there)", runner, environment)
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pyproject = os.path.join(here, "pyproject.toml")
    if not os.path.exists(pyproject):
        log.warning("runner %s and no --setup_file/--extra_package: workers must already "
                    "have alexnet-tf installed (e.g. --extra_package=dist/alexnet_tf-*.whl)", runner)
    elif importlib.util.find_spec("build") is None:
        raise BuildError(f"runner {runner} stages this project for its workers with --setup_file={pyproject}, "
                         "which needs the 'build' package: pip install build (or pass --extra_package=WHEEL)")
    else:
        # Workers (Dataflow, Docker environments) install this project and its dependencies.
        setup.setup_file = pyproject
        log.info("runner %s: staging this project with --setup_file=%s", runner, pyproject)


# ---------------------------------------------------------------------------
# Beam's DaskRunner.


class DaskCluster:
    """The dask.distributed cluster a build runs on, checked before the pipeline starts.

    With --dask_client_address or --dask_scheduler_file: reachable within
    --dask_connection_timeout, has workers, and the scheduler and every worker
    run the same build code and image libraries as this driver (same code,
    same bytes). Without either, Beam starts a local cluster, one worker per
    core. Also chooses the partition count when the user did not.
    """

    def __init__(self, options: PipelineOptions):
        from apache_beam.runners.dask.dask_runner import DaskOptions

        self.options = options.view_as(DaskOptions)
        self.where = self.options.address or self.options.scheduler_file
        self.threads = os.cpu_count() or 1
        self.workers = 0

    def _connect(self):
        import distributed

        kwargs = {"timeout": self.options.timeout} if isinstance(self.options.timeout, int) else {}
        waited = kwargs.get("timeout", "the default")
        try:
            return distributed.Client(address=self.options.address, scheduler_file=self.options.scheduler_file,
                                      set_as_default=False, **kwargs)
        except (OSError, TimeoutError, ValueError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise BuildError(f"cannot reach the Dask scheduler at {self.where} (waited {waited} s; "
                             f"--dask_connection_timeout sets it): {reason}") from None

    def check(self) -> str:
        """Checks the cluster; returns a line describing it."""
        if self.where:
            client = self._connect()
            try:
                self._check_workers(client, transforms.worker_facts())
            finally:
                client.close()
            what = f"the Dask cluster at {self.where}: {self.workers} workers, {self.threads} threads"
        else:
            what = f"a local Dask cluster (Beam's default: about one worker per core, {self.threads} threads)"
        if not (self.options.npartitions or self.options.partition_size):
            self.options.npartitions = max(2, DASK_PARTITIONS_PER_THREAD * self.threads)
        return what

    def _check_workers(self, client, mine: dict) -> None:
        workers = client.scheduler_info().get("workers", {})
        if not workers:
            raise BuildError(f"the Dask scheduler at {self.where} has no workers: start some "
                             f"(dask worker {self.where}) and run the build again")
        self.workers = len(workers)
        self.threads = sum(w.get("nthreads", 1) for w in workers.values())
        facts = client.run(transforms.worker_facts, on_error="return")
        try:
            facts["the scheduler"] = client.run_on_scheduler(transforms.worker_facts)
        except Exception as e:  # noqa: BLE001  Whatever it raised is the reason.
            facts["the scheduler"] = e
        for where, theirs in sorted(facts.items()):
            if isinstance(theirs, BaseException):
                raise BuildError(f"{_name(where)} cannot run the build's code ({_reason(theirs)}): install "
                                 f"alexnet-tf and {DASK_INSTALL} there, in the Python that runs it")
            differ = [f"{k} {theirs.get(k)} there, {v} here" for k, v in mine.items() if theirs.get(k) != v]
            if differ:
                raise BuildError(f"{_name(where)} runs other build code than this driver ({'; '.join(differ)}): "
                                 "install the same alexnet-tf, Pillow and NumPy on the scheduler and every "
                                 "worker (same code, same bytes)")


def _name(where: str) -> str:
    return where if where == "the scheduler" else f"the Dask worker {where}"


def _reason(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def dask_error(e: BaseException) -> BuildError | None:
    """A one-line BuildError for a failure of the Dask cluster itself (not of the build's data), else None."""
    try:
        import distributed
        from distributed.comm.core import CommClosedError
    except ImportError:
        return None
    if isinstance(e, distributed.KilledWorker):
        return BuildError(f"Dask workers died while running a step of the build, more times than the scheduler "
                          f"allows (distributed.scheduler.allowed-failures): {_reason(e)}; nothing was kept; find "
                          "why in the workers' logs (memory, a killed process), then rerun with --overwrite")
    if isinstance(e, ModuleNotFoundError):
        return BuildError(f"a Dask worker or the scheduler cannot import the build's code ({_reason(e)}): install "
                          f"alexnet-tf and {DASK_INSTALL} there")
    if (isinstance(e, (CommClosedError, distributed.TimeoutError))
            or re.search(r"[Ss]cheduler (lost|closed)|^Timed out trying to connect to ", str(e))):
        return BuildError(f"lost the Dask scheduler during the build ({_reason(e)}); nothing was kept: rerun "
                          "with --overwrite once the cluster is back")
    return None


# ---------------------------------------------------------------------------
# Running.


def run(pipeline) -> None:
    """Runs `pipeline` to its end; then closes the Dask client (and the local cluster) the runner started."""
    result = pipeline.run()
    try:
        result.wait_until_finish()
    except Exception as e:
        error = dask_error(e)
        if error is not None:
            raise error from None
        raise
    finally:
        client = getattr(result, "client", None)
        if client is not None:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()


class ShardWatch:
    """Every `every_s` seconds, one line saying how many shards are in `folder` (workers elsewhere)."""

    def __init__(self, folder: str, every_s: float = 15.0):
        self.folder, self.every_s = folder, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="shard-watch", daemon=True)

    def _watch(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(self.every_s):
            try:
                done = sum(1 for n in fileio.listdir(self.folder) if schema.parse_shard_name(n) is not None)
            except OSError:
                continue
            print(f"build_tfrecords: {done} shards written ({time.monotonic() - start:.0f} s)", file=sys.stderr,
                  flush=True)

    def __enter__(self) -> "ShardWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)
