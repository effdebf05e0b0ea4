"""Worker side of reading raw ILSVRC2012: what one worker lists and reads.

`imagenet_layout` (the driver) plans the reading as `ReadUnit`s; a worker lists
the members of a unit (tar headers or folder entries: names and byte ranges,
never image bytes) and later reads each member's bytes by its range. Archives
are never extracted and never held in memory whole. Files are opened through
`alexnet_tf.fileio`: the OS for local paths (no TensorFlow in the workers),
TensorFlow's file systems for `gs://` and other URLs.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from typing import Iterator, NamedTuple

from alexnet_tf import fileio


class Member(NamedTuple):
    """Where one image's bytes are: a byte range of an archive, or a whole file.

    A named tuple, not a dataclass: one travels through the shuffle per image,
    and Beam encodes tuples of primitives about twice as fast.
    """

    name: str  # Locator relative to the ImageNet folder, used in reports.
    synset: str | None  # None when it cannot be known (reported as a rejection).
    path: str = ""  # The archive, or the file itself.
    offset: int = 0  # Archives: start of the member's data in the archive.
    size: int = -1  # Archives: length of the data; -1 for a whole file.


class Skipped(NamedTuple):
    """An archive entry that is not an image file (a link, a device): reported as rejected."""

    name: str
    reason: str


def skipped(name: str, info: tarfile.TarInfo) -> Skipped:
    """The `Skipped` of a tar entry that is neither a regular file nor a folder."""
    if info.issym():
        what = f"a symbolic link (to {info.linkname})"
    elif info.islnk():
        what = f"a hard link (to {info.linkname})"
    else:
        what = f"a tar entry of type {info.type!r}"
    return Skipped(name, f"{what}, not an image file: not followed")


@dataclasses.dataclass(frozen=True)
class ReadUnit:
    """A piece of input one worker reads sequentially.

    kind is one of:
      `class_tar`: a class archive inside the training archive, the bytes
        [offset, offset + size) of `path`; all its images belong to `synset`.
      `class_dir`: a folder of one class's images.
      `tar_members`: listed members of the archive `path`, each with its own
        synset and byte range (and `Skipped` entries, its links).
      `files`: listed files (`members`, named relative to the folder `path`),
        each with its own synset.
    """

    split: str
    kind: str
    path: str
    name: str
    synset: str | None = None
    offset: int = 0
    size: int = 0
    members: tuple[Member, ...] = ()




class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + size) of a file."""

    def __init__(self, f, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + pos))
        return self._pos

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class UnitReadError(Exception):
    """Part of a unit could not be listed; the message says which and why."""


def list_unit(unit: ReadUnit) -> Iterator[Member | Skipped]:
    """Yields the members of a unit: names and byte ranges, not image bytes
    (and a `Skipped` for each archive entry that is not a file or folder).

    A class archive is listed by reading its 512-byte headers and seeking over
    the data, so listing costs a few KB of I/O per class.

    Raises:
      UnitReadError: when the rest of the unit cannot be listed (a damaged
        archive, an unreadable folder); members yielded before stay valid.
    """
    try:
        if unit.kind == "class_tar":
            with fileio.open_file(unit.path, "rb") as f:
                window = _Window(f, unit.offset, unit.size)
                with tarfile.open(fileobj=window, mode="r:") as tar:
                    for info in tar:
                        if info.isfile():
                            yield Member(
                                f"{unit.name}/{info.name}", unit.synset, unit.path,
                                unit.offset + info.offset_data, info.size,
                            )
                        elif not info.isdir():
                            yield skipped(f"{unit.name}/{info.name}", info)
        elif unit.kind == "class_dir":
            for entry in sorted(fileio.listdir(unit.path)):
                full = os.path.join(unit.path, entry)
                if not fileio.isdir(full):
                    yield Member(f"{unit.name}/{entry}", unit.synset, full)
        elif unit.kind in ("tar_members", "files"):
            yield from unit.members
        else:
            raise ValueError(f"unknown unit kind {unit.kind!r}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UnitReadError(f"{unit.name}: {type(e).__name__}: {e}") from e
    except Exception as e:  # tf.errors.OpError and friends from the file system.
        if type(e).__module__.startswith("tensorflow"):
            raise UnitReadError(f"{unit.name}: {e}") from e
        raise


class MemberReader:
    """Reads members' bytes, keeping the last archive open between reads."""

    def __init__(self):
        self._path, self._file = None, None

    def read(self, m: Member) -> bytes:
        """Returns the member's bytes.

        Raises:
          OSError: the bytes cannot be read (missing file, archive cut short).
        """
        try:
            if m.size < 0:
                with fileio.open_file(m.path, "rb") as f:
                    return f.read()
            if self._path != m.path:
                self.close()
                self._file, self._path = fileio.open_file(m.path, "rb"), m.path
            self._file.seek(m.offset)
            data = self._file.read(m.size)
        except OSError:
            raise
        except Exception as e:  # tf.errors.OpError from the file system.
            if type(e).__module__.startswith("tensorflow"):
                raise OSError(str(e).splitlines()[0]) from e
            raise
        if len(data) != m.size:
            raise OSError(f"archive ends inside this member ({len(data)} of {m.size} bytes)")
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._path, self._file = None, None
