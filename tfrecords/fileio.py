"""File access for the build and the readers: the OS for local paths, TensorFlow's file systems for URLs.

A path with a scheme (`gs://`, `s3://`, `hdfs://`) goes through `tf.io.gfile`,
whose remote file systems the readers use too; a local path goes straight to
the OS. So a local build never imports TensorFlow: in every Beam worker that is
a few seconds and several hundred MiB saved (measured in `benchmarks/build.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import IO, Any, Iterator


def is_remote(path: str) -> bool:
    return "://" in path


def _gfile():
    import tensorflow as tf  # Only for URLs.

    return tf.io.gfile


def open_file(path: str, mode: str = "rb") -> IO:
    """An open file (`rb`, `wb`, `r` or `w`); seekable when reading."""
    if is_remote(path):
        return _gfile().GFile(path, mode)
    return open(path, mode)


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Entry names of a folder, without a trailing '/' on sub-folders."""
    names = _gfile().listdir(path) if is_remote(path) else os.listdir(path)
    return [n.rstrip("/") for n in names]


def makedirs(path: str) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    if is_remote(path):
        _gfile().remove(path)
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    if is_remote(path):
        _gfile().rmtree(path)
    else:
        shutil.rmtree(path)


def rename(src: str, dst: str) -> None:
    """Moves src to dst, replacing dst (atomic on local and POSIX file systems)."""
    if is_remote(src) or is_remote(dst):
        _gfile().rename(src, dst, overwrite=True)
    else:
        os.replace(src, dst)


def error_reason(e: BaseException) -> str:
    """The cause of an error in a few words: the system's (e.g. 'No space left on device') where it names one."""
    import errno
    import re
    import sys

    tf = sys.modules.get("tensorflow")  # An OpError exists only once TensorFlow is loaded: never load it here.
    if tf is not None and isinstance(e, tf.errors.OpError):
        known = [os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)]
        said = [k for k in known if k in e.message]
        if said:
            return said[0]
        text = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:\w+\]", "", e.message)
    elif isinstance(e, OSError) and e.strerror:
        text = e.strerror
    else:
        text = str(e) or type(e).__name__
    return (text.strip().splitlines() or [type(e).__name__])[0]


def write_json_atomically(path: str, obj: Any) -> None:
    """Writes JSON to `path` through a temporary file and a rename.

    Readers see either the old file or the whole new one, never a torn write
    (on object stores, which have no rename, the copy is still all-or-nothing).
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open_file(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    rename(tmp, path)


@contextlib.contextmanager
def held_lock(path: str, wait: bool = True) -> Iterator[IO | None]:
    """Holds the kernel's exclusive lock (`flock`) on the local file `path`, made if missing; yields it open.

    The kernel releases the lock when its holder ends, even by kill -9, so
    nothing stale is ever left to remove. The file is open for reading and
    appending: a holder may write who it is for the next one to read. Where
    the OS has no `flock` (not POSIX) nothing is locked and None is yielded.

    Raises:
      BlockingIOError: `wait` is False and another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:
        yield None
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
