"""Writes given images into the raw ILSVRC2012 archive layout, byte-reproducibly.

    DIR/ILSVRC2012_img_train.tar   one ``nXXXXXXXX.tar`` per class of its images
    DIR/ILSVRC2012_img_val.tar     flat ``ILSVRC2012_val_%08d.JPEG`` images
    DIR/validation_labels.txt      line i = synset of ``ILSVRC2012_val_%08d.JPEG % i``

Every tar header is fixed but for name and size, so archive bytes depend only on
the images given. The files appear in DIR complete or not at all.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from pipelines.imagenet_layout import TRAIN_TAR, VAL_LABELS, VAL_TAR

# Every tar member gets this mtime (2012-06-18, around the ILSVRC2012 release)
# so archive bytes depend only on their contents.
TAR_MTIME = 1_340_000_000

# (member name, file bytes); lazily made, so memory holds one image at a time.
Images = Iterable[tuple[str, bytes]]


def val_name(number: int) -> str:
    """The file name of validation image `number` (1-based), as ILSVRC2012 spells it."""
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    with tarfile.open(path, mode="w", format=tarfile.GNU_FORMAT) as tar:
        yield tar


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    with open(path, "rb") as f:
        tar.addfile(_tarinfo(name, path.stat().st_size), f)


def write_archives(
    out: Path,
    train: Iterable[tuple[str, Images]],
    val: Images,
    val_labels: Iterable[str] | None,
) -> None:
    """Writes the training and validation archives (and label file) into `out`.

    Everything is written to a temporary folder inside `out` first and moved
    into place at the end, so a failure leaves the previous files untouched.

    Args:
        out: Existing folder to write into; files of the same names are replaced.
        train: (synset, its images) per class, in archive order; each class's
            images become ``<synset>.tar`` inside the training archive.
        val: The validation images, in archive order.
        val_labels: Synsets, one per line of ``validation_labels.txt``; None
            writes no label file and removes any there (the build then reads
            the shipped list, as it does for the real archives).
    """
    tmp = Path(tempfile.mkdtemp(prefix=".make_sample-", dir=out))
    try:
        # Class tars go to disk first so memory stays at one image at a time.
        with _open_tar(tmp / TRAIN_TAR) as outer:
            for synset, images in train:
                class_tar = tmp / f"{synset}.tar"
                with _open_tar(class_tar) as inner:
                    for name, data in images:
                        _add_bytes(inner, name, data)
                _add_file(outer, class_tar.name, class_tar)
                class_tar.unlink()
        with _open_tar(tmp / VAL_TAR) as tar:
            for name, data in val:
                _add_bytes(tar, name, data)
        names = [TRAIN_TAR, VAL_TAR]
        if val_labels is not None:
            (tmp / VAL_LABELS).write_text("".join(s + "\n" for s in val_labels))
            names.append(VAL_LABELS)
        for name in names:
            os.replace(tmp / name, out / name)
        if val_labels is None:
            (out / VAL_LABELS).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
