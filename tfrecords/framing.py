"""TFRecord framing: writing and reading length-prefixed, CRC-checked records without TensorFlow.

The framing `tf.data.TFRecordDataset` reads: little-endian uint64 length,
masked CRC-32C of the length, the data, masked CRC-32C of the data.
"""

from __future__ import annotations

import struct


def masked_crc32c(data: bytes) -> int:
    """CRC-32C of `data`, masked as the TFRecord framing stores it."""
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
    f.write(header + struct.pack("<I", masked_crc32c(header)))
    f.write(data)
    f.write(struct.pack("<I", masked_crc32c(data)))
    return len(data) + 16


def record_length(header: bytes) -> int | None:
    """The data length a TFRecord header (length, masked CRC of the length) gives; None if short or failing its CRC."""
    if len(header) < 12 or struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
        return None
    return struct.unpack("<Q", header[:8])[0]


class DamagedRecord(ValueError):
    """A TFRecord file whose framing or a record's CRC fails; the message names
    the offset as TensorFlow does (a record's start for its length, its data's
    start for its data)."""


def read_records(f, size: int, digest=None):
    """Yields the records of an open binary TFRecord file of `size` bytes, each
    checked against its CRCs, and feeds every byte read to `digest`
    (an `integrity.ShardDigest`, or None).

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
        n = record_length(header)
        if n is None:
            raise DamagedRecord(f"{'truncated' if len(header) < 12 else 'corrupted'} record at {pos}")
        if pos + 16 + n > size:  # Before reading: a length past the end is not allocated.
            raise DamagedRecord(f"truncated record at {pos}")
        data, crc = read(n), read(4)
        if len(data) < n or len(crc) < 4:  # Shorter than its size said when this started.
            raise DamagedRecord(f"truncated record at {pos}")
        if struct.unpack("<I", crc)[0] != masked_crc32c(data):
            raise DamagedRecord(f"corrupted record at {pos + 12}")
        yield data
        pos += 16 + n
