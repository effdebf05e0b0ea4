"""The build's output folder: its lock, the build's own staging folder, and swapping the dataset in.

A build holds `<output_dir>/.build.lock` while it writes, builds into
`.staging-<build id>/` (marked with its id), and moves the checked dataset
into the folder only at the end: a failed, killed or out-of-space build
leaves the folder's dataset as it was. Folders left by killed builds are
cleared once their processes are gone; a folder without a build's marker is
the user's and is never touched.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import uuid

from pipelines.runners import BuildError
from pipelines.verify_tfrecords import dataset_files
from tfrecords import fileio, schema

LOCK_FILE = ".build.lock"  # Inside the output folder while a build writes there.
# Every build writes into a folder of its own inside the output folder,
# `.staging-<build id>/`, and moves the dataset out of it only once it is
# complete and checked: a failed or killed build never leaves a partial
# dataset, and the workers of a killed build, which may go on writing for a
# while, write only into their own folder, which no later build uses.
STAGING_PREFIX = ".staging-"
BUILD_DIR = "_build"  # Scratch folder inside the staging folder.
# Marks a folder as made by a build, naming it (JSON: build id, host, pid,
# start time). A build removes only folders whose marker it finds; a folder
# of the same name without one is the user's and is left alone.
MARKER_FILE = ".alexnet-tf-build.json"
# The build's id, set in the driver's environment while it runs, so that the
# local worker processes it starts inherit it: a later build finds the
# workers of a killed one by it (Linux /proc) and waits for them to end
# before removing that build's folder.
BUILD_ENV = "ALEXNET_TF_BUILD"
# How long a build waits for the leftover workers of a killed build to end;
# past it their folder is left in place (named) and the build goes on.
ORPHAN_WAIT_S = 300.0


class BuildLock:
    """Holds `<output_dir>/.build.lock` while a build writes into the folder.

    A second build into the same folder stops, naming the holder (host, pid,
    start time). A lock left by a killed build on this host (its pid is gone)
    is stale: it is reported and taken over. On a local disk the lock is
    created atomically (O_EXCL); on gs:// and other remote stores it is a
    check-then-write, which closes all but a race of a few milliseconds.
    """

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.output_dir = output_dir
        now = time.gmtime()
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", now), "argv": sys.argv[1:],
                   "build": f"{time.strftime('%Y%m%dT%H%M%SZ', now)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"}

    def _holder(self) -> dict | None:
        if not fileio.exists(self.path):
            return None
        try:
            with fileio.open_file(self.path, "rb") as f:
                return json.loads(f.read() or b"{}")
        except FileNotFoundError:  # Released meanwhile.
            return None
        except ValueError:  # Half written: its holder is starting.
            return {}

    def _create(self) -> bool:
        body = json.dumps(self.me).encode()
        if fileio.is_remote(self.path):
            if fileio.exists(self.path):
                return False
            with fileio.open_file(self.path, "wb") as f:
                f.write(body)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
        except BaseException:  # A full disk: no empty lock left to stop every later build.
            os.remove(self.path)
            raise
        return True

    def __enter__(self) -> "BuildLock":
        fileio.makedirs(self.output_dir)
        for _ in range(2):
            if self._create():
                return self
            holder = self._holder() or {}
            if holder and holder.get("host") == self.me["host"] and not alive(holder.get("pid")):
                print(f"build_tfrecords: removing the stale lock of a build that is gone (pid {holder.get('pid')}, "
                      f"started {holder.get('started')})", file=sys.stderr)
                fileio.remove(self.path)
                continue
            raise BuildError(
                f"--output_dir {self.output_dir} is being written by another build (host {holder.get('host', '?')}, "
                f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')}); wait for it to end, or "
                f"remove {self.path} if that build is gone")
        raise BuildError(f"cannot take the lock {self.path}: another build keeps taking it")

    def __exit__(self, *exc) -> None:
        if (self._holder() or {}).get("pid") == self.me["pid"]:
            fileio.remove(self.path)


def alive(pid) -> bool:
    """Whether a process of this host has `pid` (a malformed pid counts as alive: never steal on doubt)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_output(output_dir: str, overwrite: bool) -> list[str]:
    """The files of a dataset already in `output_dir` (refused without --overwrite).

    Nothing is removed here: the new dataset is built in the build's own
    staging folder and replaces the old one only when complete (`swap_in`).
    """
    existing = dataset_files(output_dir, partial=True)
    if existing and not overwrite:
        raise BuildError(
            f"--output_dir {output_dir} already holds a dataset ({len(existing)} files, e.g. "
            f"{existing[0]}); pass --overwrite to replace it whole, or choose another folder"
        )
    return existing


def read_marker(folder: str) -> dict | None:
    """The marker of a folder a build made, or None (no marker, or not one a build wrote)."""
    path = os.path.join(folder, MARKER_FILE)
    try:
        with fileio.open_file(path, "rb") as f:
            marker = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("build"), str) else None


def make_staging(output_dir: str, me: dict) -> str:
    """Creates this build's staging folder, marked with `me`; refuses a folder of that name already there.

    Args:
      output_dir: The build's output folder.
      me: The build's facts (`BuildLock.me`); its id names the folder.

    Returns:
      The staging folder's path.
    """
    path = os.path.join(output_dir, STAGING_PREFIX + me["build"])
    if fileio.exists(path):
        raise BuildError(f"{path} already exists and has no marker of this build; it is left alone: "
                         "remove it, or choose another --output_dir")
    fileio.makedirs(path)
    try:
        with fileio.open_file(os.path.join(path, MARKER_FILE), "wb") as f:
            f.write(json.dumps(me).encode())
    except BaseException:
        fileio.rmtree(path)  # Made just now, by this process: holds at most a part of the marker.
        raise
    return path


def remove_build_folder(folder: str, build: str) -> None:
    """Removes a folder that the build `build` made; refuses one whose marker does not name it.

    Raises:
      BuildError: when the folder's marker is missing or names another build.
    """
    marker = read_marker(folder)
    if marker is None or marker["build"] != build:
        raise BuildError(f"{folder} has no {MARKER_FILE} naming build {build}: not removed, as this build did not "
                         "make it (remove it yourself if it is not yours)")
    fileio.rmtree(folder)


def build_processes(build: str) -> list[int]:
    """Pids of this host's processes that the build `build` started (its local workers).

    Found by `BUILD_ENV` in the environment they were started with (Linux
    /proc; [] where there is none). The driver itself is found by its pid.
    """
    needle = f"{BUILD_ENV}={build}".encode()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # Gone meanwhile, or not ours to read.
            continue
    return sorted(found)


def wait_for_processes(build: str, timeout_s: float, quiet: bool = False) -> list[int]:
    """Waits until no process of the build `build` runs; returns those still running after `timeout_s`.

    Args:
      build: The build's id.
      timeout_s: How long to wait at most.
      quiet: Say nothing about the wait (otherwise one line on stderr).
    """
    deadline = time.monotonic() + timeout_s
    pids = build_processes(build)
    if pids and not quiet:
        print(f"build_tfrecords: waiting for {len(pids)} process(es) of build {build} to end (pids "
              f"{', '.join(map(str, pids[:10]))}; at most {timeout_s:.0f} s)", file=sys.stderr)
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = build_processes(build)
    return pids


def clear_gone_builds(output_dir: str, me: dict) -> None:
    """Removes the staging folders of builds that were killed on this host, once their processes are gone.

    Runs under the lock. Only folders with a build's marker are touched; one of
    a build whose driver still runs, or that ran on another host (whose
    processes cannot be seen from here), is left in place and named.
    """
    for name in sorted(fileio.listdir(output_dir)):
        folder = os.path.join(output_dir, name.rstrip("/"))
        if not name.startswith(STAGING_PREFIX) or not fileio.isdir(folder):
            continue
        marker = read_marker(folder)
        if marker is None or marker["build"] == me["build"]:
            continue  # Not a build's: the user's, left alone.
        build = marker["build"]
        elsewhere = marker.get("host") != me["host"]
        if elsewhere or alive(marker.get("pid")):
            where = f"on host {marker.get('host')}" if elsewhere else "still running"
            print(f"build_tfrecords: note: {folder} belongs to build {build} ({where}, pid {marker.get('pid')}); "
                  "left in place, remove it once that build is gone", file=sys.stderr)
            continue
        left = wait_for_processes(build, ORPHAN_WAIT_S)
        if left:
            print(f"build_tfrecords: note: {len(left)} process(es) of build {build} still run after "
                  f"{ORPHAN_WAIT_S:.0f} s (pids {', '.join(map(str, left[:10]))}); {folder} is left in place",
                  file=sys.stderr)
            continue
        fileio.rmtree(folder)
        print(f"build_tfrecords: removed {folder}, left by build {build} (pid {marker.get('pid')}, started "
              f"{marker.get('started')}), which is gone", file=sys.stderr)


def swap_in(staging: str, output_dir: str, existing: list[str], build: str) -> None:
    """Replaces the old dataset in `output_dir` with the complete one in `staging`, then removes `staging`.

    The old metadata.json goes first and the new one comes last, so a crash in
    between never leaves a metadata.json that describes files of two builds.
    """
    for name in sorted(existing, key=lambda n: n != schema.METADATA_FILE):
        path = os.path.join(output_dir, name)
        if fileio.isdir(path):
            fileio.rmtree(path)
        else:
            fileio.remove(path)
    for name in sorted(dataset_files(staging), key=lambda n: n == schema.METADATA_FILE):
        fileio.rename(os.path.join(staging, name), os.path.join(output_dir, name))
    remove_build_folder(staging, build)


def disk_full(error: BaseException) -> str | None:
    """"no space left on device" (or "disk quota exceeded") when `error` comes from a full disk, else None.

    Beam hands a worker's error to the driver as text (a RuntimeError naming
    the OSError), so the errno is looked for in the exception chain and in
    the message.
    """
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for code in (errno.ENOSPC, errno.EDQUOT):
            if (isinstance(e, OSError) and e.errno == code) or f"[Errno {code}] {os.strerror(code)}" in str(e):
                return os.strerror(code).lower()
        e = e.__cause__ or e.__context__
    return None

