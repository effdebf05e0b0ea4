"""Preprocessing of one image, each op checked twice: eagerly and inside tf.data.Dataset.map.

As in big_vision's preprocessing tests, every check runs on both results
(`eager_and_mapped`): an op that gives other values inside the input stream's
graph than eagerly fails the same assertions.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import preprocessing as pp
from conftest import read_split
from tfrecords.folder import Records


def eager_and_mapped(fn, *columns):
    """Yields `fn` over every row of `columns` twice: eagerly, then inside `Dataset.map`.

    Each column is a sequence (or a named tuple of sequences, like `Augment`)
    as `Dataset.from_tensor_slices` takes it; row i is each column's i-th
    element, passed to `fn` as positional arguments. Each yield is a list of
    `fn`'s results, one per row, as NumPy.
    """
    columns = tuple(tf.nest.map_structure(tf.convert_to_tensor, c) if isinstance(c, tuple) else tf.convert_to_tensor(c)
                    for c in columns)
    n = int(tf.nest.flatten(columns)[0].shape[0])

    def numpy(nest):
        return tf.nest.map_structure(lambda t: t.numpy(), nest)

    yield [numpy(fn(*tf.nest.map_structure(lambda c: c[i], columns))) for i in range(n)]
    yield [numpy(r) for r in tf.data.Dataset.from_tensor_slices(columns).map(fn)]


def _decoded(jpeg):
    return tf.io.decode_jpeg(jpeg, channels=3).numpy().astype(np.float32)


def _lighting(alpha, stats):
    """§4.1's PCA lighting shift, in NumPy: eigenvalues of pixels in [0, 1], back to 0..255."""
    return stats.eigenvectors @ (alpha * stats.eigenvalues / 255.0**2) * 255.0


def test_preprocessing_imports_only_tensorflow_numpy_and_the_records_contract():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(pp))  # Every import, the top level's and any inside a function.
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {f"{node.module}.{a.name}" if node.module in ("alexnet_tf", "tfrecords") else node.module
                 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    # Serving, predict and evaluate load it: no datasets (input_pipeline), never the model.
    assert imported == {"__future__", "dataclasses", "typing", "numpy", "tensorflow", "tfrecords.folder",
                        "tfrecords.metadata", "tfrecords.schema"}


def test_color_stats_come_from_metadata(data):
    out, meta, stats, _ = data
    assert stats.mean.shape == (256, 256, 3) and stats.record_size == 256
    np.testing.assert_allclose(stats.eigenvalues, meta.color_stats.eigenvalues, rtol=1e-6)
    rgb = pp.ColorStats.from_records(Records(out, meta), mean="rgb")
    np.testing.assert_allclose(rgb.mean, meta.color_stats.mean_rgb, rtol=1e-6)
    with pytest.raises(ValueError, match="mean must be"):
        pp.ColorStats.from_records(Records(out, meta), mean="median")


def test_parse_record_gives_the_records_image_and_label(data):
    out, meta, _, _ = data
    serialized = [s.numpy() for s in tf.data.TFRecordDataset(Records(out, meta).shard_paths("validation")[0]).take(5)]
    expected = [(r["jpeg"], r["label"]) for r in read_split(out, meta, "validation")[:5]]
    for got in eager_and_mapped(pp.parse_record, serialized):
        assert [(image, int(label)) for image, label in got] == expected
        assert all(label.dtype == np.int32 for _, label in got)


def test_header_size_reads_the_size_without_decoding():
    from PIL import Image

    from conftest import encode, png_claiming

    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    top_down = bytearray(encode(image, "BMP"))
    struct.pack_into("<i", top_down, 22, -37)  # A negative height: rows stored top-down.
    inputs = {fmt: encode(image, fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP")}
    inputs.update(bmp_top_down=bytes(top_down), bomb=png_claiming(30000, 20000),
                  webp=b"RIFF\0\0\0\0WEBPVP8 ", short_png=b"\x89PNG")
    expected = [(37, 53)] * 5 + [(20000, 30000), (0, 0), (0, 0)]  # Formats not read, and short inputs: zeros.
    for got in eager_and_mapped(pp.header_size, list(inputs.values())):
        assert [tuple(int(v) for v in hw) for hw in got] == expected


def test_training_patch_is_the_decoded_patch(data):
    _, _, stats, rows = data
    jpeg = rows[0]["jpeg"]
    full = _decoded(jpeg)
    seeds = np.array([[i, 1] for i in range(6)])
    chosen = [[v.numpy() for v in pp.train_params(tf.constant(s), 256, 256)] for s in seeds]
    runs = list(eager_and_mapped(lambda j, s: pp.crop_for_train(j, stats, seed=s), [jpeg] * len(seeds), seeds))
    for got in runs:
        for (patch, params), (top, left, flip, alpha) in zip(got, chosen):
            expected = full[top : top + 227, left : left + 227]
            if flip:
                expected = expected[:, ::-1]
            assert patch.dtype == np.uint8 and isinstance(params, pp.Augment)
            patch = patch.astype(np.float32)
            # decode_and_crop_jpeg decodes only the patch; only its border pixels may differ.
            np.testing.assert_allclose(patch[1:-1, 1:-1], expected[1:-1, 1:-1], atol=2.0)
            assert np.mean(np.abs(patch - expected)) < 0.1
            assert (int(params.top), int(params.left), bool(params.flip)) == (top, left, flip)
            np.testing.assert_array_equal(params.alpha, alpha)
    for (a, _), (b, _) in zip(*runs):
        np.testing.assert_array_equal(a, b)  # Stateless: the same record, the same patch, wherever it is made.


def test_train_params_cover_every_position_and_both_reflections():
    seeds = np.array([[i, 7] for i in range(400)])
    runs = list(eager_and_mapped(lambda s: pp.train_params(s, 256, 256), seeds))
    for draws in runs:
        assert {int(d.top) for d in draws} == set(range(30))  # 256 - 227 + 1 positions.
        assert {int(d.left) for d in draws} == set(range(30))
        assert 0.4 < np.mean([bool(d.flip) for d in draws]) < 0.6
        alphas = np.stack([d.alpha for d in draws])
        assert abs(alphas.std() - 0.1) < 0.01 and abs(alphas.mean()) < 0.01
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_lighting_shift_is_the_pca_formula(data):
    _, _, stats, _ = data
    alphas = np.array([[0.1, -0.2, 0.05], [0.0, 0.0, 0.0], [-0.3, 0.15, 0.2]], np.float32)
    expected = [_lighting(a, stats) for a in alphas]
    for got in eager_and_mapped(lambda a: pp.lighting_shift(a, stats), alphas):  # One image's (3,).
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    for (got,) in eager_and_mapped(lambda a: pp.lighting_shift(a, stats), alphas[None]):  # A batch's (batch, 3).
        np.testing.assert_allclose(got, np.stack(expected), rtol=1e-5, atol=1e-6)


def test_train_preprocessing_applies_crop_flip_and_lighting(data):
    _, _, stats, rows = data
    jpeg = rows[1]["jpeg"]
    seeds = np.array([[i, 3] for i in range(16)])
    expected, flips = [], set()
    for s in seeds:
        top, left, flip, alpha = (v.numpy() for v in pp.train_params(tf.constant(s), 256, 256))
        # Reference: the patch minus the mean patch, plus the lighting shift, then reflected.
        patch = tf.io.decode_and_crop_jpeg(jpeg, tf.stack([top, left, 227, 227]), channels=3).numpy()
        e = patch.astype(np.float32) - stats.mean[top : top + 227, left : left + 227] + _lighting(alpha, stats)
        expected.append(e[:, ::-1] if flip else e)
        flips.add(bool(flip))
    assert flips == {True, False}
    runs = list(eager_and_mapped(lambda j, s: pp.preprocess_for_train(j, stats, seed=s), [jpeg] * len(seeds), seeds))
    for got in runs:
        for g, e in zip(got, expected):
            assert g.shape == (227, 227, 3) and g.dtype == np.float32
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-3)
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


def test_stream_part_and_step_part_compose_to_the_whole(data):
    _, _, stats, rows = data
    jpegs = [tf.constant(r["jpeg"]) for r in rows]
    seeds = [tf.constant([i, 5]) for i in range(len(rows))]
    parts = [pp.crop_for_train(j, stats, seed=s) for j, s in zip(jpegs, seeds)]
    patches = tf.stack([p for p, _ in parts])
    params = tf.nest.map_structure(lambda *t: tf.stack(t), *[q for _, q in parts])
    assert params.top.shape == params.flip.shape == (len(rows),) and params.alpha.shape == (len(rows), 3)
    whole = [pp.preprocess_for_train(j, stats, seed=s).numpy() for j, s in zip(jpegs, seeds)]
    rgb = pp.ColorStats(np.asarray([100.0, 110.0, 120.0], np.float32), stats.eigenvalues, stats.eigenvectors, 256)
    zero = params._replace(alpha=tf.zeros([len(rows), 3]))  # No lighting.
    batch = tf.nest.map_structure(lambda t: t[None], (patches, params, zero))  # One row: the whole batch.
    for (got,) in eager_and_mapped(lambda p, a, z: pp.finish_batch(p, a, stats), *batch):
        for k in range(len(rows)):
            np.testing.assert_allclose(got[k], whole[k], rtol=1e-6, atol=1e-4)
    for (got,) in eager_and_mapped(lambda p, a, z: pp.finish_batch(p, z, rgb), *batch):
        np.testing.assert_allclose(got, patches.numpy().astype(np.float32) - [100.0, 110.0, 120.0])


def test_central_and_ten_crops_positions(data):
    _, _, stats, rows = data
    jpegs = [r["jpeg"] for r in rows]
    fulls = [_decoded(j) for j in jpegs]

    def patch(full, t, l):
        return full[t : t + 227, l : l + 227] - stats.mean[t : t + 227, l : l + 227]

    for central in eager_and_mapped(lambda j: pp.preprocess_for_eval(j, stats), jpegs):
        for got, full in zip(central, fulls):
            np.testing.assert_array_equal(got, patch(full, 14, 14))  # (256 - 227) // 2, from the full decode.
    corners = [(0, 0), (0, 29), (29, 0), (29, 29), (14, 14)]
    for ten in eager_and_mapped(lambda j: pp.ten_crops(j, stats), jpegs):
        for got, full in zip(ten, fulls):
            assert got.shape == (10, 227, 227, 3)
            for i, (t, l) in enumerate(corners):
                np.testing.assert_array_equal(got[i], patch(full, t, l))
                np.testing.assert_array_equal(got[i + 5], patch(full, t, l)[:, ::-1])


def test_display_images_adds_the_mean_colour_back(data):
    _, _, stats, _ = data
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
    pixels[0, 0, 0] = [-40.0, 300.0, 128.0]  # Out of range: clipped to [0, 1].
    image_mean = stats.mean.reshape(-1, 3).mean(axis=0)  # A mean image gives back its mean colour.
    rgb = pp.ColorStats.for_evaluation(np.asarray([100.0, 110.0, 120.0], np.float32), 256)
    for s, mean in ((stats, image_mean), (rgb, rgb.mean)):
        expected = np.clip(pixels / 255.0, 0.0, 1.0)
        for (got,) in eager_and_mapped(lambda x: pp.display_images(x, s), (pixels - mean)[None]):
            np.testing.assert_allclose(got, expected, atol=1e-6)


def test_decode_square_scales_the_shorter_side_and_crops_the_centre():
    wide = np.zeros((300, 600, 3), np.uint8)
    wide[:, 150:450] = 200  # The central half: exactly what the 256x256 square keeps.
    same = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    pngs = [tf.io.encode_png(wide).numpy(), tf.io.encode_png(same).numpy()]
    for square, unchanged in eager_and_mapped(pp.decode_square, pngs):
        assert square.shape == (256, 256, 3)
        assert square[:, 8:-8].min() > 190  # Bicubic ringing aside, all of it is the bright centre.
        np.testing.assert_array_equal(unchanged, same)  # No resampling.


def _build_rgb(data: bytes) -> np.ndarray:
    """The build's decoded RGB of an input (pipelines.image_processing: open, load, to RGB)."""
    from pipelines import image_processing

    img = image_processing._open(data)
    img.load()
    return np.asarray(image_processing._to_rgb(img))


def _png16(values: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG (Pillow writes none) of (h, w, channels) uint16 values."""
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


# Three inputs, one of each kind of transparency, in the default suite; every other in `make test-all`.
DECODE_DEFAULT = ("rgba_png", "palette_png_trns_index", "gif_transparent_index")


@pytest.mark.parametrize("name", [n if n in DECODE_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(TRANSPARENT)])
def test_decode_rgb_is_the_builds_decode_bit_for_bit(name):
    data = TRANSPARENT[name]
    expected = _build_rgb(data)
    for (got,) in eager_and_mapped(pp.decode_rgb, [data]):
        np.testing.assert_array_equal(got, expected)
    # The same inside a tf.function's graph (the exported model's).
    np.testing.assert_array_equal(tf.function(pp.decode_rgb)(tf.constant(data)).numpy(), expected)


def test_decode_square_takes_the_shared_decode():
    data = TRANSPARENT["rgba_png_every_pair"]  # 256 x 256: the square itself, not resampled.
    for (got,) in eager_and_mapped(pp.decode_square, [data]):
        np.testing.assert_array_equal(got, _build_rgb(data))
