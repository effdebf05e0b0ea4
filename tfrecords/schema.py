"""The record schema: feature keys, the `tf.train.Example` of one image, shard names.

Records are `tf.train.Example`s with the classic TensorFlow ImageNet keys, so
existing ImageNet readers work on them unchanged. The build writes them
without TensorFlow (`make_example`); readers parse them with `parse_example`.
`tfrecords/README.md` is the same contract for people.
"""

from __future__ import annotations

import re

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
MEAN_IMAGE_FILE = "mean_image.npy"
SPLITS = ("train", "validation")

# Feature keys of one record.
ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
CHANNELS = "image/channels"
COLORSPACE = "image/colorspace"
LABEL = "image/class/label"
SYNSET = "image/class/synset"
TEXT = "image/class/text"
FILENAME = "image/filename"

# The image formats the build accepts and serving decodes: one list for both
# sides (each is one TensorFlow's `tf.io.decode_image` reads), by its name in
# Pillow (`Image.format`), with the first bytes that identify it.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
IMAGE_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP"}
# The largest image decoded, in pixels (height x width), by the build and by
# serving: decompression bombs and damaged headers stop here.
MAX_PIXELS = 128 * 1024 * 1024

# §2: images are stored as 256x256 squares (the build's default `--image_size`)
# and the network takes 227x227 patches of them. The paper says 224x224 inputs,
# but 11x11 kernels at stride 4 give 55x55 maps (as its Figure 2 shows) only
# from 227x227: (227 - 11) / 4 + 1 = 55. Stored images are at least CROP.
SQUARE = 256
CROP = 227

# Whole names only (`fullmatch`); ASCII digits (`\d` would take any script's).
_SHARD_RE = re.compile(r"(train|validation)-([0-9]{5})-of-([0-9]{5})")


def shard_name(split: str, index: int, num_shards: int) -> str:
    """Returns the file name of one shard, e.g. `train-00000-of-01024`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards")
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """Inverse of `shard_name`: (split, index, num_shards), or None if not a shard."""
    m = _SHARD_RE.fullmatch(name)
    if not m:
        return None
    return m.group(1), int(m.group(2)), int(m.group(3))


def _example_class():
    """`tf.train.Example` as a protobuf class, without importing TensorFlow.

    Built once from the schema of TensorFlow's `example.proto`/`feature.proto`
    (field numbers and types) in a private descriptor pool, so the bytes are
    the same as `tf.train.Example(...).SerializeToString()` and Beam workers
    write records without starting TensorFlow.
    """
    global _EXAMPLE
    if _EXAMPLE is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        F = descriptor_pb2.FieldDescriptorProto
        fdp = descriptor_pb2.FileDescriptorProto(name="tfrecords/example.proto", package="tensorflow",
                                                 syntax="proto3")

        def message(name, *fields, nested=()):
            m = fdp.message_type.add(name=name)
            for n in nested:
                m.nested_type.append(n)
            for field in fields:
                m.field.append(field)
            return m

        def field(name, number, kind, label=F.LABEL_OPTIONAL, type_name="", oneof=None):
            f = F(name=name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = type_name
            if oneof is not None:
                f.oneof_index = oneof
            return f

        message("BytesList", field("value", 1, F.TYPE_BYTES, F.LABEL_REPEATED))
        message("FloatList", field("value", 1, F.TYPE_FLOAT, F.LABEL_REPEATED))
        message("Int64List", field("value", 1, F.TYPE_INT64, F.LABEL_REPEATED))
        feature = message(
            "Feature",
            field("bytes_list", 1, F.TYPE_MESSAGE, type_name=".tensorflow.BytesList", oneof=0),
            field("float_list", 2, F.TYPE_MESSAGE, type_name=".tensorflow.FloatList", oneof=0),
            field("int64_list", 3, F.TYPE_MESSAGE, type_name=".tensorflow.Int64List", oneof=0),
        )
        feature.oneof_decl.add(name="kind")
        entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
        entry.field.append(field("key", 1, F.TYPE_STRING))
        entry.field.append(field("value", 2, F.TYPE_MESSAGE, type_name=".tensorflow.Feature"))
        entry.options.map_entry = True
        message("Features", field("feature", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED,
                                  ".tensorflow.Features.FeatureEntry"), nested=[entry])
        message("Example", field("features", 1, F.TYPE_MESSAGE, type_name=".tensorflow.Features"))
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fdp)
        _EXAMPLE = message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))
    return _EXAMPLE


_EXAMPLE = None


def make_example(
    *,
    jpeg: bytes,
    height: int,
    width: int,
    label: int,
    synset: str,
    text: str,
    filename: str,
) -> bytes:
    """Serialises one image and its label as a `tf.train.Example`.

    Args:
      jpeg: RGB baseline JPEG bytes.
      height: Image height in pixels.
      width: Image width in pixels.
      label: 0-based class index (position of the synset in `classes`).
      synset: WordNet id of the class, e.g. `n01440764`.
      text: Human-readable class name.
      filename: Name of the source file (archive member or file name).

    Returns:
      The serialised example (TensorFlow is not imported).
    """
    example = _example_class()()
    feature = example.features.feature
    for key, value in ((ENCODED, jpeg), (FORMAT, b"JPEG")):
        feature[key].bytes_list.value.append(value)
    for key, value in ((HEIGHT, height), (WIDTH, width), (CHANNELS, 3)):
        feature[key].int64_list.value.append(int(value))
    feature[COLORSPACE].bytes_list.value.append(b"RGB")
    feature[LABEL].int64_list.value.append(int(label))
    for key, value in ((SYNSET, synset), (TEXT, text), (FILENAME, filename)):
        feature[key].bytes_list.value.append(value.encode())
    return example.SerializeToString(deterministic=True)  # Map keys sorted: stable bytes.


def feature_spec() -> dict:
    """The `tf.io.parse_single_example` spec for a record (works in graph mode)."""
    import tensorflow as tf

    return {
        ENCODED: tf.io.FixedLenFeature([], tf.string),
        FORMAT: tf.io.FixedLenFeature([], tf.string, default_value="JPEG"),
        HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        WIDTH: tf.io.FixedLenFeature([], tf.int64),
        CHANNELS: tf.io.FixedLenFeature([], tf.int64, default_value=3),
        COLORSPACE: tf.io.FixedLenFeature([], tf.string, default_value="RGB"),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
        SYNSET: tf.io.FixedLenFeature([], tf.string, default_value=""),
        TEXT: tf.io.FixedLenFeature([], tf.string, default_value=""),
        FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }


def parse_example(serialized):
    """Parses one serialised record into a dict keyed by the feature keys."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec())

