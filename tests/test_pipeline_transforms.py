"""Beam transforms and pure functions of the pipeline, tested in isolation."""

from __future__ import annotations

import collections
import dataclasses
import io
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from alexnet_tf import records
from pipelines import build_tfrecords, color_stats, image_processing, imagenet_layout
from pipelines.build_tfrecords import BuildConfig, ListUnitFn, WriteShardFn
from pipelines.imagenet_layout import Member, ReadUnit


def _encode(array, fmt="JPEG", mode=None, **kw):
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w]  # Blocky: survives JPEG.


# -- image_processing ---------------------------------------------------------


def test_shorter_side_scaled_then_central_crop():
    # 300 wide, 600 high: scaled to 256x512, the central 256 rows are kept.
    a = np.zeros((600, 300, 3), np.uint8)
    a[:150] = (255, 0, 0)  # Top quarter red: cropped away.
    a[150:450] = (0, 255, 0)  # Middle half green: exactly the kept part.
    a[450:] = (0, 0, 255)
    out = image_processing.process_image(_encode(a, quality=95))
    assert out.pixels.shape == (256, 256, 3) and (out.height, out.width) == (256, 256)
    mean = out.pixels[8:-8].reshape(-1, 3).mean(axis=0)
    assert mean[1] > 240 and mean[0] < 15 and mean[2] < 15


def test_small_images_are_scaled_up():
    out = image_processing.process_image(_encode(_image(100, 180)))
    assert out.pixels.shape == (256, 256, 3)


@pytest.mark.parametrize(
    "fmt, mode", [("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("BMP", "RGB")]
)
def test_any_decodable_content_becomes_an_rgb_jpeg(fmt, mode):
    out = image_processing.process_image(_encode(_image(200, 300), fmt, mode))
    img = Image.open(io.BytesIO(out.jpeg))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (256, 256))
    assert (out.source_format, out.source_mode) == (fmt, mode)
    np.testing.assert_array_equal(np.asarray(img), out.pixels)


def test_cmyk_colours_survive_conversion():
    a = np.zeros((64, 64, 3), np.uint8)
    a[:] = (200, 30, 30)
    out = image_processing.process_image(_encode(a, "JPEG", "CMYK", quality=95))
    r, g, b = out.pixels.reshape(-1, 3).mean(axis=0)
    assert r > 150 and g < 80 and b < 80, (r, g, b)


def test_transparent_areas_become_white():
    a = np.zeros((64, 64, 4), np.uint8)  # Fully transparent black.
    out = image_processing.process_image(_encode(a, "PNG"))
    assert out.pixels.min() > 245


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"<html>not found</html>", "not an image"),
        (_encode(_image(300, 300))[:2000], "truncated"),
    ],
)
def test_undecodable_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(image_processing.BadImage, match=reason):
        image_processing.process_image(data)


def test_noresize_keeps_rgb_jpeg_bytes_and_converts_others():
    jpeg = _encode(_image(200, 300))
    out = image_processing.process_image(jpeg, resize=False)
    assert out.jpeg == jpeg and out.pixels.shape == (200, 300, 3) and out.square.shape == (256, 256, 3)
    gray = image_processing.process_image(_encode(_image(200, 300), mode="L"), resize=False)
    assert Image.open(io.BytesIO(gray.jpeg)).mode == "RGB" and gray.pixels.shape == (200, 300, 3)


# -- colour statistics --------------------------------------------------------


def _numpy_stats(pairs):
    x = np.concatenate([p.reshape(-1, 3) for p, _ in pairs]).astype(np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False, bias=True)


def test_color_stats_combine_fn_matches_numpy_in_a_pipeline():
    rng = np.random.default_rng(1)
    pairs = []
    for i in range(12):  # Images of several sizes; the mean image uses the squares.
        h, w = rng.integers(20, 60, size=2)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pairs.append((pixels, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    mean, cov = _numpy_stats(pairs)
    mean_image = np.mean([s for _, s in pairs], axis=0)

    def check(outputs):
        (moments,) = outputs
        stats, image = color_stats.summarize(moments)
        np.testing.assert_allclose(stats["mean_rgb"], mean, rtol=1e-12)
        np.testing.assert_allclose(stats["covariance"], cov, rtol=1e-10)
        np.testing.assert_allclose(image, mean_image, rtol=1e-6)
        assert stats["num_images"] == 12

    with BeamTestPipeline() as p:
        result = (
            p
            | beam.Create([color_stats.Moments.of_image(p, s) for p, s in pairs], reshuffle=False)
            | beam.Reshuffle()  # Split across bundles, so accumulators are merged.
            | beam.CombineGlobally(color_stats.ColorStatsFn())
        )
        assert_that(result, check)


def test_moments_merge_is_order_independent_and_exact():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(6)]
    left = color_stats.Moments()
    for im in images[:3]:
        left.merge(color_stats.Moments.of_image(im))
    right = color_stats.Moments()
    for im in images[3:]:
        right.merge(color_stats.Moments.of_image(im))
    merged = color_stats.Moments().merge(right).merge(left)
    mean, cov = _numpy_stats([(im, None) for im in images])
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(merged.comoment / merged.num_pixels, cov, rtol=1e-10)


def test_summarize_orders_eigenpairs_and_fixes_signs():
    m = color_stats.Moments.of_image(np.random.default_rng(3).integers(0, 256, (50, 50, 3), dtype=np.uint8))
    stats, _ = color_stats.summarize(m)
    vals, vecs = np.array(stats["eigenvalues"]), np.array(stats["eigenvectors"])
    assert list(vals) == sorted(vals, reverse=True)
    assert np.all(vecs.sum(axis=0) >= 0)
    np.testing.assert_allclose(vecs @ np.diag(vals) @ vecs.T, stats["covariance"], atol=1e-8)


# -- DoFns and sharding -------------------------------------------------------


CONFIG = BuildConfig(classes=("n01440764", "n01443537"), names=("tench", "goldfish"), seed=0, progress=False)


def test_list_unit_fn_labels_members_and_rejects_the_unlabelled():
    unit = ReadUnit(
        split="validation", kind="files", path="/in", name="val[0:4]",
        members=(
            Member("val/ILSVRC2012_val_00000001.JPEG", "n01443537", "/in/val/1.JPEG"),
            Member("val/ILSVRC2012_val_00000002.JPEG", "n09999999", "/in/val/2.JPEG"),
            Member("val/README.txt", None, "/in/val/README.txt"),
            Member("val/ILSVRC2012_val_00000004.JPEG", "n01440764", "/in/val/4.JPEG"),
        ),
    )
    with BeamTestPipeline() as p:
        out = p | beam.Create([unit]) | beam.ParDo(ListUnitFn(CONFIG)).with_outputs("rejected", main="items")
        assert_that(
            out.items | beam.Map(lambda r: (r[0], r[2].name, r[1] == build_tfrecords.sort_key(
                0, r[0], r[2].synset, r[2].name))),
            equal_to([
                ("validation", "val/ILSVRC2012_val_00000001.JPEG", True),
                ("validation", "val/ILSVRC2012_val_00000004.JPEG", True),
            ]),
            label="items",
        )
        assert_that(
            out.rejected | beam.Map(lambda r: (r["file"], r["reason"])),
            equal_to([
                ("val/ILSVRC2012_val_00000002.JPEG", "synset n09999999 has no training images"),
                ("val/README.txt", "no validation number in the file name (expected ILSVRC2012_val_NNNNNNNN.JPEG)"),
            ]),
            label="rejected",
        )


def test_write_shard_fn_writes_in_key_order_and_tags_rejections_and_moments(tmp_path):
    good = _encode(_image(300, 400))
    files = {
        "a.JPEG": good,
        "b.JPEG": _encode(_image(300, 300, seed=1), "PNG"),
        "c.JPEG": good[: len(good) // 2],
        "d.JPEG": _encode(_image(200, 300, seed=2), mode="CMYK"),
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
            | beam.ParDo(WriteShardFn(CONFIG, str(out_dir))).with_outputs("rejected", "moments", main="shards")
        )
        assert_that(out.shards, equal_to([
            {"split": "train", "index": 1, "num_shards": 3, "file": "train-00001-of-00003", "num_examples": 3}
        ]), label="shards")
        assert_that(out.rejected | beam.Map(lambda r: (r["file"], r["reason"].split(":")[0])), equal_to([
            ("train/c.JPEG", "corrupt or truncated JPEG"), ("train/e.JPEG", "unreadable"),
        ]), label="rejected")
        assert_that(out.moments | beam.Map(lambda m: (m.num_images, m.num_pixels)),
                    equal_to([(3, 3 * 256 * 256)]), label="moments")
    rows = [records.parse_example(r) for r in tf_records(out_dir / "train-00001-of-00003")]
    # Key order: b (10), d (20), a (40).
    assert [r[records.FILENAME].numpy().decode() for r in rows] == ["b.JPEG", "d.JPEG", "a.JPEG"]
    assert [int(r[records.LABEL]) for r in rows] == [1, 1, 0]
    assert sorted(os.listdir(out_dir)) == ["train-00001-of-00003"]  # No temporary file left.


def tf_records(path):
    import tensorflow as tf

    return list(tf.data.TFRecordDataset(str(path)))


def test_assign_shard_splits_by_rank_evenly():
    keys = np.sort(np.random.default_rng(0).integers(0, 2**63, 1000, dtype=np.uint64))
    shards = collections.Counter(
        build_tfrecords.assign_shard(("train", int(k), b""), {"train": keys}, {"train": 7})[0] for k in keys
    )
    assert sorted(shards) == [("train", i, 7) for i in range(7)]
    assert set(shards.values()) <= {142, 143}


def test_sort_key_ignores_layout_but_not_seed():
    k = build_tfrecords.sort_key
    assert k(0, "train", "n1", "ILSVRC2012_img_train.tar/n1.tar/n1_5.JPEG") == k(0, "train", "n1", "train/n1/n1_5.JPEG")
    assert k(0, "train", "n1", "n1_5.JPEG") != k(1, "train", "n1", "n1_5.JPEG")


def test_progress_lines_show_count_and_rate(capsys):
    progress = build_tfrecords._Progress(enabled=True, every_s=0.0)
    progress.tick(False)
    progress.tick(True)
    err = capsys.readouterr().err
    assert "2 images (" in err and "images/s), 1 rejected" in err


def test_class_archive_is_listed_by_headers_and_read_by_byte_range(tmp_path):
    import tarfile

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(3):
            data = f"image {i}".encode() * (i + 1) * 300
            info = tarfile.TarInfo(f"n01440764_{i}.JPEG")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / imagenet_layout.TRAIN_TAR
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("n01440764.tar")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    layout = imagenet_layout.plan(str(tmp_path))
    (unit,) = layout.splits["train"].units
    members = list(imagenet_layout.list_unit(unit))
    assert [(m.name.split("/")[-1], m.synset) for m in members] == [
        (f"n01440764_{i}.JPEG", "n01440764") for i in range(3)
    ]
    reader = imagenet_layout.MemberReader()
    assert [reader.read(m) for m in members] == [f"image {i}".encode() * (i + 1) * 300 for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [imagenet_layout.TRAIN_TAR]  # Nothing extracted.
    short = dataclasses.replace(members[0], size=members[0].size + 10**6)
    with pytest.raises(OSError, match="archive ends inside this member"):
        reader.read(short)
