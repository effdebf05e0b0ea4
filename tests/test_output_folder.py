"""Tests of `pipelines.output_folder`: one build per folder, staging, swapping in, full disks."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tfrecords import integrity, metadata, schema

from tfrecords.folder import Records
from conftest import LOCAL_BEAM, build
from pipelines import build_tfrecords, output_folder, shard_writing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



# ---------------------------------------------------------------------------
# Re-runs and crashes.


def test_existing_output_is_refused_then_replaced_whole(sample, tmp_path):
    build(sample["output_dir"], tmp_path, "--train_shards=2")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(build_tfrecords.BuildError, match="already holds a dataset.*--overwrite"):
        build(sample["output_dir"], tmp_path)
    meta = build(sample["output_dir"], tmp_path, "--train_shards=3", "--overwrite")
    shards = sorted(f for f in os.listdir(tmp_path) if schema.parse_shard_name(f))
    listed = sorted(s.file for info in meta.splits.values() for s in info.shards)
    assert shards == listed and "train-00000-of-00003" in shards  # The 2-shard build is gone.
    assert (tmp_path / "notes.txt").read_text() == "mine"  # Other files are not ours to remove.


def _dataset_files(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_crashed_overwrite_leaves_the_old_dataset_whole(sample, tmp_path, monkeypatch):
    build(sample["output_dir"], tmp_path)
    before = _dataset_files(tmp_path)
    assert schema.METADATA_FILE in before

    def crash(self, element):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(shard_writing.WriteShardFn, "process", crash)
    with pytest.raises(Exception, match="worker lost"):
        build(sample["output_dir"], tmp_path, "--overwrite")
    assert _dataset_files(tmp_path) == before  # Built beside it, never swapped in.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # No staging left.


@pytest.mark.slow
def test_an_overwrite_that_fails_its_checks_leaves_the_old_dataset_whole(sample, tmp_path):
    build(sample["output_dir"], tmp_path)
    before = _dataset_files(tmp_path)
    with pytest.raises(build_tfrecords.BuildError, match="max_reject_fraction"):
        build(sample["output_dir"], tmp_path, "--overwrite", "--image_size=240", "--max_reject_fraction=0.001")
    assert _dataset_files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    # And one that passes replaces it whole.
    meta = build(sample["output_dir"], tmp_path, "--overwrite", "--image_size=240")
    assert metadata.load_metadata(str(tmp_path)) == meta and meta.image.size == 240
    assert Records(str(tmp_path), meta).mean_image.shape == (240, 240, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(output_folder.STAGING_PREFIX)]


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_a_build_leaves_a_users_own_staging_folder_alone(sample, tmp_path):
    (tmp_path / ".staging").mkdir()
    (tmp_path / ".staging" / "notes.txt").write_text("mine")
    build(sample["output_dir"], tmp_path)
    assert (tmp_path / ".staging" / "notes.txt").read_text() == "mine"


def test_an_overwrite_leaves_a_users_own_build_folder_alone(sample, built, tmp_path):
    shutil.copytree(built[0], tmp_path, dirs_exist_ok=True)  # A dataset already there.
    (tmp_path / "_build").mkdir()
    (tmp_path / "_build" / "notes.txt").write_text("mine")
    meta = build(sample["output_dir"], tmp_path, "--overwrite", "--train_shards=2")
    assert (tmp_path / "_build" / "notes.txt").read_text() == "mine"
    assert meta.splits["train"].num_shards == 2 and metadata.load_metadata(str(tmp_path)) == meta


def test_a_folder_without_the_builds_marker_is_never_removed_or_reused(tmp_path, capfd):
    me = output_folder.BuildLock(str(tmp_path)).me
    # Removing: refused, in one line, for a folder without a marker or with another build's.
    folder = tmp_path / (output_folder.STAGING_PREFIX + "x")
    folder.mkdir()
    (folder / "data").write_text("mine")
    with pytest.raises(build_tfrecords.BuildError, match=r"has no .* naming build .*: not removed") as e:
        output_folder.remove_build_folder(str(folder), me["build"])
    assert "\n" not in str(e.value) and (folder / "data").read_text() == "mine"
    (folder / output_folder.MARKER_FILE).write_text(json.dumps({**me, "build": "another"}))
    with pytest.raises(build_tfrecords.BuildError, match="not removed"):
        output_folder.remove_build_folder(str(folder), me["build"])
    assert (folder / "data").read_text() == "mine"
    # Reusing: a folder already at this build's staging path is refused, and kept.
    taken = tmp_path / (output_folder.STAGING_PREFIX + me["build"])
    taken.mkdir()
    (taken / "data").write_text("mine")
    with pytest.raises(build_tfrecords.BuildError, match="already exists and has no marker of this build"):
        output_folder.make_staging(str(tmp_path), me)
    assert (taken / "data").read_text() == "mine" and not (taken / output_folder.MARKER_FILE).exists()
    # The folder a build makes carries its marker, and only that build removes it.
    taken.rename(tmp_path / "kept")
    staging = output_folder.make_staging(str(tmp_path), me)
    assert json.loads(open(os.path.join(staging, output_folder.MARKER_FILE)).read()) == me
    output_folder.remove_build_folder(staging, me["build"])
    assert not os.path.exists(staging)


def test_only_marked_folders_of_builds_that_are_gone_are_cleared(tmp_path, capfd):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    me = output_folder.BuildLock(str(tmp_path)).me

    def folder(name, marker):
        path = tmp_path / (output_folder.STAGING_PREFIX + name)
        path.mkdir()
        (path / "train-00000-of-00001").write_text("x")
        if marker:
            (path / output_folder.MARKER_FILE).write_text(json.dumps({**me, **marker}))
        return path

    dead = folder("dead", {"build": "dead", "pid": gone.pid})
    unmarked = folder("unmarked", None)
    running = folder("running", {"build": "running", "pid": os.getpid()})
    remote = folder("remote", {"build": "remote", "pid": gone.pid, "host": "elsewhere"})
    output_folder.clear_gone_builds(str(tmp_path), me)
    assert not dead.exists()
    assert unmarked.exists() and running.exists() and remote.exists()
    err = capfd.readouterr().err
    assert f"removed {dead}, left by build dead (pid {gone.pid}" in err
    assert f"{running} belongs to build running (still running" in err and "elsewhere" in err


def _disk_full_after(monkeypatch, nbytes):
    """Writes of shard bytes fail with ENOSPC once `nbytes` have been written (in-process workers)."""
    written = [0]
    real = integrity.DigestingWriter.write

    def write(self, data):
        written[0] += len(data)
        if written[0] > nbytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(integrity.DigestingWriter, "write", write)


def test_a_full_disk_stops_with_one_line_and_leaves_the_earlier_dataset_whole(sample, tmp_path, monkeypatch,
                                                                               capsys):
    out = tmp_path / "out"
    build(sample["output_dir"], out)
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    _disk_full_after(monkeypatch, 1_000_000)
    loggers = [logging.getLogger(n) for n in ("apache_beam", *build_tfrecords.BUNDLE_ERROR_LOGGERS)]
    levels = [x.level for x in loggers]
    try:
        with pytest.raises(SystemExit) as e:
            build_tfrecords.main(["--imagenet_dir", sample["output_dir"], "--output_dir", str(out), "--overwrite",
                                  "--train_shards=2", *LOCAL_BEAM])
    finally:  # main() sets them for the command line.
        for x, level in zip(loggers, levels):
            x.setLevel(level)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"build_tfrecords: error: no space left on device in --output_dir {out}: the build stopped and removed what "
        "it had written; the dataset already there is intact; free some space (or choose another --output_dir) "
        "and run it again")
    assert "Traceback" not in err and err.lower().count("no space left") == 1
    assert _tree(out) == before  # The old dataset, byte for byte; no staging, no partial shard.


def test_a_full_disk_on_a_first_build_leaves_nothing_behind(sample, tmp_path, monkeypatch):
    _disk_full_after(monkeypatch, 1_000_000)
    (tmp_path / "kept").mkdir()
    with pytest.raises(build_tfrecords.BuildError, match=r"^no space left on device in --output_dir .*/kept: "):
        build(sample["output_dir"], tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []  # A folder that was there stays, empty.
    with pytest.raises(build_tfrecords.BuildError, match="no space left on device"):
        build(sample["output_dir"], tmp_path / "new")
    assert not (tmp_path / "new").exists()  # One the build made goes.
    monkeypatch.undo()
    build(sample["output_dir"], tmp_path / "kept")  # The next build is not refused.


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("workers", [LOCAL_BEAM, ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]],
                         ids=["in-process", "worker-processes"])
@pytest.mark.slow
def test_a_really_full_disk_is_one_line_and_exit_1(sample, small_disk, workers):
    out = small_disk / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", sample["output_dir"],
         "--output_dir", str(out), *workers], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"build_tfrecords: error: no space left on device in --output_dir {out}: the build stopped and removed")
    assert "Traceback" not in proc.stderr and proc.stderr.lower().count("no space left") == 1
    assert list(small_disk.iterdir()) == []


# ---------------------------------------------------------------------------
# One build per folder: the lock.


def _build_cli(src, out, *flags, stderr_to=None):
    return subprocess.Popen([sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", str(src),
                             "--output_dir", str(out), *flags, *LOCAL_BEAM], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=stderr_to, text=True)


@pytest.mark.slow
def test_two_builds_into_one_folder_one_refuses_naming_the_other(sample, tmp_path):
    out = tmp_path / "out"
    logs = [open(tmp_path / f"build{i}.log", "w+") for i in range(2)]
    first = _build_cli(sample["output_dir"], out, stderr_to=logs[0])
    time.sleep(0.5)
    second = _build_cli(sample["output_dir"], out, "--image_size=240", stderr_to=logs[1])
    codes = [first.wait(300), second.wait(300)]
    text = [open(log.name).read() for log in logs]
    assert sorted(codes) == [0, 1], text
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert "is being written by another build (host " in text[loser].strip().splitlines()[-1]
    meta = metadata.load_metadata(str(out))
    size = 256 if winner == 0 else 240  # One dataset, the winner's, whole.
    assert meta.image.size == size and Records(str(out), meta).mean_image.shape == (size, size, 3)
    assert not (out / output_folder.LOCK_FILE).exists()
    check = subprocess.run([sys.executable, "-m", "pipelines.verify_tfrecords", "--data_dir", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-2000:]


def test_a_held_lock_stops_a_build_before_it_writes(sample, tmp_path):
    out = tmp_path / "out"
    with output_folder.BuildLock(str(out)):  # This process holds it, alive.
        with pytest.raises(build_tfrecords.BuildError, match=rf"pid {os.getpid()}, started .*remove .*\.build\.lock"):
            build(sample["output_dir"], out)
        assert sorted(p.name for p in out.iterdir()) == [output_folder.LOCK_FILE]
    assert list(out.iterdir()) == []  # Released on exit.


def test_a_stale_lock_of_a_killed_build_is_taken_over(sample, tmp_path, capfd):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # A pid that no longer runs.
    out = tmp_path / "out"
    out.mkdir()
    (out / output_folder.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                                             "started": "2026-01-01T00:00:00Z"}))
    meta = build(sample["output_dir"], out)
    assert meta.splits["train"].num_examples > 0
    assert f"removing the stale lock of a build that is gone (pid {gone.pid}" in capfd.readouterr().err
    assert not (out / output_folder.LOCK_FILE).exists()


def test_the_lock_is_released_when_a_build_fails(sample, tmp_path):
    with pytest.raises(build_tfrecords.BuildError, match="max_reject_fraction"):
        build(sample["output_dir"], tmp_path / "out", "--max_reject_fraction=0.001")
    assert not (tmp_path / "out" / output_folder.LOCK_FILE).exists()


def _poll(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # A multi-process build killed mid-write, then another: about a minute on 2 cores.
def test_a_build_killed_mid_write_cannot_touch_the_build_that_takes_over(sample, tmp_path):
    out = tmp_path / "out"
    log = open(tmp_path / "killed.log", "w+")
    killed = subprocess.Popen([sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir",
                               sample["output_dir"], "--output_dir", str(out), "--train_shards=3",
                               "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    # Killed (the driver alone, as the OOM killer or a lost session does) once its workers write shards.
    _poll(lambda: any(".tmp-" in p.name or schema.parse_shard_name(p.name) for p in out.rglob("*")), 240,
          "the first shard")
    lock = json.loads((out / output_folder.LOCK_FILE).read_text())
    killed.kill()
    killed.wait()
    orphans = output_folder.build_processes(lock["build"])
    # Taken over at once, and without --overwrite: what the killed build wrote is no dataset of the folder's.
    meta = build(sample["output_dir"], out, "--train_shards=2")
    # The old build's workers are gone before its folder is removed, and they wrote nothing outside it.
    assert output_folder.build_processes(lock["build"]) == []
    time.sleep(1)
    listed = {s.file for info in meta.splits.values() for s in info.shards}
    assert sorted(p.name for p in out.iterdir()) == sorted(listed | {schema.METADATA_FILE, schema.MEAN_IMAGE_FILE})
    assert metadata.load_metadata(str(out)) == meta and meta.splits["train"].num_shards == 2
    check = subprocess.run([sys.executable, "-m", "pipelines.verify_tfrecords", "--data_dir", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, (orphans, check.stderr[-2000:], open(log.name).read()[-2000:])


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="processes are found through /proc")
def test_the_folder_of_a_killed_build_is_removed_only_once_its_workers_are_gone(tmp_path, capfd):
    me = output_folder.BuildLock(str(tmp_path)).me
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # The killed build's driver.
    old = tmp_path / (output_folder.STAGING_PREFIX + "old")
    old.mkdir()
    (old / output_folder.MARKER_FILE).write_text(json.dumps({**me, "build": "old", "pid": gone.pid}))
    # One of its workers, still writing into its folder for a while after the driver died.
    worker = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\nfor i in range(10):\n    time.sleep(0.15)\n"
         "    os.makedirs(sys.argv[1], exist_ok=True)\n    open(os.path.join(sys.argv[1], f'part-{i}'), 'w').close()",
         str(old / "_build")], env={**os.environ, output_folder.BUILD_ENV: "old"})
    try:
        _poll(lambda: output_folder.build_processes("old") == [worker.pid], 10, "the worker to start")
        output_folder.clear_gone_builds(str(tmp_path), me)
        assert worker.poll() is not None  # Waited for it...
        time.sleep(0.3)
        assert not old.exists()  # ...so nothing of the old build comes back.
    finally:
        worker.kill()
    err = capfd.readouterr().err
    assert f"waiting for 1 process(es) of build old to end (pids {worker.pid}; at most 300 s)" in err
    assert f"removed {old}, left by build old" in err


def test_a_disk_full_before_the_pipeline_leaves_no_lock_and_no_folder(sample, tmp_path, monkeypatch):
    real = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.f = real(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", Full)  # The lock's body does not fit.
    with pytest.raises(build_tfrecords.BuildError, match=r"^no space left on device in --output_dir .*/out: the "
                       "build stopped before writing any records"):
        build(sample["output_dir"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert build(sample["output_dir"], tmp_path / "out").splits["train"].num_examples > 0  # Not locked out.
