"""The tf.data input stream: records -> batches, for training and evaluation.

Dataset assembly: which shards each input pipeline (worker) reads, passes over
them in a shuffled order read interleaved in parallel, the records numbered
so that each is augmented from its own seed and a resumed run skips exactly
what it has trained on, one epoch at a time through the tf.data service, and
every record once, in order, for evaluation. What is done to one record
(decode, crop, reflect, lighting, mean) is `alexnet_tf.preprocessing`'s.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from alexnet_tf import preprocessing
from tfrecords.folder import Records


def _files(records: Records, split: str, context: tf.distribute.InputContext | None):
    files = records.shard_paths(split)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if context and context.num_input_pipelines > 1:
        if len(files) < context.num_input_pipelines:
            raise ValueError(
                f"{split} has {len(files)} shards for {context.num_input_pipelines} input pipelines; "
                "build the records with more shards"
            )
        # Each worker reads its own shards (per-file sharding: no wasted reads).
        ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
    return ds


def record_seed(seed: int, index):
    """The (2,) stateless seed of the `index`-th record of a stream seeded with `seed`."""
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])


def _one_pass(files: tf.data.Dataset, num_files: int, seed: int, shuffle_buffer: int,
              deterministic: bool) -> tf.data.Dataset:
    """Every record of `files` once: the files in a shuffled order, read
    interleaved in parallel, the records shuffled through a buffer."""
    ds = files.shuffle(num_files, seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        tf.data.TFRecordDataset, cycle_length=16, block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic,
    )
    return ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)


def train_records(
    records: Records,
    seed: int,
    context: tf.distribute.InputContext | None = None,
    shuffle_buffer: int = 10_000,
    deterministic: bool = True,
) -> tf.data.Dataset:
    """One input pipeline's endless stream of serialized training records, in passes.

    Each pass reads every record of the pipeline's shards once: the shards in
    a shuffled order, read interleaved in parallel, then the records shuffled
    through a buffer. The next pass starts only when this one has drained
    (`repeat` after the shuffle), so the first pass holds no record twice,
    and with `deterministic` the whole stream is a pure function of (seed,
    shards): the k-th record is the same in every run, which is what lets a
    resumed run skip exactly the records it has already trained on.
    """
    files = _files(records, "train", context)
    num_files = len(records.shard_paths("train"))
    return _one_pass(files, num_files, seed, shuffle_buffer, deterministic).repeat()


def epoch_records(records: Records, seed: int, shuffle_buffer: int = 10_000) -> tf.data.Dataset:
    """One epoch of serialized training records, each once, for the tf.data service.

    The same reading as `train_records`' passes, over all shards and without
    repeat: under `ShardingPolicy.DYNAMIC` the dispatcher hands the shards
    (the splits of the shard list) to the service workers one at a time, each
    worker reads and shuffles what it was given, and the job ends when every
    shard has been handed out and read.
    """
    files = records.shard_paths("train")
    return _one_pass(tf.data.Dataset.from_tensor_slices(files), len(files), seed, shuffle_buffer, False)


def record_fingerprint(serialized):
    """A record's own int64 identity (farmhash of its bytes): the same on every worker."""
    return tf.bitcast(tf.fingerprint(serialized[None])[0], tf.int64)


def _distribution(service: str, job_name: str):
    """The transformation that makes a dataset's elements on the tf.data service's workers (`distribute_epoch`)."""
    svc = tf.data.experimental.service
    return svc.distribute(processing_mode=svc.ShardingPolicy.DYNAMIC, service=service, job_name=job_name)


def distribute_epoch(dataset: tf.data.Dataset, service: str, job_name: str) -> tf.data.Dataset:
    """`dataset` (one finite epoch) produced by the tf.data service at `service`.

    Every reader of the same `job_name` reads one shared job: between them
    they get each element at most once (`ShardingPolicy.DYNAMIC`), whichever
    worker made it. A job name read again after its end gives nothing.
    """
    return dataset.apply(_distribution(service, job_name))


def train_dataset(
    records: Records,
    stats: preprocessing.ColorStats,
    global_batch_size: int,
    context: tf.distribute.InputContext | None = None,
    shuffle_buffer: int = 10_000,
    seed: int | None = None,
    crop: int = preprocessing.CROP,
    deterministic: bool = True,
    skip: int = 0,
    service: str | None = None,
    job_name: str | None = None,
    passes: int = 1,
) -> tf.data.Dataset:
    """One input pipeline's ((patches, Augment), labels) batches: an endless
    stream, or one epoch made by the tf.data service's workers (`service`).

    The records are decoded into random reflected patches in parallel
    (`preprocessing.crop_for_train`), each record's randomness drawn
    statelessly from its own seed; then batched per replica with
    drop_remainder (static shapes for XLA and equal steps on every replica).
    `preprocessing.finish_batch(patches, augment, stats)` turns a batch into
    the network's input inside the training step.

    Here (no `service`) the records come from `train_records` (shuffled
    shards read in parallel, shuffled records, one pass after another) and
    are numbered: a record's seed is `record_seed(seed, its number)`.

    Through the tf.data service at `service`, the stream is the job
    `job_name`: the service's workers read the shards they are handed
    (`epoch_records`, `passes` passes over them), crop, reflect and batch;
    the trainer only receives batches. A record's seed comes from (seed, its
    fingerprint), so it does not depend on which worker took it. The stream
    ends with the job: each worker's last partial batch is dropped, so an
    epoch trains on slightly fewer records than the split holds (less than a
    batch per service worker), and never on one twice. Every input pipeline
    of every trainer must pass the same arguments (the job is shared);
    `context` only sets the per-replica batch size.

    Args:
      seed: Seed of the shard order, the record shuffle and the augmentation
        (None: a random one).
      deterministic: Interleave and map hand their results on in a fixed
        order (the work stays parallel), so that the same seed gives the same
        batches. False hands on whatever finishes first; it measures no
        faster here (`benchmarks/input_determinism.py`) and loses the stream
        position a resumed run needs. The service's workers always hand on
        what finishes first.
      skip: Records of this stream already trained on: they are read and
        dropped before decoding (a resumed epoch starts where the last one
        stopped; their numbers, and so their augmentation, stay the same).
        Not with `service`, where a resumed run reads on from where the job is.
      passes: The service's job makes that many passes over the records (for
        measurements that need a long job; training uses one job per epoch).
    """
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))
    batch = context.get_per_replica_batch_size(global_batch_size) if context else global_batch_size
    if service:
        if skip:
            raise ValueError("skip is for the stream read here: a resumed job of the tf.data service reads on "
                             "from where it is")
        ds = epoch_records(records, seed, shuffle_buffer).repeat(passes)
        delivery, deterministic = _distribution(service, job_name), False
    else:
        ds = train_records(records, seed, context, shuffle_buffer, deterministic).enumerate().skip(skip)
        delivery = None

    def crop_record(serialized, key):
        image, label = preprocessing.parse_record(serialized)
        return preprocessing.crop_for_train(image, stats, crop, record_seed(seed, key)), label

    # A record's key: its number here, its own bytes' fingerprint on the service's workers (in the one map).
    keyed = ((lambda serialized: crop_record(serialized, record_fingerprint(serialized))) if service
             else (lambda number, serialized: crop_record(serialized, number)))
    ds = ds.map(keyed, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    ds = ds.batch(batch, drop_remainder=True)
    if delivery is not None:
        ds = ds.apply(delivery)
    return ds.prefetch(tf.data.AUTOTUNE)


def preview_images(records: Records, count: int):
    """A small fixed set of training images for TensorBoard: the first `count` records
    of the first training shard, as JPEG bytes (count,)."""
    first = records.shard_paths("train")[0]
    ds = tf.data.TFRecordDataset(first).take(count).map(lambda s: preprocessing.parse_record(s)[0])
    return tf.stack(list(ds))


def augment_preview(jpegs, stats: preprocessing.ColorStats, seed: int, crop: int = preprocessing.CROP):
    """The preview images augmented as training does, with record seeds from `seed`:
    (count, crop, crop, 3) float32 network inputs."""
    parts = [preprocessing.crop_for_train(jpegs[i], stats, crop, record_seed(seed, i))
             for i in range(int(jpegs.shape[0]))]
    patches = tf.stack([p for p, _ in parts])
    aug = tf.nest.map_structure(lambda *t: tf.stack(t), *[a for _, a in parts])
    return preprocessing.finish_batch(patches, aug, stats)


def eval_dataset(
    records: Records,
    stats: preprocessing.ColorStats,
    batch_size: int,
    split: str = "validation",
    ten_crop: bool = False,
    context: tf.distribute.InputContext | None = None,
    crop: int = preprocessing.CROP,
) -> tf.data.Dataset:
    """Every record of a split once, in order: (images, labels) batches.

    images are (batch, crop, crop, 3), or (batch, 10, crop, crop, 3) with ten_crop.
    With several input pipelines each reads its own shards, or, where there
    are fewer shards than pipelines, every shard and keeps its own share of
    the records (so every split can be evaluated by any number of workers).
    """
    batch = context.get_per_replica_batch_size(batch_size) if context else batch_size
    fn = preprocessing.ten_crops if ten_crop else preprocessing.preprocess_for_eval
    files = records.shard_paths(split)
    if context and len(files) < context.num_input_pipelines:
        ds = tf.data.TFRecordDataset(files).shard(context.num_input_pipelines, context.input_pipeline_id)
    else:
        ds = _files(records, split, context).interleave(tf.data.TFRecordDataset, cycle_length=1)

    def patches(serialized):
        image, label = preprocessing.parse_record(serialized)
        return fn(image, stats, crop), label

    ds = ds.map(patches, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)
