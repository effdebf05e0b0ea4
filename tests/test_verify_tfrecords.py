"""`python -m pipelines.verify_tfrecords` finds each kind of damage."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from pipelines import verify_tfrecords
from tfrecords import checked_json, framing, integrity, metadata, schema

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
    return json.loads((dst / schema.METADATA_FILE).read_text())


def _save(dst, raw):
    (dst / schema.METADATA_FILE).write_text(json.dumps(raw))


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
    _rewrite_first_record(dst / first.file, **{schema.LABEL: 10})
    _rewrite_first_record(dst / second.file, **{schema.SYNSET: b"n00000001"})
    problems = verify_tfrecords.verify(str(dst), progress=False)
    assert len(problems) == 4
    assert any("label 10 outside 0..9" in p for p in problems)
    assert any("but the record says n00000001" in p for p in problems)
    for shard in (first, second):  # Rewritten: no longer the build's bytes either.
        assert f"{shard.file} is not the file this build wrote (its first bytes differ" in " ".join(problems)


def test_undecodable_image(copy):
    dst, meta = copy
    name = meta.splits["train"].shards[0].file
    _rewrite_first_record(dst / name, **{schema.ENCODED: b"\xff\xd8 not really a jpeg"})
    digest, problem = verify_tfrecords.verify(str(dst), progress=False)
    assert digest.startswith(f"{name} is not the file this build wrote")
    assert problem.startswith(f"{name} record 0") and "does not decode as JPEG" in problem


def test_unlisted_shard_and_missing_metadata(copy):
    dst, meta = copy
    (dst / "train-00000-of-00099").write_bytes(b"")
    assert verify_tfrecords.verify(str(dst), progress=False) == [
        "train-00000-of-00099: shard file not listed in metadata.json (left from another build?)"
    ]
    os.remove(dst / schema.METADATA_FILE)
    (problem,) = verify_tfrecords.verify(str(dst), progress=False)
    assert "metadata.json not found" in problem


def test_malformed_metadata_is_one_problem(copy):
    dst, _ = copy
    raw = _raw(dst)
    del raw["splits"]["train"]["shards"][0]["file"]
    _save(dst, raw)
    assert verify_tfrecords.verify(str(dst), progress=False) == [
        f"{dst / schema.METADATA_FILE}: splits.train.shards[0].file is missing"
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


@pytest.mark.slow
def test_cli_exit_codes(copy):
    dst, meta = copy
    cmd = [sys.executable, "-m", "pipelines.verify_tfrecords", "--data_dir", str(dst)]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith(f"verify_tfrecords: OK {dst}")
    os.remove(dst / meta.splits["validation"].shards[0].file)
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "verify_tfrecords: error: validation-00000-of-00001: listed in metadata.json but missing" in bad.stderr


# -- the shards' identity (sizes and SHA-256 recorded by the build) ---------------------


def test_the_build_records_every_shards_size_and_digest(built):
    out, meta = built
    for info in meta.splits.values():
        for shard in info.shards:
            path = os.path.join(out, shard.file)
            digest = integrity.file_digest(path).info()
            assert (shard.bytes, shard.sha256, shard.head_sha256) == (
                os.path.getsize(path), digest["sha256"], digest["head_sha256"])


def test_swapped_shards_are_named_by_verify_and_at_the_start_of_training(copy):
    dst, meta = copy
    a, b = (s.file for s in meta.splits["train"].shards[:2])
    os.rename(dst / a, dst / "tmp")
    os.rename(dst / b, dst / a)
    os.rename(dst / "tmp", dst / b)
    problems = verify_tfrecords.verify(str(dst), progress=False)
    assert f"{a} holds the bytes of {b} (swapped or copied)" in problems
    assert f"{b} holds the bytes of {a} (swapped or copied)" in problems
    with pytest.raises(metadata.MetadataError, match=f"{a} holds the bytes of {b}"):
        integrity.check_shards(str(dst), meta)


def test_a_shard_from_another_build_is_named(copy, built):
    dst, meta = copy
    name = meta.splits["train"].shards[0].file
    # The same records in another order: what another build's shard of these images would hold.
    raw = [r.numpy() for r in tf.data.TFRecordDataset(str(dst / name))][::-1]
    with tf.io.TFRecordWriter(str(dst / name)) as w:
        for r in raw:
            w.write(r)
    expected = f"{name} is not the file this build wrote (its first bytes differ: damaged, or from another build)"
    assert verify_tfrecords.verify(str(dst), progress=False) == [expected]
    with pytest.raises(metadata.MetadataError, match="not the ones its metadata.json lists"):
        integrity.check_shards(str(dst), meta)


def test_damage_past_the_first_bytes_is_found_by_verify_not_at_start(copy):
    dst, meta = copy
    shard = max(meta.splits["train"].shards, key=lambda s: s.bytes)
    path = dst / shard.file
    data = bytearray(path.read_bytes())
    assert len(data) > integrity.HEAD_BYTES + 100
    data[-50] ^= 0xFF  # Inside the last image's JPEG bytes.
    path.write_bytes(bytes(data))
    integrity.check_shards(str(dst), meta)  # Size and first bytes unchanged: the cheap check passes.
    problems = verify_tfrecords.verify(str(dst), progress=False)
    assert (f"{shard.file} differs from the file this build wrote after its first {integrity.HEAD_BYTES:,} bytes "
            "(damaged)") in problems
    truncated = bytes(data[:-7])
    path.write_bytes(truncated)
    with pytest.raises(metadata.MetadataError, match=f"{shard.file} is {len(truncated):,} bytes, the build wrote "
                                                    f"{shard.bytes:,} \\(truncated or appended to\\)"):
        integrity.check_shards(str(dst), meta)


def test_metadata_of_an_earlier_version_without_digests_still_verifies(copy, capsys):
    dst, _ = copy
    raw = _raw(dst)
    for split in raw["splits"].values():
        for shard in split["shards"]:
            for key in ("bytes", "sha256", "head_sha256"):
                del shard[key]
    _save(dst, raw)
    assert verify_tfrecords.verify(str(dst), progress=False) == []
    assert "records no shard digests" in capsys.readouterr().err
    integrity.check_shards(str(dst), metadata.load_metadata(str(dst)))


def test_the_shard_holding_a_damaged_record_is_found_from_the_offset_alone(copy):
    dst, meta = copy
    shards = meta.splits["train"].shards
    target = dst / shards[1].file
    raw = [r.numpy() for r in tf.data.TFRecordDataset(str(target))]
    offset = sum(len(r) + 16 for r in raw[:5])  # Where record 5 starts.
    data = bytearray(target.read_bytes())
    data[offset + 12 + 100] ^= 0xFF  # Inside record 5's data: its data CRC fails.
    target.write_bytes(bytes(data))
    at = offset + 12  # TensorFlow names a bad data CRC by where the data start.
    with pytest.raises(tf.errors.DataLossError, match=f"corrupted record at {at}") as caught:
        for _ in tf.data.TFRecordDataset(str(target)):
            pass
    assert integrity.damaged_at(str(target), at)
    assert not integrity.damaged_at(str(target), at + 1)  # Not a record boundary there.
    assert not any(integrity.damaged_at(str(dst / s.file), at) for s in shards if s.file != shards[1].file)
    message = integrity.data_loss_message(caught.value, str(dst), meta)
    assert message.startswith(f"records shard {target} is damaged (corrupted record at {at}")
    # A damaged length field: named by where the record starts.
    data[offset + 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError, match=f"corrupted record at {offset}"):
        for _ in tf.data.TFRecordDataset(str(target)):
            pass
    assert integrity.damaged_at(str(target), offset) and not integrity.damaged_at(str(target), offset + 12)


def _read_all(path, digest=None):
    with open(path, "rb") as f:
        return list(framing.read_records(f, os.path.getsize(path), digest))


def test_one_read_gives_tensorflows_records_and_the_digest_and_names_damage_as_tensorflow_does(copy):
    dst, meta = copy
    shard = meta.splits["train"].shards[1]
    target = dst / shard.file
    digest = integrity.ShardDigest()
    got = _read_all(target, digest)
    assert got == [r.numpy() for r in tf.data.TFRecordDataset(str(target))] and len(got) == shard.num_examples
    assert digest.info() == {"bytes": shard.bytes, "sha256": shard.sha256, "head_sha256": shard.head_sha256}

    offset = sum(len(r) + 16 for r in got[:5])  # Where record 5 starts.
    clean = target.read_bytes()
    for at, flip, message in ((offset + 12 + 100, None, f"corrupted record at {offset + 12}"),  # Its data.
                              (offset + 2, None, f"corrupted record at {offset}"),  # Its length field.
                              (None, len(clean) - 3, f"truncated record at {sum(len(r) + 16 for r in got[:-1])}")):
        data = bytearray(clean)
        if at is not None:
            data[at] ^= 0xFF
        else:
            del data[flip:]
        target.write_bytes(bytes(data))
        with pytest.raises(tf.errors.DataLossError) as tf_error:
            for _ in tf.data.TFRecordDataset(str(target)):
                pass
        if at is not None:  # TensorFlow's words for the same place.
            assert message in tf_error.value.message
        with pytest.raises(framing.DamagedRecord, match=message):
            _read_all(target)
    # A length field claiming more than the file holds (its CRC recomputed to match) is not read.
    data = bytearray(clean)
    huge = (1 << 60).to_bytes(8, "little")
    data[offset:offset + 12] = huge + framing.masked_crc32c(huge).to_bytes(4, "little")
    target.write_bytes(bytes(data))
    with pytest.raises(framing.DamagedRecord, match=f"truncated record at {offset}"):
        _read_all(target)


def test_verify_names_the_damaged_record_and_still_digests_the_rest(copy):
    dst, meta = copy
    shard = meta.splits["train"].shards[1]
    target = dst / shard.file
    got = _read_all(target)
    offset = sum(len(r) + 16 for r in got[:5])
    data = bytearray(target.read_bytes())
    data[offset + 12 + 100] ^= 0xFF
    target.write_bytes(bytes(data))
    problems = verify_tfrecords.verify(str(dst), progress=False)
    assert f"{shard.file}: unreadable after 5 records (corrupted record at {offset + 12})" in problems
    assert f"{shard.file}: holds 5 records, metadata.json says {shard.num_examples}" in problems
    assert any(p.startswith(f"{shard.file} differs from the file this build wrote") for p in problems)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_shard_outside_the_folder_is_refused_by_verify_and_the_readers(copy, tmp_path, where):
    dst, _ = copy
    raw = _raw(dst)
    first = raw["splits"]["train"]["shards"][0]["file"]
    outside = tmp_path / "outside"
    outside.mkdir()
    (dst / first).rename(outside / first)  # The same bytes: only where metadata.json points is wrong.
    raw["splits"]["train"]["shards"][0]["file"] = f"../outside/{first}" if where == "parent" else str(outside / first)
    _save(dst, raw)
    message = "splits.train.shards[0].file must be a shard file name of split train"
    problems = verify_tfrecords.verify(str(dst), progress=False)
    assert len(problems) == 1 and message in problems[0], problems
    with pytest.raises(metadata.MetadataError, match=re.escape(message)):  # What every reader opens a folder with.
        metadata.load_metadata(str(dst))


@pytest.mark.slow
def test_training_on_a_folder_whose_shard_points_outside_it_stops_in_one_line(copy, tmp_path):
    dst, _ = copy
    raw = _raw(dst)
    first = raw["splits"]["train"]["shards"][0]["file"]
    (dst / first).rename(tmp_path / first)
    raw["splits"]["train"]["shards"][0]["file"] = str(tmp_path / first)
    _save(dst, raw)
    proc = subprocess.run([sys.executable, "-m", "alexnet_tf.train", "--preset=sample", f"--data_dir={dst}",
                           f"--model_dir={tmp_path / 'run'}", "--cpu_devices=1"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"train: error: {dst / schema.METADATA_FILE}: splits.train.shards[0].file must be a shard file name of "
        f"split train such as train-00000-of-00001 (a plain name inside the records folder), got "
        f"{checked_json.show(str(tmp_path / first))}")
    assert not (tmp_path / "run").exists()


# -- --same_as: two builds compared (small fake folders, no build) ---------------------


def _fake_dataset(folder, seconds=1.5, created="2026-12-02T10:00:00Z"):
    """A folder shaped like a build's output: two shards, the mean image, metadata.json, a leftover lock."""
    folder.mkdir()
    (folder / "train-00000-of-00002").write_bytes(b"\x01" * 3000)
    (folder / "train-00001-of-00002").write_bytes(b"\x02" * 10)
    (folder / schema.MEAN_IMAGE_FILE).write_bytes(b"\x93NUMPY fake")
    (folder / ".build.lock").write_text(created)  # Not part of the dataset.
    meta = {"created": created, "build": {"seconds": seconds, "runner": "local"},
            "color_stats": {"mean": [0.1, 0.2, 0.3]}, "splits": {"train": {"shards": [{"n": 1}, {"n": 2}]}}}
    (folder / schema.METADATA_FILE).write_text(json.dumps(meta))
    return folder


@pytest.fixture
def two(tmp_path):
    """Two copies of one fake dataset that differ only in the fields builds may differ in."""
    return _fake_dataset(tmp_path / "a"), _fake_dataset(tmp_path / "b", seconds=99.0, created="2027-01-01T00:00:00Z")


def test_same_datasets_compare_equal(two):
    a, b = two
    assert verify_tfrecords.compare(str(a), str(b)) == ([], 4)


def test_a_changed_shard_byte_is_named_with_its_offset(two):
    a, b = two
    data = bytearray((b / "train-00000-of-00002").read_bytes())
    data[2049] ^= 1
    (b / "train-00000-of-00002").write_bytes(bytes(data))
    (b / "train-00001-of-00002").write_bytes(b"\x02" * 11)  # One byte longer.
    assert verify_tfrecords.compare(str(a), str(b))[0] == [
        "train-00000-of-00002: bytes differ (first at byte 2049)",
        "train-00001-of-00002: bytes differ (one ends at byte 10, the other goes on)",
    ]


def test_metadata_fields_are_named_by_their_json_path(two):
    a, b = two
    meta = json.loads((b / schema.METADATA_FILE).read_text())
    meta["color_stats"]["mean"][1] = 0.20000000000000004  # A last-bit difference is a difference.
    meta["splits"]["train"]["shards"][1]["n"] = 3
    meta["build"]["runner"] = "DaskRunner"
    meta["build"]["workers"] = 2
    (b / schema.METADATA_FILE).write_text(json.dumps(meta))
    assert verify_tfrecords.compare(str(a), str(b))[0] == [
        f"metadata.json: build.runner: \"local\" in {a}, \"DaskRunner\" in {b}",
        f"metadata.json: build.workers: only in {b}",
        f"metadata.json: color_stats.mean[1]: 0.2 in {a}, 0.20000000000000004 in {b}",
        f"metadata.json: splits.train.shards[1].n: 2 in {a}, 3 in {b}",
    ]


def test_missing_and_extra_files_are_named(two):
    a, b = two
    os.remove(a / schema.MEAN_IMAGE_FILE)
    (a / "validation-00000-of-00001").write_bytes(b"x")
    assert verify_tfrecords.compare(str(a), str(b)) == ([
        f"validation-00000-of-00001: in {a} only",
        f"mean_image.npy: missing from {a} (in {b})",
    ], 5)
    assert verify_tfrecords.compare(str(a), str(b / "nothing"))[0] == [f"{b / 'nothing'}: no such folder"]


def test_same_as_cli(two):
    a, b = two
    cmd = [sys.executable, "-m", "pipelines.verify_tfrecords", "--data_dir", str(a), "--same_as", str(b)]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (ok.returncode, ok.stdout) == (0, f"verify_tfrecords: same dataset as {b} (4 files)\n"), ok.stderr
    (b / schema.METADATA_FILE).write_text("{not json")
    os.remove(b / "train-00001-of-00002")
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    lines = bad.stderr.splitlines()
    assert lines[0] == f"verify_tfrecords: error: train-00001-of-00002: in {a} only"
    assert lines[1].startswith(f"verify_tfrecords: error: metadata.json: unreadable in {b} (")
    assert len(lines) == 2


@pytest.mark.slow  # A second build of the sample, on the command line's default runner: about 20 s.
def test_two_builds_of_one_input_are_the_same_dataset(sample, built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", sample["output_dir"],
                    "--output_dir", str(again)], cwd=REPO, check=True, capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "pipelines.verify_tfrecords", "--data_dir", str(again),
                           "--same_as", out], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"verify_tfrecords: same dataset as {out} (")
