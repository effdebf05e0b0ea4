"""The tf.data input stream, each op checked eagerly and inside Dataset.map."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import input_pipeline as ip
from tfrecords import folder
from conftest import read_split


@pytest.fixture(scope="module")
def data(built):
    out, meta = built
    stats = ip.ColorStats.from_metadata(out, meta)
    rows = read_split(out, meta, "validation")[:3]
    return out, meta, stats, rows


def _decoded(jpeg):
    return tf.io.decode_jpeg(jpeg, channels=3).numpy().astype(np.float32)


def test_color_stats_come_from_metadata(data):
    out, meta, stats, _ = data
    assert stats.mean.shape == (256, 256, 3) and stats.record_size == 256
    np.testing.assert_allclose(stats.eigenvalues, meta.color_stats.eigenvalues, rtol=1e-6)
    rgb = ip.ColorStats.from_metadata(out, meta, mean="rgb")
    np.testing.assert_allclose(rgb.mean, meta.color_stats.mean_rgb, rtol=1e-6)
    with pytest.raises(ValueError, match="mean must be"):
        ip.ColorStats.from_metadata(out, meta, mean="median")


def test_training_patch_is_the_decoded_patch(data):
    _, _, stats, rows = data
    jpeg = rows[0]["jpeg"]
    full = _decoded(jpeg)
    for i in range(6):
        seed = tf.constant([i, 1])
        top, left, flip, alpha = (v.numpy() for v in ip.train_params(seed, 256, 256))
        patch, params = ip.crop_for_train(tf.constant(jpeg), stats, seed=seed)
        expected = full[top : top + 227, left : left + 227]
        if flip:
            expected = expected[:, ::-1]
        got = patch.numpy().astype(np.float32)
        # decode_and_crop_jpeg decodes only the patch; only its border pixels may differ.
        np.testing.assert_allclose(got[1:-1, 1:-1], expected[1:-1, 1:-1], atol=2.0)
        assert np.mean(np.abs(got - expected)) < 0.1
        assert (int(params.top), int(params.left), bool(params.flip)) == (top, left, flip)
        np.testing.assert_array_equal(params.alpha.numpy(), alpha)


def test_train_params_cover_every_position_and_both_reflections():
    draws = [ip.train_params(tf.constant([i, 7]), 256, 256) for i in range(400)]
    tops = {int(d[0]) for d in draws}
    lefts = {int(d[1]) for d in draws}
    assert tops == set(range(30)) and lefts == set(range(30))  # 256 - 227 + 1 positions.
    flips = np.mean([bool(d[2]) for d in draws])
    assert 0.4 < flips < 0.6
    alphas = np.stack([d[3].numpy() for d in draws])
    assert abs(alphas.std() - 0.1) < 0.01 and abs(alphas.mean()) < 0.01


def test_lighting_shift_is_the_pca_formula(data):
    _, _, stats, _ = data
    alpha = np.array([0.1, -0.2, 0.05], np.float32)
    got = ip.lighting_shift(tf.constant(alpha), stats).numpy()
    expected = stats.eigenvectors @ (alpha * stats.eigenvalues / 255.0**2) * 255.0
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_train_preprocessing_applies_crop_flip_and_lighting(data):
    _, _, stats, rows = data
    jpeg = tf.constant(rows[1]["jpeg"])
    flips = set()
    for i in range(16):
        seed = tf.constant([i, 3])
        top, left, flip, alpha = ip.train_params(seed, 256, 256)
        got = ip.preprocess_for_train(jpeg, stats, seed=seed).numpy()
        # Reference: the patch minus the mean patch, plus the lighting shift, then reflected.
        patch = tf.io.decode_and_crop_jpeg(jpeg, tf.stack([top, left, 227, 227]), channels=3).numpy()
        t, l = int(top), int(left)
        expected = patch.astype(np.float32) - stats.mean[t : t + 227, l : l + 227]
        expected = expected + ip.lighting_shift(alpha, stats).numpy()
        if bool(flip):
            expected = expected[:, ::-1]
        flips.add(bool(flip))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
    assert flips == {True, False}


def test_stream_part_and_step_part_compose_to_the_whole(data):
    _, _, stats, rows = data
    jpegs = [tf.constant(r["jpeg"]) for r in rows]
    seeds = [tf.constant([i, 5]) for i in range(len(rows))]
    parts = [ip.crop_for_train(j, stats, seed=s) for j, s in zip(jpegs, seeds)]
    patches = tf.stack([p for p, _ in parts])
    params = tf.nest.map_structure(lambda *t: tf.stack(t), *[q for _, q in parts])
    assert patches.dtype == tf.uint8 and isinstance(params, ip.Augment)
    assert params.top.shape == params.flip.shape == (len(rows),) and params.alpha.shape == (len(rows), 3)
    batch = ip.finish_batch(patches, params, stats).numpy()
    for k, (j, s) in enumerate(zip(jpegs, seeds)):
        np.testing.assert_allclose(batch[k], ip.preprocess_for_train(j, stats, seed=s).numpy(), rtol=1e-6, atol=1e-4)
    rgb = ip.ColorStats(np.asarray([100.0, 110.0, 120.0], np.float32), stats.eigenvalues, stats.eigenvectors, 256)
    zero = params._replace(alpha=tf.zeros([len(rows), 3]))  # No lighting.
    np.testing.assert_allclose(ip.finish_batch(patches, zero, rgb).numpy(),
                               patches.numpy().astype(np.float32) - [100.0, 110.0, 120.0])


def test_eager_and_dataset_map_agree(data):
    _, _, stats, rows = data
    jpegs = [r["jpeg"] for r in rows]
    seeds = [[i, 11] for i in range(len(jpegs))]
    eager = [ip.preprocess_for_train(tf.constant(j), stats, seed=tf.constant(s)).numpy() for j, s in zip(jpegs, seeds)]
    ds = tf.data.Dataset.from_tensor_slices((jpegs, seeds)).map(
        lambda j, s: ip.preprocess_for_train(j, stats, seed=s))
    for a, b in zip(eager, ds):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-6, atol=1e-5)
    parts = tf.data.Dataset.from_tensor_slices((jpegs, seeds)).map(lambda j, s: ip.crop_for_train(j, stats, seed=s))
    for j, s, (patch, params) in zip(jpegs, seeds, parts):
        e_patch, e_params = ip.crop_for_train(tf.constant(j), stats, seed=tf.constant(s))
        np.testing.assert_array_equal(patch.numpy(), e_patch.numpy())
        for a, b in zip(params, e_params):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    central = [ip.preprocess_for_eval(tf.constant(j), stats).numpy() for j in jpegs]
    for a, b in zip(central, tf.data.Dataset.from_tensor_slices(jpegs).map(lambda j: ip.preprocess_for_eval(j, stats))):
        np.testing.assert_array_equal(a, b.numpy())
    ten = [ip.ten_crops(tf.constant(j), stats).numpy() for j in jpegs]
    for a, b in zip(ten, tf.data.Dataset.from_tensor_slices(jpegs).map(lambda j: ip.ten_crops(j, stats))):
        np.testing.assert_array_equal(a, b.numpy())


def test_central_and_ten_crops_positions(data):
    _, _, stats, rows = data
    jpeg = tf.constant(rows[2]["jpeg"])
    full = _decoded(rows[2]["jpeg"])

    def patch(t, l):
        return full[t : t + 227, l : l + 227] - stats.mean[t : t + 227, l : l + 227]

    central = ip.preprocess_for_eval(jpeg, stats).numpy()
    np.testing.assert_array_equal(central, patch(14, 14))  # (256 - 227) // 2, from the full decode.
    ten = ip.ten_crops(jpeg, stats).numpy()
    assert ten.shape == (10, 227, 227, 3)
    corners = [(0, 0), (0, 29), (29, 0), (29, 29), (14, 14)]
    for i, (t, l) in enumerate(corners):
        np.testing.assert_array_equal(ten[i], patch(t, l))
        np.testing.assert_array_equal(ten[i + 5], patch(t, l)[:, ::-1])


def test_decode_square_scales_the_shorter_side_and_crops_the_centre():
    wide = np.zeros((300, 600, 3), np.uint8)
    wide[:, 150:450] = 200  # The central half: exactly what the 256x256 square keeps.
    png = tf.io.encode_png(wide)
    square = ip.decode_square(png).numpy()
    assert square.shape == (256, 256, 3)
    assert square[:, 8:-8].min() > 190  # Bicubic ringing aside, all of it is the bright centre.
    same = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(ip.decode_square(tf.io.encode_png(same)).numpy(), same)  # No resampling.


def _build_rgb(data: bytes) -> np.ndarray:
    """The build's decoded RGB of an input (pipelines.image_processing: open, load, to RGB)."""
    from pipelines import image_processing

    img = image_processing._open(data)
    img.load()
    return np.asarray(image_processing._to_rgb(img))


def _png16(values: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG (Pillow writes none) of (h, w, channels) uint16 values."""
    import struct
    import zlib

    h, w = values.shape[:2]
    raw = b"".join(b"\0" + values[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _transparent_inputs():
    """{name: bytes}: every kind of transparency the build composites on white, and look-alikes it does not."""
    from PIL import Image

    from conftest import encode, gif_with_own_colour_table

    rng = np.random.default_rng(11)
    # Every (colour, alpha) pair once: the compositing arithmetic, exhaustively.
    c, a = np.meshgrid(np.arange(256), np.arange(256))
    every = np.stack([c, 255 - c, (c * 7) % 256, a], -1).astype(np.uint8)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    rgba[:, :10, 3] = 0  # Fully transparent columns, fully opaque rows.
    rgba[:5, :, 3] = 255
    palette = Image.fromarray(rng.integers(0, 16, (37, 53), dtype=np.uint8), "P")
    palette.putpalette(rng.integers(0, 256, 48).tolist())
    gif = encode(palette, "GIF", transparency=3, comment=b"x" * 600)  # A comment block before the image.
    gray = Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8), "L")
    return {
        "rgba_png_every_pair": encode(Image.fromarray(every, "RGBA"), "PNG"),
        "rgba_png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "la_png": encode(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"),
        "palette_png_trns_alphas": encode(palette, "PNG",
                                          transparency=bytes(rng.integers(0, 256, 16, dtype=np.uint8))),
        "palette_png_trns_index": encode(palette, "PNG", transparency=3),
        "gif_transparent_index": gif,
        "gif_transparent_index_own_table": gif_with_own_colour_table(gif),
        "gif_animated": encode(palette, "GIF", transparency=5, save_all=True,
                               append_images=[palette.rotate(90)], loop=0),
        "rgba_png_16_bit": _png16(rng.integers(0, 65536, (37, 53, 4), dtype=np.uint16), 6),
        "la_png_16_bit": _png16(rng.integers(0, 65536, (37, 53, 2), dtype=np.uint16), 4),
        "gray_png_16_bit": _png16(rng.integers(0, 65536, (37, 53, 1), dtype=np.uint16), 0),
        # No transparency the build composites: a palette without tRNS (TensorFlow's
        # 4-channel decode gives it alpha 15 at 4 bits a pixel), a GIF without a
        # transparent index, an RGB or gray PNG's single transparent colour.
        "palette_png_opaque": encode(palette, "PNG"),
        "gif_opaque": encode(palette, "GIF"),
        "gif_opaque_own_table": gif_with_own_colour_table(encode(palette, "GIF")),
        "rgb_png_trns_colour": encode(Image.fromarray(rgba[..., :3]), "PNG",
                                      transparency=tuple(int(v) for v in rgba[0, 0, :3])),
        "gray_png_trns_colour": encode(gray, "PNG", transparency=int(gray.getpixel((0, 0)))),
        "rgba_bmp": encode(Image.fromarray(rgba, "RGBA"), "BMP"),
    }


TRANSPARENT = _transparent_inputs()


@pytest.mark.parametrize("name", sorted(TRANSPARENT))
def test_decode_rgb_is_the_builds_decode_bit_for_bit(name):
    data = TRANSPARENT[name]
    expected = _build_rgb(data)
    np.testing.assert_array_equal(ip.decode_rgb(tf.constant(data)).numpy(), expected)
    # The same inside a graph (the exported model's, Dataset.map's).
    np.testing.assert_array_equal(tf.function(ip.decode_rgb)(tf.constant(data)).numpy(), expected)


def test_decode_square_takes_the_shared_decode():
    data = TRANSPARENT["rgba_png_every_pair"]  # 256 x 256: the square itself, not resampled.
    np.testing.assert_array_equal(ip.decode_square(tf.constant(data)).numpy(), _build_rgb(data))


def test_train_dataset_batches(data):
    out, meta, stats, _ = data
    ds = ip.train_dataset(out, meta, stats, 8, shuffle_buffer=50)
    (patches, params), labels = next(iter(ds))
    assert patches.shape == (8, 227, 227, 3) and patches.dtype == tf.uint8
    assert params.alpha.shape == (8, 3) and params.flip.dtype == tf.bool
    for position in (params.top.numpy(), params.left.numpy()):
        assert position.min() >= 0 and position.max() <= 29
    assert labels.dtype == tf.int32 and 0 <= labels.numpy().min() and labels.numpy().max() < meta.num_classes
    images = ip.finish_batch(patches, params, stats)
    # Mean subtracted: centred near zero, within the pixel range.
    assert abs(float(tf.reduce_mean(images))) < 40 and float(tf.reduce_max(tf.abs(images))) < 300


def _batches(ds, n):
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(n)]


def test_seeded_deterministic_stream_repeats_itself_exactly(data):
    out, meta, stats, _ = data
    make = lambda seed: ip.train_dataset(out, meta, stats, 8, shuffle_buffer=50, seed=seed, deterministic=True)  # noqa: E731
    first, again, other = _batches(make(3), 6), _batches(make(3), 6), _batches(make(4), 6)
    for a, b in zip(tf.nest.flatten(first), tf.nest.flatten(again)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(tf.nest.flatten(first), tf.nest.flatten(other)))
    # Each record has its own draw: the 48 patches are not all at one position.
    tops = np.concatenate([b[0][1].top for b in first])
    assert len(set(tops.tolist())) > 5


def test_a_resumed_stream_continues_exactly_where_the_trained_steps_end(data):
    out, meta, stats, _ = data
    make = lambda skip: ip.train_dataset(out, meta, stats, 8, shuffle_buffer=50, seed=5, skip=skip)  # noqa: E731
    straight = _batches(make(0), 7)
    resumed = _batches(make(3 * 8), 4)  # Killed after 3 trained steps of 8 records.
    for a, b in zip(tf.nest.flatten(straight[3:]), tf.nest.flatten(resumed)):
        np.testing.assert_array_equal(a, b)  # The same records, augmented the same: none twice, none left out.


def test_each_pass_reads_every_record_once(data):
    out, meta, _, _ = data
    n = meta.splits["train"].num_examples
    stream = [r.numpy() for r in ip.train_records(out, meta, seed=2, shuffle_buffer=50).take(2 * n)]
    first, second = stream[:n], stream[n:]
    assert len(set(first)) == n and set(first) == set(second)
    assert first != second  # Each pass in its own order.
    stored = sorted(r["jpeg"] for r in read_split(out, meta, "train"))
    assert stored == sorted(ip.parse_record(r)[0].numpy() for r in first)


def test_each_record_is_augmented_from_its_own_seed(data):
    out, meta, stats, rows = data
    # A stream of one shard read in order (no shuffle to speak of): record i is augmented with record_seed(seed, i).
    ds = ip.train_dataset(out, meta, stats, 4, shuffle_buffer=1, seed=9, deterministic=True)
    (patches, aug), labels = next(iter(ds))
    first_shard = folder.shard_paths(out, meta, "train")
    order = tf.data.Dataset.from_tensor_slices(first_shard).shuffle(len(first_shard), seed=9)
    jpeg = next(iter(tf.data.TFRecordDataset(next(iter(order))).map(lambda s: ip.parse_record(s)[0])))
    patch, expected = ip.crop_for_train(jpeg, stats, seed=ip.record_seed(9, 0))
    np.testing.assert_array_equal(patches[0].numpy(), patch.numpy())
    assert int(aug.top[0]) == int(expected.top) and int(aug.left[0]) == int(expected.left)


def test_eval_dataset_reads_every_example_once(data):
    out, meta, stats, _ = data
    labels = np.concatenate([y.numpy() for _, y in ip.eval_dataset(out, meta, stats, 7, split="train")])
    expected = [r["label"] for r in read_split(out, meta, "train")]
    assert list(labels) == expected
    shapes = {tuple(x.shape[1:]) for x, _ in ip.eval_dataset(out, meta, stats, 4, ten_crop=True)}
    assert shapes == {(10, 227, 227, 3)}


def test_input_context_splits_shards_between_workers(data):
    out, meta, stats, _ = data
    seen = []
    for worker in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=2)
        files = [f.numpy().decode() for f in ip._files(out, meta, "train", ctx)]
        seen.append(set(files))
        assert ip.train_dataset(out, meta, stats, 8, ctx).element_spec[0][0].shape == (4, 227, 227, 3)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(folder.shard_paths(out, meta, "train"))
