"""Tests of `pipelines.transforms`: listing the inputs and assigning them to shards, on `beam.Create` input."""

from __future__ import annotations

import collections
import io

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import imagenet_layout, members, transforms
from pipelines.members import Member, ReadUnit
from pipelines.transforms import BuildConfig


# -- DoFns and sharding -------------------------------------------------------


CONFIG = BuildConfig(classes=("n01440764", "n01443537"), names=("tench", "goldfish"), seed=0, progress=False)


def test_list_members_labels_members_and_rejects_the_unlabelled():
    unit = ReadUnit(
        split="validation", kind="files", path="/in", name="val[0:4]",
        members=(
            Member("val/ILSVRC2012_val_00000001.JPEG", "n01443537", "/in/val/1.JPEG"),
            Member("val/ILSVRC2012_val_00000002.JPEG", "n09999999", "/in/val/2.JPEG"),
            Member("val/README.txt", None, "/in/val/README.txt"),
            Member("val/ILSVRC2012_val_00000004.JPEG", "n01440764", "/in/val/4.JPEG"),
        ),
    )
    with BeamTestPipeline() as p:
        out = p | beam.Create([unit]) | transforms.ListMembers(CONFIG)
        assert_that(
            out["items"] | beam.Map(lambda r: (r[0], r[2].name, r[1] == transforms.sort_key(
                0, r[0], r[2].synset, r[2].name))),
            equal_to([
                ("validation", "val/ILSVRC2012_val_00000001.JPEG", True),
                ("validation", "val/ILSVRC2012_val_00000004.JPEG", True),
            ]),
            label="items",
        )
        assert_that(
            out["rejected"] | beam.Map(lambda r: (r["file"], r["reason"])),
            equal_to([
                ("val/ILSVRC2012_val_00000002.JPEG", "synset n09999999 has no training images"),
                ("val/README.txt", "no validation number in the file name (expected ILSVRC2012_val_NNNNNNNN.JPEG)"),
            ]),
            label="rejected",
        )
        assert_that(out["read"], equal_to([("validation", 4)]), label="read")


def test_assign_shard_splits_by_rank_evenly():
    keys = np.random.default_rng(0).integers(0, 2**64 - 1, 1000, dtype=np.uint64)
    bounds = dict([transforms.shard_bounds(("train", [int(k) for k in keys]), {"train": 7})])
    shards = collections.Counter(transforms.assign_shard(("train", int(k), b""), bounds)[0] for k in keys)
    ranks = {int(k): r for r, k in enumerate(np.sort(keys))}
    for k in keys:  # Shard = rank * shards // N: contiguous ranges of the rank.
        assert transforms.assign_shard(("train", int(k), b""), bounds)[0][1] == ranks[int(k)] * 7 // 1000
    assert sorted(shards) == [("train", i, 7) for i in range(7)]
    assert set(shards.values()) <= {142, 143}


def test_sort_key_ignores_layout_but_not_seed():
    k = transforms.sort_key
    assert k(0, "train", "n1", "ILSVRC2012_img_train.tar/n1.tar/n1_5.JPEG") == k(0, "train", "n1", "train/n1/n1_5.JPEG")
    assert k(0, "train", "n1", "n1_5.JPEG") != k(1, "train", "n1", "n1_5.JPEG")


def test_class_archive_is_listed_by_headers_and_read_by_byte_range(tmp_path):
    import tarfile

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(3):
            data = f"image {i}".encode() * (i + 1) * 300
            info = tarfile.TarInfo(f"n01440764_{i}.JPEG")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / imagenet_layout.TRAIN_TAR
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("n01440764.tar")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    layout = imagenet_layout.plan(str(tmp_path))
    (unit,) = layout.splits["train"].units
    listed = list(members.list_unit(unit))
    assert [(m.name.split("/")[-1], m.synset) for m in listed] == [
        (f"n01440764_{i}.JPEG", "n01440764") for i in range(3)
    ]
    reader = members.MemberReader()
    assert [reader.read(m) for m in listed] == [f"image {i}".encode() * (i + 1) * 300 for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [imagenet_layout.TRAIN_TAR]  # Nothing extracted.
    short = listed[0]._replace(size=listed[0].size + 10**6)
    with pytest.raises(OSError, match="archive ends inside this member"):
        reader.read(short)


def test_links_in_a_class_archive_are_rejected_by_name_not_dropped(tmp_path):
    import tarfile

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tar:
        data = b"image bytes" * 100
        info = tarfile.TarInfo("n01440764_1.JPEG")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, kind, target in (("n01440764_2.JPEG", tarfile.SYMTYPE, "/etc/passwd"),
                                   ("n01440764_3.JPEG", tarfile.LNKTYPE, "n01440764_1.JPEG"),
                                   ("sub", tarfile.DIRTYPE, "")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    path = tmp_path / imagenet_layout.TRAIN_TAR
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("n01440764.tar")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    (unit,) = imagenet_layout.plan(str(tmp_path)).splits["train"].units
    config = BuildConfig(classes=("n01440764",), names=("tench",))
    out = list(transforms.ListUnitFn(config).process(unit))
    items = [v for kind, v in out if kind == transforms.ITEM]
    rejected = [v for kind, v in out if kind == transforms.REJECTED]
    assert [v for kind, v in out if kind == transforms.READ] == [("train", 3)]  # Listed: the image and the links.
    assert [m.name.split("/")[-1] for _, _, m in items] == ["n01440764_1.JPEG"]
    assert rejected == [  # Counted as read and rejected (read = written + rejected); the folder is structure.
        {"split": "train", "file": f"{imagenet_layout.TRAIN_TAR}/n01440764.tar/n01440764_2.JPEG",
         "reason": "a symbolic link (to /etc/passwd), not an image file: not followed"},
        {"split": "train", "file": f"{imagenet_layout.TRAIN_TAR}/n01440764.tar/n01440764_3.JPEG",
         "reason": "a hard link (to n01440764_1.JPEG), not an image file: not followed"},
    ]


def test_links_in_the_flat_validation_archive_are_rejected_too(tmp_path):
    import tarfile

    with tarfile.open(tmp_path / imagenet_layout.VAL_TAR, "w") as tar:
        data = b"image bytes" * 100
        info = tarfile.TarInfo("ILSVRC2012_val_00000001.JPEG")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("ILSVRC2012_val_00000002.JPEG")
        info.type, info.linkname = tarfile.SYMTYPE, "/dev/zero"
        tar.addfile(info)
    (tmp_path / "validation_labels.txt").write_text("n01440764\nn01440764\n")
    units = imagenet_layout.plan(str(tmp_path)).splits["validation"].units
    config = BuildConfig(classes=("n01440764",), names=("tench",))
    out = [o for u in units for o in transforms.ListUnitFn(config).process(u)]
    assert [v[2].name for kind, v in out if kind == transforms.ITEM] == [
        f"{imagenet_layout.VAL_TAR}/ILSVRC2012_val_00000001.JPEG"]
    assert [v for kind, v in out if kind == transforms.REJECTED] == [
        {"split": "validation", "file": f"{imagenet_layout.VAL_TAR}/ILSVRC2012_val_00000002.JPEG",
         "reason": "a symbolic link (to /dev/zero), not an image file: not followed"}]


def test_assign_shards_groups_contiguous_key_ranges():
    rng = np.random.default_rng(4)
    keys = [int(k) for k in rng.integers(0, 2**63, 200, dtype=np.uint64)]
    items = [("train", k, Member(f"train/{i}.JPEG", "n01440764")) for i, k in enumerate(keys)]
    items += [("validation", k, Member(f"val/{i}.JPEG", "n01440764")) for i, k in enumerate(keys[:40])]

    def check(groups):
        by_split = collections.defaultdict(dict)
        for (split, shard, shards), kv in groups:
            by_split[split][shard] = (shards, sorted(k for k, _ in kv))
        # train: 200 records, 3 asked for -> 3; validation: 40 records, 5 asked -> 1 (32 a shard at least).
        assert {s: len(v) for s, v in by_split.items()} == {"train": 3, "validation": 1}
        train = [by_split["train"][i][1] for i in range(3)]
        assert [len(t) for t in train] in ([66, 67, 67], [67, 66, 67], [67, 67, 66])
        assert train[0][-1] < train[1][0] and train[1][-1] < train[2][0]  # Contiguous ranks.
        assert sorted(sum(train, [])) == sorted(keys)

    with BeamTestPipeline() as p:
        groups = p | beam.Create(items) | transforms.AssignShards({"train": 3, "validation": 5})
        assert_that(groups, check)
