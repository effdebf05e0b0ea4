"""Tests of `pipelines.build_report`: the checks on the summary, metadata.json and the build's report."""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from tfrecords import metadata, schema

from tfrecords.folder import Records
from conftest import build, read_split, tar_members
from pipelines import build_tfrecords, image_processing


def _quirk_basename(quirk):
    return quirk.split("/")[-1]


def test_every_input_is_written_or_rejected(built, sample):
    out, meta = built
    assert meta.splits["train"].num_read == sample["num_train"]
    assert meta.splits["validation"].num_read == sample["num_val"]
    for split, info in meta.splits.items():
        rows = read_split(out, meta, split)
        assert len(rows) == info.num_examples
        assert info.num_read == info.num_examples + info.num_rejected
        assert [s.num_examples for s in info.shards] == [
            collections.Counter(r["shard"] for r in rows)[s.file] for s in info.shards
        ]
    # The one truncated JPEG is the one rejection, with its reason.
    assert len(meta.rejected) == 1
    rejected = meta.rejected[0]
    assert rejected.split == "train"
    assert rejected.file.endswith(_quirk_basename(sample["quirks"]["truncated"]))
    assert "truncated" in rejected.reason




def _raw_train_images(sample):
    """{file name: bytes} of every image in the sample's training archive."""
    images = {}
    for data in tar_members(sample["train_tar"]).values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            images.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
    return images


def test_color_stats_match_numpy_over_the_stored_pixels(built, sample):
    out, meta = built
    rows = read_split(out, meta, "train")
    raw = _raw_train_images(sample)
    # The statistics take each stored image's pixels before JPEG encoding.
    pixels_of = [image_processing.process_image(raw[r["filename"]]).pixels for r in rows]
    pixels = np.concatenate([p.reshape(-1, 3) for p in pixels_of]).astype(np.float64)
    stats = meta.color_stats
    assert stats.num_images == len(rows) and stats.num_pixels == len(pixels)
    np.testing.assert_allclose(stats.mean_rgb, pixels.mean(axis=0), rtol=1e-12)
    cov = np.cov(pixels, rowvar=False, bias=True)
    np.testing.assert_allclose(stats.covariance, cov, rtol=1e-10)
    values, vectors = np.linalg.eigh(cov)
    np.testing.assert_allclose(stats.eigenvalues, values[::-1], rtol=1e-9)
    got = np.array(stats.eigenvectors)
    # Columns are eigenvectors: cov @ v = lambda v, unit length.
    np.testing.assert_allclose(cov @ got, got * np.array(stats.eigenvalues), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=0), 1.0, rtol=1e-12)
    assert list(stats.eigenvalues) == sorted(stats.eigenvalues, reverse=True)
    mean_image = Records(out, meta).mean_image
    assert mean_image.shape == (256, 256, 3) and mean_image.dtype == np.float32
    np.testing.assert_allclose(mean_image, np.mean(pixels_of, axis=0), rtol=1e-6, atol=1e-4)
    # And the images as stored (decoded JPEGs) agree up to JPEG noise.
    stored = np.concatenate([np.asarray(Image.open(io.BytesIO(r["jpeg"])).convert("RGB")).reshape(-1, 3)
                             for r in rows]).astype(np.float64)
    np.testing.assert_allclose(stats.mean_rgb, stored.mean(axis=0), atol=1.0)
    # JPEG's chroma subsampling softens the sample's sharp colour textures: the
    # covariance of the stored images differs by a few percent (natural photos: less).
    stored_cov = np.cov(stored, rowvar=False, bias=True)
    assert np.linalg.norm(np.array(stats.covariance) - stored_cov) < 0.05 * np.linalg.norm(stored_cov)


def _encoded(h, w, fmt="JPEG", value=128):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _tiny_imagenet(root, files: dict) -> str:
    """Extracted folders with one class (tench) holding `files` (name -> bytes), no validation set."""
    folder = root / "imagenet" / "train" / "n01440764"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return str(root / "imagenet")


def test_formats_serving_does_not_decode_are_counted_rejects(tmp_path):
    formats = ["JPEG", "WEBP", "TIFF", "PNG"]  # Content, whatever the name says.
    src = _tiny_imagenet(tmp_path, {f"n01440764_{i}.JPEG": _encoded(300, 300, f) for i, f in enumerate(formats, 1)})
    meta = build(src, tmp_path / "out", "--max_reject_fraction=1")
    train = meta.splits["train"]
    assert (train.num_read, train.num_examples, train.num_rejected) == (4, 2, 2)
    assert [(os.path.basename(r.file), r.reason) for r in meta.rejected] == [
        ("n01440764_2.JPEG", "WEBP is not one of the formats serving decodes: JPEG, PNG, GIF, BMP"),
        ("n01440764_3.JPEG", "TIFF is not one of the formats serving decodes: JPEG, PNG, GIF, BMP"),
    ]


def test_upscaled_images_are_counted_in_metadata_and_the_report(tmp_path, capsys):
    sizes = {"n01440764_1.JPEG": (1, 1), "n01440764_2.JPEG": (100, 180), "n01440764_3.JPEG": (300, 400),
             "n01440764_4.JPEG": (256, 256)}
    src = _tiny_imagenet(tmp_path, {name: _encoded(h, w, "PNG") for name, (h, w) in sizes.items()})
    meta = build(src, tmp_path / "out")
    assert meta.splits["train"].num_upscaled == 2 and meta.splits["train"].num_examples == 4
    raw = json.loads((tmp_path / "out" / schema.METADATA_FILE).read_text())
    assert raw["splits"]["train"]["num_upscaled"] == 2
    assert metadata.load_metadata(str(tmp_path / "out")) == meta
    assert "train: 2 of the 4 images scaled up (shorter side below 256)" in capsys.readouterr().err
    # Metadata of builds that did not count still reads (None), and writes back as it was.
    del raw["splits"]["train"]["num_upscaled"]
    old = metadata.Metadata.from_json(raw)
    assert old.splits["train"].num_upscaled is None and old.to_json() == raw
    meta = build(src, tmp_path / "kept", "--noresize")
    assert meta.splits["train"].num_upscaled == 0


def test_too_many_rejections_fail_without_metadata(sample, tmp_path):
    with pytest.raises(build_tfrecords.BuildError, match=r"1 of 160 inputs rejected .*max_reject_fraction=0.001"):
        build(sample["output_dir"], tmp_path, "--max_reject_fraction=0.001")
    assert not (tmp_path / schema.METADATA_FILE).exists()




def test_metadata_json_round_trips_through_the_reader(built):
    out, meta = built
    assert metadata.load_metadata(out) == meta
    raw = json.loads(open(os.path.join(out, schema.METADATA_FILE)).read())
    assert meta.to_json() == raw
