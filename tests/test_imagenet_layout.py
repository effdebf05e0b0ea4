"""What the layout reads and refuses: files that are not images, cut archives,
empty classes, duplicate names, odd file names, the test set,
and an output folder inside the input."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import LOCAL_BEAM, build, extract_sample, tar_members
from pipelines import build_tfrecords, imagenet_layout, members

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fails(tmp_path, match, *argv, out=None):
    out = out or tmp_path / "out"
    with pytest.raises((imagenet_layout.LayoutError, build_tfrecords.BuildError), match=match) as e:
        build_tfrecords.run([*argv, "--output_dir", str(out), *LOCAL_BEAM])
    assert "\n" not in str(e.value)
    return out


def _tar(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write_train_tar(folder, inner: dict[str, bytes]) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, imagenet_layout.TRAIN_TAR)
    with open(path, "wb") as f:
        f.write(_tar(inner))
    return path


def _cut_before_last_member(data: bytes) -> bytes:
    """The archive cut at the boundary before its last member: no end-of-archive blocks."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return data[: last.offset]


def _class_dir_unit(folder, synset) -> members.ReadUnit:
    return members.ReadUnit(split="train", kind="class_dir", path=str(folder), name=f"train/{synset}",
                            synset=synset)


# -- 1. only regular files, and at most MAX_MEMBER_BYTES of each ------------------


def test_pipes_devices_and_dangling_links_in_a_class_folder_are_rejected_unread(tmp_path):
    folder = tmp_path / "n01440764"
    folder.mkdir()
    (folder / "a.JPEG").write_bytes(b"jpeg")
    (tmp_path / "elsewhere.JPEG").write_bytes(b"jpeg")
    os.symlink(tmp_path / "elsewhere.JPEG", folder / "b.JPEG")  # A link to a file: read.
    os.mkfifo(folder / "fifo.JPEG")
    os.symlink("/dev/zero", folder / "zero.JPEG")
    os.symlink(tmp_path / "nothing", folder / "dangling.JPEG")
    (folder / "more").mkdir()
    got = {os.path.basename(m.name): m for m in members.list_unit(_class_dir_unit(folder, "n01440764"))}
    assert got["more"] == members.Skipped("train/n01440764/more", members.NESTED)
    assert isinstance(got["a.JPEG"], members.Member) and isinstance(got["b.JPEG"], members.Member)
    assert isinstance(got["fifo.JPEG"], members.Skipped)
    assert "named pipe (FIFO), not a regular file" in got["fifo.JPEG"].reason
    assert isinstance(got["zero.JPEG"], members.Skipped)
    assert "a link to /dev/zero, a character device, not a regular file" in got["zero.JPEG"].reason
    assert isinstance(got["dangling.JPEG"], members.Skipped) and "cannot be read" in got["dangling.JPEG"].reason


def test_a_member_over_the_byte_limit_is_rejected_with_its_size(tmp_path, monkeypatch):
    monkeypatch.setattr(members, "MAX_MEMBER_BYTES", 1000, raising=False)
    folder = tmp_path / "n01440764"
    folder.mkdir()
    (folder / "big.JPEG").write_bytes(b"x" * 1001)
    (folder / "small.JPEG").write_bytes(b"x" * 1000)
    got = {os.path.basename(m.name): m for m in members.list_unit(_class_dir_unit(folder, "n01440764"))}
    assert isinstance(got["small.JPEG"], members.Member)
    assert got["big.JPEG"] == members.Skipped(
        "train/n01440764/big.JPEG", "1,001 bytes, over the limit of 1,000 bytes per image: not read")
    # Archive members: by their header's size.
    path = tmp_path / "n01440764.tar"
    path.write_bytes(_tar({"big.JPEG": b"x" * 1001, "small.JPEG": b"x" * 10}))
    unit = members.ReadUnit("train", "class_tar", str(path), "n01440764.tar", "n01440764", 0, path.stat().st_size)
    got = {os.path.basename(m.name): m for m in members.list_unit(unit)}
    assert isinstance(got["big.JPEG"], members.Skipped) and "1,001 bytes, over the limit" in got["big.JPEG"].reason
    # The reader stops at the bound too (a file that grew after it was listed).
    (folder / "small.JPEG").write_bytes(b"x" * 5000)
    with pytest.raises(OSError, match="over the limit of 1,000 bytes"):
        members.MemberReader().read(got_small := members.Member("s", "n01440764", str(folder / "small.JPEG")))
    assert got_small.size == -1


def test_a_build_counts_pipes_devices_odd_names_and_big_files_as_rejected(sample, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(members, "MAX_MEMBER_BYTES", 1 << 20, raising=False)
    src = extract_sample(sample, tmp_path / "imagenet")
    os.link(sample["val_labels"], os.path.join(src, "validation_labels.txt"))
    folder = os.path.join(src, "train", sample["synsets"][0])
    os.mkfifo(os.path.join(folder, "fifo.JPEG"))
    os.symlink("/dev/zero", os.path.join(folder, "zero.JPEG"))
    with open(os.path.join(folder, "big.JPEG"), "wb") as f:
        f.write(b"\xff" * ((1 << 20) + 1))
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.JPEG"), "wb") as f:  # Latin-1, not UTF-8.
        f.write(b"jpeg")
    meta = build(src, tmp_path / "out", "--max_reject_fraction=0.5")
    train = meta.splits["train"]
    assert train.num_read == sample["num_train"] + 4 == train.num_examples + train.num_rejected
    reasons = {os.path.basename(r.file): r.reason for r in meta.rejected}
    assert "not a regular file" in reasons["fifo.JPEG"] and "/dev/zero" in reasons["zero.JPEG"]
    assert "over the limit of 1,048,576 bytes per image" in reasons["big.JPEG"]
    assert reasons["caf\\xe9.JPEG"] == "file name is not valid UTF-8: not read (rename the file)"
    assert "Traceback" not in capfd.readouterr().err


# -- 2. archives cut at a member boundary -------------------------------------------


@pytest.mark.parametrize("which", [imagenet_layout.TRAIN_TAR, imagenet_layout.VAL_TAR])
def test_an_archive_cut_at_a_member_boundary_stops_the_build(sample, tmp_path, which):
    src = tmp_path / "in"
    src.mkdir()
    source = sample["train_tar"] if which == imagenet_layout.TRAIN_TAR else sample["val_tar"]
    data = open(source, "rb").read()
    (src / which).write_bytes(_cut_before_last_member(data))
    shutil.copy(sample["val_labels"], src / "validation_labels.txt")
    _fails(tmp_path, f"^truncated: .*{which} ends without the end-of-archive blocks; download it again$",
           "--imagenet_dir", str(src))
    assert not (tmp_path / "out").exists()


def test_an_archive_cut_inside_a_member_is_named_truncated(sample, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    data = open(sample["train_tar"], "rb").read()
    (src / imagenet_layout.TRAIN_TAR).write_bytes(data[: _cut_before_last_member(data).__len__() + 2048])
    _fails(tmp_path, "^truncated: .*ILSVRC2012_img_train.tar ends inside a member; download it again$",
           "--imagenet_dir", str(src))


def test_a_class_archive_cut_at_a_member_boundary_stops_the_build(sample, tmp_path):
    inner = tar_members(sample["train_tar"])
    victim = sorted(inner)[3]
    inner[victim] = _cut_before_last_member(inner[victim])
    src = tmp_path / "in"
    _write_train_tar(src, inner)
    out = _fails(tmp_path, f"^truncated: ILSVRC2012_img_train.tar/{victim} ends without the end-of-archive "
                 "blocks; download it again; metadata.json was not written$", "--imagenet_dir", str(src))
    assert not (out / "metadata.json").exists()


def test_a_class_archive_cut_at_a_boundary_keeps_an_earlier_dataset_whole(sample, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("train-00000-of-00001", "validation-00000-of-00001", "metadata.json"):  # Stand-ins.
        (out / name).write_bytes(f"earlier {name}".encode())
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    inner = tar_members(sample["train_tar"])
    victim = sorted(inner)[0]
    inner[victim] = _cut_before_last_member(inner[victim])
    src = tmp_path / "in"
    _write_train_tar(src, inner)
    _fails(tmp_path, "^truncated: ", "--imagenet_dir", str(src), "--overwrite", out=out)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_the_cli_stops_on_a_cut_archive_with_one_line_and_status_1(sample, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / imagenet_layout.TRAIN_TAR).write_bytes(_cut_before_last_member(open(sample["train_tar"], "rb").read()))
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", str(src),
         "--output_dir", str(tmp_path / "out"), *LOCAL_BEAM],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"build_tfrecords: error: truncated: {src / imagenet_layout.TRAIN_TAR} ends without the "
        "end-of-archive blocks; download it again")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# -- 3. a class with no images ------------------------------------------------------


def test_an_empty_class_archive_is_named_empty(sample, tmp_path):
    inner = tar_members(sample["train_tar"])
    inner[sorted(inner)[2]] = _tar({})
    _write_train_tar(tmp_path / "in", inner)
    synset = sorted(inner)[2][: -len(".tar")]
    _fails(tmp_path, f"^class {synset} has no images: .*member {synset}.tar is an empty tar archive",
           "--imagenet_dir", str(tmp_path / "in"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_class_folder_stops_the_build(sample, tmp_path, split):
    src = extract_sample(sample, tmp_path / "imagenet", val_by_class=True)
    synset = sample["synsets"][4]
    shutil.rmtree(os.path.join(src, split, synset))
    os.mkdir(os.path.join(src, split, synset))
    _fails(tmp_path, f"^class {synset} has no images: {split}/{synset} is empty", "--imagenet_dir", src)


# -- 4. duplicate names -------------------------------------------------------------


def test_one_file_name_in_two_training_classes_is_two_images(sample, tmp_path):
    """The class is part of a record's sort key, so two training classes may share file names."""
    src = extract_sample(sample, tmp_path / "imagenet")
    os.link(sample["val_labels"], os.path.join(src, "validation_labels.txt"))
    a, b = sample["synsets"][0], sample["synsets"][1]
    for synset, data in ((a, b"a"), (b, b"b")):
        name = sorted(os.listdir(os.path.join(src, "train", synset)))[0]
        shutil.copy(os.path.join(src, "train", synset, name), os.path.join(src, "train", synset, "same.JPEG"))
    meta = build(src, tmp_path / "out")
    train = meta.splits["train"]
    assert train.num_read == sample["num_train"] + 2
    assert train.num_examples == train.num_read - 1  # The sample's one truncated JPEG.
    assert not any(r.file.endswith("same.JPEG") for r in meta.rejected)


def test_a_validation_file_in_two_class_folders_is_named_with_both_classes(sample, tmp_path):
    src = extract_sample(sample, tmp_path / "imagenet", val_by_class=True)
    a, b = sample["synsets"][1], sample["synsets"][6]
    name = sorted(os.listdir(os.path.join(src, "val", a)))[0]
    shutil.copy(os.path.join(src, "val", a, name), os.path.join(src, "val", b, name))
    _fails(tmp_path, f"validation file {name} is listed twice, as val/{a}/{name} and val/{b}/{name} "
           f"\\(classes {a} and {b}\\); keep one$", "--imagenet_dir", src)


def test_a_validation_archive_with_a_name_twice_is_refused(sample, tmp_path):
    val = tar_members(sample["val_tar"])
    first = sorted(val)[0]
    val[f"again/{first}"] = val[first]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / imagenet_layout.VAL_TAR).write_bytes(_tar(val))
    _fails(tmp_path, f"validation file {first} is listed twice", "--imagenet_dir", str(tmp_path / "in"),
           "--val_labels", sample["val_labels"])


def test_two_archives_of_one_class_are_refused(sample, tmp_path):
    inner = tar_members(sample["train_tar"])
    first = sorted(inner)[0]
    inner[f"copy/{first}"] = inner[first]
    _write_train_tar(tmp_path / "in", inner)
    _fails(tmp_path, f"holds two archives of class {first[:-4]}: {first} and copy/{first}",
           "--imagenet_dir", str(tmp_path / "in"))


def test_a_name_twice_in_a_class_archive_is_read_once(tmp_path):
    path = tmp_path / "n01440764.tar"
    path.write_bytes(_tar({"a.JPEG": b"1", "sub/a.JPEG": b"2", "b.JPEG": b"3"}))
    unit = members.ReadUnit("train", "class_tar", str(path), "n01440764.tar", "n01440764", 0, path.stat().st_size)
    got = list(members.list_unit(unit))
    assert [type(m).__name__ for m in got] == ["Member", "Skipped", "Member"]
    assert got[1].reason == ("a second file named a.JPEG in class n01440764 (first: n01440764.tar/a.JPEG): "
                             "not read twice")


def _linked_sample(sample, src):
    """A folder holding the sample's archives and label file (hard links)."""
    src.mkdir()
    for name in ("train_tar", "val_tar", "val_labels"):
        os.link(sample[name], src / os.path.basename(sample[name]))
    return src


# -- 7. the test set ----------------------------------------------------------------


@pytest.mark.parametrize("form", ["ILSVRC2012_img_test_v10102019.tar", "ILSVRC2012_img_test.tar", "test"])
def test_the_test_set_is_reported_as_skipped_with_its_size(sample, tmp_path, form):
    src = _linked_sample(sample, tmp_path / "in")
    images = {f"ILSVRC2012_test_{i:08d}.JPEG": b"jpeg" for i in range(1, 8)}
    if form == "test":
        (src / "test").mkdir()
        for n, data in images.items():
            (src / "test" / n).write_bytes(data)
    else:
        (src / form).write_bytes(_tar(images))
    layout = imagenet_layout.plan(str(src))
    assert set(layout.splits) == {"train", "validation"}
    size = None if form == "test" else (src / form).stat().st_size
    what = "extracted folder test/ (7 entries)" if form == "test" else f"archive {form} ({size:,} bytes, not opened)"
    line = f"test: {what}: skipped, the test set has no labels"
    assert layout.skipped == [line]
    assert line in layout.describe()


@pytest.mark.slow
def test_the_build_summary_names_the_skipped_test_set(sample, tmp_path, capfd):
    src = _linked_sample(sample, tmp_path / "in")
    (src / imagenet_layout.TEST_TARS[0]).write_bytes(_tar({"ILSVRC2012_test_00000001.JPEG": b"jpeg"}))
    build(src, tmp_path / "out")
    err = capfd.readouterr().err
    summary = err[err.index("wrote "):]
    size = (src / imagenet_layout.TEST_TARS[0]).stat().st_size
    assert (f"test: archive {imagenet_layout.TEST_TARS[0]} ({size:,} bytes, not opened): skipped, the test set has "
            "no labels") in summary


# -- 8. the output folder inside the input -------------------------------------------


@pytest.mark.parametrize("where", ["tfrecords", ".", "train/../records"])
def test_an_output_folder_inside_the_input_is_refused_before_writing(sample, tmp_path, where):
    src = _linked_sample(sample, tmp_path / "in")
    before = sorted(os.listdir(src))
    out = src / where
    _fails(tmp_path, "is inside --imagenet_dir .*: a later build would read the shards as input",
           "--imagenet_dir", str(src), out=out)
    assert sorted(os.listdir(src)) == before


def test_an_output_folder_reached_through_a_link_is_inside_too(tmp_path):
    (tmp_path / "in").mkdir()
    os.symlink(tmp_path / "in", tmp_path / "link")
    with pytest.raises(imagenet_layout.LayoutError, match="is inside"):
        imagenet_layout.check_output_outside(str(tmp_path / "in"), str(tmp_path / "link" / "out"))
    imagenet_layout.check_output_outside(str(tmp_path / "in"), str(tmp_path / "in-other"))  # A prefix, not inside.


def test_a_flat_validation_folder_lists_pipes_and_odd_names_as_rejected(sample, tmp_path):
    src = extract_sample(sample, tmp_path / "imagenet")
    os.link(sample["val_labels"], os.path.join(src, "validation_labels.txt"))
    val = os.path.join(src, "val")
    os.mkfifo(os.path.join(val, "ILSVRC2012_val_00000041.JPEG"))
    with open(os.path.join(os.fsencode(val), b"ILSVRC2012_val_00000042\xff.JPEG"), "wb") as f:
        f.write(b"jpeg")
    units = imagenet_layout.plan(src).splits["validation"].units
    listed = [m for u in units for m in members.list_unit(u)]
    skipped = {m.name: m.reason for m in listed if isinstance(m, members.Skipped)}
    assert skipped == {
        "val/ILSVRC2012_val_00000041.JPEG": "a named pipe (FIFO), not a regular file: not read",
        "val/ILSVRC2012_val_00000042\\xff.JPEG": "file name is not valid UTF-8: not read (rename the file)",
    }
    assert len(listed) == sample["num_val"] + 2


def test_an_unreadable_test_archive_is_reported_not_fatal(sample, tmp_path):
    src = _linked_sample(sample, tmp_path / "in")
    os.symlink(tmp_path / "nothing", src / "ILSVRC2012_img_test.tar")  # Opening it fails.
    layout = imagenet_layout.plan(str(src))
    assert layout.skipped[0].startswith("test: archive ILSVRC2012_img_test.tar (unreadable: ")
    assert set(layout.splits) == {"train", "validation"}
