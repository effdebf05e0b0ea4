"""`Records`: a records folder opened and checked once, then read through its methods."""

import os
import shutil

import numpy as np
import pytest

from tfrecords import classes, folder, metadata


def test_open_reads_the_metadata_and_gives_the_shards_and_the_mean_image(built):
    out, meta = built
    data = folder.Records.open(out)
    assert data.meta == meta and data.data_dir == out
    assert data.num_classes == meta.num_classes and data.classes == meta.classes
    assert data.color_stats == meta.color_stats
    assert data.shard_paths("train") == [os.path.join(out, s.file) for s in meta.splits["train"].shards]
    assert data.has_examples("train") and data.has_examples("validation") and not data.has_examples("test")
    assert data.split("validation").num_examples == meta.splits["validation"].num_examples
    mean = data.mean_image
    assert mean.shape == (meta.image.size, meta.image.size, 3) and mean.dtype == np.float32
    assert data.mean_image is mean  # Read once.
    assert data.metadata_path == os.path.join(out, "metadata.json")


def test_open_checks_every_shard_once_at_the_start(built, tmp_path):
    out, meta = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    os.remove(copy / meta.splits["validation"].shards[0].file)
    with pytest.raises(metadata.MetadataError, match=r"1 shard\(s\) listed in .* are missing: .*validation-00000"):
        folder.Records.open(str(copy))
    assert folder.Records.open(str(copy), splits=["train"]).meta == meta  # Only the splits asked for.


def test_check_classes_names_the_first_label_that_differs(built):
    out, meta = built
    data = folder.Records(out, meta)
    data.check_classes(meta.synsets, "the model")
    other = list(meta.synsets)
    other[2] = "n99999999"
    with pytest.raises(classes.ClassMismatch, match=f"label 2 is n99999999 in the model, {meta.synsets[2]} in {out}$"):
        data.check_classes(other, "the model")
