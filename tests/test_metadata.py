"""metadata.json as typed objects: round trips and the checks of `metadata.Metadata.from_json`."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re

import pytest

from tfrecords import classes, metadata, schema

from tfrecords.folder import Records

PATH = "some/where/metadata.json"


@pytest.fixture
def raw(built):
    """A fresh copy of the built metadata.json, parsed, to edit."""
    out, _ = built
    with open(os.path.join(out, schema.METADATA_FILE)) as f:
        return json.load(f)


def _error(obj) -> str:
    with pytest.raises(metadata.MetadataError) as e:
        metadata.Metadata.from_json(obj, PATH)
    return str(e.value)


def test_built_metadata_round_trips_byte_for_byte(built):
    out, meta = built
    text = open(os.path.join(out, schema.METADATA_FILE)).read()
    raw = json.loads(text)
    parsed = metadata.Metadata.from_json(raw)
    assert parsed.to_json() == raw
    assert json.dumps(parsed.to_json(), indent=1) + "\n" == text  # What the builder writes.
    assert list(parsed.to_json()) == list(raw)  # Same key order, not only the same keys.
    assert list(parsed.to_json()["color_stats"]) == list(raw["color_stats"])
    assert parsed == meta == metadata.load_metadata(out)  # run() returns what it wrote.
    assert metadata.Metadata.from_json(meta.to_json()) == meta
    assert hash(parsed) == hash(meta)


def test_attributes_are_typed(built):
    out, meta = built
    assert meta.format_version == schema.FORMAT_VERSION and meta.dataset == "ILSVRC2012"
    assert meta.classes[0] == classes.ClassInfo(0, "n01440764", "tench")
    assert meta.synsets == tuple(c.synset for c in meta.classes) and len(meta.synsets) == meta.num_classes
    assert list(meta.splits) == ["train", "validation"]
    train = meta.split("train")
    assert isinstance(train, metadata.SplitInfo) and isinstance(train.shards, tuple)
    first = train.shards[0]
    assert first.file == schema.shard_name("train", 0, train.num_shards)
    assert type(first.bytes) is int and len(first.sha256) == len(first.head_sha256) == 64
    assert sum(s.num_examples for s in train.shards) == train.num_examples
    assert meta.image == metadata.ImageInfo(256, True, 90, "RGB", meta.image.note)
    stats = meta.color_stats
    assert isinstance(stats.eigenvalues, tuple) and len(stats.eigenvalues) == 3
    assert isinstance(stats.covariance[0], tuple) and len(stats.covariance) == 3
    assert stats.mean_image_file == schema.MEAN_IMAGE_FILE and stats.mean_image_shape == (256, 256, 3)
    assert meta.rejected[0].split == "train" and "truncated" in meta.rejected[0].reason
    assert meta.build.seed == 0 and meta.build.train_shards == 1024 and meta.build.extra == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.num_classes = 3


def test_unknown_split(built):
    out, meta = built
    with pytest.raises(metadata.MetadataError, match=r"split 'test' not in metadata.json; it has \['train', "):
        meta.split("test")
    with pytest.raises(metadata.MetadataError, match=r"split 'test' not in .*metadata.json; it has \['train', "):
        Records(out, meta).shard_paths("test")


def test_color_stats_are_none_without_training_images(raw):
    raw["color_stats"] = {}
    meta = metadata.Metadata.from_json(raw)
    assert meta.color_stats is None
    assert meta.to_json()["color_stats"] == {} and meta.to_json() == raw
    del raw["color_stats"]
    assert metadata.Metadata.from_json(raw).color_stats is None
    with pytest.raises(metadata.MetadataError, match="names no mean image"):
        Records("anywhere", meta).mean_image


def test_color_stats_without_a_mean_image(raw):
    del raw["color_stats"]["mean_image_file"], raw["color_stats"]["mean_image_shape"]
    meta = metadata.Metadata.from_json(raw)
    assert meta.color_stats.mean_image_file is None and meta.color_stats.mean_image_shape is None
    assert meta.to_json() == raw  # The keys stay absent.
    with pytest.raises(metadata.MetadataError, match="names no mean image"):
        Records("anywhere", meta).mean_image


def test_unknown_build_keys_survive_a_round_trip(raw):
    raw["build"]["runner"] = "DataflowRunner"
    raw["build"]["workers"] = {"max": 64}
    meta = metadata.Metadata.from_json(raw)
    assert meta.build.extra == {"runner": "DataflowRunner", "workers": {"max": 64}}
    assert meta.to_json() == raw and list(meta.to_json()["build"]) == list(raw["build"])
    assert metadata.Metadata.from_json(meta.to_json()) == meta


def test_color_stats_info_turns_lists_into_tuples():
    eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    stats = metadata.ColorStatsInfo(255, 1, 4, [1.0, 2.0, 3.0], [0.5, 0.5, 0.5], eye, [3.0, 2.0, 1.0], eye,
                                   mean_image_shape=[2, 2, 3])
    assert stats.covariance == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    assert stats.mean_image_shape == (2, 2, 3)
    assert hash(stats) == hash(dataclasses.replace(stats))
    assert stats.to_json()["covariance"] == eye and stats.to_json()["mean_image_shape"] == [2, 2, 3]
    assert "mean_image_file" not in stats.to_json()


def _set(path, value):
    """An edit that sets the value at a key path (a list of keys and indices)."""
    def edit(obj):
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


def _delete(path):
    def edit(obj):
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set(["format_version"], 2), f"{PATH} has format_version 2; this code reads 1"),
        (_delete(["format_version"]), f"{PATH} has format_version None; this code reads 1"),
        (_set(["format_version"], True), f"{PATH} has format_version True; this code reads 1"),
        (_set(["num_classes"], 11), f"{PATH}: num_classes=11 but 10 classes listed"),
        (_set(["num_classes"], "10"), f'{PATH}: num_classes must be an integer, got "10"'),
        (_set(["classes", 3, "label"], 4), f"{PATH}: classes are not listed in label order 0..n-1"),
        (lambda m: m["classes"].pop(), f"{PATH}: num_classes=10 but 9 classes listed"),
        (_set(["classes", 2, "synset"], 5), f"{PATH}: classes[2].synset must be a string, got 5"),
        (_delete(["classes", 0, "name"]), f"{PATH}: classes[0].name is missing"),
        (_set(["classes", 1], "n01443537"), f'{PATH}: classes[1] must be a JSON object, got "n01443537"'),
        (_delete(["splits", "validation", "source"]), f"{PATH}: splits.validation.source is missing"),
        (_set(["splits", "validation", "num_shards"], 2), f"{PATH}: split validation says 2 shards but lists 1"),
        (_set(["splits", "train", "shards", 0, "num_examples"], True),
         f"{PATH}: splits.train.shards[0].num_examples must be an integer, got true"),
        (_set(["splits", "train"], []), f"{PATH}: splits.train must be a JSON object, got []"),
        (_delete(["image"]), f"{PATH}: image is missing"),
        (_set(["image", "resized"], 1), f"{PATH}: image.resized must be true or false, got 1"),
        (_set(["image", "size"], 256.0), f"{PATH}: image.size must be an integer, got 256.0"),
        (_set(["color_stats", "covariance"], [[1.0, 0.0], [0.0, 1.0]]),
         f"{PATH}: color_stats.covariance must be a list of 3x3 lists of numbers, got [[1.0, 0.0], [0.0, 1.0]]"),
        (_set(["color_stats", "eigenvalues"], [3.0, "2", 1.0]),
         f'{PATH}: color_stats.eigenvalues must be a list of 3 numbers, got [3.0, "2", 1.0]'),
        (_set(["color_stats", "mean_image_shape"], [256, 256.0, 3]),
         f"{PATH}: color_stats.mean_image_shape must be a list of 3 integers, got [256, 256.0, 3]"),
        (_set(["color_stats"], None), f"{PATH}: color_stats must be a JSON object, got null"),
        (_set(["rejected", 0, "reason"], None), f"{PATH}: rejected[0].reason must be a string, got null"),
        (_set(["rejected"], {}), f"{PATH}: rejected must be a list, got {{}}"),
        (_set(["build", "seed"], "0"), f'{PATH}: build.seed must be an integer, got "0"'),
        (_set(["build", "max_reject_fraction"], "0.01"),
         f'{PATH}: build.max_reject_fraction must be a number, got "0.01"'),
        (_delete(["created"]), f"{PATH}: created is missing"),
    ],
)
def test_each_inconsistency_is_named(raw, edit, message):
    edit(raw)
    assert _error(raw) == message


def test_shards_that_do_not_add_up(raw):
    train = raw["splits"]["train"]
    train["shards"][1]["num_examples"] += 2
    assert _error(raw) == (
        f"{PATH}: split train says {train['num_examples']} examples but its shards add up to "
        f"{train['num_examples'] + 2}"
    )


def test_long_values_are_cut_in_messages(raw):
    raw["build"]["seed"] = "x" * 100
    assert _error(raw) == f'{PATH}: build.seed must be an integer, got "{"x" * 36}...'


def test_top_level_must_be_an_object():
    assert _error([1, 2]) == f"{PATH}: the top level must be a JSON object, got [1, 2]"


def test_load_metadata_errors(raw, tmp_path):
    path = str(tmp_path / schema.METADATA_FILE)
    with pytest.raises(metadata.MetadataError, match=re.escape(f"{path} not found: build the records first")):
        metadata.load_metadata(str(tmp_path))
    (tmp_path / schema.METADATA_FILE).write_text('{"format_version": 1,')
    with pytest.raises(metadata.MetadataError, match=re.escape(f"{path} is not valid JSON: ")):
        metadata.load_metadata(str(tmp_path))
    raw["format_version"] = 2
    (tmp_path / schema.METADATA_FILE).write_text(json.dumps(raw))
    with pytest.raises(metadata.MetadataError, match=re.escape(f"{path} has format_version 2; this code reads 1")):
        metadata.load_metadata(str(tmp_path))
    raw["format_version"] = 1
    del raw["splits"]["train"]["num_read"]
    (tmp_path / schema.METADATA_FILE).write_text(json.dumps(raw))
    with pytest.raises(metadata.MetadataError, match=re.escape(f"{path}: splits.train.num_read is missing")):
        metadata.load_metadata(str(tmp_path))


def test_write_metadata_writes_the_builders_bytes_and_refuses_inconsistent_metadata(built, tmp_path):
    out, meta = built
    metadata.write_metadata(str(tmp_path), meta)
    assert (tmp_path / schema.METADATA_FILE).read_text() == open(os.path.join(out, schema.METADATA_FILE)).read()
    bad = dataclasses.replace(meta, num_classes=meta.num_classes + 1)
    dst = tmp_path / "bad"
    dst.mkdir()
    with pytest.raises(metadata.MetadataError, match=f"num_classes={meta.num_classes + 1} but"):
        metadata.write_metadata(str(dst), bad)
    assert os.listdir(dst) == []


def test_edits_do_not_reach_the_built_copy(raw, built):
    out, meta = built
    before = copy.deepcopy(meta.to_json())
    parsed = metadata.Metadata.from_json(raw)
    raw["splits"]["train"]["shards"].clear()
    raw["build"]["seed"] = 99
    assert parsed == meta and meta.to_json() == before


@pytest.mark.parametrize("file", [
    "../outside/train-00000-of-00003", "/data/train-00000-of-00003", "sub/train-00000-of-00003",
    "train-00000-of-00003/../../../etc/passwd", "..", "", "validation-00000-of-00001", "train-00000-of-00003\n",
    "train-00000-of-00003.tmp-1", "train-\u0660\u0660\u0660\u0660\u0660-of-00003",
])
def test_a_shard_name_must_be_a_plain_name_of_its_split(raw, file):
    raw["splits"]["train"]["shards"][0]["file"] = file
    assert _error(raw).startswith(
        f"{PATH}: splits.train.shards[0].file must be a shard file name of split train such as "
        "train-00000-of-00001 (a plain name inside the records folder), got ")


@pytest.mark.parametrize("file", ["../mean_image.npy", "/tmp/mean_image.npy", "sub/mean_image.npy", "x.npy"])
def test_the_mean_image_must_be_the_builds_file_inside_the_folder(raw, file):
    raw["color_stats"]["mean_image_file"] = file
    assert _error(raw) == (f'{PATH}: color_stats.mean_image_file must be "mean_image.npy" (a plain name inside the '
                           f"records folder), got {json.dumps(file)}")


@pytest.mark.parametrize("key", ["synset", "name"])
@pytest.mark.parametrize("char", ["\t", "\n", "\r", "\x00", "\x7f", "\x85", "\u2028", "\u2029"])
def test_class_text_with_a_control_character_is_refused(raw, key, char):
    text = raw["classes"][3][key]
    raw["classes"][3][key] = text[:4] + char + text[4:]
    assert _error(raw) == (f"{PATH}: classes[3].{key} must be one line of text without control characters (found "
                           f"U+{ord(char):04X}), got {json.dumps(raw['classes'][3][key])}")


def test_class_text_may_be_any_printable_text(raw):
    raw["classes"][3]["name"] = "Æsop's tench, café \u00e9t\u00e9 \U0001F41F \u200d"
    assert metadata.Metadata.from_json(raw, PATH).classes[3].name == raw["classes"][3]["name"]
