"""Beam transforms and pure functions of the pipeline, tested in isolation."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import socket

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines import color_stats, image_processing, imagenet_layout, members, transforms
from pipelines.members import Member, ReadUnit
from pipelines.transforms import BuildConfig
from tfrecords import fileio, framing, integrity, schema


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


def test_small_images_are_scaled_up_and_say_so():
    out = image_processing.process_image(_encode(_image(100, 180)))
    assert out.pixels.shape == (256, 256, 3) and out.upscaled
    # Upscaled: the shorter side below the stored size, whatever the format; not at or above it.
    for (h, w), fmt, upscaled in [((1, 1), "PNG", True), ((255, 900), "JPEG", True), ((256, 300), "JPEG", False),
                                  ((2000, 3000), "JPEG", False), ((600, 300), "PNG", False)]:
        assert image_processing.process_image(_encode(_image(h, w), fmt)).upscaled is upscaled, (h, w)
    assert image_processing.process_image(_encode(_image(100, 180)), image_size=64).upscaled is False
    assert image_processing.process_image(_encode(_image(100, 180)), resize=False).upscaled is False  # Kept size.


@pytest.mark.parametrize(
    "fmt, mode", [("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("BMP", "RGB")]
)
def test_any_decodable_content_becomes_an_rgb_jpeg(fmt, mode):
    out = image_processing.process_image(_encode(_image(200, 300), fmt, mode))
    img = Image.open(io.BytesIO(out.jpeg))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (256, 256))
    assert (out.source_format, out.source_mode) == (fmt, mode)
    # `pixels` are the image before encoding: the stored JPEG is them up to JPEG noise.
    assert out.pixels.shape == (256, 256, 3) and out.pixels.dtype == np.uint8
    stored = np.asarray(img).reshape(-1, 3).astype(float)
    np.testing.assert_allclose(stored.mean(axis=0), out.pixels.reshape(-1, 3).mean(axis=0), atol=2)
    assert np.abs(stored - out.pixels.reshape(-1, 3)).mean() < 16  # Random colour blocks: chroma loss.


def test_cmyk_colours_survive_conversion():
    a = np.zeros((64, 64, 3), np.uint8)
    a[:] = (200, 30, 30)
    out = image_processing.process_image(_encode(a, "JPEG", "CMYK", quality=95))
    r, g, b = out.pixels.reshape(-1, 3).mean(axis=0)
    assert r > 150 and g < 80 and b < 80, (r, g, b)


def _png16(array) -> bytes:
    """A 16-bit PNG of a (h, w, c) uint16 array (c: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA); PIL writes only gray."""
    import struct
    import zlib

    h, w, c = array.shape
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_pngs_become_the_8_bits_tensorflow_decodes(channels):
    import tensorflow as tf

    # 0, 257 (1 in the high byte), 2000 (7), 65535 and the edges between 8-bit levels,
    # then random values; 256x256 so the stored square is the decoded image itself.
    edges = [0, 1, 255, 256, 257, 383, 384, 2000, 32767, 32768, 65279, 65280, 65534, 65535]
    array = np.random.default_rng(channels).integers(0, 65536, (256, 256, channels)).astype(np.uint16)
    array[0, :len(edges), 0] = edges
    if channels in (2, 4):
        array[..., -1] = 65535  # Opaque: TensorFlow drops alpha, the build puts it on white.
    data = _png16(array)
    served = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    assert list(served[0, [0, 4, 7, 13], 0]) == [0, 1, 7, 255]  # 2000 -> 7 (high byte), not 8 (rounded).
    out = image_processing.process_image(data)
    np.testing.assert_array_equal(out.square, served)
    if channels == 1:
        assert out.source_mode == "I;16"


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


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF"])
@pytest.mark.parametrize("resize", [True, False])
def test_formats_serving_does_not_decode_are_rejected_with_the_list(fmt, resize):
    # PIL opens them; the exported model refuses them (schema.IMAGE_MAGIC), so the build must too.
    with pytest.raises(image_processing.BadImage) as e:
        image_processing.process_image(_encode(_image(300, 300), fmt), resize=resize)
    assert str(e.value) == f"{fmt} is not one of the formats serving decodes: JPEG, PNG, GIF, BMP"
    assert schema.IMAGE_FORMATS == ("JPEG", "PNG", "GIF", "BMP")  # The one list, both sides.
    for served in ("JPEG", "PNG", "GIF", "BMP"):
        assert image_processing.served_format(_encode(_image(16, 16), served)) == served


@pytest.mark.parametrize("side", [12_000, 30_000])  # 1.07x and 6.7x the limit (PIL refuses at 2x itself).
def test_images_above_the_decoded_pixel_limit_are_rejected_before_decoding(side):
    from conftest import png_claiming

    with pytest.raises(image_processing.BadImage, match="above the limit of 134,217,728 decoded pixels"):
        image_processing.process_image(png_claiming(side, side))


def test_noresize_keeps_rgb_jpeg_bytes_and_converts_others():
    jpeg = _encode(_image(200, 300))
    out = image_processing.process_image(jpeg, resize=False)
    # Kept bytes; the statistics see the image at 1/8 scale (8x8 block means); no mean-image square.
    assert out.jpeg == jpeg and (out.height, out.width) == (200, 300) and out.square is None
    assert out.pixels.shape == (25, 38, 3)
    full = np.asarray(Image.open(io.BytesIO(jpeg))).astype(float)
    np.testing.assert_allclose(out.pixels.reshape(-1, 3).mean(axis=0), full.reshape(-1, 3).mean(axis=0), atol=1.5)
    gray = image_processing.process_image(_encode(_image(200, 300), mode="L"), resize=False)
    assert Image.open(io.BytesIO(gray.jpeg)).mode == "RGB" and (gray.height, gray.width) == (200, 300)
    assert gray.pixels.shape == (25, 38, 3)
    with pytest.raises(image_processing.BadImage, match="truncated"):
        image_processing.process_image(jpeg[: len(jpeg) // 2], resize=False)  # Checked though kept.


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
        assert 1 <= len(outputs) <= transforms.STATS_FAN_IN  # Partial sums, added by the driver.
        sums = color_stats.PixelSums()
        for partial in outputs:
            sums.merge(partial)
        stats, image = color_stats.summarize(sums)
        np.testing.assert_allclose(stats["mean_rgb"], mean, rtol=1e-12)
        np.testing.assert_allclose(stats["covariance"], cov, rtol=1e-10)
        np.testing.assert_allclose(image, mean_image, rtol=1e-6)
        assert stats["num_images"] == 12

    with BeamTestPipeline() as p:
        result = (
            p
            | beam.Create([color_stats.PixelSums.of_image(p, s) for p, s in pairs], reshuffle=False)
            | beam.Reshuffle()  # Split across bundles, so accumulators are merged.
            | transforms.ComputeColorStats()
        )
        assert_that(result, check)


def test_pixel_sums_merge_in_any_order_to_the_same_bytes():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (int(rng.integers(20, 50)), 40, 3), dtype=np.uint8) for _ in range(8)]
    squares = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in images]
    parts = [color_stats.PixelSums.of_image(im, sq) for im, sq in zip(images, squares)]
    results = []
    for order in (range(8), reversed(range(8)), rng.permutation(8)):
        # Merged in another order and grouping each time, as runners and their workers do.
        left, right = color_stats.PixelSums(), color_stats.PixelSums()
        for i, j in enumerate(order):
            (left if i % 3 else right).merge(parts[j])
        stats, mean_image = color_stats.summarize(color_stats.PixelSums().merge(right).merge(left))
        results.append((json.dumps(stats), mean_image.tobytes()))
    assert results[0] == results[1] == results[2]
    mean, cov = _numpy_stats([(im, None) for im in images])
    stats = json.loads(results[0][0])
    np.testing.assert_allclose(stats["mean_rgb"], mean, rtol=1e-14)
    np.testing.assert_allclose(stats["covariance"], cov, rtol=1e-12)


def test_summarize_orders_eigenpairs_and_fixes_signs():
    m = color_stats.PixelSums.of_image(np.random.default_rng(3).integers(0, 256, (50, 50, 3), dtype=np.uint8))
    stats, _ = color_stats.summarize(m)
    vals, vecs = np.array(stats["eigenvalues"]), np.array(stats["eigenvectors"])
    assert list(vals) == sorted(vals, reverse=True)
    assert np.all(vecs.sum(axis=0) >= 0)
    np.testing.assert_allclose(vecs @ np.diag(vals) @ vecs.T, stats["covariance"], atol=1e-8)


# -- DoFns and sharding -------------------------------------------------------


CONFIG = BuildConfig(classes=("n01440764", "n01443537"), names=("tench", "goldfish"), seed=0, progress=False)


def test_list_members_labels_members_and_rejects_the_unlabelled():
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
        out = p | beam.Create([unit]) | transforms.ListMembers(CONFIG)
        assert_that(
            out["items"] | beam.Map(lambda r: (r[0], r[2].name, r[1] == transforms.sort_key(
                0, r[0], r[2].synset, r[2].name))),
            equal_to([
                ("validation", "val/ILSVRC2012_val_00000001.JPEG", True),
                ("validation", "val/ILSVRC2012_val_00000004.JPEG", True),
            ]),
            label="items",
        )
        assert_that(
            out["rejected"] | beam.Map(lambda r: (r["file"], r["reason"])),
            equal_to([
                ("val/ILSVRC2012_val_00000002.JPEG", "synset n09999999 has no training images"),
                ("val/README.txt", "no validation number in the file name (expected ILSVRC2012_val_NNNNNNNN.JPEG)"),
            ]),
            label="rejected",
        )
        assert_that(out["read"], equal_to([("validation", 4)]), label="read")


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
            | transforms.WriteShards(CONFIG, str(out_dir))
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


def test_assign_shard_splits_by_rank_evenly():
    keys = np.random.default_rng(0).integers(0, 2**64 - 1, 1000, dtype=np.uint64)
    bounds = dict([transforms.shard_bounds(("train", [int(k) for k in keys]), {"train": 7})])
    shards = collections.Counter(transforms.assign_shard(("train", int(k), b""), bounds)[0] for k in keys)
    ranks = {int(k): r for r, k in enumerate(np.sort(keys))}
    for k in keys:  # Shard = rank * shards // N: contiguous ranges of the rank.
        assert transforms.assign_shard(("train", int(k), b""), bounds)[0][1] == ranks[int(k)] * 7 // 1000
    assert sorted(shards) == [("train", i, 7) for i in range(7)]
    assert set(shards.values()) <= {142, 143}


def test_sort_key_ignores_layout_but_not_seed():
    k = transforms.sort_key
    assert k(0, "train", "n1", "ILSVRC2012_img_train.tar/n1.tar/n1_5.JPEG") == k(0, "train", "n1", "train/n1/n1_5.JPEG")
    assert k(0, "train", "n1", "n1_5.JPEG") != k(1, "train", "n1", "n1_5.JPEG")


def test_progress_lines_show_count_and_rate(capsys):
    progress = transforms._Progress(enabled=True, every_s=0.0)
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
    listed = list(members.list_unit(unit))
    assert [(m.name.split("/")[-1], m.synset) for m in listed] == [
        (f"n01440764_{i}.JPEG", "n01440764") for i in range(3)
    ]
    reader = members.MemberReader()
    assert [reader.read(m) for m in listed] == [f"image {i}".encode() * (i + 1) * 300 for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [imagenet_layout.TRAIN_TAR]  # Nothing extracted.
    short = listed[0]._replace(size=listed[0].size + 10**6)
    with pytest.raises(OSError, match="archive ends inside this member"):
        reader.read(short)


def test_links_in_a_class_archive_are_rejected_by_name_not_dropped(tmp_path):
    import tarfile

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tar:
        data = b"image bytes" * 100
        info = tarfile.TarInfo("n01440764_1.JPEG")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, kind, target in (("n01440764_2.JPEG", tarfile.SYMTYPE, "/etc/passwd"),
                                   ("n01440764_3.JPEG", tarfile.LNKTYPE, "n01440764_1.JPEG"),
                                   ("sub", tarfile.DIRTYPE, "")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    path = tmp_path / imagenet_layout.TRAIN_TAR
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("n01440764.tar")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    (unit,) = imagenet_layout.plan(str(tmp_path)).splits["train"].units
    config = BuildConfig(classes=("n01440764",), names=("tench",))
    out = list(transforms.ListUnitFn(config).process(unit))
    items = [v for kind, v in out if kind == transforms.ITEM]
    rejected = [v for kind, v in out if kind == transforms.REJECTED]
    assert [v for kind, v in out if kind == transforms.READ] == [("train", 3)]  # Listed: the image and the links.
    assert [m.name.split("/")[-1] for _, _, m in items] == ["n01440764_1.JPEG"]
    assert rejected == [  # Counted as read and rejected (read = written + rejected); the folder is structure.
        {"split": "train", "file": f"{imagenet_layout.TRAIN_TAR}/n01440764.tar/n01440764_2.JPEG",
         "reason": "a symbolic link (to /etc/passwd), not an image file: not followed"},
        {"split": "train", "file": f"{imagenet_layout.TRAIN_TAR}/n01440764.tar/n01440764_3.JPEG",
         "reason": "a hard link (to n01440764_1.JPEG), not an image file: not followed"},
    ]


def test_links_in_the_flat_validation_archive_are_rejected_too(tmp_path):
    import tarfile

    with tarfile.open(tmp_path / imagenet_layout.VAL_TAR, "w") as tar:
        data = b"image bytes" * 100
        info = tarfile.TarInfo("ILSVRC2012_val_00000001.JPEG")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("ILSVRC2012_val_00000002.JPEG")
        info.type, info.linkname = tarfile.SYMTYPE, "/dev/zero"
        tar.addfile(info)
    (tmp_path / "validation_labels.txt").write_text("n01440764\nn01440764\n")
    units = imagenet_layout.plan(str(tmp_path)).splits["validation"].units
    config = BuildConfig(classes=("n01440764",), names=("tench",))
    out = [o for u in units for o in transforms.ListUnitFn(config).process(u)]
    assert [v[2].name for kind, v in out if kind == transforms.ITEM] == [
        f"{imagenet_layout.VAL_TAR}/ILSVRC2012_val_00000001.JPEG"]
    assert [v for kind, v in out if kind == transforms.REJECTED] == [
        {"split": "validation", "file": f"{imagenet_layout.VAL_TAR}/ILSVRC2012_val_00000002.JPEG",
         "reason": "a symbolic link (to /dev/zero), not an image file: not followed"}]


def test_assign_shards_groups_contiguous_key_ranges():
    rng = np.random.default_rng(4)
    keys = [int(k) for k in rng.integers(0, 2**63, 200, dtype=np.uint64)]
    items = [("train", k, Member(f"train/{i}.JPEG", "n01440764")) for i, k in enumerate(keys)]
    items += [("validation", k, Member(f"val/{i}.JPEG", "n01440764")) for i, k in enumerate(keys[:40])]

    def check(groups):
        by_split = collections.defaultdict(dict)
        for (split, shard, shards), kv in groups:
            by_split[split][shard] = (shards, sorted(k for k, _ in kv))
        # train: 200 records, 3 asked for -> 3; validation: 40 records, 5 asked -> 1 (32 a shard at least).
        assert {s: len(v) for s, v in by_split.items()} == {"train": 3, "validation": 1}
        train = [by_split["train"][i][1] for i in range(3)]
        assert [len(t) for t in train] in ([66, 67, 67], [67, 66, 67], [67, 67, 66])
        assert train[0][-1] < train[1][0] and train[1][-1] < train[2][0]  # Contiguous ranks.
        assert sorted(sum(train, [])) == sorted(keys)

    with BeamTestPipeline() as p:
        groups = p | beam.Create(items) | transforms.AssignShards({"train": 3, "validation": 5})
        assert_that(groups, check)


def test_summary_reaches_the_driver_through_a_beam_sink(tmp_path):
    pixels, other = _image(40, 50), _image(30, 20, seed=3)
    parts = [color_stats.PixelSums.of_image(pixels, pixels[:8, :8]), color_stats.PixelSums.of_image(other, other[:8, :8])]
    shards = [{"split": "train", "index": i, "num_shards": 2, "file": schema.shard_name("train", i, 2),
               "num_examples": 3} for i in (1, 0)]
    rejected = [{"split": "train", "file": "b", "reason": "r2"}, {"split": "train", "file": "a", "reason": "r1"}]
    with BeamTestPipeline() as p:
        _ = (
            p | "S" >> beam.Create(shards),
            p | "R" >> beam.Create(rejected),
            p | "C" >> beam.Create([("train", 8), ("validation", 2), ("train", 1)]),  # A line a read unit.
            p | "M" >> beam.Create(parts),  # Partial sums.
        ) | transforms.WriteSummary(str(tmp_path))
    summary = transforms.read_summary(str(tmp_path))
    assert [s["index"] for s in summary["shards"]] == [0, 1]
    assert [r["file"] for r in summary["rejected"]] == ["a", "b"]
    assert summary["read"] == {"train": 9, "validation": 2}
    expected, mean_image = color_stats.summarize(color_stats.PixelSums().merge(parts[1]).merge(parts[0]))
    assert summary["pixel_sums"].num_images == 2
    assert summary["color_stats"] == expected
    np.testing.assert_array_equal(summary["mean_image"], mean_image)


# -- exact integer statistics, and records without TensorFlow -----------------------


def test_pixel_sums_are_exact_integers_even_past_int64():
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (int(rng.integers(8, 40)), 33, 3), dtype=np.uint8) for _ in range(9)]
    squares = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in images]
    x = np.concatenate([im.reshape(-1, 3) for im in images]).astype(object)  # Python integers: exact.
    sums = color_stats.PixelSums()
    for im, sq in zip(images, squares):
        sums.add(im, sq)
    assert (sums.num_images, sums.num_pixels) == (9, len(x))
    assert sums.sum == [int(v) for v in x.sum(axis=0)]
    assert sums.products == [[int(v) for v in row] for row in x.T.dot(x)]
    np.testing.assert_array_equal(sums.image_sum, np.sum(squares, axis=0, dtype=np.int64))
    with pytest.raises(ValueError, match="mean image shapes differ"):
        sums.add(images[1], images[1])  # Its own pixels as the square: another shape.
    # 2^40 copies of the same sums: far past what int64 holds, still exact, and the same statistics.
    big = color_stats.PixelSums.from_json(json.loads(json.dumps(sums.to_json())), sums.image_sum)
    for _ in range(40):
        big.merge(color_stats.PixelSums.from_json(big.to_json(), big.image_sum))
    assert big.products[0][0] == sums.products[0][0] << 40 and big.products[0][0] > 2**63
    assert color_stats.summarize(big)[0]["covariance"] == color_stats.summarize(sums)[0]["covariance"]


def test_make_example_matches_tensorflow_byte_for_byte_without_importing_it():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tfrecords import schema\n"
        "b = schema.make_example(jpeg=b'\\xff\\xd8jpeg', height=256, width=255, label=7, synset='n01440764',"
        " text='tench', filename='n01440764_1.JPEG')\n"
        "assert 'tensorflow' not in sys.modules\n"
        "sys.stdout.write(b.hex())\n"
    )
    ours = bytes.fromhex(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True).stdout)
    import tensorflow as tf

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    theirs = tf.train.Example(features=tf.train.Features(feature={
        schema.ENCODED: b(b"\xff\xd8jpeg"), schema.FORMAT: b(b"JPEG"), schema.HEIGHT: i(256),
        schema.WIDTH: i(255), schema.CHANNELS: i(3), schema.COLORSPACE: b(b"RGB"), schema.LABEL: i(7),
        schema.SYNSET: b(b"n01440764"), schema.TEXT: b(b"tench"), schema.FILENAME: b(b"n01440764_1.JPEG"),
    })).SerializeToString(deterministic=True)
    assert ours == theirs
    parsed = schema.parse_example(ours)
    assert int(parsed[schema.WIDTH]) == 255 and parsed[schema.TEXT].numpy() == b"tench"


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


def test_long_thin_images_take_bounded_memory():
    # Cropped in source coordinates before scaling: a 20000x1 PNG (about 100 bytes)
    # would otherwise be scaled to 5,120,000x256 first (about 4 GB).
    import subprocess
    import sys

    code = (
        "import io, re, numpy as np\n"
        "from PIL import Image\n"
        "from pipelines import image_processing\n"
        "buf = io.BytesIO()\n"
        "Image.fromarray(np.full((1, 20000, 3), 200, np.uint8)).save(buf, format='PNG')\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # Resets the peak (VmHWM) to the current size.\n"
        "out = image_processing.process_image(buf.getvalue())\n"
        "peak = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
        "print(out.pixels.shape, int(out.pixels.mean()), peak)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    shape, mean, peak_mib = proc.stdout.rsplit(" ", 2)
    assert shape == "(256, 256, 3)" and int(mean) in (199, 200, 201)
    assert int(peak_mib) < 300, f"peak {peak_mib} MiB"


_PEAK_CODE = """
import gc, io, re, sys, numpy as np
from PIL import Image
from pipelines import image_processing
fmt, mode, (width, height) = sys.argv[1], sys.argv[2], map(int, sys.argv[3].split("x"))
x, y = np.linspace(0, 255, width).astype(np.uint8), np.linspace(0, 255, height).astype(np.uint8)
a = np.stack([np.add.outer(y // 2, x // 2), np.add.outer(y // 4, x // 2), np.add.outer(y // 2, x // 4)], -1)
a[::7, ::5] = 90  # Some detail.
buf = io.BytesIO()
Image.fromarray(a).convert(mode).save(buf, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
data = buf.getvalue()
del a, buf
gc.collect()
def kib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")  # Resets the peak (VmHWM) to the current size.
before = kib("VmRSS")
out = image_processing.process_image(data, resize=sys.argv[4] == "resize")
print(out.width, out.height, (kib("VmHWM") - before) * 1024 / (width * height))
"""


# 9 million pixels, and a long thin 17 million; the bounds are per input pixel (schema.MAX_PIXELS at most).
@pytest.mark.parametrize("fmt, mode, size, resize, bytes_per_pixel", [
    ("JPEG", "CMYK", "3000x3000", "resize", 0.5),  # Decoded at 1/8 scale: 8 bytes a pixel before (CMYK, RGB).
    ("JPEG", "L", "3000x3000", "resize", 0.5),
    ("PNG", "RGBA", "3000x3000", "resize", 6.0),  # Decoded whole (4 bytes a pixel), reduced as it becomes RGB; 13.
    ("PNG", "P", "3000x3000", "resize", 2.0),  # Decoded whole (1 byte a pixel).
    ("PNG", "RGBA", "17000x1000", "resize", 5.0),  # Long thin: only the central square becomes RGB; 13 before.
    ("PNG", "RGBA", "3000x3000", "noresize", 10.0),  # Own size: decoded, its RGB copy (8) and bands; 13 before.
])
def test_per_image_memory_is_bounded(fmt, mode, size, resize, bytes_per_pixel):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PEAK_CODE, fmt, mode, size, resize], capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    width, height, per_pixel = proc.stdout.split()
    assert f"{width}x{height}" == ("256x256" if resize == "resize" else size)
    assert float(per_pixel) < bytes_per_pixel, f"{float(per_pixel):.2f} bytes a pixel at the peak"


def test_banded_and_reduced_conversion_gives_the_whole_images_pixels():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (700, 301, 4), dtype=np.uint8)  # Taller than a band, not a whole number of them.
    rgba = Image.fromarray(a, "RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    for img, whole in [(rgba, white), (Image.fromarray(a[..., :3]).convert("P"), None),
                       (Image.fromarray(a[..., :3]).convert("CMYK"), None), (Image.fromarray(a[..., 0]), None)]:
        whole = whole or img.convert("RGB")
        for factor in (1, 2, 3, 7):
            expected = whole.reduce(factor) if factor > 1 else whole
            assert np.array_equal(np.asarray(image_processing._to_rgb(img, factor)), np.asarray(expected)), (
                img.mode, factor)
    # Far larger than needed: reduced to a shorter side of at least 2 x 256 first, close to resampling the whole.
    big = _image(1600, 1100)
    out = image_processing.process_image(_encode(big, "PNG"))
    full = np.asarray(Image.fromarray(big).resize((256, 256), Image.Resampling.BICUBIC, box=(0, 250, 1100, 1350)))
    assert np.abs(out.square.astype(int) - full).mean() < 2
    # A long thin one, from READ_BOX_PIXELS on: converted only where the scaling reads it, as if whole.
    rgba = np.random.default_rng(1).integers(0, 256, (80, 38, 4), dtype=np.uint8)
    a = np.kron(rgba, np.ones((12, 480, 1), np.uint8))  # 960 x 18240 (not reduced), 17.5 million pixels.
    assert a.shape[0] * a.shape[1] >= image_processing.READ_BOX_PIXELS
    whole = Image.new("RGB", (a.shape[1], a.shape[0]), (255, 255, 255))
    whole.paste(Image.fromarray(a, "RGBA"), mask=Image.fromarray(a[..., 3]))
    left = (a.shape[1] - a.shape[0]) / 2
    expected = whole.resize((256, 256), Image.Resampling.BICUBIC, box=(left, 0, left + a.shape[0], a.shape[0]))
    out = image_processing.process_image(_encode(a, "PNG", compress_level=1))
    assert np.abs(out.square.astype(int) - np.asarray(expected)).max() <= 1
