"""Writing a SavedModel folder safely: refusing folders that are not exports, the finite-weight check, and the atomic swap.

`alexnet_tf.export` builds what is written; this module decides where and how it lands on disk.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

import numpy as np
import tensorflow as tf

from tfrecords import fileio

CLASSES_ASSET = "classes.tsv"
SAVED_MODEL_PB = "saved_model.pb"
TMP_TAG = ".tmp-"  # <export_dir>.tmp-<pid>: the new SavedModel while written.
OLD_TAG = ".old-"  # <export_dir>.old-<pid>: the earlier one, set aside (only without an atomic exchange).
class ExportError(Exception):
    """An export that cannot be written; the message is one line, and nothing at the export folder changed."""


class NonFiniteWeights(ExportError, ValueError):
    """The weights hold NaN or infinite values (a diverged run): such a model is not exported."""

def is_export(path: str) -> bool:
    """Whether `path` holds a SavedModel written by this module (its saved_model.pb and assets/classes.tsv)."""
    return (tf.io.gfile.exists(os.path.join(path, SAVED_MODEL_PB))
            and tf.io.gfile.exists(os.path.join(path, "assets", CLASSES_ASSET)))


def _local(path: str) -> bool:
    return "://" not in path


def siblings(target: str, tag: str) -> list[tuple[str, int]]:
    """(path, pid) of the folders `<target><tag><pid>` beside `target`."""
    parent, base = os.path.split(target.rstrip("/"))
    prefix = base + tag
    try:
        names = tf.io.gfile.listdir(parent or ".")
    except tf.errors.NotFoundError:
        return []
    found = []
    for name in names:
        name = name.rstrip("/")
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            found.append((os.path.join(parent, name), int(name[len(prefix):])))
    return found


def _abandoned(pid: int) -> bool:
    """Whether `pid`'s export is over: this process's own, or no such process on this host."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # Alive, someone else's.
        return False
    return False


SAVED_MODEL_PARTS = {SAVED_MODEL_PB, "variables", "assets", "fingerprint.pb"}


def export_leftover(path: str) -> bool:
    """Whether `path` is a folder holding nothing but parts of a SavedModel (an interrupted export's)."""
    return tf.io.gfile.isdir(path) and {e.rstrip("/") for e in tf.io.gfile.listdir(path)} <= SAVED_MODEL_PARTS


def recover(export_dir: str) -> str | None:
    """Puts back an earlier SavedModel an interrupted export left aside; tidies its temporary folders.

    When `export_dir` is missing and `<export_dir>.old-<pid>` holds an export
    (the fallback swap was killed between its two renames), that copy is
    renamed back; returns its former path (None when nothing was put back).
    Temporary and aside folders of exports no longer running are removed,
    and only when `export_dir` holds an export (nothing there is the only copy).
    """
    target = resolve(export_dir)
    restored = None
    if not tf.io.gfile.exists(target):
        aside = [(p, pid) for p, pid in siblings(target, OLD_TAG) if is_export(p)]
        if aside:
            restored = max(aside, key=lambda a: tf.io.gfile.stat(a[0]).mtime_nsec)[0]
            tf.io.gfile.rename(restored, target)
    if _local(target) and is_export(target):
        for path, pid in siblings(target, TMP_TAG) + siblings(target, OLD_TAG):
            if _abandoned(pid) and export_leftover(path):
                tf.io.gfile.rmtree(path)
    return restored


def resolve(export_dir: str) -> str:
    """The folder itself (a symbolic link's target), without a trailing slash."""
    return os.path.realpath(export_dir) if _local(export_dir) else export_dir.rstrip("/")


def check_export_dir(export_dir: str) -> None:
    """Raises ExportError unless `export_dir` is new, empty, or an earlier export (what may be replaced)."""
    target = resolve(export_dir)
    if _local(target):
        cwd = os.path.realpath(os.getcwd())
        if cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep):
            raise ExportError(f"--export_dir {export_dir} is the current folder or holds it; the export replaces "
                              "its folder whole, so name a folder outside the current one")
    if not tf.io.gfile.exists(target):
        return
    if not tf.io.gfile.isdir(target):
        raise ExportError(f"{export_dir} is a file, not a folder; name a new or empty folder for the SavedModel")
    entries = sorted(e.rstrip("/") for e in tf.io.gfile.listdir(target))
    if entries and not is_export(target):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ExportError(f"{export_dir} is not empty ({shown}) and is not a SavedModel written by "
                          "alexnet_tf.export; nothing was written: name a new or empty folder")


def check_finite(model, mean=None) -> None:
    """Raises NonFiniteWeights naming the first weight (in the model's order) that holds NaN or infinity."""
    named = [(w.path, w) for w in model.weights]
    if mean is not None:
        named.append(("the mean image", mean))
    for name, value in named:
        a = np.asarray(value)
        if not np.isfinite(a).all():
            nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            raise NonFiniteWeights(f"the model's weights are not all finite: {name} holds {nan} NaN and {inf} "
                                   f"infinite values (of {a.size}); the run diverged, export a checkpoint from "
                                   "before it (--checkpoint)")


RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc 2.28 and later.
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):  # Old kernel, or the filesystem.
        return False
    raise OSError(err, os.strerror(err), b)


def swap_in(tmp: str, target: str) -> None:
    """Moves the complete SavedModel `tmp` to `target`, with a SavedModel at `target` (or recoverable) throughout.

    A new or empty `target`: one rename. An earlier export: an atomic exchange,
    then the old one (now at `tmp`) deleted; without the exchange, the old one
    renamed aside to `<target>.old-<pid>`, `tmp` renamed in, the aside copy
    deleted (`recover` puts it back if the second rename never happens).
    """
    if not tf.io.gfile.exists(target) or not tf.io.gfile.listdir(target):
        if tf.io.gfile.exists(target):
            tf.io.gfile.rmtree(target)  # Empty.
        tf.io.gfile.rename(tmp, target)
        return
    if _local(target) and _exchange(tmp, target):
        tf.io.gfile.rmtree(tmp)  # The earlier export.
        return
    old = f"{target}{OLD_TAG}{os.getpid()}"
    if tf.io.gfile.exists(old):
        tf.io.gfile.rmtree(old)
    tf.io.gfile.rename(target, old)
    tf.io.gfile.rename(tmp, target)
    tf.io.gfile.rmtree(old)


def write_out(archive, tmp: str, export_dir: str) -> None:
    """archive.write_out(tmp); a failure (a full disk) removes `tmp` and raises ExportError."""
    try:
        archive.write_out(tmp, verbose=False)
        if not tf.io.gfile.exists(os.path.join(tmp, SAVED_MODEL_PB)):
            raise OSError(f"{SAVED_MODEL_PB} was not written")
    except (Exception, KeyboardInterrupt) as e:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
        if isinstance(e, (OSError, tf.errors.OpError)):
            kept = ("the earlier SavedModel there is unchanged" if is_export(resolve(export_dir))
                    else "nothing was left there")
            raise ExportError(f"cannot write the SavedModel for {export_dir} ({fileio.error_reason(e)}); {kept}") from None
        raise
