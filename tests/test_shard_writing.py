"""Tests of `pipelines.shard_writing`: shards written in key order, with their rejections and pixel sums."""

from __future__ import annotations

import hashlib
import os
import socket

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from conftest import blocky_image as _image, encode_array as _encode
from pipelines import shard_writing
from pipelines.members import Member
from pipelines.transforms import BuildConfig
from tfrecords import integrity, schema


CONFIG = BuildConfig(classes=("n01440764", "n01443537"), names=("tench", "goldfish"), seed=0, progress=False)


def test_write_shards_writes_in_key_order_and_tags_rejections_and_sums(tmp_path):
    good = _encode(_image(300, 400))
    files = {
        "a.JPEG": good,
        "b.JPEG": _encode(_image(300, 300, seed=1), "PNG"),
        "c.JPEG": good[: len(good) // 2],
        "d.JPEG": _encode(_image(200, 300, seed=2), mode="CMYK"),  # Scaled up: counted in the shard's info.
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    synsets = {"a.JPEG": "n01440764", "b.JPEG": "n01443537", "c.JPEG": "n01443537",
               "d.JPEG": "n01443537", "e.JPEG": "n01440764"}
    keys = {"a.JPEG": 40, "b.JPEG": 10, "c.JPEG": 30, "d.JPEG": 20, "e.JPEG": 5}
    items = [(keys[n], Member(f"train/{n}", synsets[n], str(tmp_path / n))) for n in keys]  # e.JPEG is missing.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with BeamTestPipeline() as p:
        out = (
            p
            | beam.Create([(("train", 1, 3), items)])
            | shard_writing.WriteShards(CONFIG, str(out_dir))
        )
        assert_that(out["shards"], _shard_written(out_dir), label="shards")
        assert_that(out["rejected"] | beam.Map(lambda r: (r["file"], r["reason"].split(":")[0])), equal_to([
            ("train/c.JPEG", "corrupt or truncated JPEG"), ("train/e.JPEG", "unreadable"),
        ]), label="rejected")
        assert_that(out["sums"] | beam.Map(lambda m: (m.num_images, m.num_pixels)),
                    equal_to([(3, 3 * 256 * 256)]), label="sums")
    rows = [schema.parse_example(r) for r in tf_records(out_dir / "train-00001-of-00003")]
    # Key order: b (10), d (20), a (40).
    assert [r[schema.FILENAME].numpy().decode() for r in rows] == ["b.JPEG", "d.JPEG", "a.JPEG"]
    assert [int(r[schema.LABEL]) for r in rows] == [1, 1, 0]
    assert sorted(os.listdir(out_dir)) == ["train-00001-of-00003"]  # No temporary file left.


def _shard_written(out_dir):
    """A matcher: the one shard's info, its size and digests those of the file written."""
    def match(actual):
        (info,) = actual
        data = (out_dir / info["file"]).read_bytes()
        assert info.pop("worker") == f"{socket.gethostname()}:{os.getpid()}"  # The in-process test runner.
        assert info == {"split": "train", "index": 1, "num_shards": 3, "file": "train-00001-of-00003",
                        "num_examples": 3, "num_upscaled": 1, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "head_sha256": hashlib.sha256(data[:integrity.HEAD_BYTES]).hexdigest()}
    return match


def tf_records(path):
    import tensorflow as tf

    return list(tf.data.TFRecordDataset(str(path)))


def test_progress_lines_show_count_and_rate(capsys):
    progress = shard_writing._Progress(enabled=True, every_s=0.0)
    progress.tick(False)
    progress.tick(True)
    err = capsys.readouterr().err
    assert "2 images (" in err and "images/s), 1 rejected" in err
