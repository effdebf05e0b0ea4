"""The data contract between `pipelines.build_tfrecords` and every reader.

One place in code for the record format and `metadata.json`; the writer
(the Beam pipeline) and the readers (input stream, verification, evaluation)
import it, so the two cannot drift apart. `tfrecords/README.md` documents the
same contract for people.

Records are `tf.train.Example`s with the classic TensorFlow ImageNet keys, so
existing ImageNet readers work on them unchanged.
"""

from __future__ import annotations

import json
import os
import re
import struct
import uuid
from typing import Any, Mapping

import numpy as np

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

_SHARD_RE = re.compile(r"^(train|validation)-(\d{5})-of-(\d{5})$")


def shard_name(split: str, index: int, num_shards: int) -> str:
    """Returns the file name of one shard, e.g. `train-00000-of-01024`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards")
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """Inverse of `shard_name`: (split, index, num_shards), or None if not a shard."""
    m = _SHARD_RE.match(name)
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
        fdp = descriptor_pb2.FileDescriptorProto(name="alexnet_tf/example.proto", package="tensorflow",
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


def _masked_crc32c(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_record(f, data: bytes) -> int:
    """Appends one record to an open binary file in the TFRecord framing.

    The framing `tf.data.TFRecordDataset` reads: little-endian uint64 length,
    masked CRC-32C of the length, the data, masked CRC-32C of the data.
    Returns the number of bytes written.
    """
    header = struct.pack("<Q", len(data))
    f.write(header + struct.pack("<I", _masked_crc32c(header)))
    f.write(data)
    f.write(struct.pack("<I", _masked_crc32c(data)))
    return len(data) + 16


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


class MetadataError(ValueError):
    """metadata.json is missing, unreadable or inconsistent."""


def metadata_path(data_dir: str) -> str:
    return os.path.join(data_dir, METADATA_FILE)


def write_json_atomically(path: str, obj: Any) -> None:
    """Writes JSON to `path` through a temporary file and a rename.

    Readers see either the old file or the whole new one, never a torn write
    (on object stores, which have no rename, the copy is still all-or-nothing).
    """
    from alexnet_tf import fileio

    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fileio.open_file(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    fileio.rename(tmp, path)


def load_metadata(data_dir: str) -> dict:
    """Reads and sanity-checks `<data_dir>/metadata.json`.

    Raises:
      MetadataError: with a specific message when the file is missing,
        unreadable, of another format version, or internally inconsistent.
    """
    import tensorflow as tf

    path = metadata_path(data_dir)
    if not tf.io.gfile.exists(path):
        raise MetadataError(
            f"{path} not found: build the records first with "
            "`python -m pipelines.build_tfrecords --output_dir "
            f"{data_dir}` (a folder without metadata.json is incomplete)"
        )
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetadataError(f"{path} is not valid JSON: {e}") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise MetadataError(
            f"{path} has format_version {version!r}; this code reads {FORMAT_VERSION}"
        )
    classes = meta.get("classes", [])
    if [c.get("label") for c in classes] != list(range(len(classes))):
        raise MetadataError(f"{path}: classes are not listed in label order 0..n-1")
    if meta.get("num_classes") != len(classes):
        raise MetadataError(
            f"{path}: num_classes={meta.get('num_classes')} but {len(classes)} classes listed"
        )
    for split, info in meta.get("splits", {}).items():
        total = sum(s["num_examples"] for s in info["shards"])
        if total != info["num_examples"]:
            raise MetadataError(
                f"{path}: split {split} says {info['num_examples']} examples "
                f"but its shards add up to {total}"
            )
    return meta


def shard_paths(data_dir: str, meta: Mapping, split: str) -> list[str]:
    """Full paths of a split's shards, in shard order, as listed in metadata."""
    if split not in meta["splits"]:
        raise MetadataError(
            f"split {split!r} not in {metadata_path(data_dir)}; "
            f"it has {sorted(meta['splits'])}"
        )
    return [os.path.join(data_dir, s["file"]) for s in meta["splits"][split]["shards"]]


def load_mean_image(data_dir: str, meta: Mapping) -> np.ndarray:
    """The training-set mean image (H, W, 3) float32 in 0..255 pixel units."""
    import tensorflow as tf

    name = meta["color_stats"]["mean_image_file"]
    with tf.io.gfile.GFile(os.path.join(data_dir, name), "rb") as f:
        return np.load(f)
