"""Tests for pipelines/sample_folder.py: claiming a folder, its JSON files, its lock."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # Lets plain `pytest` import the package too.
    sys.path.insert(0, str(REPO))

from pipelines import imagenet_layout, sample_folder  # noqa: E402
from tfrecords import fileio  # noqa: E402


def test_claim_marks_the_folder_ours_and_the_sample_incomplete(tmp_path):
    out = tmp_path / "new" / "sample"
    sample_folder.claim(out)
    assert (out / sample_folder.OWNER).is_file()
    (out / sample_folder.MARKER).write_text("{}")
    (out / imagenet_layout.TRAIN_TAR).write_bytes(b"ours")
    sample_folder.claim(out)  # Ours: may be written again ...
    assert not (out / sample_folder.MARKER).exists()  # ... and is incomplete until then.


def test_claim_refuses_imagenet_files_it_did_not_write(tmp_path):
    (tmp_path / imagenet_layout.VAL_TAR).write_bytes(b"theirs")
    with pytest.raises(FileExistsError, match="not written by make_sample"):
        sample_folder.claim(tmp_path)
    assert not (tmp_path / sample_folder.OWNER).exists()


def test_json_round_trip_and_unreadable_is_none(tmp_path):
    path = tmp_path / sample_folder.MANIFEST
    fileio.write_json_atomically(str(path), {"b": 1, "a": [2]})  # How make_sample writes it.
    assert path.read_text() == '{\n "b": 1,\n "a": [\n  2\n ]\n}\n'  # The contract's JSON writer: keys kept in order.
    assert sample_folder.read_json(path) == {"a": [2], "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # No temporary file left.
    path.write_text("{not json")
    assert sample_folder.read_json(path) is None
    assert sample_folder.read_json(tmp_path / "missing") is None


def test_dir_lock_lets_one_builder_in_at_a_time(tmp_path):
    inside, overlaps = [], []

    def build():
        with sample_folder.dir_lock(tmp_path):
            overlaps.append(len(inside))
            inside.append(1)
            threading.Event().wait(0.05)
            inside.pop()

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [0, 0, 0]
