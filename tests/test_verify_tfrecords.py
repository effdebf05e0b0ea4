"""`python -m pipelines.verify_tfrecords` finds each kind of damage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from alexnet_tf import records
from pipelines import verify_tfrecords

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def copy(built, tmp_path):
    """A writable copy of the built records and its metadata."""
    out, meta = built
    dst = tmp_path / "records"
    shutil.copytree(out, dst)
    return dst, meta


def _raw(dst):
    """metadata.json as parsed JSON, to damage on disk."""
    return json.loads((dst / records.METADATA_FILE).read_text())


def _save(dst, raw):
    (dst / records.METADATA_FILE).write_text(json.dumps(raw))


def _rewrite_first_record(path, **changes):
    raw = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    ex = tf.train.Example.FromString(raw[0])
    for key, value in changes.items():
        feature = ex.features.feature[key]
        if isinstance(value, int):
            feature.int64_list.value[:] = [value]
        else:
            feature.bytes_list.value[:] = [value]
    raw[0] = ex.SerializeToString()
    with tf.io.TFRecordWriter(str(path)) as w:
        for r in raw:
            w.write(r)


def test_clean_build_verifies(built):
    out, _ = built
    assert verify_tfrecords.verify(out, progress=False) == []


def test_missing_shard(copy):
    dst, meta = copy
    name = meta.splits["train"].shards[0].file
    os.remove(dst / name)
    assert verify_tfrecords.verify(str(dst), progress=False) == [f"{name}: listed in metadata.json but missing"]


def test_count_mismatch(copy):
    dst, _ = copy
    raw = _raw(dst)
    shard = raw["splits"]["validation"]["shards"][0]
    shard["num_examples"] += 1
    raw["splits"]["validation"]["num_examples"] += 1
    _save(dst, raw)
    problems = verify_tfrecords.verify(str(dst), progress=False)
    assert problems == [
        f"{shard['file']}: holds {shard['num_examples'] - 1} records, metadata.json says {shard['num_examples']}"
    ]


def test_label_out_of_range_and_wrong_synset(copy):
    dst, meta = copy
    first, second = meta.splits["train"].shards[:2]
    _rewrite_first_record(dst / first.file, **{records.LABEL: 10})
    _rewrite_first_record(dst / second.file, **{records.SYNSET: b"n00000001"})
    problems = verify_tfrecords.verify(str(dst), progress=False)
    assert len(problems) == 2
    assert any("label 10 outside 0..9" in p for p in problems)
    assert any("but the record says n00000001" in p for p in problems)


def test_undecodable_image(copy):
    dst, meta = copy
    name = meta.splits["train"].shards[0].file
    _rewrite_first_record(dst / name, **{records.ENCODED: b"\xff\xd8 not really a jpeg"})
    (problem,) = verify_tfrecords.verify(str(dst), progress=False)
    assert problem.startswith(f"{name} record 0") and "does not decode as JPEG" in problem


def test_unlisted_shard_and_missing_metadata(copy):
    dst, meta = copy
    (dst / "train-00000-of-00099").write_bytes(b"")
    assert verify_tfrecords.verify(str(dst), progress=False) == [
        "train-00000-of-00099: shard file not listed in metadata.json (left from another build?)"
    ]
    os.remove(dst / records.METADATA_FILE)
    (problem,) = verify_tfrecords.verify(str(dst), progress=False)
    assert "metadata.json not found" in problem


def test_malformed_metadata_is_one_problem(copy):
    dst, _ = copy
    raw = _raw(dst)
    del raw["splits"]["train"]["shards"][0]["file"]
    _save(dst, raw)
    assert verify_tfrecords.verify(str(dst), progress=False) == [
        f"{dst / records.METADATA_FILE}: splits.train.shards[0].file is missing"
    ]


def test_missing_mean_image_entry(copy):
    dst, _ = copy
    raw = _raw(dst)
    del raw["color_stats"]["mean_image_file"]
    _save(dst, raw)
    problems = verify_tfrecords.verify(str(dst), progress=False)
    assert problems == ["metadata.json: color_stats has no mean_image_file"]
    raw["color_stats"] = {}
    _save(dst, raw)
    assert verify_tfrecords.verify(str(dst), progress=False) == [
        "metadata.json: color_stats is empty though there is a training split"
    ]


def test_cli_exit_codes(copy):
    dst, meta = copy
    cmd = [sys.executable, "-m", "pipelines.verify_tfrecords", "--data_dir", str(dst)]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith(f"verify_tfrecords: OK {dst}")
    os.remove(dst / meta.splits["validation"].shards[0].file)
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "verify_tfrecords: error: validation-00000-of-00001: listed in metadata.json but missing" in bad.stderr
