"""TFRecord framing written and read without TensorFlow: TensorFlow's bytes, every CRC checked."""

import io

import pytest

from tfrecords import framing


def test_write_record_framing_is_tensorflows(tmp_path):
    import tensorflow as tf

    payloads = [b"", b"x", bytes(range(256)) * 40]
    with open(tmp_path / "ours", "wb") as f:
        sizes = [framing.write_record(f, p) for p in payloads]
    with tf.io.TFRecordWriter(str(tmp_path / "theirs")) as w:
        for p in payloads:
            w.write(p)
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
    assert sum(sizes) == (tmp_path / "ours").stat().st_size
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "ours"))] == payloads


def test_read_records_gives_back_what_was_written_and_names_damage_by_offset():
    f = io.BytesIO()
    for p in (b"ab", b"cde"):
        framing.write_record(f, p)
    data = f.getvalue()
    assert list(framing.read_records(io.BytesIO(data), len(data))) == [b"ab", b"cde"]
    bad = bytearray(data)
    bad[18 + 12] ^= 1  # A byte of the second record's data (it starts at 18).
    with pytest.raises(framing.DamagedRecord, match="^corrupted record at 30$"):
        list(framing.read_records(io.BytesIO(bytes(bad)), len(bad)))
    with pytest.raises(framing.DamagedRecord, match="^truncated record at 18$"):
        list(framing.read_records(io.BytesIO(data[:-1]), len(data) - 1))
