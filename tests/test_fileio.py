"""File access for both sides of the contract: atomic JSON writes and the kernel's file lock."""

import json
import os
import subprocess
import sys

import pytest

from tfrecords import fileio

HOLD = ("import sys, time\nfrom tfrecords import fileio\nwith fileio.held_lock(sys.argv[1]) as f:\n"
        "    print('held', flush=True)\n    time.sleep(60)\n")


def test_write_json_atomically_leaves_the_whole_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "x.json")
    fileio.write_json_atomically(path, {"a": [1, 2], "b": "c"})
    fileio.write_json_atomically(path, {"a": 3})
    with open(path) as f:
        assert f.read() == json.dumps({"a": 3}, indent=1) + "\n"
    assert os.listdir(tmp_path) == ["x.json"]


def test_a_held_lock_refuses_a_second_holder_until_the_first_is_killed(tmp_path):
    lock = str(tmp_path / ".lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BlockingIOError):
            with fileio.held_lock(lock, wait=False):
                pass
    finally:
        holder.kill()  # As kill -9: the kernel releases the lock with its holder.
        holder.wait()
    with fileio.held_lock(lock, wait=False) as f:
        f.write("me\n")
    with fileio.held_lock(lock) as f:  # Released on leaving; the holder's words stay readable.
        f.seek(0)
        assert f.read() == "me\n"


def test_fileio_local_paths(tmp_path):
    d = str(tmp_path / "a" / "b")
    fileio.makedirs(d)
    fileio.makedirs(d)  # Exists already: fine.
    with fileio.open_file(f"{d}/x", "w") as f:
        f.write("one")
    with fileio.open_file(f"{d}/y", "w") as f:
        f.write("two")
    fileio.rename(f"{d}/y", f"{d}/x")  # Replaces.
    assert fileio.listdir(d) == ["x"] and open(f"{d}/x").read() == "two"
    assert fileio.isdir(d) and not fileio.isdir(f"{d}/x") and fileio.exists(f"{d}/x")
    fileio.rmtree(str(tmp_path / "a"))
    assert not fileio.exists(d)
    assert fileio.is_remote("gs://bucket/x") and not fileio.is_remote("/data/x")
