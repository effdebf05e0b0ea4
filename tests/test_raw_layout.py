"""Tests for pipelines/raw_layout.py: the archives' layout, fixed headers, replacement."""

from __future__ import annotations

import hashlib
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # Lets plain `pytest` import the package too.
    sys.path.insert(0, str(REPO))

from pipelines import class_labels, imagenet_layout  # noqa: E402
from pipelines import raw_layout  # noqa: E402

TRAIN = [("n01440764", [("n01440764_3.JPEG", b"abc"), ("n01440764_7.JPEG", b"de")]),
         ("n02102040", [("n02102040_1.JPEG", b"f")])]
VAL = [(raw_layout.val_name(2), b"gh"), (raw_layout.val_name(1), b"i")]


def write(out: Path, labels=("n02102040", "n01440764")) -> None:
    raw_layout.write_archives(out, iter(TRAIN), iter(VAL), labels)


def test_val_name_is_ilsvrc2012s():
    assert raw_layout.val_name(7) == "ILSVRC2012_val_00000007.JPEG"
    assert class_labels.VAL_NUMBER_RE.search(raw_layout.val_name(50_000)).group(1) == "00050000"


def test_layout_is_nested_class_tars_and_a_flat_val_tar(tmp_path):
    write(tmp_path)
    with tarfile.open(tmp_path / imagenet_layout.TRAIN_TAR) as outer:
        classes = outer.getmembers()
        assert [m.name for m in classes] == ["n01440764.tar", "n02102040.tar"]
        for (synset, images), info in zip(TRAIN, classes):
            with tarfile.open(fileobj=outer.extractfile(info)) as inner:
                assert [(m.name, inner.extractfile(m).read()) for m in inner.getmembers()] == images
    with tarfile.open(tmp_path / imagenet_layout.VAL_TAR) as tar:
        members = tar.getmembers()
        assert [(m.name, tar.extractfile(m).read()) for m in members] == VAL
        for m in members:  # Fixed headers: bytes depend on the images only.
            assert (m.mode, m.uid, m.gid, m.uname, m.gname) == (0o644, 0, 0, "", "")
            assert m.isfile() and m.mtime == raw_layout.TAR_MTIME
    assert (tmp_path / imagenet_layout.VAL_LABELS).read_text() == "n02102040\nn01440764\n"
    # Nothing else is left behind: no class tars, no temporary folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [imagenet_layout.TRAIN_TAR, imagenet_layout.VAL_TAR, imagenet_layout.VAL_LABELS])


def test_same_images_give_the_same_bytes(tmp_path):
    digests = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        write(tmp_path / d)
        digests.append([hashlib.sha256((tmp_path / d / n).read_bytes()).hexdigest()
                        for n in (imagenet_layout.TRAIN_TAR, imagenet_layout.VAL_TAR)])
    assert digests[0] == digests[1]


def test_no_labels_removes_a_label_file_there(tmp_path):
    write(tmp_path)
    write(tmp_path, labels=None)
    assert not (tmp_path / imagenet_layout.VAL_LABELS).exists()
    assert (tmp_path / imagenet_layout.VAL_TAR).is_file()


def test_a_failure_leaves_the_previous_files(tmp_path):
    write(tmp_path)
    before = (tmp_path / imagenet_layout.TRAIN_TAR).read_bytes()

    def broken():
        yield "n01440764", [("n01440764_3.JPEG", b"x")]
        raise RuntimeError("image failed")

    with pytest.raises(RuntimeError, match="image failed"):
        raw_layout.write_archives(tmp_path, broken(), iter(VAL), None)
    assert (tmp_path / imagenet_layout.TRAIN_TAR).read_bytes() == before
    assert (tmp_path / imagenet_layout.VAL_LABELS).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [imagenet_layout.TRAIN_TAR, imagenet_layout.VAL_TAR, imagenet_layout.VAL_LABELS])
