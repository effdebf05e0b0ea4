"""Shard integrity: each shard's size and digests, checked at start, and damage found in reading named.

The build records every shard's size, SHA-256 and the SHA-256 of its first
HEAD_BYTES in `metadata.json`; readers check sizes and heads when they open the
folder (`check_shards`), `verify_tfrecords` every byte, and a damaged record met
in training is traced back to its shard (`data_loss_message`).
"""

from __future__ import annotations

import hashlib
import os
import struct

from tfrecords.framing import masked_crc32c, record_length
from tfrecords.metadata import Metadata, MetadataError, ShardInfo, metadata_path
from tfrecords.schema import METADATA_FILE

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
            n = record_length(f.read(12))
            if n is None:
                return False  # Damaged before `offset`, or not a TFRecord file: not the record named.
            pos += 12 + n + 4
        if pos not in (offset, offset - 12):
            return False
        f.seek(pos)
        n = record_length(f.read(12))
        if n is None:
            return pos == offset
        data, crc = f.read(n), f.read(4)
        return pos == offset - 12 and (len(crc) < 4 or struct.unpack("<I", crc)[0] != masked_crc32c(data))


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
