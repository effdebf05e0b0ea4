"""The data contract between `pipelines.build_tfrecords` and every reader.

One place in code for the record format and `metadata.json`; the writer
(the Beam pipeline) and the readers (input stream, verification, evaluation)
import it, so the two cannot drift apart. `tfrecords/README.md` documents the
same contract for people.

Records are `tf.train.Example`s with the classic TensorFlow ImageNet keys, so
existing ImageNet readers work on them unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import unicodedata
import uuid
from typing import Any, Mapping, NoReturn

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

# The image formats the build accepts and serving decodes: one list for both
# sides (each is one TensorFlow's `tf.io.decode_image` reads), by its name in
# Pillow (`Image.format`), with the first bytes that identify it.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
IMAGE_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP"}
# The largest image decoded, in pixels (height x width), by the build and by
# serving: decompression bombs and damaged headers stop here.
MAX_PIXELS = 128 * 1024 * 1024

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


# ---------------------------------------------------------------------------
# metadata.json as typed objects. Each class's `to_json` gives its part of the
# file with the keys in the file's order; `Metadata.from_json` checks a parsed
# file and builds the objects.


class _Flat:
    """`to_json` of a dataclass whose fields are all JSON values: its fields, in order."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ClassInfo(_Flat):
    """One class: its 0-based label (position in `classes`), WordNet id and name."""

    label: int
    synset: str
    name: str


# Unicode categories a class's synset or name may not hold: control characters
# (tab, newline, ...), lone surrogates, line and paragraph separators. Class
# lists are written one class a line, tab-separated (the exported model's
# class table), so each must be one line of text.
_NOT_IN_CLASS_TEXT = ("Cc", "Cs", "Zl", "Zp")


def control_character(text: str) -> str | None:
    """The first character of `text` a synset or class name may not hold, as U+XXXX, or None."""
    for ch in text:
        if unicodedata.category(ch) in _NOT_IN_CLASS_TEXT:
            return f"U+{ord(ch):04X}"
    return None


class ClassMismatch(ValueError):
    """A model and a set of records (or two runs) have different class lists."""


def check_same_classes(model_synsets, records_synsets, model: str, data: str) -> None:
    """Raises `ClassMismatch` unless the two class lists are the same synsets in the same order.

    Labels are positions in the list: the same count of other classes, or the
    same classes in another order, would pair every output with the wrong
    class without any other error.

    Args:
      model_synsets, records_synsets: Synsets in label order.
      model, data: How to name each side in the message.
    """
    model_synsets, records_synsets = list(model_synsets), list(records_synsets)
    if model_synsets == records_synsets:
        return
    if len(model_synsets) != len(records_synsets):
        raise ClassMismatch(f"{model} has {len(model_synsets)} classes, {data} has {len(records_synsets)}")
    differ = [i for i, (a, b) in enumerate(zip(model_synsets, records_synsets)) if a != b]
    i = differ[0]
    more = f" (and {len(differ) - 1} more labels differ)" if len(differ) > 1 else ""
    raise ClassMismatch(f"{model} and {data} have different classes: label {i} is {model_synsets[i]} in "
                        f"{model}, {records_synsets[i]} in {data}{more}")


@dataclasses.dataclass(frozen=True)
class ShardInfo(_Flat):
    """One shard: its file name (relative to the records folder), record count and identity.

    `bytes`, `sha256` (of the whole file) and `head_sha256` (of its first
    HEAD_BYTES) are written by the build as it writes the shard; None in
    metadata written before they were recorded.
    """

    file: str
    num_examples: int
    bytes: int | None = None
    sha256: str | None = None
    head_sha256: str | None = None


# Readers check each shard's size and the digest of its first bytes at start
# (64 KiB a shard: about 74 MB for ImageNet's 1152 shards); verify_tfrecords
# checks the whole file.
HEAD_BYTES = 1 << 16


class ShardDigest:
    """Size, SHA-256 and SHA-256 of the first HEAD_BYTES of a file, fed its bytes in order."""

    def __init__(self):
        self.size = 0
        self.full = hashlib.sha256()
        self.head = hashlib.sha256()

    def update(self, data: bytes) -> None:
        if self.size < HEAD_BYTES:
            self.head.update(data[:HEAD_BYTES - self.size])
        self.full.update(data)
        self.size += len(data)

    def update_from(self, f) -> None:
        """Feeds the rest of an open binary file, 4 MiB at a time."""
        while chunk := f.read(1 << 22):
            self.update(chunk)

    def info(self) -> dict:
        """{"bytes", "sha256", "head_sha256"}, as `ShardInfo` has them."""
        return {"bytes": self.size, "sha256": self.full.hexdigest(), "head_sha256": self.head.hexdigest()}


class DigestingWriter:
    """A binary file that also feeds every byte written to a `ShardDigest`."""

    def __init__(self, f):
        self.f, self.digest = f, ShardDigest()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.f.write(data)


def file_digest(path: str, head_only: bool = False) -> ShardDigest:
    """The `ShardDigest` of a file (local or any filesystem TensorFlow reads); with
    `head_only`, of its first HEAD_BYTES only (its size is then the file's, from a stat)."""
    import tensorflow as tf

    d = ShardDigest()
    with tf.io.gfile.GFile(path, "rb") as f:
        if head_only:
            d.update(f.read(HEAD_BYTES))
            d.size = tf.io.gfile.stat(path).length
            return d
        d.update_from(f)
    return d


def _record_length(header: bytes) -> int | None:
    """The data length a TFRecord header (length, masked CRC of the length) gives; None if short or failing its CRC."""
    if len(header) < 12 or struct.unpack("<I", header[8:])[0] != _masked_crc32c(header[:8]):
        return None
    return struct.unpack("<Q", header[:8])[0]


class DamagedRecord(ValueError):
    """A TFRecord file whose framing or a record's CRC fails; the message names
    the offset as TensorFlow does (a record's start for its length, its data's
    start for its data)."""


def read_records(f, size: int, digest: ShardDigest | None = None):
    """Yields the records of an open binary TFRecord file of `size` bytes, each
    checked against its CRCs, and feeds every byte read to `digest`.

    One pass over the file checks both the records and the shard's digest
    (verify_tfrecords), never holding more than one record.

    Raises:
      DamagedRecord: at the first record that fails; the bytes after it are left unread.
    """
    def read(n: int) -> bytes:
        data = f.read(n)
        if digest is not None:
            digest.update(data)
        return data

    pos = 0
    while header := read(12):
        n = _record_length(header)
        if n is None:
            raise DamagedRecord(f"{'truncated' if len(header) < 12 else 'corrupted'} record at {pos}")
        if pos + 16 + n > size:  # Before reading: a length past the end is not allocated.
            raise DamagedRecord(f"truncated record at {pos}")
        data, crc = read(n), read(4)
        if len(data) < n or len(crc) < 4:  # Shorter than its size said when this started.
            raise DamagedRecord(f"truncated record at {pos}")
        if struct.unpack("<I", crc)[0] != _masked_crc32c(data):
            raise DamagedRecord(f"corrupted record at {pos + 12}")
        yield data
        pos += 16 + n


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """One split: records written, inputs read and rejected, and its shards in shard order.

    `num_read == num_examples + num_rejected`; `num_examples` is the sum of the
    shards' counts and `num_shards` their number. `num_upscaled` counts the
    records whose input's shorter side was below `image.size` (scaled up to
    it; 0 with `--noresize`); None in metadata of builds that did not count.
    """

    num_examples: int
    num_shards: int
    num_read: int
    num_rejected: int
    source: str  # Where the inputs came from, for people.
    shards: tuple[ShardInfo, ...]
    num_upscaled: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "shards", tuple(self.shards))

    def to_json(self) -> dict:
        return {
            "num_examples": self.num_examples,
            "num_shards": self.num_shards,
            "num_read": self.num_read,
            "num_rejected": self.num_rejected,
            "source": self.source,
            "shards": [s.to_json() for s in self.shards],
            **({} if self.num_upscaled is None else {"num_upscaled": self.num_upscaled}),
        }


@dataclasses.dataclass(frozen=True)
class ImageInfo(_Flat):
    """How the images are stored.

    `size` is the side of the stored square images when `resized`, None when
    the records keep their original sizes (`--noresize`).
    """

    size: int | None
    resized: bool
    jpeg_quality: int
    colorspace: str = "RGB"
    note: str = ""

    @property
    def square(self) -> int | None:
        """Side of the stored square images, or None when they keep their own sizes."""
        return self.size if self.resized else None


@dataclasses.dataclass(frozen=True)
class ColorStatsInfo:
    """Colour statistics of the training images as stored (float64, 0..`pixel_scale` units).

    Lists given to the constructor become tuples; `to_json` gives lists back.

    Attributes:
      pixel_scale: The pixel unit's top value (255).
      num_images, num_pixels: What the statistics were computed over.
      mean_rgb, std_rgb: (3,) per-channel mean and standard deviation.
      covariance: (3, 3) population covariance of RGB pixels.
      eigenvalues: (3,) its eigenvalues, descending.
      eigenvectors: (3, 3) the matching unit eigenvectors as columns.
      mean_image_file: The mean image's file in the records folder, or None.
      mean_image_shape: Its (H, W, 3) shape, or None.
    """

    pixel_scale: float
    num_images: int
    num_pixels: int
    mean_rgb: tuple[float, ...]
    std_rgb: tuple[float, ...]
    covariance: tuple[tuple[float, ...], ...]
    eigenvalues: tuple[float, ...]
    eigenvectors: tuple[tuple[float, ...], ...]
    mean_image_file: str | None = None
    mean_image_shape: tuple[int, int, int] | None = None

    def __post_init__(self):
        for name in ("mean_rgb", "std_rgb", "eigenvalues"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("covariance", "eigenvectors"):
            object.__setattr__(self, name, tuple(tuple(row) for row in getattr(self, name)))
        if self.mean_image_shape is not None:
            object.__setattr__(self, "mean_image_shape", tuple(self.mean_image_shape))

    def to_json(self) -> dict:
        """The `color_stats` object; the mean image keys only when there is a mean image."""
        out = {
            "pixel_scale": self.pixel_scale,
            "num_images": self.num_images,
            "num_pixels": self.num_pixels,
            "mean_rgb": list(self.mean_rgb),
            "std_rgb": list(self.std_rgb),
            "covariance": [list(r) for r in self.covariance],
            "eigenvalues": list(self.eigenvalues),
            "eigenvectors": [list(r) for r in self.eigenvectors],
        }
        if self.mean_image_file is not None:
            out["mean_image_file"] = self.mean_image_file
        if self.mean_image_shape is not None:
            out["mean_image_shape"] = list(self.mean_image_shape)
        return out


@dataclasses.dataclass(frozen=True)
class Rejection(_Flat):
    """One input that was read but not written, and why."""

    split: str
    file: str
    reason: str


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """The build's parameters and duration.

    `extra` keeps keys this code does not know (from a newer builder), in their
    order, so that a read and a write lose nothing; `to_json` writes them after
    the known keys. It takes no part in hashing.
    """

    imagenet_dir: str
    val_labels: str | None
    seed: int
    train_shards: int
    validation_shards: int
    max_reject_fraction: float
    seconds: float
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "extra", dict(self.extra))

    def to_json(self) -> dict:
        known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**known, **{k: v for k, v in self.extra.items() if k not in known}}


@dataclasses.dataclass(frozen=True)
class Metadata:
    """The whole of metadata.json (format version 1); see `tfrecords/README.md`.

    `from_json` checks a parsed file; `to_json` gives it back key for key, so
    `Metadata.from_json(m.to_json()) == m`. `splits` keeps the file's order
    (train, then validation) and takes no part in hashing.

    Attributes:
      format_version: `FORMAT_VERSION`.
      dataset: "ILSVRC2012".
      created: UTC time of the build, ISO 8601.
      num_classes: `len(classes)`.
      classes: In label order: `classes[i].label == i`.
      splits: Split name -> its counts and shards; only the splits built.
      image: How the images are stored.
      color_stats: Of the training images; None without a training split.
      rejected: Inputs read but not written.
      build: The build's parameters.
    """

    format_version: int
    dataset: str
    created: str
    num_classes: int
    classes: tuple[ClassInfo, ...]
    splits: Mapping[str, SplitInfo] = dataclasses.field(hash=False)
    image: ImageInfo
    color_stats: ColorStatsInfo | None
    rejected: tuple[Rejection, ...]
    build: BuildInfo

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "splits", dict(self.splits))
        object.__setattr__(self, "rejected", tuple(self.rejected))

    @property
    def synsets(self) -> tuple[str, ...]:
        """The classes' WordNet ids in label order."""
        return tuple(c.synset for c in self.classes)

    def shards_by_head(self) -> dict:
        """Recorded head digest -> shard file, over every split (to name a shard found in another's place)."""
        return {x.head_sha256: x.file for s in self.splits.values() for x in s.shards if x.head_sha256}

    def split(self, name: str) -> SplitInfo:
        """The split `name`.

        Raises:
          MetadataError: the split was not built.
        """
        if name not in self.splits:
            raise MetadataError(f"split {name!r} not in {METADATA_FILE}; it has {sorted(self.splits)}")
        return self.splits[name]

    def to_json(self) -> dict:
        """The metadata.json object, keys in the file's order (`color_stats` is {} when None)."""
        return {
            "format_version": self.format_version,
            "dataset": self.dataset,
            "created": self.created,
            "num_classes": self.num_classes,
            "classes": [c.to_json() for c in self.classes],
            "splits": {name: s.to_json() for name, s in self.splits.items()},
            "image": self.image.to_json(),
            "color_stats": self.color_stats.to_json() if self.color_stats is not None else {},
            "rejected": [r.to_json() for r in self.rejected],
            "build": self.build.to_json(),
        }

    @classmethod
    def from_json(cls, obj: Mapping, path: str = METADATA_FILE) -> Metadata:
        """Checks a parsed metadata.json and builds the objects.

        Unknown keys are ignored, except in `build` (kept in `BuildInfo.extra`).

        Args:
          obj: The parsed file.
          path: The file's path, for error messages.

        Raises:
          MetadataError: naming `path` and the field: a key missing, a value of
            the wrong type, another format version, classes not in label order,
            `num_classes` or a split's shard count or example count that does not
            match the lists.
        """
        top = _Obj(obj, "", path)
        version = obj.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise MetadataError(f"{path} has format_version {version!r}; this code reads {FORMAT_VERSION}")
        classes = []
        for c in top.objects("classes"):
            classes.append(ClassInfo(c.integer("label"), _class_text(c, "synset"), _class_text(c, "name")))
        if [c.label for c in classes] != list(range(len(classes))):
            raise MetadataError(f"{path}: classes are not listed in label order 0..n-1")
        num_classes = top.integer("num_classes")
        if num_classes != len(classes):
            raise MetadataError(f"{path}: num_classes={num_classes} but {len(classes)} classes listed")
        splits = {}
        split_objs = top.obj("splits")
        for name in split_objs.value:
            splits[name] = _split_info(name, split_objs.obj(name))
        im = top.obj("image")
        size = im.get("size")
        if size is not None:
            size = im.integer("size")
        image = ImageInfo(size=size, resized=im.boolean("resized"), jpeg_quality=im.integer("jpeg_quality"),
                          colorspace=im.string("colorspace", "RGB"), note=im.string("note", ""))
        stats = top.obj("color_stats", {})
        color_stats = _color_stats_info(stats) if stats.value else None
        rejected = [Rejection(r.string("split"), r.string("file"), r.string("reason"))
                    for r in top.objects("rejected")]
        b = top.obj("build")
        val_labels = b.get("val_labels")
        build = BuildInfo(
            imagenet_dir=b.string("imagenet_dir"),
            val_labels=None if val_labels is None else b.string("val_labels"),
            seed=b.integer("seed"),
            train_shards=b.integer("train_shards"),
            validation_shards=b.integer("validation_shards"),
            max_reject_fraction=b.number("max_reject_fraction"),
            seconds=b.number("seconds"),
            extra={k: v for k, v in b.value.items() if k not in _BUILD_KEYS},
        )
        return cls(format_version=version, dataset=top.string("dataset"), created=top.string("created"),
                   num_classes=num_classes, classes=classes, splits=splits, image=image,
                   color_stats=color_stats, rejected=rejected, build=build)


_BUILD_KEYS = frozenset(f.name for f in dataclasses.fields(BuildInfo)) - {"extra"}
_MISSING = object()


def _show(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


class _Obj:
    """A JSON object of metadata.json and where it is; typed reads that fail with the field's name."""

    def __init__(self, value: Any, where: str, path: str):
        if not isinstance(value, Mapping):
            raise MetadataError(f"{path}: {where or 'the top level'} must be a JSON object, got {_show(value)}")
        self.value, self.where, self.path = value, where, path

    def at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, where: str, what: str, value: Any) -> NoReturn:
        raise MetadataError(f"{self.path}: {where} must be {what}, got {_show(value)}")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.value:
            if default is _MISSING:
                raise MetadataError(f"{self.path}: {self.at(key)} is missing")
            return default
        return self.value[key]

    def integer(self, key: str) -> int:
        v = self.get(key)
        if type(v) is not int:
            self.fail(self.at(key), "an integer", v)
        return v

    def number(self, key: str) -> float:
        v = self.get(key)
        if type(v) not in (int, float):
            self.fail(self.at(key), "a number", v)
        return v

    def boolean(self, key: str) -> bool:
        v = self.get(key)
        if type(v) is not bool:
            self.fail(self.at(key), "true or false", v)
        return v

    def string(self, key: str, default: Any = _MISSING) -> str:
        v = self.get(key, default)
        if type(v) is not str:
            self.fail(self.at(key), "a string", v)
        return v

    def obj(self, key: str, default: Any = _MISSING) -> _Obj:
        return _Obj(self.get(key, default), self.at(key), self.path)

    def objects(self, key: str) -> list[_Obj]:
        v = self.get(key)
        if not isinstance(v, list):
            self.fail(self.at(key), "a list", v)
        return [_Obj(x, f"{self.at(key)}[{i}]", self.path) for i, x in enumerate(v)]

    def numbers(self, key: str, shape: tuple[int, ...]) -> Any:
        """A list (or list of lists) of numbers of the given shape."""
        v = self.get(key)

        def ok(x, dims):
            if not dims:
                return type(x) in (int, float)
            return isinstance(x, list) and len(x) == dims[0] and all(ok(e, dims[1:]) for e in x)

        if not ok(v, shape):
            kind = " numbers" if len(shape) == 1 else " lists of numbers"
            what = "a list of " + "x".join(map(str, shape)) + kind
            self.fail(self.at(key), what, v)
        return v


def _optional(x: _Obj, key: str, kind: type):
    """A field metadata of older builds lacks: None when absent."""
    if x.get(key, None) is None:
        return None
    return x.integer(key) if kind is int else x.string(key)


def _class_text(c: _Obj, key: str) -> str:
    """A class's synset or name: one line of text (see `control_character`)."""
    text = c.string(key)
    bad = control_character(text)
    if bad:
        c.fail(c.at(key), f"one line of text without control characters (found {bad})", text)
    return text


def _shard_file(x: _Obj, split: str) -> str:
    """A shard's `file`: a plain file name of the shard pattern for `split`, never a path.

    Readers open it inside the records folder: a name with `/`, `..` or an
    absolute path would reach outside it.
    """
    file = x.string("file")
    parsed = parse_shard_name(file)
    if parsed is None or parsed[0] != split:
        x.fail(x.at("file"), f"a shard file name of split {split} such as {shard_name(split, 0, 1)} (a plain "
               "name inside the records folder)", file)
    return file


def _split_info(name: str, s: _Obj) -> SplitInfo:
    shards = [ShardInfo(_shard_file(x, name), x.integer("num_examples"), _optional(x, "bytes", int),
                        _optional(x, "sha256", str), _optional(x, "head_sha256", str)) for x in s.objects("shards")]
    info = SplitInfo(num_examples=s.integer("num_examples"), num_shards=s.integer("num_shards"),
                     num_read=s.integer("num_read"), num_rejected=s.integer("num_rejected"),
                     source=s.string("source"), shards=shards, num_upscaled=_optional(s, "num_upscaled", int))
    total = sum(x.num_examples for x in shards)
    if total != info.num_examples:
        raise MetadataError(
            f"{s.path}: split {name} says {info.num_examples} examples but its shards add up to {total}")
    if info.num_shards != len(shards):
        raise MetadataError(f"{s.path}: split {name} says {info.num_shards} shards but lists {len(shards)}")
    return info


def _mean_image_file(c: _Obj) -> str:
    """`color_stats.mean_image_file`: the build's MEAN_IMAGE_FILE, never a path (see `_shard_file`)."""
    file = c.string("mean_image_file")
    if file != MEAN_IMAGE_FILE:
        c.fail(c.at("mean_image_file"), f'"{MEAN_IMAGE_FILE}" (a plain name inside the records folder)', file)
    return file


def _color_stats_info(c: _Obj) -> ColorStatsInfo:
    shape = c.get("mean_image_shape", None)
    if shape is not None:
        shape = c.numbers("mean_image_shape", (3,))
        if any(type(x) is not int for x in shape):
            c.fail(c.at("mean_image_shape"), "a list of 3 integers", shape)
    file = c.get("mean_image_file", None)
    return ColorStatsInfo(
        pixel_scale=c.number("pixel_scale"),
        num_images=c.integer("num_images"),
        num_pixels=c.integer("num_pixels"),
        mean_rgb=c.numbers("mean_rgb", (3,)),
        std_rgb=c.numbers("std_rgb", (3,)),
        covariance=c.numbers("covariance", (3, 3)),
        eigenvalues=c.numbers("eigenvalues", (3,)),
        eigenvectors=c.numbers("eigenvectors", (3, 3)),
        mean_image_file=None if file is None else _mean_image_file(c),
        mean_image_shape=shape,
    )


def load_metadata(data_dir: str) -> Metadata:
    """Reads and checks `<data_dir>/metadata.json`.

    Raises:
      MetadataError: with a specific message when the file is missing,
        unreadable, of another format version, or malformed or internally
        inconsistent (see `Metadata.from_json`).
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
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetadataError(f"{path} is not valid JSON: {e}") from e
    return Metadata.from_json(obj, path)


def write_metadata(data_dir: str, meta: Metadata) -> None:
    """Checks `meta` and writes it to `<data_dir>/metadata.json` atomically.

    Raises:
      MetadataError: `meta` is inconsistent (as `Metadata.from_json` finds); nothing is written.
    """
    path = metadata_path(data_dir)
    obj = meta.to_json()
    Metadata.from_json(obj, path)
    write_json_atomically(path, obj)


def shard_paths(data_dir: str, meta: Metadata, split: str) -> list[str]:
    """Full paths of a split's shards, in shard order, as listed in metadata."""
    if split not in meta.splits:
        raise MetadataError(
            f"split {split!r} not in {metadata_path(data_dir)}; "
            f"it has {sorted(meta.splits)}"
        )
    return [os.path.join(data_dir, s.file) for s in meta.splits[split].shards]


def load_mean_image(data_dir: str, meta: Metadata) -> np.ndarray:
    """The training-set mean image (H, W, 3) float32 in 0..255 pixel units.

    Raises:
      MetadataError: the metadata names no mean image (no training split was built).
    """
    import tensorflow as tf

    if meta.color_stats is None or meta.color_stats.mean_image_file is None:
        raise MetadataError(f"{metadata_path(data_dir)} names no mean image (was the training split built?)")
    path = os.path.join(data_dir, meta.color_stats.mean_image_file)
    if not tf.io.gfile.exists(path):
        raise MetadataError(f"{path} is missing (named by {metadata_path(data_dir)})")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            mean = np.load(f)
    except (ValueError, OSError, EOFError) as e:
        raise MetadataError(f"{path} is not a NumPy array file ({e}): the records folder is damaged") from e
    size = meta.image.square
    if mean.dtype.kind != "f" or (size and mean.shape != (size, size, 3)):
        raise MetadataError(f"{path} holds a {mean.dtype} array of shape {mean.shape}, not the "
                            f"{size}x{size}x3 float mean image {metadata_path(data_dir)} describes")
    return mean


def damaged_at(path: str, offset: int) -> bool:
    """Whether the TFRecord file `path` has a record failing its CRCs at `offset`.

    TensorFlow names a record by where its header starts (a bad length CRC)
    or where its data start, 12 bytes on (a bad data CRC). The walk reads 12
    bytes a record (the length fields) and skips the data, so a shard where
    `offset` is not such a place costs a few reads and answers False.
    """
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as f:
        pos = 0
        while pos + 12 < offset:
            f.seek(pos)
            n = _record_length(f.read(12))
            if n is None:
                return False  # Damaged before `offset`, or not a TFRecord file: not the record named.
            pos += 12 + n + 4
        if pos not in (offset, offset - 12):
            return False
        f.seek(pos)
        n = _record_length(f.read(12))
        if n is None:
            return pos == offset
        data, crc = f.read(n), f.read(4)
        return pos == offset - 12 and (len(crc) < 4 or struct.unpack("<I", crc)[0] != _masked_crc32c(data))


def data_loss_message(error, data_dir: str, meta: Metadata | None = None) -> str:
    """One line for a `tf.errors.DataLossError` met reading `data_dir`'s shards.

    TensorFlow's message gives the record's offset, not the file: with `meta`,
    the shards are searched for a record at that offset that fails its CRC
    (`damaged_at`), and the damaged one is named; otherwise the line points to
    the verifier, which reads shard by shard.
    """
    import concurrent.futures
    import re

    # Inside a tf.function (the training loop) the cause is not on the first
    # line ("Graph execution error:") but further down.
    found = re.search(r"corrupted record at (\d+)", error.message)
    what = found.group(0) if found else re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", "",
                                               error.message.strip().splitlines()[0]).strip()
    named = []
    if meta is not None and found:
        offset = int(found.group(1))
        shards = [x for split in meta.splits.values() for x in split.shards if x.bytes is None or x.bytes > offset]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            hits = pool.map(lambda x: damaged_at(os.path.join(data_dir, x.file), offset), shards)
            named = [x.file for x, hit in zip(shards, hits) if hit]
    if named:
        return (f"records shard {', '.join(os.path.join(data_dir, n) for n in named)} is damaged ({what}); "
                "rebuild it (pipelines.build_tfrecords --overwrite), then run the same command again")
    return (f"a records shard in {data_dir} is damaged ({what}); `python -m pipelines.verify_tfrecords "
            f"--data_dir={data_dir}` names it (rebuild it, then run the same command again)")


def check_shards(data_dir: str, meta: Metadata, splits=None, workers: int = 16) -> None:
    """Raises `MetadataError` naming the shards that are missing or not the ones the build wrote.

    Found at start, not when the input stream reaches them an epoch later: every
    shard `metadata.json` lists must exist and, where the build recorded them,
    have its size and the digest of its first HEAD_BYTES (a shard of another
    build, or two shards swapped, differ there). Damage further in is found by
    the records' CRCs when read, and by `verify_tfrecords`, which digests every
    byte.
    """
    import concurrent.futures

    import tensorflow as tf

    shards = [(split, shard) for split in (splits or sorted(meta.splits)) if split in meta.splits
              for shard in meta.splits[split].shards]
    paths = [os.path.join(data_dir, x.file) for _, x in shards]
    missing = [p for p in paths if not tf.io.gfile.exists(p)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MetadataError(f"{len(missing)} shard(s) listed in {metadata_path(data_dir)} are missing: "
                            f"{', '.join(missing[:3])}{more}")
    recorded = [x for _, x in shards if x.bytes is not None and x.head_sha256 is not None]
    if not recorded:
        return
    heads = meta.shards_by_head()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        found = list(pool.map(lambda x: file_digest(os.path.join(data_dir, x.file), head_only=True), recorded))
    wrong = [shard_mismatch(x, d, heads) for x, d in zip(recorded, found)]
    wrong = [w for w in wrong if w]
    if wrong:
        more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise MetadataError(f"{len(wrong)} shard(s) in {data_dir} are not the ones its {METADATA_FILE} lists: "
                            f"{'; '.join(wrong[:3])}{more} (rebuild with pipelines.build_tfrecords --overwrite, or "
                            "put the build's own shards back)")


def shard_mismatch(shard: ShardInfo, found: ShardDigest, heads: dict, full: bool = False) -> str | None:
    """How a shard on disk differs from what the build recorded, or None.

    Args:
      shard: What metadata.json records.
      found: The file's digest (`file_digest`; of the head only unless `full`).
      heads: Recorded head digest -> shard file, over the whole dataset, to
        name a shard found in another's place.
    """
    name = shard.file
    digest = found.info()
    if digest["head_sha256"] != shard.head_sha256:
        other = heads.get(digest["head_sha256"])
        if other and other != name:
            return f"{name} holds the bytes of {other} (swapped or copied)"
        return f"{name} is not the file this build wrote (its first bytes differ: damaged, or from another build)"
    if digest["bytes"] != shard.bytes:
        return f"{name} is {digest['bytes']:,} bytes, the build wrote {shard.bytes:,} (truncated or appended to)"
    if full and shard.sha256 is not None and digest["sha256"] != shard.sha256:
        return f"{name} differs from the file this build wrote after its first {HEAD_BYTES:,} bytes (damaged)"
    return None
