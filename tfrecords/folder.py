"""A records folder opened once: `Records` holds its metadata, classes, shard paths, colour statistics and mean image.

`Records.open(data_dir)` reads `metadata.json`, checks every listed shard's
size and head digest, and is then handed to whatever reads the folder (the
input stream, the evaluator, the figures, the run checks), so none of them
opens the folder again or takes its path and metadata side by side.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from tfrecords import integrity
from tfrecords.classes import ClassInfo, check_same_classes
from tfrecords.metadata import ColorStatsInfo, Metadata, MetadataError, SplitInfo, load_metadata, metadata_path


class Records:
    """One records folder, opened and checked once.

    Attributes:
      data_dir: The folder (a local path or a URL TensorFlow reads).
      meta: Its `metadata.json`.
    """

    def __init__(self, data_dir: str, meta: Metadata):
        self.data_dir, self.meta = data_dir, meta

    @classmethod
    def open(cls, data_dir: str, splits=None) -> Records:
        """Reads `<data_dir>/metadata.json` and checks the shards of `splits` (default all).

        Raises:
          MetadataError: the metadata is missing or malformed, or a shard is
            missing or not the file the build wrote (see `integrity.check_shards`).
        """
        records = cls(data_dir, load_metadata(data_dir))
        records.check_shards(splits)
        return records

    def check_shards(self, splits=None) -> None:
        """Raises `MetadataError` naming the shards of `splits` (default all) that are missing or not the build's."""
        integrity.check_shards(self.data_dir, self.meta, splits)

    @property
    def metadata_path(self) -> str:
        return metadata_path(self.data_dir)

    @property
    def classes(self) -> tuple[ClassInfo, ...]:
        return self.meta.classes

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def color_stats(self) -> ColorStatsInfo | None:
        return self.meta.color_stats

    def split(self, name: str) -> SplitInfo:
        """The split `name` (`MetadataError` when it was not built)."""
        return self.meta.split(name)

    def has_examples(self, split: str) -> bool:
        """Whether `split` was built and holds at least one record."""
        return split in self.meta.splits and self.meta.splits[split].num_examples > 0

    def shard_paths(self, split: str) -> list[str]:
        """Full paths of a split's shards, in shard order, as listed in metadata."""
        if split not in self.meta.splits:
            raise MetadataError(f"split {split!r} not in {self.metadata_path}; it has {sorted(self.meta.splits)}")
        return [os.path.join(self.data_dir, s.file) for s in self.meta.splits[split].shards]

    @functools.cached_property
    def mean_image(self) -> np.ndarray:
        """The training-set mean image (H, W, 3) float32 in 0..255 pixel units, read on first use, once.

        Raises:
          MetadataError: the metadata names no mean image (no training split was
            built), or the file is missing or not the array metadata.json describes.
        """
        return self._read_mean_image()

    def _read_mean_image(self) -> np.ndarray:
        import tensorflow as tf

        meta, named_by = self.meta, self.metadata_path
        if meta.color_stats is None or meta.color_stats.mean_image_file is None:
            raise MetadataError(f"{named_by} names no mean image (was the training split built?)")
        path = os.path.join(self.data_dir, meta.color_stats.mean_image_file)
        if not tf.io.gfile.exists(path):
            raise MetadataError(f"{path} is missing (named by {named_by})")
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                mean = np.load(f)
        except (ValueError, OSError, EOFError) as e:
            raise MetadataError(f"{path} is not a NumPy array file ({e}): the records folder is damaged") from e
        size = meta.image.square
        if mean.dtype.kind != "f" or (size and mean.shape != (size, size, 3)):
            raise MetadataError(f"{path} holds a {mean.dtype} array of shape {mean.shape}, not the "
                                f"{size}x{size}x3 float mean image {named_by} describes")
        return mean

    def check_classes(self, model_synsets, model: str) -> None:
        """Raises `ClassMismatch` unless `model_synsets` are this folder's classes in label order.

        `model` names the other side in the message; this side is named by its folder.
        """
        check_same_classes(model_synsets, self.meta.synsets, model, self.data_dir)

    def data_loss_message(self, error) -> str:
        """One line naming the damaged shard behind a `tf.errors.DataLossError` met reading this folder."""
        return integrity.data_loss_message(error, self.data_dir, self.meta)
