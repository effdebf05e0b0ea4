"""Preprocessing of one image: a record -> the network's input, in pure tensor ops.

The same functions run eagerly, inside `Dataset.map` (the input stream,
`alexnet_tf.input_pipeline`) and in the exported model's serving signature
(`export`, `predict`, `evaluate`). Only TensorFlow, NumPy and the data contract
(`tfrecords`) are imported: no datasets, never the model. As in
tf-models' data loaders, a decoder apart from the parsers:

- decoder: a serialized `tf.Example` -> (image bytes, label) (`parse_record`);
  any JPEG, PNG, GIF or BMP -> RGB exactly as the build decodes it (`decode_rgb`);
- training parser, §4.1 of the paper: a random 227x227 patch of the stored
  256x256 image (`decode_and_crop_jpeg`: only the patch is decoded), reflected
  at random (`crop_for_train`, in the stream); PCA lighting noise and
  subtraction of the training-set mean (`finish_batch`, in the training step);
- evaluation parser: the central patch, or the paper's ten patches (four
  corners and centre, and their reflections) whose softmax outputs are averaged.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfrecords import schema
from tfrecords.folder import Records
from tfrecords.metadata import MetadataError

CROP = schema.CROP  # 227: the network's input patches.
SQUARE = schema.SQUARE  # §2: images are stored and evaluated as 256x256.
LIGHTING_STD = 0.1  # §4.1: alpha_i ~ N(0, 0.1).


@dataclasses.dataclass(frozen=True)
class ColorStats:
    """What preprocessing needs from metadata.json (`tfrecords/README.md`), as constants.

    Attributes:
      mean: (H, W, 3) mean image or (3,) mean RGB, in 0..255 pixel units.
      eigenvalues: (3,) eigenvalues of the RGB covariance, 0..255 units (descending).
      eigenvectors: (3, 3) matching eigenvectors as columns.
      record_size: Side of the stored square images (256), or None if the
        records keep their original sizes (`--noresize`).
    """

    mean: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    record_size: int | None

    @property
    def square_size(self) -> int:
        """Side of the square patches are taken from (the records', or the paper's 256)."""
        return self.record_size or SQUARE

    @classmethod
    def for_evaluation(cls, mean, record_size: int | None) -> "ColorStats":
        """Statistics for evaluation and serving, which subtract the mean and add no lighting."""
        return cls(mean=mean, eigenvalues=np.zeros(3, np.float32), eigenvectors=np.eye(3, dtype=np.float32),
                   record_size=record_size)

    @classmethod
    def from_records(cls, records: Records, mean: str = "image") -> "ColorStats":
        """The statistics of a built dataset.

        Args:
          records: The records folder, opened (`tfrecords.folder.Records`).
          mean: "image" (the paper: the mean image, cropped where the patch is)
            or "rgb" (one mean colour for every pixel).
        """
        stats = records.color_stats
        if stats is None:
            raise MetadataError(f"{records.metadata_path} has no training colour statistics (was the training "
                                "split built?)")
        size = records.meta.image.square
        if mean == "image":
            if size is None:
                raise ValueError("mean='image' needs records of one size; these were built with --noresize: "
                                 "use mean='rgb'")
            m = records.mean_image
        elif mean == "rgb":
            m = np.asarray(stats.mean_rgb, np.float32)
        else:
            raise ValueError(f"mean must be 'image' or 'rgb', got {mean!r}")
        return cls(
            mean=np.asarray(m, np.float32),
            eigenvalues=np.asarray(stats.eigenvalues, np.float32),
            eigenvectors=np.asarray(stats.eigenvectors, np.float32),
            record_size=size,
        )


# ---------------------------------------------------------------------------
# Decoder: a record, and an image's bytes, to tensors.


def parse_record(serialized):
    """(encoded image bytes, int32 label) of one serialized record."""
    ex = schema.parse_example(serialized)
    return ex[schema.ENCODED], tf.cast(ex[schema.LABEL], tf.int32)


# The largest image decoded and the formats read, by their first bytes (serving's
# check of its inputs too): the build's, from the data contract.
MAX_PIXELS = schema.MAX_PIXELS
IMAGE_MAGIC = schema.IMAGE_MAGIC


def header_size(image_bytes):
    """(height, width) int64 of a JPEG, PNG, GIF or BMP from its header alone, without decoding it."""
    padded = image_bytes + b"\0" * 26  # Short inputs: read zeros, not past the end.

    def raw(offset, dtype, little_endian):
        return tf.cast(tf.io.decode_raw(tf.strings.substr(padded, offset, 8 if dtype == tf.int32 else 4), dtype,
                                        little_endian=little_endian), tf.int64)

    def jpeg():
        return tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64)

    def png():  # IHDR: big-endian width, height.
        return tf.reverse(raw(16, tf.int32, False), [0])

    def gif():  # Logical screen: little-endian 16-bit width, height.
        return tf.reverse(raw(6, tf.uint16, True), [0])

    def bmp():  # BITMAPINFOHEADER: little-endian 32-bit width, height (negative: top-down).
        return tf.abs(tf.reverse(raw(18, tf.int32, True), [0]))

    def starts(magic):
        return tf.equal(tf.strings.substr(padded, 0, len(magic)), magic)

    readers = {"JPEG": jpeg, "PNG": png, "GIF": gif, "BMP": bmp}
    return tf.case([(starts(magic), readers[name]) for magic, name in IMAGE_MAGIC.items()],
                   default=lambda: tf.zeros([2], tf.int64))


def _byte_reader(image_bytes):
    """A function i (int32 or int64) -> the i-th byte of `image_bytes` as int32 (0 past the end)."""
    data = tf.concat([tf.cast(tf.io.decode_raw(image_bytes, tf.uint8), tf.int32), [0]], 0)
    last = tf.size(data, out_type=tf.int64) - 1
    return lambda i: data[tf.minimum(tf.cast(i, tf.int64), last)]


def _gif_transparency(image_bytes):
    """(transparent, table_start, table_size) of a GIF's first frame, from its blocks.

    `transparent`: the frame's Graphic Control Extension names a transparent
    colour index; the colour table the frame uses (its own, or the global
    one) lies at bytes [table_start, table_start + table_size).
    """
    at = _byte_reader(image_bytes)
    n = tf.strings.length(image_bytes)

    def table(flags):  # Colour table flag and size: 3 * 2^(bits 0-2 + 1) bytes.
        return tf.where(tf.bitwise.bitwise_and(flags, 0x80) > 0,
                        3 * tf.bitwise.left_shift(2, tf.bitwise.bitwise_and(flags, 7)), 0)

    global_size = table(at(10))

    def skip_sub_blocks(o):  # Data sub-blocks: a length byte and that many bytes, up to a 0 length.
        end, = tf.while_loop(lambda o: tf.logical_and(o < n, at(o) > 0), lambda o: (o + at(o) + 1,), (o,))
        return end + 1

    def step(o, transparent, start, size, done):
        kind, label = at(o), at(o + 1)
        is_gce = tf.logical_and(tf.equal(kind, 0x21), tf.equal(label, 0xF9))
        transparent = tf.where(is_gce, tf.bitwise.bitwise_and(at(o + 3), 1) > 0, transparent)
        descriptor = tf.equal(kind, 0x2C)  # The first image: its own table follows its 10 bytes if flagged.
        own = table(at(o + 9))
        start = tf.where(tf.logical_and(descriptor, own > 0), o + 10, start)
        size = tf.where(tf.logical_and(descriptor, own > 0), own, size)
        done = tf.logical_or(descriptor, tf.not_equal(kind, 0x21))  # An image, the trailer, or damage.
        o = tf.cond(done, lambda: o, lambda: skip_sub_blocks(o + 2))
        return o, transparent, start, size, done

    _, transparent, start, size, done = tf.while_loop(
        lambda o, t, s, z, done: tf.logical_and(tf.logical_not(done), o < n), step,
        [13 + global_size, tf.constant(False), tf.constant(13), global_size, tf.constant(False)])
    return tf.logical_and(transparent, done), start, size


def _png_has_trns(image_bytes):
    """Whether a PNG has a tRNS chunk (transparent palette entries) before its image data."""
    at = _byte_reader(image_bytes)
    n = tf.cast(tf.strings.length(image_bytes), tf.int64)

    def step(o, found, done):  # A chunk: 4-byte big-endian length, 4-byte type, data, 4-byte CRC.
        length = sum(tf.cast(at(o + i), tf.int64) * 2 ** (24 - 8 * i) for i in range(4))
        kind = tf.strings.substr(image_bytes, tf.cast(o + 4, tf.int32), 4)
        found = tf.equal(kind, "tRNS")
        done = tf.reduce_any(tf.equal(kind, ["tRNS", "IDAT", "IEND"]))
        return o + 12 + length, found, done

    return tf.while_loop(lambda o, found, done: tf.logical_and(tf.logical_not(done), o + 8 <= n), step,
                         [tf.constant(8, tf.int64), tf.constant(False), tf.constant(False)])[1]


def composite_on_white(rgba):
    """(h, w, 4) uint8 -> (h, w, 3) uint8: the build's transparency on white, to the bit.

    Pillow's paste through the alpha mask onto white: each channel c with
    alpha a becomes (255 (255 - a) + c a) / 255, rounded to nearest by the
    integer steps Pillow takes (v + 128, then (v + v >> 8) >> 8).
    """
    x = tf.cast(rgba, tf.uint16)  # Every step stays below 2^16: 255 * 255 + 128 + 254.
    a = x[..., 3:]
    v = 255 * (255 - a) + x[..., :3] * a + 128
    return tf.cast(tf.bitwise.right_shift(tf.bitwise.right_shift(v, 8) + v, 8), tf.uint8)


def decode_rgb(image_bytes):
    """Any JPEG, PNG, GIF or BMP -> (height, width, 3) uint8 RGB, the build's pixels to the bit.

    The one decode of evaluation, the figures and the exported model's
    serving signature. Transparency is treated as the build treats it
    (`pipelines.image_processing`): a PNG with an alpha channel (RGBA,
    gray + alpha) or a palette with transparent entries (tRNS), and a GIF
    whose first frame has a transparent colour index, are composited on
    white with the build's own arithmetic (`composite_on_white`). TensorFlow
    alone would drop the alpha channel (showing whatever colour lies under a
    transparent pixel) and show a GIF's transparent index as black. An RGB or
    gray PNG's single transparent colour (tRNS) is kept as its colour, as the
    build keeps it. GIFs and BMPs give their first frame.
    """
    def starts(magic):
        return tf.equal(tf.strings.substr(image_bytes, 0, len(magic)), magic)

    def png():
        # Colour type (IHDR byte 25): 4 gray + alpha, 6 RGBA; 3 a palette, transparent with a tRNS chunk.
        # One byte read, not the file: the chunk walk runs for palette PNGs only.
        colour_type = tf.io.decode_raw(tf.strings.substr(image_bytes + b"\0" * 26, 25, 1), tf.uint8)[0]
        alpha = tf.logical_or(tf.reduce_any(tf.equal(colour_type, [4, 6])),
                              tf.cond(tf.equal(colour_type, 3), lambda: _png_has_trns(image_bytes),
                                      lambda: tf.constant(False)))
        return tf.cond(alpha,
                       lambda: composite_on_white(tf.io.decode_png(image_bytes, channels=4)),
                       lambda: tf.io.decode_png(image_bytes, channels=3))

    def gif():
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        transparent, start, size = _gif_transparency(image_bytes)

        def on_white():
            # The same GIF with every colour of its table white: opaque pixels
            # decode white and the transparent ones (TensorFlow's) black.
            white = tf.strings.substr(tf.constant(b"\xff" * 768), 0, size)
            marked = tf.strings.join([tf.strings.substr(image_bytes, 0, start), white,
                                      tf.strings.substr(image_bytes, start + size, -1)])
            hidden = tf.io.decode_image(marked, channels=3, expand_animations=False)[..., :1] == 0
            return tf.where(hidden, tf.constant(255, tf.uint8), image)

        return tf.cond(transparent, on_white, lambda: image)

    def other():  # JPEG and BMP: no transparency in the build either.
        return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)

    image = tf.case([(starts(b"\x89PNG"), png), (starts(b"GIF8"), gif)], default=other)
    return tf.ensure_shape(image, [None, None, 3])


def decode_square(image_bytes, size: int = SQUARE):
    """Any JPEG/PNG/GIF/BMP -> the paper's stored form: (size, size, 3) uint8.

    §2: the shorter side scaled to `size` (bicubic, antialiased), then the
    central square. Records of the pipeline already are that square and are
    only decoded, so evaluation and the exported model see the same pixels.

    The central square is cut in the source's own coordinates first and only
    it is scaled, as the build does: scaling a long thin image whole first
    (5000x1 to 1,280,000x256) would take gigabytes for nothing.
    """
    image = decode_rgb(image_bytes)
    shape = tf.shape(image)[:2]

    def scale_and_crop():
        side = tf.reduce_min(shape)
        square = tf.image.crop_to_bounding_box(image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side)
        scaled = tf.image.resize(square, [size, size], method="bicubic", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(scaled), 0, 255), tf.uint8)

    square = tf.cond(tf.reduce_all(shape == size), lambda: image, scale_and_crop)
    return tf.ensure_shape(square, [size, size, 3])


# ---------------------------------------------------------------------------
# Training parser (§4.1): crop and reflect in the stream, lighting and mean in the step.


def _record_shape(image_bytes, stats: ColorStats):
    """(height, width) training patches are taken from: the record's, or the square's."""
    if stats.record_size is None:
        return tf.constant(SQUARE), tf.constant(SQUARE)  # After decode_square.
    shape = tf.io.extract_jpeg_shape(image_bytes)
    return shape[0], shape[1]


def lighting_shift(alpha, stats: ColorStats):
    """§4.1 PCA lighting: [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T, in 0..255 pixel units.

    `alpha` is (3,) for one image or (batch, 3) for a batch.

    The eigenvalues are those of pixels scaled to [0, 1] (as in the reference
    implementations; in 0..255 units the formula would shift by hundreds of
    levels), and the shift is scaled back to 0..255.
    """
    values = tf.constant(stats.eigenvalues) / (255.0 * 255.0)
    return tf.linalg.matvec(tf.constant(stats.eigenvectors), alpha * values) * 255.0


class Augment(NamedTuple):
    """§4.1's random choices for one training patch (or, stacked, for a batch).

    The input stream draws them and crops; the training step uses them again
    for the float part (`finish_batch`). A nest of tensors: it travels through
    tf.data, `strategy.run` and `tf.function` as it is.
    """

    top: tf.Tensor  # int32: the patch's first row in the square.
    left: tf.Tensor  # int32: its first column.
    flip: tf.Tensor  # bool: reflected horizontally.
    alpha: tf.Tensor  # float32 (3,): lighting coefficients, alpha_i ~ N(0, 0.1).


def train_params(seed, height, width, crop: int = CROP) -> Augment:
    """The random choices for one training image, from a (2,) int seed (stateless: the
    same seed gives the same choices, in any order and on any thread).

    Returns:
      The patch position (uniform over every position inside the image),
      whether to reflect it (probability 1/2), and the three lighting
      coefficients alpha_i ~ N(0, 0.1).
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    top = tf.random.stateless_uniform([], seeds[0], 0, height - crop + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[1], 0, width - crop + 1, dtype=tf.int32)
    flip = tf.random.stateless_uniform([], seeds[2]) < 0.5
    alpha = tf.random.stateless_normal([3], seeds[3], stddev=LIGHTING_STD)
    return Augment(top, left, flip, alpha)


def crop_for_train(image_bytes, stats: ColorStats, crop: int = CROP, seed=None):
    """The input stream's per-image work: a random patch, reflected at random, as uint8.

    The float work (mean subtraction, lighting) is left to `finish_batch`, which
    runs inside the training step: on an accelerator it costs nothing there, and
    uint8 patches are a quarter of the host-to-device traffic of float32 ones.

    Args:
      image_bytes: A scalar string tensor (a record's `image/encoded`).
      stats: Colour statistics of the training set.
      crop: Patch side (227).
      seed: (2,) int tensor: the record's own seed for stateless randomness;
        None draws one from the global generator.

    Returns:
      (patch, augment): (crop, crop, 3) uint8 (already reflected if chosen) and
      the `Augment` that made it.
    """
    h, w = _record_shape(image_bytes, stats)
    if seed is None:
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    aug = train_params(seed, h, w, crop)
    if stats.record_size is None:  # --noresize records: the slow path through the square.
        patch = tf.slice(decode_square(image_bytes), tf.stack([aug.top, aug.left, 0]), [crop, crop, 3])
    else:
        # Only the patch is decoded: several times less work than the whole image.
        # (Pixels on the patch's own border can differ by a few levels from a full
        # decode: chroma upsampling there lacks its outside neighbours.)
        patch = tf.io.decode_and_crop_jpeg(image_bytes, tf.stack([aug.top, aug.left, crop, crop]), channels=3)
    patch = tf.cond(aug.flip, lambda: tf.reverse(patch, axis=[1]), lambda: patch)
    return tf.ensure_shape(patch, [crop, crop, 3]), aug


def finish_batch(patches, aug: Augment, stats: ColorStats):
    """The training step's part of §4.1: float, minus the mean, plus the lighting.

    Args:
      patches: (batch, crop, crop, 3) uint8 from `crop_for_train`.
      aug: The batch's `Augment` (each field with a leading batch dimension).
      stats: Colour statistics of the training set.

    Returns:
      (batch, crop, crop, 3) float32: each patch minus the mean image at the
      patch's own position (mirrored where the patch was), plus its lighting shift.
    """
    crop = patches.shape[1]
    x = tf.cast(patches, tf.float32)
    x = x + lighting_shift(aug.alpha, stats)[:, None, None, :]
    mean = tf.convert_to_tensor(stats.mean)
    if len(mean.shape) == 1:
        return x - mean
    offsets = tf.range(crop)
    rows = aug.top[:, None] + offsets
    cols = aug.left[:, None] + tf.where(aug.flip[:, None], crop - 1 - offsets, offsets)
    m = tf.gather(tf.gather(mean, rows), cols, axis=2, batch_dims=1)  # (batch, crop, crop, 3)
    return x - m


def preprocess_for_train(image_bytes, stats: ColorStats, crop: int = CROP, seed=None):
    """One training image, all of §4.1: `crop_for_train` then `finish_batch`.

    Returns:
      (crop, crop, 3) float32, mean subtracted, with lighting noise.
    """
    patch, aug = crop_for_train(image_bytes, stats, crop, seed)
    return finish_batch(patch[None], tf.nest.map_structure(lambda t: t[None], aug), stats)[0]


# ---------------------------------------------------------------------------
# Evaluation parser: the central patch, or the paper's ten.


def _mean_patch(stats: ColorStats, top, left, crop: int):
    mean = tf.convert_to_tensor(stats.mean)  # An array, or the exported model's variable.
    if len(mean.shape) == 1:
        return mean
    return tf.slice(mean, tf.stack([top, left, 0]), [crop, crop, 3])


def patch_from_square(square, top, left, stats: ColorStats, crop: int = CROP):
    """The crop x crop patch of a decoded square at (top, left), float32, mean subtracted."""
    patch = tf.slice(square, tf.stack([top, left, 0]), [crop, crop, 3])
    return tf.cast(patch, tf.float32) - _mean_patch(stats, top, left, crop)


def preprocess_for_eval(image_bytes, stats: ColorStats, crop: int = CROP):
    """The central patch of the decoded square, mean subtracted: (crop, crop, 3) float32.

    The exported model's serving signature runs this same function.
    """
    offset = (stats.square_size - crop) // 2
    return patch_from_square(decode_square(image_bytes, stats.square_size), offset, offset, stats, crop)


def ten_crops(image_bytes, stats: ColorStats, crop: int = CROP):
    """§4.1 test-time patches: corners and centre, then their reflections: (10, crop, crop, 3)."""
    square = decode_square(image_bytes, stats.square_size)
    far, mid = stats.square_size - crop, (stats.square_size - crop) // 2
    positions = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]
    patches = tf.stack([patch_from_square(square, t, l, stats, crop) for t, l in positions])
    return tf.concat([patches, tf.reverse(patches, axis=[2])], axis=0)


def display_images(images, stats: ColorStats):
    """Adds the mean colour back and scales to [0, 1] for TensorBoard."""
    mean = stats.mean if stats.mean.ndim == 1 else stats.mean.reshape(-1, 3).mean(axis=0)
    return tf.clip_by_value((images + mean) / 255.0, 0.0, 1.0)
