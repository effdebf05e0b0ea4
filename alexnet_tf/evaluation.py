"""Loss and top-1/top-5 error over a split: one evaluator for training and `alexnet_tf.evaluate`."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from alexnet_tf import input_pipeline


def metric_sums(per_example_loss, logits, labels):
    """(sum of losses, top-1 hits, top-5 hits, count) of a batch, float32 scalars."""
    logits = tf.cast(logits, tf.float32)
    top1 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32))
    top5 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, min(5, logits.shape[-1])), tf.float32))
    count = tf.cast(tf.shape(labels)[0], tf.float32)
    return tf.reduce_sum(tf.cast(per_example_loss, tf.float32)), top1, top5, count


def rates(sums) -> dict:
    """{"loss", "top1_error", "top5_error"} from summed (loss, top-1, top-5, count)."""
    loss, top1, top5, count = (float(s) for s in sums)
    count = max(count, 1.0)
    return {"loss": loss / count, "top1_error": 1 - top1 / count, "top5_error": 1 - top5 / count}


class Evaluator:
    """Validation loss and top-1/top-5 error with the central patch (or the paper's 10 patches).

    Args:
      model: A callable (images, training=False) -> logits: a Keras model or
        a SavedModel adapter.
      strategy: The strategy the model's variables live under.
      data_dir: Records folder.
      meta: Its metadata.json.
      stats: Colour statistics the images are preprocessed with.
      batch_size: Global evaluation batch size.
    """

    def __init__(self, model, strategy, data_dir: str, meta: dict, stats: input_pipeline.ColorStats,
                 batch_size: int):
        self.model, self.strategy, self.data_dir, self.meta, self.stats = model, strategy, data_dir, meta, stats
        self.batch_size = batch_size
        # Every worker of a multi-worker job evaluates the whole split itself:
        # no collectives to fall out of step, and identical results (and so
        # identical schedule decisions) everywhere.
        self.distributed = not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)

        def replica_eval(images, labels):
            # The last batch of a split leaves some replicas empty; skip the model there.
            return tf.cond(tf.shape(labels)[0] > 0, lambda: forward(images, labels),
                           lambda: (tf.zeros([]),) * 4)

        def forward(images, labels):
            if len(images.shape) == 5:  # (batch, 10, h, w, 3): average the softmax of the patches.
                b = tf.shape(images)[0]
                logits = self.model(tf.reshape(images, [-1, *images.shape[2:]]), training=False)
                probs = tf.reduce_mean(tf.reshape(tf.nn.softmax(tf.cast(logits, tf.float32)), [b, 10, -1]), axis=1)
            else:
                probs = tf.nn.softmax(tf.cast(self.model(images, training=False), tf.float32))
            per_example = -tf.math.log(tf.gather(probs, labels, batch_dims=1) + 1e-12)
            return metric_sums(per_example, probs, labels)

        @tf.function
        def distributed_step(batch):
            sums = self.strategy.run(replica_eval, args=batch)
            return tf.stack([self.strategy.reduce("SUM", s, axis=None) for s in sums])

        self._local = tf.function(lambda images, labels: tf.stack(replica_eval(images, labels)))
        self._distributed = distributed_step

    def evaluate(self, split: str = "validation", ten_crop: bool = False, progress: bool = False) -> dict:
        """Loss, top-1 and top-5 error over every example of `split`."""
        batch = self.batch_size
        if ten_crop:
            batch = max(1, batch // 10)
        if self.distributed:
            batch -= batch % self.strategy.num_replicas_in_sync
            batch = max(batch, self.strategy.num_replicas_in_sync)
            ds = self.strategy.distribute_datasets_from_function(
                lambda ctx: input_pipeline.eval_dataset(self.data_dir, self.meta, self.stats, batch, split,
                                                        ten_crop, ctx))
            step = self._distributed
        else:
            ds = input_pipeline.eval_dataset(self.data_dir, self.meta, self.stats, batch, split, ten_crop)
            step = lambda b: self._local(*b)  # noqa: E731
        sums = np.zeros(4)
        expected = self.meta["splits"][split]["num_examples"]
        bar = keras.utils.Progbar(expected, verbose=1 if progress else 0, unit_name="image")
        for b in ds:
            sums += step(b).numpy()
            bar.update(int(sums[3]))
        if int(sums[3]) != expected:
            raise RuntimeError(f"evaluated {int(sums[3])} {split} examples, metadata.json lists {expected}")
        return rates(sums)
