"""What a run reports each epoch (the chief): TensorBoard's summaries, the console's line, and warnings.

TensorBoard gets scalars, augmented inputs, weight histograms and the paper's
figures; the console the epoch's line (with --verbose); warnings go to both."""

from __future__ import annotations

import os
import typing

import numpy as np
import tensorflow as tf

from alexnet_tf import distribute, figures, input_pipeline, preprocessing, run_dir
from alexnet_tf.config import TrainConfig

if typing.TYPE_CHECKING:
    from alexnet_tf.trainer import Data


def write_histogram(name: str, values, buckets: int = 30) -> None:
    """Writes a TensorBoard histogram of `values` at the default writer's step,
    as `tf.summary.histogram` does (float64 rows [left edge, right edge, count]
    over `buckets` equal buckets from the minimum to the maximum), counted with
    NumPy on the host.

    TensorBoard's own op counts through a one-hot float64 matrix of values x
    buckets: for fc6's 37.7M weights that is 9 GB of temporary memory (on the
    GPU, where the variable lives) and 7-13 s on 2 CPU cores; this takes a
    fraction of a second, counting 4 Mi values at a time. Non-finite values are
    left out (a non-finite loss is reported by the stall watch).
    """
    from tensorboard.plugins.histogram import metadata

    x = np.asarray(values).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        rows = np.zeros((buckets, 3))
    else:
        lo, hi = float(x.min()), float(x.max())
        if lo == hi:
            counts = np.zeros(buckets)
            counts[-1] = x.size
            rows = np.stack([np.full(buckets, hi), np.full(buckets, hi), counts], axis=1)
        else:
            width, chunk = (hi - lo) / buckets, 1 << 22  # float64 temporaries of 4 Mi values at most.
            counts = sum(np.bincount(np.minimum(np.floor((x[i:i + chunk].astype(np.float64) - lo) / width)
                                                .astype(np.int64), buckets - 1), minlength=buckets)
                         for i in range(0, x.size, chunk))
            edges = np.linspace(lo, hi, buckets + 1)
            edges[-1] = hi
            rows = np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
    tf.summary.write(name, tf.constant(rows, tf.float64),
                     metadata=metadata.create_summary_metadata(display_name=None, description=None))


class Summaries:
    """TensorBoard (chief only): scalars, augmented inputs, weight histograms and the paper's figures.

    train/: losses, errors, learning rate, speed, augmented images, histograms
    and conv1's kernels (Figure 3); validation/: losses, errors, per-class
    errors, and the fixed validation images' top-5 and fc7 neighbours (Figure 4).
    """

    def __init__(self, model_dir: str, chief: bool, model, config: TrainConfig, data: Data):
        self.chief, self.model, self.config, self.data = chief, model, config, data
        if not chief:
            return
        root = run_dir.path(model_dir, run_dir.TENSORBOARD)
        self.train = tf.summary.create_file_writer(os.path.join(root, "train"))
        self.val = tf.summary.create_file_writer(os.path.join(root, "validation"))
        self.preview = (input_pipeline.preview_images(data.records, config.log_images)
                        if config.log_images else None)
        self.fixed = (figures.FixedImages(data.records, data.stats, config.figure_pool)
                      if config.figures and data.has_validation else None)
        self.forward = figures.keras_forward(model) if self.fixed else None
        self.names = [c.name for c in data.records.meta.classes]

    def __enter__(self) -> Summaries:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def epoch(self, epoch: int, result: dict, per_class: dict | None = None) -> None:
        """The finished epoch's summaries, and its line on the console (with --verbose)."""
        if not self.chief:
            return
        if self.config.verbose:
            print(epoch_line(result), flush=True)
        config, stats, model = self.config, self.data.stats, self.model
        with self.train.as_default(step=epoch):
            for k in ("loss", "top1_error", "top5_error"):
                tf.summary.scalar(k, result[f"train_{k}"])
            tf.summary.scalar("learning_rate", result["learning_rate"])
            tf.summary.scalar("images_per_second", result["images_per_second"])
            if self.preview is not None:  # The same images every epoch, augmented afresh.
                images = input_pipeline.augment_preview(self.preview, stats, seed=epoch)
                tf.summary.image("augmented_training_images",
                                 preprocessing.display_images(images, stats), max_outputs=config.log_images)
            if config.histograms and epoch % max(config.histogram_every, 1) == 0:
                for v in model.trainable_variables:
                    write_histogram(v.path, v.numpy())
            if config.figures:
                grid = figures.kernel_grid(figures.conv1_kernel(model), figures.conv1_groups(config.grouped))
                tf.summary.image("conv1_kernels", grid[None], description=(
                    "The 96 conv1 kernels (Figure 3), one band per group, each scaled to its own range."))
        if "val_loss" in result:
            with self.val.as_default(step=epoch):
                for k in ("loss", "top1_error", "top5_error"):
                    tf.summary.scalar(k, result[f"val_{k}"])
                if per_class is not None:
                    seen = np.asarray(per_class["count"]) > 0
                    write_histogram("per_class_top1_error", np.asarray(per_class["top1_error"])[seen])
                    write_histogram("per_class_top5_error", np.asarray(per_class["top5_error"])[seen])
                    worst = figures.per_class_table(per_class, self.data.records.meta.classes, worst=20)
                    tf.summary.text("worst_classes", figures.markdown_table(worst))
                if self.fixed is not None:
                    drawn = self.fixed.draw(self.forward, self.names)
                    tf.summary.image("top5_predictions", drawn.predictions[None], description=(
                        "Fixed validation images with their top-5 (Figure 4, left); the true class's bar is red."))
                    if drawn.neighbours is not None:
                        tf.summary.image("fc7_nearest_neighbours", drawn.neighbours[None], description=(
                            f"Query images (first column) and the validation images (of the first "
                            f"{len(self.fixed.labels)}) nearest in fc7 (Figure 4, right); green: same class."))
        self.train.flush()
        self.val.flush()

    def warning(self, message: str, step: int) -> None:
        """A warning on the console and as text in TensorBoard (train/warnings) at the global step."""
        distribute.say(self.chief, f"WARNING: {message}")
        if self.chief:
            with self.train.as_default(step=step):
                tf.summary.text("warnings", message)
            self.train.flush()

    def close(self) -> None:
        if self.chief:
            self.train.close()
            self.val.close()


def epoch_line(r: dict) -> str:
    """The finished epoch's line on the console."""
    line = (f"epoch {r['epoch']}: loss {r['train_loss']:.4f}, top-1 error {r['train_top1_error']:.2%}, "
            f"top-5 error {r['train_top5_error']:.2%}, {r['images_per_second']:.1f} images/s, "
            f"lr {r['learning_rate']:g}")
    if "val_top1_error" in r:
        line += (f" | validation loss {r['val_loss']:.4f}, top-1 error {r['val_top1_error']:.2%}, "
                 f"top-5 error {r['val_top5_error']:.2%}")
    return line
