"""Keeps a sample folder's bookkeeping: who wrote it, whether it is complete, one builder at a time.

A sample folder holds the raw ILSVRC2012 files (see `raw_layout`), ``manifest.json``
(what was written), ``SAMPLE_COMPLETE`` (written last: the sample is complete) and
an owner mark written before anything else.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from pipelines.imagenet_layout import TRAIN_TAR, VAL_LABELS, VAL_TAR
from tfrecords import fileio

MANIFEST = "manifest.json"
MARKER = "SAMPLE_COMPLETE"
# Written before anything else: the folder's ImageNet-named files are ours to replace.
OWNER = ".written-by-make_sample"


def claim(out: Path) -> None:
    """Makes `out` the sample's folder, and marks any sample there incomplete.

    Raises:
        FileExistsError: `out` holds ImageNet files (the archives, the label
            file) that make_sample did not write, e.g. a real ImageNet folder:
            they would be replaced.
    """
    out.mkdir(parents=True, exist_ok=True)
    theirs = [n for n in (TRAIN_TAR, VAL_TAR, VAL_LABELS) if (out / n).exists()]
    if theirs and not (out / OWNER).exists() and not (out / MANIFEST).exists():
        raise FileExistsError(f"{out} holds {', '.join(theirs)}, not written by make_sample: a sample would "
                              "replace them; give an empty or new --output_dir")
    (out / OWNER).touch()
    # Whatever is there stops counting as complete until we finish.
    (out / MARKER).unlink(missing_ok=True)


def read_json(path: Path) -> dict | None:
    """Returns the JSON object in `path`, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def dir_lock(directory: Path) -> Iterator[None]:
    """Serialises builders of one cache dir (e.g. parallel test workers)."""
    with fileio.held_lock(str(directory / ".lock")):
        yield
