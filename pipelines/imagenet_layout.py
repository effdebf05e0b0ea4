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
(`pipelines.members`). Labels (the class list, the validation label file) are
`pipelines.class_labels`'s. Files are opened through `tfrecords.fileio`, so
`gs://` paths work.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile

from pipelines import class_labels
from pipelines import members as members_lib
from tfrecords import fileio
# LayoutError is planning's one error, the label file's included: callers catch it here.
from pipelines.class_labels import SYNSET_RE, LayoutError
from pipelines.members import Member, ReadUnit, Skipped, skipped  # noqa: F401 (the plan is made of these)

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
VAL_LABELS = "validation_labels.txt"  # Beside the archives: line n is the synset of ILSVRC2012_val_<n>.
TRAIN_DIR = "train"
VAL_DIR = "val"
# The test set's archives (TFDS's manual folder holds the 2019 one) and folder.
TEST_TARS = ("ILSVRC2012_img_test_v10102019.tar", "ILSVRC2012_img_test.tar")
TEST_DIR = "test"
# Validation members are grouped into units of this size: small enough to spread
# over workers, large enough that per-unit overhead (one file open) is negligible.
VAL_CHUNK = 500


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
            local = os.path.join(imagenet_dir, VAL_LABELS)
            val_labels = local if fileio.exists(local) else class_labels.default_val_labels_path()
        labels = class_labels.read_val_labels(val_labels)
        labels_path = val_labels
        flat = class_labels.label_flat_members(flat, labels, val_labels)
        known = set(splits["train"].synsets) if "train" in splits else set()
        unknown = sorted(set(labels) - known - set(class_labels.ilsvrc_synsets()))
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
