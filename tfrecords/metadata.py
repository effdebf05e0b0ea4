"""`metadata.json` as typed objects: the counts, shards, classes, colour statistics and build of a records folder.

Each class's `to_json` gives its part of the file with the keys in the file's
order; `Metadata.from_json` checks a parsed file and builds the objects, so
`Metadata.from_json(m.to_json()) == m`. `tfrecords/README.md` describes the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from tfrecords import checked_json, fileio
from tfrecords.checked_json import Flat
from tfrecords.classes import ClassInfo, control_character
from tfrecords.schema import FORMAT_VERSION, MEAN_IMAGE_FILE, METADATA_FILE, parse_shard_name, shard_name


class MetadataError(ValueError):
    """metadata.json is missing, unreadable or inconsistent."""


def metadata_path(data_dir: str) -> str:
    return os.path.join(data_dir, METADATA_FILE)


@dataclasses.dataclass(frozen=True)
class ShardInfo(Flat):
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
class ImageInfo(Flat):
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
class Rejection(Flat):
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
        top = checked_json.Fields(obj, "", path, MetadataError)
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


def _optional(x: checked_json.Fields, key: str, kind: type):
    """A field metadata of older builds lacks: None when absent."""
    if x.get(key, None) is None:
        return None
    return x.integer(key) if kind is int else x.string(key)


def _class_text(c: checked_json.Fields, key: str) -> str:
    """A class's synset or name: one line of text (see `control_character`)."""
    text = c.string(key)
    bad = control_character(text)
    if bad:
        c.fail(c.at(key), f"one line of text without control characters (found {bad})", text)
    return text


def _shard_file(x: checked_json.Fields, split: str) -> str:
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


def _split_info(name: str, s: checked_json.Fields) -> SplitInfo:
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


def _mean_image_file(c: checked_json.Fields) -> str:
    """`color_stats.mean_image_file`: the build's MEAN_IMAGE_FILE, never a path (see `_shard_file`)."""
    file = c.string("mean_image_file")
    if file != MEAN_IMAGE_FILE:
        c.fail(c.at("mean_image_file"), f'"{MEAN_IMAGE_FILE}" (a plain name inside the records folder)', file)
    return file


def _color_stats_info(c: checked_json.Fields) -> ColorStatsInfo:
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
    fileio.write_json_atomically(path, obj)
