"""Beam's and TensorFlow's start-up noise kept off a tool's console, all of it back with `--verbose_startup`.

What is dropped, line by line (`NOISE`): Beam's import-time warning that no
BigQuery client is installed, its note that the default runner is used, its
local workers' start-up notes ("Logging handler created.", "No
semi_persistent_directory found", "Discarding unparseable args") and the
driver's relays of them, absl's C++ notice "All log messages before
absl::InitializeLog() ...", TensorFlow's C++ INFO lines (I0000 ...
port.cc:153] oneDNN ..., cpu_feature_guard and its "To enable the following
instructions" line) and two of its C++ warnings that say nothing to a user of
this project (a generator dataset that is not optimized, a skipped loop
optimization). TensorFlow's C++ errors, the project's own lines and every
other line stay.

Two ways in. A warning logged while Beam is imported is held (`held_imports`)
and logged again by `release` under `--verbose_startup`; the lines that
processes write straight to file descriptor 2 (TensorFlow's C++ log, Beam's
local workers, which inherit it) go through `relay_stderr`, a pipe whose
reader drops the noise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Callable, Iterator

NOISE = {
    "Beam without its GCP extra": re.compile(r"apitools not found, and bigquery client libraries are not available"),
    "Beam worker start-up": re.compile(r"Logging handler created\.|No semi_persistent_directory found|"
                                       r"Discarding unparseable args: \["),
    "Beam's default runner": re.compile(r"Missing pipeline option \(runner\)\. Executing pipeline using the "
                                        r"default runner"),
    "absl C++ log start-up": re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    # absl's C++ format: level, date, time, thread, file:line]; TensorFlow's older one: date, time, level, file.
    "TensorFlow C++ INFO": re.compile(r"^I\d{4} [\d:.]+ +\d+ [\w.-]+:\d+\] |"
                                      r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: I [\w/.-]+:\d+\] "),
    "TensorFlow CPU instructions": re.compile(r"^To enable the following instructions: .*rebuild TensorFlow"),
    "TensorFlow graph notes": re.compile(r"^W\d{4} .*(Input of GeneratorDatasetOp::Dataset will not be optimized|"
                                         r"Skipping loop optimization for Merge node)"),
}


def is_noise(line: str) -> bool:
    """Whether `line` is start-up noise of Beam or TensorFlow (`NOISE`)."""
    return any(p.search(line) for p in NOISE.values())


class _Holder(logging.Handler):
    """Keeps the records logged during an import, to be logged again (or not) once the flags are read."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_HELD: list[logging.LogRecord] = []


@contextlib.contextmanager
def held_imports() -> Iterator[None]:
    """Holds what is logged through the root logger during the block (an import of Beam), for `release`.

    Beam's modules log with `logging.warning`, which configures the root
    logger on first use when it has no handler; the holder is that handler
    while the block runs, so nothing is configured and nothing printed.
    """
    root, holder = logging.getLogger(), _Holder()
    root.addHandler(holder)
    try:
        yield
    finally:
        root.removeHandler(holder)
        _HELD.extend(holder.records)


def release(verbose: bool) -> None:
    """Logs the held records again with `verbose`, through the handlers configured by then; drops them without."""
    held, _HELD[:] = list(_HELD), []
    for record in held if verbose else []:
        logging.getLogger(record.name).handle(record)


@contextlib.contextmanager
def relay_stderr(keep: Callable[[str], bool], join_s: float = 10.0) -> Iterator[None]:
    """Routes file descriptor 2 (this process's and its children's) through a pipe; writes on the lines `keep`s.

    A partial line ending in a carriage return (a progress line redrawn in
    place) is written on at once, so progress stays live.
    """
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    console = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def relay():
        pending = b""
        while chunk := os.read(read_end, 1 << 16):  # Until every writer (children too) has closed.
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if keep(line.decode(errors="replace")):
                    os.write(console, line + b"\n")
            if b"\r" in pending:
                cut = pending.rindex(b"\r") + 1
                os.write(console, pending[:cut])
                pending = pending[cut:]
        if pending and keep(pending.decode(errors="replace")):
            os.write(console, pending)
        os.close(read_end)

    thread = threading.Thread(target=relay, name="stderr-relay", daemon=True)
    thread.start()
    _RELAYS.append((console, thread))
    try:
        yield
    finally:
        _RELAYS.remove((console, thread))
        sys.stderr.flush()
        os.dup2(console, 2)  # Back to the console; children's copies of the pipe close as they exit.
        thread.join(join_s)
        if not thread.is_alive():  # Otherwise still relaying a child that is finishing.
            os.close(console)


_RELAYS: list[tuple[int, threading.Thread]] = []  # (the console's descriptor, the relay) of each open relay_stderr.


def drain(join_s: float = 5.0) -> None:
    """File descriptor 2 back on the console, and what the relays hold written out: for a thread about to
    end the process with `os._exit`, which would lose both (no `finally` runs)."""
    sys.stderr.flush()
    for console, thread in reversed(list(_RELAYS)):
        os.dup2(console, 2)
        thread.join(join_s)


@contextlib.contextmanager
def quiet_start(verbose: bool) -> Iterator[None]:
    """The block's noise dropped (`NOISE`), or with `verbose` every line kept and the held records logged.

    A block that ends the process with a non-zero status (the tool's one-line
    error, already written) leaves nothing after that line on the console.

    Also TensorFlow's C++ INFO level off before TensorFlow is imported (unless
    the user set TF_CPP_MIN_LOG_LEVEL): its lines after start-up are not
    even written.
    """
    release(verbose)
    if verbose:
        yield
        return
    before = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    try:
        with relay_stderr(lambda line: not is_noise(line)):
            yield
    except SystemExit as e:
        if e.code not in (0, None):
            _last_word()
        raise
    finally:
        if before is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)


def _last_word() -> None:
    """Points file descriptor 2 at the null device: the tool has said in one line why it stops, and what
    TensorFlow's threads log while the process winds down (a lost tf.data service dispatcher's failed
    heartbeats, say) would stand after that line."""
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
