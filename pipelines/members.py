"""Worker side of reading raw ILSVRC2012: what one worker lists and reads.

`imagenet_layout` (the driver) plans the reading as `ReadUnit`s; a worker lists
the members of a unit (tar headers or folder entries: names and byte ranges,
never image bytes) and later reads each member's bytes by its range. Archives
are never extracted and never held in memory whole. Files are opened through
`tfrecords.fileio`: the OS for local paths (no TensorFlow in the workers),
TensorFlow's file systems for `gs://` and other URLs.
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
import tarfile
from typing import Iterator, NamedTuple

from tfrecords import fileio


# The most bytes read for one image: about 600 times the average ILSVRC2012
# image (about 110 KB), and a bound on a worker's memory for one image. A
# member over it is rejected with its size, never read.
MAX_MEMBER_BYTES = 64 * 1024 * 1024
# The words that mark an archive cut short at a member boundary (the driver
# stops the build on them).
TRUNCATED = "ends without the end-of-archive blocks"


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


def printable(name: str) -> str:
    """`name` with bytes that are not UTF-8 shown as \\xNN (file names are bytes on POSIX)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _bad_name(name: str) -> str | None:
    """Why a file name cannot be used, or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8: not read (rename the file)"
    return None


def too_large(size: int) -> str:
    return f"{size:,} bytes, over the limit of {MAX_MEMBER_BYTES:,} bytes per image: not read"


def tar_entry(name: str, synset: str | None, path: str, info: tarfile.TarInfo) -> Member | Skipped | None:
    """The `Member` of an archive entry; a `Skipped` for an entry that is not
    read (a link, a device, a name that is not UTF-8, over MAX_MEMBER_BYTES);
    None for a folder entry."""
    if info.isdir():
        return None
    if not info.isfile():
        return skipped(printable(name), info)
    reason = _bad_name(name) or (too_large(info.size) if info.size > MAX_MEMBER_BYTES else None)
    if reason:
        return Skipped(printable(name), reason)
    return Member(name, synset, path, info.offset_data, info.size)


_NOT_REGULAR = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
NESTED = "a folder inside a class folder: not read (images are read one level deep)"


def folder_entry(folder: str, entry: str, name: str, synset: str | None) -> Member | Skipped:
    """The `Member` of a file in a class folder (a link to a regular file
    counts as one); a `Skipped` for an entry that is not read (a sub-folder, a
    pipe, a device, a link to one or to nothing, a name that is not UTF-8, a
    file over MAX_MEMBER_BYTES)."""
    full = os.path.join(folder, entry)
    reason = _bad_name(name)
    if reason:
        return Skipped(printable(name), reason)
    if fileio.is_remote(full):  # Object stores hold only regular files and prefixes.
        return Skipped(name, NESTED) if fileio.isdir(full) else Member(name, synset, full)
    link = f"a link to {os.readlink(full)}, " if os.path.islink(full) else ""
    try:
        st = os.stat(full)
    except OSError as e:
        return Skipped(name, f"{link}cannot be read ({e.strerror}): not read")
    if stat.S_ISDIR(st.st_mode):
        return Skipped(name, NESTED)
    if not stat.S_ISREG(st.st_mode):
        what = next((w for test, w in _NOT_REGULAR if test(st.st_mode)), "not a file")
        return Skipped(name, f"{link}{what}, not a regular file: not read")
    if st.st_size > MAX_MEMBER_BYTES:
        return Skipped(name, too_large(st.st_size))
    return Member(name, synset, full)


def ends_with_marker(f, offset: int) -> bool:
    """Whether a tar archive read as far as `offset` (its `TarFile.offset` after
    the last member) has an end-of-archive block there: 512 zero bytes. One cut
    at a member boundary has none, and no error on reading."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


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


class TruncatedArchive(UnitReadError):
    """A class archive ends without its end-of-archive blocks: the build stops."""


def list_unit(unit: ReadUnit) -> Iterator[Member | Skipped]:
    """Yields the members of a unit: names and byte ranges, not image bytes
    (and a `Skipped`, with its reason, for each entry that is not read: see
    `tar_entry` and `folder_entry`).

    A class archive is listed by reading its 512-byte headers and seeking over
    the data, so listing costs a few KB of I/O per class.

    Raises:
      UnitReadError: when the rest of the unit cannot be listed (a damaged
        archive, an unreadable folder); members yielded before stay valid.
        `TruncatedArchive` when a class archive has no end-of-archive block
        after its last member (cut at a member boundary).
    """
    try:
        if unit.kind == "class_tar":
            with fileio.open_file(unit.path, "rb") as f:
                window = _Window(f, unit.offset, unit.size)
                with tarfile.open(fileobj=window, mode="r:") as tar:
                    seen: dict[str, str] = {}
                    for info in tar:
                        m = tar_entry(f"{unit.name}/{info.name}", unit.synset, unit.path, info)
                        if isinstance(m, Member):
                            m = m._replace(offset=unit.offset + m.offset)
                            base = os.path.basename(info.name)
                            if base in seen:  # Same key: the same image twice in its class.
                                m = Skipped(m.name, f"a second file named {base} in class {unit.synset} "
                                            f"(first: {seen[base]}): not read twice")
                            else:
                                seen[base] = m.name
                        if m is not None:
                            yield m
                    if not ends_with_marker(window, tar.offset):
                        raise TruncatedArchive(f"truncated: {unit.name} {TRUNCATED}; download it again")
        elif unit.kind == "class_dir":
            for entry in sorted(fileio.listdir(unit.path)):
                yield folder_entry(unit.path, entry, f"{unit.name}/{entry}", unit.synset)
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
            if m.size > MAX_MEMBER_BYTES:
                raise OSError(too_large(m.size))
            if m.size < 0:
                with fileio.open_file(m.path, "rb") as f:
                    data = f.read(MAX_MEMBER_BYTES + 1)  # A file that grew since it was listed.
                if len(data) > MAX_MEMBER_BYTES:
                    raise OSError(f"over the limit of {MAX_MEMBER_BYTES:,} bytes per image: not read")
                return data
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
