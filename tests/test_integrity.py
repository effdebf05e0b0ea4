"""Shard integrity: a shard's digests, a mismatch named by its kind, a damaged record found from its offset."""

import dataclasses
import hashlib
import io

from tfrecords import framing, integrity
from tfrecords.metadata import ShardInfo


def _shard(tmp_path, name, payloads):
    f = io.BytesIO()
    for p in payloads:
        framing.write_record(f, p)
    (tmp_path / name).write_bytes(f.getvalue())
    return str(tmp_path / name), f.getvalue()


def test_a_digest_fed_in_pieces_is_the_files_and_its_heads(tmp_path):
    path, data = _shard(tmp_path, "train-00000-of-00001", [bytes(range(256)) * 300, b"x"])
    d = integrity.ShardDigest()
    for i in range(0, len(data), 1000):
        d.update(data[i:i + 1000])
    assert d.info() == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "head_sha256": hashlib.sha256(data[:integrity.HEAD_BYTES]).hexdigest()}
    assert integrity.file_digest(path).info() == d.info()
    assert integrity.file_digest(path, head_only=True).info()["head_sha256"] == d.info()["head_sha256"]


def test_each_kind_of_mismatch_is_named(tmp_path):
    path, data = _shard(tmp_path, "train-00000-of-00002", [b"a" * 100, b"b" * 100])
    other, _ = _shard(tmp_path, "train-00001-of-00002", [b"c" * 100])
    mine = ShardInfo("train-00000-of-00002", 2, **integrity.file_digest(path).info())
    theirs = ShardInfo("train-00001-of-00002", 1, **integrity.file_digest(other).info())
    heads = {mine.head_sha256: mine.file, theirs.head_sha256: theirs.file}
    assert integrity.shard_mismatch(mine, integrity.file_digest(path), heads, full=True) is None
    assert integrity.shard_mismatch(mine, integrity.file_digest(other), heads) == (
        "train-00000-of-00002 holds the bytes of train-00001-of-00002 (swapped or copied)")
    longer = dataclasses.replace(mine, bytes=mine.bytes + 1)
    assert integrity.shard_mismatch(longer, integrity.file_digest(path), heads) == (
        f"train-00000-of-00002 is {len(data):,} bytes, the build wrote {len(data) + 1:,} (truncated or appended to)")
    assert "is not the file this build wrote" in integrity.shard_mismatch(mine, integrity.file_digest(other), {})


def test_a_damaged_record_is_found_at_the_offset_tensorflow_names(tmp_path):
    path, data = _shard(tmp_path, "validation-00000-of-00001", [b"a" * 50, b"b" * 50, b"c" * 50])
    assert not any(integrity.damaged_at(path, at) for at in (0, 66, 78, 144))  # Sound records.
    bad = bytearray(data)
    bad[66 + 12 + 3] ^= 1  # The second record's data (record at 66, data at 78).
    (tmp_path / "validation-00000-of-00001").write_bytes(bytes(bad))
    assert integrity.damaged_at(path, 78) and not integrity.damaged_at(path, 66) and not integrity.damaged_at(path, 144)
