"""Loss and top-1/top-5 error over a split: one evaluator for training and `alexnet_tf.evaluate`."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from alexnet_tf import distribute, input_pipeline, preprocessing
from tfrecords.folder import Records


def top_k_hits(scores, labels, k: int):
    """Whether each label is among the k highest scores, a tie counting against it: (batch,) bool.

    `tf.math.in_top_k` counts every class tied at the boundary as in the top
    k, so a network that gives every class the same score (dead ReLUs), or
    whose softmax underflows to exact zeros, would score 0% error. Here the
    label's rank is the number of other classes scoring at least as much.
    """
    scores = tf.cast(scores, tf.float32)
    mine = tf.gather(scores, tf.cast(labels, tf.int32), batch_dims=1)[:, None]
    rank = tf.reduce_sum(tf.cast(scores >= mine, tf.int32), axis=1) - 1
    return (rank < min(k, scores.shape[-1])) & tf.math.is_finite(mine[:, 0])  # NaN: a miss.


def metric_sums(per_example_loss, logits, labels):
    """(sum of losses, top-1 hits, top-5 hits, count) of a batch, float32 scalars."""
    top1 = tf.reduce_sum(tf.cast(top_k_hits(logits, labels, 1), tf.float32))
    top5 = tf.reduce_sum(tf.cast(top_k_hits(logits, labels, 5), tf.float32))
    count = tf.cast(tf.shape(labels)[0], tf.float32)
    return tf.reduce_sum(tf.cast(per_example_loss, tf.float32)), top1, top5, count


def rates(sums) -> dict:
    """{"loss", "top1_error", "top5_error"} from summed (loss, top-1, top-5, count)."""
    loss, top1, top5, count = (float(s) for s in sums)
    count = max(count, 1.0)
    return {"loss": loss / count, "top1_error": 1 - top1 / count, "top5_error": 1 - top5 / count}


# Evaluation sums are integers, so that they add up exactly in any order (over
# batches, replicas and workers): hits and counts, and each example's loss in
# units of 2**-32 (finer than float32's resolution for any loss above 0.002).
LOSS_UNIT = 2.0**-32


def exact_sums(per_example_loss, scores, labels, num_classes: int = 0, confusion: bool = False):
    """(loss in LOSS_UNITs, top-1 hits, top-5 hits, count, non-finite losses) of a batch, int64 (5,).

    A non-finite loss (a diverged network) is counted, not summed: `exact_rates`
    then reports the loss as NaN, as a float sum would. `scores` rank the
    classes (log-probabilities, logits: any monotonic score). With `num_classes`,
    per-class images, top-1 hits and top-5 hits follow (3 x num_classes), and
    with `confusion` the counts of (true, predicted) label pairs
    (num_classes x num_classes, row-major): see `split_sums`.
    """
    loss = tf.cast(per_example_loss, tf.float64)
    finite = tf.math.is_finite(loss)
    units = tf.cast(tf.round(tf.where(finite, loss, 0.0) / LOSS_UNIT), tf.int64)
    top1 = tf.cast(top_k_hits(scores, labels, 1), tf.int64)
    top5 = tf.cast(top_k_hits(scores, labels, 5), tf.int64)
    count = tf.shape(labels, out_type=tf.int64)[0]
    sums = [tf.stack([tf.reduce_sum(units), tf.reduce_sum(top1), tf.reduce_sum(top5), count,
                      tf.reduce_sum(tf.cast(~finite, tf.int64))])]
    if num_classes:
        labels = tf.cast(labels, tf.int64)

        def per_class(weights):
            return tf.math.unsorted_segment_sum(weights, labels, num_classes)

        sums += [per_class(tf.ones_like(top1)), per_class(top1), per_class(top5)]
        if confusion:
            predicted = tf.argmax(scores, axis=-1, output_type=tf.int64)
            sums.append(tf.math.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes,
                                         maxlength=num_classes * num_classes, dtype=tf.int64))
    return tf.concat(sums, axis=0)


def sums_size(num_classes: int = 0, confusion: bool = False) -> int:
    return 5 + 3 * num_classes + (num_classes * num_classes if confusion else 0)


def split_sums(sums, num_classes: int = 0) -> tuple[dict, dict | None]:
    """(`exact_rates`, per class {count, top1_error, top5_error[, confusion]} or None) of added-up sums."""
    sums = np.asarray(sums, np.int64)
    rates = exact_rates(sums[:5])
    if not num_classes:
        return rates, None
    count, top1, top5 = sums[5:5 + 3 * num_classes].reshape(3, num_classes)
    seen = np.maximum(count, 1)
    per_class = {"count": count.tolist(), "top1_error": (1 - top1 / seen).tolist(),
                 "top5_error": (1 - top5 / seen).tolist()}
    if len(sums) > 5 + 3 * num_classes:
        per_class["confusion"] = sums[5 + 3 * num_classes:].reshape(num_classes, num_classes)
    return rates, per_class


def exact_rates(sums) -> dict:
    """`rates` of `exact_sums` added up."""
    loss, top1, top5, count, nonfinite = (int(s) for s in sums[:5])
    return rates([loss * LOSS_UNIT if not nonfinite else float("nan"), top1, top5, count])


def pad_batch(images, size: int):
    """`images` with zero images appended up to `size` along the batch axis.

    Appended with a concatenation, not `tf.pad`: with oneDNN (TensorFlow's
    default on x86), Grappler fuses a Pad followed by a convolution into the
    convolution's own padding, and on CPUs with AVX-512 the fused kernel drops
    padding along the batch axis when the batch size is unknown at trace time:
    the network then saw the unpadded batch and the reshape before fc6 failed.
    A concatenation has no such rewrite, on any CPU and in any precision.
    """
    n = tf.shape(images)[0]
    zeros = tf.zeros(tf.concat([[size - n], tf.shape(images)[1:]], axis=0), images.dtype)
    return tf.concat([images, zeros], axis=0)


class Evaluator:
    """Validation loss and top-1/top-5 error with the central patch (or the paper's 10 patches).

    The sums are exact (`exact_sums`), and every batch the network sees has the
    full batch size (a split's last, partial batch is padded, the padding left
    out of the sums): on CPU a convolution's result for one image depends on
    the batch size, not on the other images. So the result depends only on the
    weights and the batch size, not on how the split is divided: a multi-worker
    evaluation, where each worker evaluates its own shards and the sums are
    added up once at the end, gives the same hit counts as a single-worker one
    and the same loss to float32 precision (a multi-worker process's float32
    losses can differ from a one-device process's in the last bit).

    Args:
      model: A callable (images, training=False) -> logits: a Keras model or
        a SavedModel adapter.
      strategy: The strategy the model's variables live under.
      records: The records folder, opened (`tfrecords.folder.Records`).
      stats: Colour statistics the images are preprocessed with.
      batch_size: Global evaluation batch size (per worker under multi_worker).
      per_class: Also count images, top-1 and top-5 hits per class.
      confusion: Also count (true, predicted) label pairs (with `per_class`).
    """

    def __init__(self, model, strategy, records: Records, stats: preprocessing.ColorStats,
                 batch_size: int, per_class: bool = False, confusion: bool = False):
        self.model, self.strategy, self.records, self.stats = model, strategy, records, stats
        self.batch_size = batch_size
        self.classes = records.num_classes if per_class or confusion else 0
        self.confusion = bool(confusion and self.classes)
        sums_length = sums_size(self.classes, self.confusion)
        # Workers read disjoint shards in their own number of batches: no
        # per-batch collectives to fall out of step, one sum at the end.
        self.workers = distribute.num_workers(strategy)

        def forward(images, labels, size):
            n = tf.shape(labels)[0]
            padded = pad_batch(images, size)
            # Log-probabilities, not probabilities: a softmax that underflows to
            # zeros would tie classes and cap the loss.
            if len(images.shape) == 5:  # (batch, 10, h, w, 3): average the softmax of the patches.
                logits = self.model(tf.reshape(padded, [-1, *images.shape[2:]]), training=False)
                logp = tf.reshape(tf.nn.log_softmax(tf.cast(logits, tf.float32)), [size, 10, -1])
                logp = tf.reduce_logsumexp(logp, axis=1) - np.log(10.0).astype(np.float32)  # log mean(p).
            else:
                logp = tf.nn.log_softmax(tf.cast(self.model(padded, training=False), tf.float32))
            logp = logp[:n]
            per_example = -tf.gather(logp, labels, batch_dims=1)
            return exact_sums(per_example, logp, labels, self.classes, self.confusion)

        def replica_eval(images, labels, size):
            # The last batch of a split leaves some replicas empty; skip the model there.
            return tf.cond(tf.shape(labels)[0] > 0, lambda: forward(images, labels, size),
                           lambda: tf.zeros([sums_length], tf.int64))

        @tf.function
        def distributed_step(batch, size):
            sums = self.strategy.run(replica_eval, args=(*batch, size))
            return self.strategy.reduce("SUM", sums, axis=None)

        self._local = tf.function(replica_eval)
        self._distributed = distributed_step
        # Each split's input and step, made at its first evaluation: a run evaluates every epoch.
        self._inputs: dict = {}

    def evaluate(self, split: str = "validation", ten_crop: bool = False, progress: bool = False) -> dict:
        """Loss, top-1 and top-5 error over every example of `split` (and "per_class", see `split_sums`)."""
        if (split, ten_crop) not in self._inputs:
            self._inputs[split, ten_crop] = self._input(split, ten_crop)
        ds, step = self._inputs[split, ten_crop]
        sums = np.zeros(sums_size(self.classes, self.confusion), np.int64)
        expected = self.records.split(split).num_examples
        bar = keras.utils.Progbar(expected, verbose=1 if progress else 0, unit_name="image")
        for b in ds:
            sums += step(b).numpy()
            bar.update(int(sums[3]))
        sums = distribute.all_workers(self.strategy, sums).sum(axis=0)
        if int(sums[3]) != expected:
            raise RuntimeError(f"evaluated {int(sums[3])} {split} examples, metadata.json lists {expected}")
        result, per_class = split_sums(sums, self.classes)
        if per_class is not None:
            result["per_class"] = per_class
        return result

    def _input(self, split: str, ten_crop: bool):
        """(dataset, step) of `split`: the batches, and the function that sums one."""
        batch = self.batch_size
        if ten_crop:
            batch = max(1, batch // 10)
        # Never wider than the split: a partial batch is padded to the full batch
        # size, and a batch of 100,000 for 100 images would pad to gigabytes.
        batch = min(batch, max(1, self.records.split(split).num_examples))
        if self.workers > 1 or self.strategy.num_replicas_in_sync == 1:
            # One device per worker; each of several workers reads its own share.
            context = (tf.distribute.InputContext(self.workers, distribute.worker_index(self.strategy), 1)
                       if self.workers > 1 else None)
            ds = input_pipeline.eval_dataset(self.records, self.stats, batch, split, ten_crop, context)
            step = lambda b: self._local(*b, batch)  # noqa: E731
        else:
            batch -= batch % self.strategy.num_replicas_in_sync
            batch = max(batch, self.strategy.num_replicas_in_sync)
            ds = self.strategy.distribute_datasets_from_function(
                lambda ctx: input_pipeline.eval_dataset(self.records, self.stats, batch, split,
                                                        ten_crop, ctx))
            per_replica = batch // self.strategy.num_replicas_in_sync
            step = lambda b: self._distributed(b, per_replica)  # noqa: E731
        return ds, step
