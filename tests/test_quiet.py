"""toolcli.quiet: Beam's and TensorFlow's start-up noise kept off the build's and the trainer's console."""

from __future__ import annotations

import logging

import pytest

from conftest import cli
from toolcli import quiet

# Lines as the build (its local workers, the driver's relays) and the trainer printed them.
NOISE = [
    "WARNING:root:apitools not found, and bigquery client libraries are not available despite the import not raising "
    "an ImportError.",
    "INFO:__main__:Logging handler created.",
    "WARNING:__main__:No semi_persistent_directory found:  User registered objects (e.g. schema, logical type) "
    "throughregisteries may not be effective",
    "WARNING:apache_beam.options.pipeline_options:Discarding unparseable args: ['--direct_runner_use_stacked_bundle', "
    "'--pipeline_type_check']",
    "WARNING apache_beam.runners.portability.local_job_service: Worker: severity: WARN timestamp {   seconds: "
    "1796291231   nanos: 214462518 } message: \"No semi_persistent_directory found:  User registered objects\"",
    "INFO root: Missing pipeline option (runner). Executing pipeline using the default runner: DirectRunner.",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796291300.388848     384 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors.",
    "I0000 00:00:1796291303.411265     384 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
    "W0000 00:00:1796291305.499383     384 dataset.cc:997] Input of GeneratorDatasetOp::Dataset will not be optimized "
    "because the dataset does not implement the AsGraphDefInternal() method needed to apply optimizations.",
    "W0000 00:00:1796291312.261269     384 loop_optimizer.cc:934] Skipping loop optimization for Merge node with "
    "control input: cond/branch_executed/_24",
]
KEPT = [
    "build_tfrecords: wrote /tmp/out/metadata.json (10 classes, 8.9 s)",
    "  train: 400 read = 399 written in 12 shards + 1 rejected",
    "build_tfrecords: worker 7: 100 images (9.0 images/s), 0 rejected",
    "E0000 00:00:1796291302.697266     384 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
    "W0000 00:00:1796291302.697266     384 cpu_allocator_impl.cc:83] Allocation of 1 exceeds 10% of free memory.",
    "train: error: --batch_size must be at least 1, got 0",
    "WARNING:root:a warning",
]


@pytest.mark.parametrize("line", NOISE)
def test_the_start_up_noise_is_named(line):
    assert quiet.is_noise(line)


@pytest.mark.parametrize("line", KEPT)
def test_the_projects_lines_errors_and_other_warnings_are_kept(line):
    assert not quiet.is_noise(line)


def test_what_an_import_logs_is_held_and_logged_again_only_when_verbose(caplog):
    # In a command nothing else handles the root logger while Beam is imported; here pytest's handler does too.
    log = logging.getLogger("a.library")
    with quiet.held_imports():
        log.warning("said while importing")
    caplog.clear()
    quiet.release(False)
    assert caplog.records == []
    with quiet.held_imports():
        log.warning("said again while importing")
    caplog.clear()
    quiet.release(True)
    assert [r.getMessage() for r in caplog.records] == ["said again while importing"]
    quiet.release(True)  # Logged once.
    assert len(caplog.records) == 1


def test_the_relay_drops_what_it_is_told_and_keeps_progress_live(capfd):
    import os

    with quiet.relay_stderr(lambda line: "drop" not in line):
        os.write(2, b"keep this\ndrop this\n10%\r20%\r")
        os.write(2, b"last")
    err = capfd.readouterr().err
    assert err == "keep this\n10%\r20%\rlast"


_LATE_LINE = """
import os, sys, threading, time
from toolcli import quiet

def late():  # A thread of TensorFlow's, logging while the process winds down.
    time.sleep(0.3)
    os.write(2, b"W0000 00:00:1.0 1 data_service_client.cc:479] Failed to heartbeat to dispatcher\\n")

with quiet.quiet_start(False):
    threading.Thread(target=late).start()  # Not a daemon: the process waits for it.
    print("tool: error: it stops here", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("status", [1, 0])
def test_a_tools_one_line_error_is_the_last_line_on_the_console(status):
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _LATE_LINE, str(status)], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == status
    lines = r.stderr.splitlines()
    assert lines[0] == "tool: error: it stops here"
    assert lines[1:] == ([] if status else ["W0000 00:00:1.0 1 data_service_client.cc:479] Failed to heartbeat to "
                                           "dispatcher"])  # A run that ends well keeps what comes after.


_EXIT_FROM_A_THREAD = """
import os, sys, threading
from toolcli import quiet

def watch():  # As a watchdog thread ends a run: no finally of the main thread runs.
    if sys.argv[1] == "drain":
        quiet.drain()
    print("tool: error: the dispatcher is gone", file=sys.stderr, flush=True)
    os._exit(1)

with quiet.quiet_start(False):
    print("tool: a line before", file=sys.stderr, flush=True)
    threading.Thread(target=watch).start()
    threading.Event().wait(30)
"""


def test_a_thread_that_ends_the_process_drains_the_relay_first():
    import os
    import subprocess
    import sys

    # Without `drain` both lines are lost: os._exit ends the process before the relay writes them out.
    r = subprocess.run([sys.executable, "-c", _EXIT_FROM_A_THREAD, "drain"], capture_output=True, text=True,
                       timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["tool: a line before", "tool: error: the dispatcher is gone"]


def _noise_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if quiet.is_noise(line)]


@pytest.mark.slow
def test_the_builds_console_has_no_start_up_noise_and_verbose_startup_brings_it_back(sample, tmp_path):
    # The default local runner: worker processes, which print Beam's start-up notes themselves.
    quiet_run = cli("pipelines.build_tfrecords", f"--imagenet_dir={sample['output_dir']}", f"--output_dir={tmp_path / 'a'}",
                    "--train_shards=2", "--validation_shards=1")
    assert quiet_run.returncode == 0, quiet_run.stderr[-3000:]
    output = quiet_run.stdout + quiet_run.stderr
    assert not _noise_lines(output), _noise_lines(output)
    for absent in ("apitools", "Logging handler created", "semi_persistent_directory", "Discarding unparseable args",
                   "Missing pipeline option"):
        assert absent not in output
    assert f"build_tfrecords: wrote {tmp_path / 'a'}/metadata.json" in quiet_run.stderr  # Its own lines stay.
    loud = cli("pipelines.build_tfrecords", f"--imagenet_dir={sample['output_dir']}", f"--output_dir={tmp_path / 'b'}",
               "--train_shards=2", "--validation_shards=1", "--verbose_startup")
    assert loud.returncode == 0, loud.stderr[-3000:]
    noise = "\n".join(_noise_lines(loud.stdout + loud.stderr))
    for present in ("apitools not found", "Logging handler created", "No semi_persistent_directory found"):
        assert present in noise, loud.stderr[-3000:]
