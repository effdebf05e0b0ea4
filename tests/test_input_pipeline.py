"""The tf.data input stream: shards per worker, shuffled passes, exact resume, evaluation in order.

Each record's own preprocessing is checked in test_preprocessing.py.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from alexnet_tf import input_pipeline as ip
from alexnet_tf import preprocessing as pp
from conftest import read_split
from tfrecords.folder import Records


def test_train_dataset_batches(data):
    out, meta, stats, _ = data
    ds = ip.train_dataset(Records(out, meta), stats, 8, shuffle_buffer=50)
    (patches, params), labels = next(iter(ds))
    assert patches.shape == (8, 227, 227, 3) and patches.dtype == tf.uint8
    assert params.alpha.shape == (8, 3) and params.flip.dtype == tf.bool
    for position in (params.top.numpy(), params.left.numpy()):
        assert position.min() >= 0 and position.max() <= 29
    assert labels.dtype == tf.int32 and 0 <= labels.numpy().min() and labels.numpy().max() < meta.num_classes
    images = pp.finish_batch(patches, params, stats)
    # Mean subtracted: centred near zero, within the pixel range.
    assert abs(float(tf.reduce_mean(images))) < 40 and float(tf.reduce_max(tf.abs(images))) < 300


def _batches(ds, n):
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(n)]


def test_seeded_deterministic_stream_repeats_itself_exactly(data):
    out, meta, stats, _ = data
    make = lambda seed: ip.train_dataset(Records(out, meta), stats, 8, shuffle_buffer=50, seed=seed, deterministic=True)  # noqa: E731
    first, again, other = _batches(make(3), 6), _batches(make(3), 6), _batches(make(4), 6)
    for a, b in zip(tf.nest.flatten(first), tf.nest.flatten(again)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(tf.nest.flatten(first), tf.nest.flatten(other)))
    # Each record has its own draw: the 48 patches are not all at one position.
    tops = np.concatenate([b[0][1].top for b in first])
    assert len(set(tops.tolist())) > 5


def test_a_resumed_stream_continues_exactly_where_the_trained_steps_end(data):
    out, meta, stats, _ = data
    make = lambda skip: ip.train_dataset(Records(out, meta), stats, 8, shuffle_buffer=50, seed=5, skip=skip)  # noqa: E731
    straight = _batches(make(0), 7)
    resumed = _batches(make(3 * 8), 4)  # Killed after 3 trained steps of 8 records.
    for a, b in zip(tf.nest.flatten(straight[3:]), tf.nest.flatten(resumed)):
        np.testing.assert_array_equal(a, b)  # The same records, augmented the same: none twice, none left out.


def test_each_pass_reads_every_record_once(data):
    out, meta, _, _ = data
    n = meta.splits["train"].num_examples
    stream = [r.numpy() for r in ip.train_records(Records(out, meta), seed=2, shuffle_buffer=50).take(2 * n)]
    first, second = stream[:n], stream[n:]
    assert len(set(first)) == n and set(first) == set(second)
    assert first != second  # Each pass in its own order.
    stored = sorted(r["jpeg"] for r in read_split(out, meta, "train"))
    assert stored == sorted(pp.parse_record(r)[0].numpy() for r in first)


def test_each_record_is_augmented_from_its_own_seed(data):
    out, meta, stats, rows = data
    # A stream of one shard read in order (no shuffle to speak of): record i is augmented with record_seed(seed, i).
    ds = ip.train_dataset(Records(out, meta), stats, 4, shuffle_buffer=1, seed=9, deterministic=True)
    (patches, aug), labels = next(iter(ds))
    first_shard = Records(out, meta).shard_paths("train")
    order = tf.data.Dataset.from_tensor_slices(first_shard).shuffle(len(first_shard), seed=9)
    jpeg = next(iter(tf.data.TFRecordDataset(next(iter(order))).map(lambda s: pp.parse_record(s)[0])))
    patch, expected = pp.crop_for_train(jpeg, stats, seed=ip.record_seed(9, 0))
    np.testing.assert_array_equal(patches[0].numpy(), patch.numpy())
    assert int(aug.top[0]) == int(expected.top) and int(aug.left[0]) == int(expected.left)


def test_eval_dataset_reads_every_example_once(data):
    out, meta, stats, _ = data
    labels = np.concatenate([y.numpy() for _, y in ip.eval_dataset(Records(out, meta), stats, 7, split="train")])
    expected = [r["label"] for r in read_split(out, meta, "train")]
    assert list(labels) == expected
    shapes = {tuple(x.shape[1:]) for x, _ in ip.eval_dataset(Records(out, meta), stats, 4, ten_crop=True)}
    assert shapes == {(10, 227, 227, 3)}


def test_input_context_splits_shards_between_workers(data):
    out, meta, stats, _ = data
    seen = []
    for worker in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=2)
        files = [f.numpy().decode() for f in ip._files(Records(out, meta), "train", ctx)]
        seen.append(set(files))
        assert ip.train_dataset(Records(out, meta), stats, 8, ctx).element_spec[0][0].shape == (4, 227, 227, 3)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(Records(out, meta).shard_paths("train"))


def test_preview_is_the_first_training_records_augmented_as_training_does(data):
    out, meta, stats, _ = data
    jpegs = ip.preview_images(Records(out, meta), 3)
    first = os.path.basename(Records(out, meta).shard_paths("train")[0])
    assert list(jpegs.numpy()) == [r["jpeg"] for r in read_split(out, meta, "train") if r["shard"] == first][:3]
    images = ip.augment_preview(jpegs, stats, seed=4).numpy()
    assert images.shape == (3, 227, 227, 3)
    for i in range(3):  # Record i of the preview: the stream's record i with the epoch's seed.
        expected = pp.preprocess_for_train(jpegs[i], stats, seed=ip.record_seed(4, i)).numpy()
        np.testing.assert_allclose(images[i], expected, rtol=1e-6, atol=1e-4)
    assert not np.allclose(images, ip.augment_preview(jpegs, stats, seed=5).numpy())  # Each epoch its own.
