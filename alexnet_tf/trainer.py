"""The training loop: `train_and_evaluate(config, model_dir, strategy)`.

One custom loop (`strategy.run` over `distribute_datasets_from_function`)
serves every strategy: `one_device`, `mirrored` (all GPUs, or logical CPU
devices) and `multi_worker` (TF_CONFIG). Keras' `model.fit` fails under
MultiWorkerMirroredStrategy with Keras 3; this loop does not.

The device runs `steps_per_loop` training steps per call from the host (a
`tf.range` loop inside one `tf.function`), with the metric sums accumulated on
the device; the host reads them once per call to update the progress bar,
TensorBoard and checkpoints, so it never waits for the device between steps.

With `jit_compile`, each replica's forward and backward pass is compiled with
XLA; the all-reduce and the SGD update run outside the compiled function, so
the same code compiles under every strategy (an optimizer's cross-replica
update cannot run inside a per-replica XLA cluster).

Killed at any moment, the same call resumes from the last checkpoint:
weights, optimizer state, epoch, step, schedule state, and the input position
(the epoch's stream is a pure function of the seed, the epoch and the worker;
a resumed epoch skips the records already trained on, see `settle_stream`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from alexnet_tf import (distribute, evaluation, export, figures, input_pipeline, model as model_lib, preprocessing,
                        recipes, run_dir)
from alexnet_tf.config import ConfigError, TrainConfig
from tfrecords import fileio
from tfrecords.classes import ClassMismatch
from tfrecords.folder import Records


def say(chief: bool, message: str) -> None:
    """One line about the run on stderr (from the chief only)."""
    if chief:
        print(f"train: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Small pure pieces.


def learning_rate_after_epoch(config: TrainConfig, epoch: int, lr: float, val_error: float | None,
                              best: float, bad_epochs: int, decays: int) -> tuple[float, float, int, int]:
    """The schedule: returns (lr, best, bad_epochs, decays) for the next epoch.

    Args:
      epoch: The epoch just finished, 0-based.
      val_error: Its validation top-1 error, or None without a validation split
        (the plateau schedule then keeps the rate).
    """
    if config.lr_schedule == "dexp":  # Each epoch at the rate its start's share of the run gives.
        rate = recipes.dexp((epoch + 1) / config.epochs, config.learning_rate, config.lr_final_factor,
                            config.lr_steps)
        return rate, min(best, math.inf if val_error is None else val_error), 0, decays
    if config.lr_schedule == "step":
        decays = sum(1 for e in config.lr_decay_epochs if e <= epoch + 1)
        return config.learning_rate * 0.1**decays, min(best, math.inf if val_error is None else val_error), 0, decays
    if val_error is None:
        return lr, best, bad_epochs, decays
    if val_error < best:
        return lr, val_error, 0, decays
    bad_epochs += 1
    if bad_epochs >= config.lr_patience and decays < config.max_lr_decays:
        return lr / 10.0, best, 0, decays + 1
    return lr, best, bad_epochs, decays


def loop_length(global_step: int, step_in_epoch: int, steps_per_epoch: int, steps_per_loop: int,
                checkpoint_every: int = 0, profile_steps: tuple[int, ...] = ()) -> int:
    """Steps the next device loop runs: at most `steps_per_loop`, cut at the
    epoch's end, at checkpoint boundaries, and where the profiler starts and stops."""
    n = min(steps_per_loop, steps_per_epoch - step_in_epoch)
    if checkpoint_every:
        n = min(n, checkpoint_every - global_step % checkpoint_every)
    if profile_steps:
        first, last = profile_steps
        for boundary in (first, last + 1):  # A loop starts at `first`; one ends after `last`.
            if global_step < boundary:
                n = min(n, boundary - global_step)
    return max(n, 1)


class LoopState:
    """Loop state saved in every checkpoint beside the model and optimizer."""

    def __init__(self, learning_rate: float):
        def var(value, dtype):
            return tf.Variable(value, dtype=dtype, trainable=False)

        self.epoch = var(0, tf.int64)
        self.step_in_epoch = var(0, tf.int64)
        self.global_step = var(0, tf.int64)
        self.learning_rate = var(learning_rate, tf.float64)
        self.best_val_error = var(math.inf, tf.float64)
        self.bad_epochs = var(0, tf.int64)
        self.lr_decays = var(0, tf.int64)
        # Running sums of the epoch's training metrics (loss, top-1, top-5, count).
        self.sums = var([0.0, 0.0, 0.0, 0.0], tf.float64)
        self.train_seconds = var(0.0, tf.float64)
        # The input position: the stream is a pure function of its seed, and a
        # resumed epoch skips the records of `step_in_epoch` steps, so both the
        # seed and the records per step (global batch / input pipelines) must
        # be those of the run being resumed. -1: not recorded yet.
        self.stream_seed = var(-1, tf.int64)
        self.global_batch = var(-1, tf.int64)
        self.input_pipelines = var(-1, tf.int64)
        # The run's identity, drawn at its first start: it names the tf.data
        # service's job of each epoch, which every trainer process shares and a
        # resumed run reads on from. -1: not drawn yet.
        self.run_id = var(-1, tf.int64)

    def trackables(self) -> dict:
        return dict(vars(self))


# ---------------------------------------------------------------------------
# The model, its optimizer and the compiled training loop.


def build_model_and_optimizer(config: TrainConfig, num_classes: int, strategy, compute_dtype: str, build=None):
    """The network (`build`, default AlexNet initialised as the config's recipe says) and its SGD
    optimizer under the strategy.

    float16 wraps the optimizer in dynamic loss scaling.
    """
    policy = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[compute_dtype]
    build = build or functools.partial(model_lib.build_alexnet, init=recipes.get(config.recipe).init)
    with strategy.scope():
        model = build(num_classes, grouped=config.grouped, dropout=config.dropout, seed=config.seed, dtype=policy)
        optimizer = keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=config.momentum)
        if compute_dtype == "float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    return model, optimizer


class TrainLoop:
    """The replicated training step, and `steps` of it per call on the device.

    Args:
      model, optimizer: Built under `strategy`'s scope.
      strategy: Any tf.distribute strategy.
      global_batch: Examples per step over all replicas (the loss is averaged over it).
      weight_decay: Coefficient of 0.5 * |w|^2 on every kernel (and bias, with `decay_biases`).
      decay_biases: Weight decay also on the biases.
      bias_lr: The biases' learning rate over the kernels': a number or a
        variable the caller updates (a recipe's schedule); None: equal.
      finish: Turns a batch from the input stream into (images, labels) on
        the replica's device (default: the batch as it is).
      jit_compile: XLA for each replica's forward and backward pass.
      state: Where `run` adds the metric sums and the steps (optional).
      warmup_steps: Linear learning-rate ramp over the first steps (0: none).
      finite: The input stream ends with the epoch (the tf.data service's): a
        call stops early when any replica's stream has ended, and returns how
        many steps it ran. Otherwise the stream is endless and every call
        runs all its steps.
    """

    def __init__(self, model, optimizer, strategy, global_batch: int, weight_decay: float = 0.0,
                 finish=None, jit_compile: bool = False, state: LoopState | None = None, warmup_steps: float = 0.0,
                 finite: bool = False, decay_biases: bool = False, bias_lr=None):
        self.model, self.optimizer, self.strategy, self.state = model, optimizer, strategy, state
        self.finite = finite
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        is_bias = [v.path.endswith("bias") for v in model.trainable_variables]
        kernels = [v for v, b in zip(model.trainable_variables, is_bias) if decay_biases or not b]
        finish = finish or (lambda inputs, labels: (inputs, labels))

        def gradients(inputs, labels, keep=None):
            images, labels = finish(inputs, labels)
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                if keep is not None:  # 0.0 masks the stand-in example of an empty batch; 1.0 changes nothing.
                    per_example *= tf.cast(keep, per_example.dtype)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                total = loss
                if weight_decay:
                    # 0.5 * wd * |w|^2 has gradient wd * w: the paper's "- 0.0005 e w"
                    # term enters the momentum update exactly as in §5.
                    decay = weight_decay * tf.add_n([tf.nn.l2_loss(tf.cast(k, tf.float32)) for k in kernels])
                    total += tf.nn.scale_regularization_loss(decay)
                scaled = optimizer.scale_loss(total)
            grads = tape.gradient(scaled, model.trainable_variables)
            sums = tf.stack(evaluation.metric_sums(per_example, logits, labels))
            return grads, sums if keep is None else sums * keep

        # One compiled function per replica: a function traced on replica 0
        # captures replica 0's variables, and XLA cannot read them from another device.
        compiled = {}

        def replica_step(inputs, labels):
            extra = ()
            if finite:  # The service's stream: a replica may get an empty batch at a step.
                inputs, labels, keep = at_least_one_example(inputs, labels)
                extra = (keep,)
            if jit_compile:
                replica = int(tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group))
                if replica not in compiled:
                    compiled[replica] = tf.function(gradients, jit_compile=True)
                grads, sums = compiled[replica](inputs, labels, *extra)
            else:
                grads, sums = gradients(inputs, labels, *extra)
            if self.loss_scaled:
                grads = skip_everywhere_if_any_nonfinite(grads)
            if bias_lr is not None:
                # With SGD and momentum, a gradient scaled by m is a learning rate scaled by m.
                m = tf.convert_to_tensor(bias_lr)
                grads = [g * tf.cast(m, g.dtype) if b else g for g, b in zip(grads, is_bias)]
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return sums

        self.replica_step = replica_step
        # One value: the replicas' weights are equal after each step's all-reduce.
        self.weights_finite = tf.function(lambda: tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(v)) for v in model.trainable_variables]))
        ramp = float(warmup_steps)

        def one_step(inputs, sums):
            if ramp and state is not None:
                done = tf.cast(state.global_step + 1, tf.float64) / ramp
                lr = state.learning_rate * tf.minimum(done, 1.0)
                optimizer.learning_rate.assign(tf.cast(lr, optimizer.learning_rate.dtype))
            per_replica = strategy.run(replica_step, args=inputs)
            if state is not None:
                state.global_step.assign_add(1)
            return sums + tf.cast(strategy.reduce("SUM", per_replica, axis=None), tf.float64)

        def record(sums, ran):
            if state is not None:
                state.sums.assign_add(sums)
                state.step_in_epoch.assign_add(ran)
            return sums, ran

        @tf.function
        def run(iterator, steps):
            sums = tf.zeros([4], tf.float64)
            for _ in tf.range(steps):
                sums = one_step(next(iterator), sums)
            return record(sums, steps)

        @tf.function
        def run_finite(iterator, steps):
            sums = tf.zeros([4], tf.float64)
            ran = tf.constant(0, tf.int64)
            for _ in tf.range(steps):
                # Has a value only if every replica of every worker has a batch
                # (one all-reduce across workers): all stop at the same step.
                batch = iterator.get_next_as_optional()
                if not batch.has_value():
                    break
                sums = one_step(batch.get_value(), sums)
                ran += 1
            return record(sums, ran)

        self._run = run_finite if finite else run

    def run(self, iterator, steps: int):
        """Runs `steps` training steps on the device (fewer where a finite stream ends).

        Returns:
          The summed (loss, top-1, top-5, count) tensor and the number of steps run.
        """
        return self._run(iterator, tf.constant(steps, tf.int64))


def at_least_one_example(inputs, labels):
    """(inputs, labels, keep): an empty batch becomes one all-zero example and
    `keep` 0.0 (its loss, gradients and metrics masked to exact zeros); any
    other batch is unchanged, with `keep` 1.0.

    oneDNN's convolution (TensorFlow 2.21 on CPUs with AVX-512, where it is on
    by default) returns its input unchanged for an empty batch: a replica
    without a batch would hand conv2 three channels and stop the run.
    """
    n = tf.shape(labels)[0]
    size = tf.maximum(n, 1)
    grow = functools.partial(evaluation.pad_batch, size=size)
    keep = tf.cast(tf.minimum(n, 1), tf.float32)
    return tf.nest.map_structure(grow, inputs), grow(labels), keep


def skip_everywhere_if_any_nonfinite(grads):
    """Makes every replica's gradients non-finite if any replica's are.

    Keras' LossScaleOptimizer decides whether to apply a step from replica 0's
    gradients alone (before their all-reduce), so an overflow on another
    replica would be summed into the weights. After this, all replicas agree:
    the step is skipped everywhere and the loss scale lowered.
    """
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    bad = tf.distribute.get_replica_context().all_reduce("SUM", 1.0 - tf.cast(finite, tf.float32))
    poison = tf.where(bad > 0, np.nan, 1.0)
    return [g * tf.cast(poison, g.dtype) for g in grads]


# ---------------------------------------------------------------------------
# TensorBoard.


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

    def __init__(self, model_dir: str, chief: bool, model, config: TrainConfig, data: "Data"):
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

    def epoch(self, epoch: int, result: dict, per_class: dict | None = None) -> None:
        if not self.chief:
            return
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
        """A warning, as text in TensorBoard (train/warnings) at the global step."""
        if self.chief:
            with self.train.as_default(step=step):
                tf.summary.text("warnings", message)
            self.train.flush()

    def close(self) -> None:
        if self.chief:
            self.train.close()
            self.val.close()


# ---------------------------------------------------------------------------
# The run, as named steps.


@dataclasses.dataclass
class TrainResult:
    model: object  # The trained keras.Model (under the strategy's variables).
    history: list  # One dict of metrics per finished epoch.


@dataclasses.dataclass
class Data:
    """What the run takes from the records folder."""

    records: Records  # The records folder, opened and checked once.
    stats: preprocessing.ColorStats
    num_classes: int
    steps_per_epoch: int
    has_validation: bool


def read_data(config: TrainConfig, strategy) -> Data:
    """The records' metadata, checked against the batch size and the replicas."""
    records = Records.open(config.data_dir)
    meta = records.meta
    try:
        stats = preprocessing.ColorStats.from_records(records, config.mean)
    except ValueError as e:  # --mean=image on records of many sizes.
        raise ConfigError(str(e)) from None
    num_train = meta.split("train").num_examples
    if config.batch_size > num_train:
        raise ConfigError(f"--batch_size={config.batch_size} is larger than the {num_train} training examples of "
                          f"{config.data_dir}")
    steps_per_epoch = config.steps_per_epoch or num_train // config.batch_size
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(f"--batch_size={config.batch_size} does not divide over the {replicas} replicas; use a "
                          f"multiple of {replicas} (or another --cpu_devices / --gpu_split)")
    if meta.image.square is not None and meta.image.square < preprocessing.CROP:
        raise ConfigError(f"{config.data_dir} holds {meta.image.square}x{meta.image.square} images, smaller than "
                          f"the network's {preprocessing.CROP}x{preprocessing.CROP} input patches; rebuild the "
                          f"records with --image_size of at least {preprocessing.CROP} (the paper's 256)")
    return Data(records, stats, records.num_classes, steps_per_epoch, records.has_examples("validation"))


class Diverged(RuntimeError):
    """The weights became non-finite: the run cannot go on from here."""


# LoopState fields that checkpoints of earlier versions lack.
NEWER_FIELDS = ("run_id",)


class _Checkpoints:
    """The chief writes <model_dir>/checkpoints; other workers must save too
    (collectives), into a scratch folder they remove at the end."""

    def __init__(self, model_dir: str, strategy, chief: bool, **trackables):
        ckpt_dir = run_dir.path(model_dir, run_dir.CHECKPOINTS)
        task_type, task_id = distribute.task(strategy)
        self.save_dir = ckpt_dir if chief else os.path.join(model_dir, f".{run_dir.CHECKPOINTS}-{task_type}-{task_id}")
        self.chief = chief
        self.trackables = trackables
        self.checkpoint = tf.train.Checkpoint(**trackables)
        # Before the manager, which reads the state file the chief may write again.
        self.latest = run_dir.latest_checkpoint(model_dir, repair=chief)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.save_dir, max_to_keep=3)

    def restore(self) -> str | None:
        """Restores the latest checkpoint; every object it should hold must be there,
        except the loop-state fields added after it was written (`NEWER_FIELDS`),
        which keep their start values."""
        if self.latest:
            saved = {name.split("/")[0] for name, _ in tf.train.list_variables(self.latest)}
            older = [k for k in NEWER_FIELDS if k in self.trackables and k not in saved]
            checkpoint = (tf.train.Checkpoint(**{k: v for k, v in self.trackables.items() if k not in older})
                          if older else self.checkpoint)
            try:
                checkpoint.restore(self.latest).assert_existing_objects_matched()
            except tf.errors.OpError as e:  # A damaged .data or .index file.
                earlier = [os.path.basename(p) for _, p in run_dir.checkpoint_steps(os.path.dirname(self.latest))
                           if p != self.latest]
                raise run_dir.RunDirError(
                    f"checkpoint {self.latest} cannot be read ({fileio.error_reason(e)}): it is damaged. Move its files "
                    f"({os.path.basename(self.latest)}.*) aside to resume from "
                    f"{earlier[-1] if earlier else 'the start'}") from None
        return self.latest

    def save(self, step: int) -> None:
        """Writes checkpoint `step`; where that fails (a full disk), removes its
        partial files and stops the run, the earlier checkpoints intact."""
        try:
            self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            for name in tf.io.gfile.listdir(self.save_dir):
                if name.startswith(f"ckpt-{step}_temp") or name.startswith(f"ckpt-{step}."):
                    full = os.path.join(self.save_dir, name)
                    (tf.io.gfile.rmtree if tf.io.gfile.isdir(full) else tf.io.gfile.remove)(full)
            raise run_dir.RunDirError(
                f"cannot write checkpoint ckpt-{step} into {self.save_dir} ({fileio.error_reason(e)}); its partial files are "
                f"removed and the earlier checkpoints kept: free space, then run the same command to resume") from None

    def clean_up(self) -> None:
        if not self.chief and tf.io.gfile.exists(self.save_dir):
            tf.io.gfile.rmtree(self.save_dir)


def settle_stream(config: TrainConfig, state: LoopState, strategy, resumed: bool) -> int:
    """The training stream's seed, recorded in `state` with the batch size and
    the number of input pipelines, after checking a resumed run keeps them.

    Without --seed the first start draws one (the chief's, on every worker)
    and the checkpoints keep it, so a resumed epoch replays the same order.

    Raises:
      distribute.RunConflict: The checkpoint's run used another seed, batch size or
        number of workers: its input position would mean other records.
    """
    pipelines = distribute.num_workers(strategy)
    if resumed:
        for was, now, what in ((int(state.global_batch), config.batch_size, "--batch_size"),
                               (int(state.input_pipelines), pipelines, "workers (input pipelines)"),
                               (int(state.stream_seed), config.seed, "--seed")):
            if was >= 0 and now is not None and was != now:
                raise distribute.RunConflict(
                    f"the checkpoint's run has {what} {was}, this one {now}: a resumed run keeps them (the input "
                    f"position is counted in its records); use another --model_dir to start a new run")
    seed, run_id = int(state.stream_seed), int(state.run_id)
    if seed < 0 or run_id < 0:  # A first start (or a checkpoint older than run_id): the chief's, in one collective.
        rng = np.random.default_rng()
        if seed < 0:
            seed = config.seed if config.seed is not None else int(rng.integers(2**31 - 1))
        if run_id < 0:  # Independent of --seed: two runs with one seed are still two runs.
            run_id = int(rng.integers(2**62))
        seed, run_id = (int(v) for v in distribute.all_workers(strategy, [seed, run_id])[0])
    state.stream_seed.assign(seed)
    state.run_id.assign(run_id)
    state.global_batch.assign(config.batch_size)
    state.input_pipelines.assign(pipelines)
    return seed


def service_job_name(state: LoopState) -> str:
    """The tf.data service job of the run's current epoch."""
    return f"alexnet-{int(state.run_id):016x}-epoch{int(state.epoch) + 1}"


def run_facts(config: TrainConfig, data: Data, state: LoopState, latest: str | None) -> dict:
    """What every worker of one run must agree on: the configuration (paths
    aside), the records' identity and the state restored from the checkpoint."""
    facts = {f"--{f.name}": getattr(config, f.name) for f in dataclasses.fields(config)
             if f.name not in ("data_dir", "verbose")}
    facts["records (metadata.json classes and split sizes)"] = (
        data.records.meta.classes, {k: v.num_examples for k, v in sorted(data.records.meta.splits.items())})
    facts["restored checkpoint"] = os.path.basename(latest) if latest else None
    facts["global step"] = int(state.global_step)
    facts["epoch"] = int(state.epoch)
    return facts


def open_checkpoints(model_dir: str, strategy, chief: bool, model, optimizer, state: LoopState) -> _Checkpoints:
    """The run's checkpoints: the model, the optimizer and the loop state."""
    # The model's non-trainable state (the dropout layers' seed generators) is
    # not among the variables a Keras 3 model gives tf.train.Checkpoint; without
    # it a resumed run would draw the masks of its first steps again.
    return _Checkpoints(model_dir, strategy, chief, model=model, optimizer=optimizer,
                        model_state=list(model.non_trainable_variables), **state.trackables())


class Stalled(RuntimeError):
    """The run stopped itself (--stop_if_stalled): its loss showed it was not learning."""


class StallWatch:
    """Says, once per run, when the training loss shows the network is not learning.

    Not learning: the loss of the latest device loop is non-finite, or, past
    `stall_steps` steps, still above (1 - stall_margin) x ln(classes), the loss
    of a network that predicts every class alike. The paper's initialisation
    is known to sit there (Caffe's bvlc_alexnet readme: biases of 1 "gave flat
    loss"), and a day of such a run on ImageNet is a day lost.

    Args:
      config: The run's config (stall_steps, stall_margin, stop_if_stalled, recipe).
      num_classes: The classes of the records.
      report: Called with the warning (the console and TensorBoard).
    """

    def __init__(self, config: TrainConfig, num_classes: int, report=None):
        self.config, self.report = config, report
        self.chance = recipes.chance_loss(num_classes)
        self.limit = (1 - config.stall_margin) * self.chance
        self.classes = num_classes
        self.warned = False

    def _advice(self) -> str:
        others = [r for r in recipes.RECIPES if r != self.config.recipe]
        if self.config.recipe == "paper":
            return ("The paper's initialisation (biases of 1, every weight N(0, 0.01)) is known to stall at this "
                    "loss: Caffe's bvlc_alexnet readme says biases of 1 'gave flat loss' and trained with "
                    "--recipe=caffe (biases 0.1, fc6/fc7 weights N(0, 0.005), biases at twice the learning "
                    "rate); --recipe=cuda_convnet2 is the paper's author's later one; a lower --learning_rate "
                    "may also help.")
        return (f"Check --learning_rate ({self.config.learning_rate:g}) and that the labels match the images; "
                f"the other recipes: {', '.join('--recipe=' + r for r in others)}.")

    def check(self, window_sums, global_step: int) -> str | None:
        """The warning for a device loop's summed (loss, top-1, top-5, count), once; else None."""
        if self.warned:
            return None
        loss, count = float(window_sums[0]), float(window_sums[3])
        if count <= 0:
            return None
        loss /= count
        if not math.isfinite(loss):
            message = (f"the training loss became {loss} by step {global_step}: the run diverged. The learning "
                       f"rate ({self.config.learning_rate:g}) is likely too high for this initialisation (on the "
                       "10-class sample the paper's blows up above 0.002): lower --learning_rate, add "
                       f"--warmup_epochs, or try another recipe. {self._advice()}")
        elif self.config.stall_steps and global_step >= self.config.stall_steps and loss > self.limit:
            message = (f"the training loss is {loss:.3f} after {global_step} steps, no better than chance "
                       f"(ln {self.classes} = {self.chance:.3f}; a network that learns is below {self.limit:.3f} "
                       f"by now): it is not learning. {self._advice()}")
        else:
            return None
        self.warned = True
        if self.config.stop_if_stalled:
            message += " Stopped (--stop_if_stalled); the checkpoints written so far are kept."
        if self.report:
            self.report(message, global_step)
        if self.config.stop_if_stalled:
            raise Stalled(message)
        return message


def run_epoch(loop: TrainLoop, iterator, state: LoopState, config: TrainConfig, steps_per_epoch: int,
              save=None, profile_dir: str | None = None, bar=None, watch: StallWatch | None = None) -> None:
    """Trains to the end of the current epoch in device loops of up to `steps_per_loop` steps.

    The host reads the metric sums once per loop, for the progress bar, and
    saves a checkpoint (`save(global_step)`) at every `checkpoint_every_steps`
    boundary. A finite stream (`loop.finite`) may end the epoch before
    `steps_per_epoch`. `watch` looks at each loop's loss.
    """
    tick = time.monotonic()
    step_in_epoch, global_step = int(state.step_in_epoch), int(state.global_step)
    while step_in_epoch < steps_per_epoch:
        n = loop_length(global_step, step_in_epoch, steps_per_epoch, config.steps_per_loop,
                        config.checkpoint_every_steps if save else 0, config.profile_steps if profile_dir else ())
        if profile_dir and global_step == config.profile_steps[0]:
            tf.profiler.experimental.start(profile_dir)
        window, ran = loop.run(iterator, n)
        ran = int(ran) if loop.finite else n  # An endless stream runs every step: no wait for the device.
        step_in_epoch, global_step = step_in_epoch + ran, global_step + ran
        window = window.numpy()
        if watch is not None:
            watch.check(window, global_step)
        saving = save and config.checkpoint_every_steps and global_step % config.checkpoint_every_steps == 0
        if saving or not math.isfinite(float(window[0])):
            ensure_finite(loop, global_step)  # Never a checkpoint of non-finite weights.
        if profile_dir and global_step - 1 == config.profile_steps[-1]:
            tf.profiler.experimental.stop()
        if bar is not None:
            rates = evaluation.rates(state.sums.numpy())  # The host's one wait for the device per loop.
            bar.update(step_in_epoch, [("loss", rates["loss"]), ("top1_err", rates["top1_error"]),
                                       ("top5_err", rates["top5_error"])])
        if saving:
            state.train_seconds.assign_add(time.monotonic() - tick)
            tick = time.monotonic()
            save(global_step)
        if ran < n:  # The stream's epoch has ended.
            break
    state.train_seconds.assign_add(time.monotonic() - tick)


def ensure_finite(loop: TrainLoop, global_step: int) -> None:
    """Stops a diverged run before it writes anything of it.

    Raises:
      Diverged: A weight is NaN or infinite.
    """
    if not bool(loop.weights_finite()):
        raise Diverged(f"the run diverged: its weights became non-finite by step {global_step}. Stopped; the "
                       "checkpoints written so far (each with finite weights) are kept and nothing is exported: "
                       "lower --learning_rate, add --warmup_epochs, or try another --recipe, with another "
                       "--model_dir (or resume this one from its last checkpoint)")


def epoch_result(state: LoopState) -> dict:
    """The finished epoch's training metrics."""
    sums = state.sums.numpy()
    r = evaluation.rates(sums)
    return {
        "epoch": int(state.epoch) + 1,
        "learning_rate": float(state.learning_rate.numpy()),
        "train_loss": r["loss"],
        "train_top1_error": r["top1_error"],
        "train_top5_error": r["top5_error"],
        "images_per_second": float(sums[3]) / max(float(state.train_seconds.numpy()), 1e-9),
        "train_images": int(sums[3]),
        "steps": int(state.step_in_epoch),
    }


def next_epoch(config: TrainConfig, state: LoopState, optimizer, result: dict) -> None:
    """Applies the schedule after an epoch and resets the epoch's counters."""
    lr, best, bad, decays = learning_rate_after_epoch(
        config, int(state.epoch), result["learning_rate"], result.get("val_top1_error"),
        float(state.best_val_error.numpy()), int(state.bad_epochs), int(state.lr_decays))
    state.learning_rate.assign(lr)
    optimizer.learning_rate.assign(lr)
    state.best_val_error.assign(best)
    state.bad_epochs.assign(bad)
    state.lr_decays.assign(decays)
    state.epoch.assign_add(1)
    state.step_in_epoch.assign(0)
    state.sums.assign(tf.zeros(4, tf.float64))
    state.train_seconds.assign(0.0)


def epoch_line(r: dict) -> str:
    line = (f"epoch {r['epoch']}: loss {r['train_loss']:.4f}, top-1 error {r['train_top1_error']:.2%}, "
            f"top-5 error {r['train_top5_error']:.2%}, {r['images_per_second']:.1f} images/s, "
            f"lr {r['learning_rate']:g}")
    if "val_top1_error" in r:
        line += (f" | validation loss {r['val_loss']:.4f}, top-1 error {r['val_top1_error']:.2%}, "
                 f"top-5 error {r['val_top5_error']:.2%}")
    return line


def check_same_run(info: dict, mean: np.ndarray, config: TrainConfig, data: Data, model_dir: str) -> None:
    """Refuses to resume a run under settings its checkpoint was not trained
    with: another recipe (other bias learning rates, decay targets and
    schedule from here on), network layout (the checkpoint would not fit),
    dropout, mean (kind, or the image itself) or records' image size. Keys
    that folders of earlier versions lack are not checked.

    Raises:
      distribute.RunConflict: naming the setting, the run's value and this one's.
    """
    now = {"recipe": config.recipe, "grouped": config.grouped, "dropout": config.dropout, "mean": config.mean,
           "square_size": data.stats.square_size}
    flags = {"square_size": "the records' image size (pipelines.build_tfrecords --image_size)"}
    for key, value in now.items():
        was = info.get(key)
        if was is not None and was != value:
            what = flags.get(key, f"--{key}")
            raise distribute.RunConflict(
                f"the run in {model_dir} has {what}={was}, this one {what}={value}: a resumed run keeps the settings "
                f"its checkpoints were trained with; use another --model_dir to start a new run")
    if np.shape(mean) != np.shape(data.stats.mean) or not np.array_equal(mean, np.asarray(data.stats.mean, np.float32)):
        raise distribute.RunConflict(
            f"the run in {model_dir} subtracts another mean ({run_dir.MEAN_IMAGE}) than {config.data_dir} gives: "
            "a resumed run keeps its input; use the records it was trained on, or another --model_dir")


def train_and_evaluate(config: TrainConfig, model_dir: str, strategy=None) -> TrainResult:
    """Trains (or resumes training), evaluates each epoch, exports at the end.

    Args:
      config: Hyperparameters.
      model_dir: Checkpoints, TensorBoard logs, history.json and the SavedModel go here.
      strategy: A tf.distribute strategy (default: the current/default one).

    Returns:
      The model and the history of all finished epochs (resumed runs included).
    """
    strategy = strategy or tf.distribute.get_strategy()
    chief = distribute.is_chief(strategy)
    data = read_data(config, strategy)  # Its errors leave no trace in model_dir.
    # The chief holds the folder: a second run on it stops before it writes.
    with run_dir.run_lock(model_dir) if chief else contextlib.nullcontext():
        return _train_and_evaluate(config, model_dir, strategy, chief, data)


def _train_and_evaluate(config: TrainConfig, model_dir: str, strategy, chief: bool, data: Data) -> TrainResult:
    if config.deterministic:
        # Deterministic kernels where an op has several (cuDNN's convolutions,
        # GPU reductions); raises on an op that has no deterministic one.
        tf.config.experimental.enable_op_determinism()
        # Grappler's arithmetic optimizer regroups chains of float additions
        # (the weight-decay and loss gradients, the replicas' all-reduce) in an
        # order that follows the graph's construction, and the replicas of
        # MirroredStrategy are traced concurrently, in threads: two runs would
        # then add in different orders and differ in the last bits.
        tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    # Nothing in the folder is written before every check of a resumed run.
    # Continued on records of other classes it would pair every output with
    # the wrong class; under other settings it would not be the run it was.
    if tf.io.gfile.exists(run_dir.path(model_dir, run_dir.MODEL_INFO)):
        info, mean = run_dir.read_model_info(model_dir)
        try:
            data.records.check_classes([c["synset"] for c in info["classes"]], f"the run in {model_dir}")
        except ClassMismatch as e:
            raise distribute.RunConflict(f"{e}; use another --model_dir to start a new run") from None
        if run_dir.latest_checkpoint(model_dir):
            check_same_run(info, mean, config, data, model_dir)
    dtype = distribute.compute_dtype(config.mixed_precision, strategy)
    model, optimizer = build_model_and_optimizer(config, data.num_classes, strategy, dtype)
    state = LoopState(config.learning_rate)
    checkpoints = open_checkpoints(model_dir, strategy, chief, model, optimizer, state)
    history = []
    resumed = checkpoints.restore() is not None
    if chief:  # What an export needs besides the weights, beside the checkpoints.
        run_dir.write_model_info(model_dir, num_classes=data.num_classes, grouped=config.grouped,
                                 dropout=config.dropout, recipe=config.recipe,
                                 classes=[c.to_json() for c in data.records.meta.classes],
                                 mean=data.stats.mean, mean_kind=config.mean, square_size=data.stats.square_size)
    distribute.check_workers_agree(strategy, run_facts(config, data, state, checkpoints.latest))
    stream_seed = settle_stream(config, state, strategy, resumed)
    if resumed:
        optimizer.learning_rate.assign(float(state.learning_rate.numpy()))
        say(chief, f"resumed from {checkpoints.latest}: epoch {int(state.epoch) + 1}, step {int(state.step_in_epoch)}")
        history = [h for h in run_dir.read_history(model_dir) if h["epoch"] <= int(state.epoch)]
    if config.data_service:
        say(chief, f"input stream: the tf.data service at {config.data_service}, one job per epoch "
                   f"({service_job_name(state)} first); evaluation reads the records here")

    recipe = recipes.get(config.recipe)
    with strategy.scope():  # The biases' learning rate over the kernels', set at each epoch's start.
        bias_lr = tf.Variable(1.0, trainable=False, dtype=tf.float32)
    loop = TrainLoop(
        model, optimizer, strategy, config.batch_size, config.weight_decay,
        finish=lambda inputs, labels: (preprocessing.finish_batch(*inputs, data.stats), labels),
        jit_compile=config.jit_compile, state=state, warmup_steps=config.warmup_epochs * data.steps_per_epoch,
        finite=bool(config.data_service), decay_biases=recipe.decay_biases,
        bias_lr=None if recipe.bias_lr is None else bias_lr)

    def dataset_fn(context):
        if config.data_service:
            # The epoch's job, shared by every trainer process; a resumed run reads
            # on from where the job is (the dispatcher keeps it for its
            # --job_gc_timeout), records already handed out are not produced again.
            return input_pipeline.service_train_dataset(
                data.records, data.stats, config.batch_size, config.data_service,
                service_job_name(state), seed=stream_seed + int(state.epoch) * 1000, context=context,
                shuffle_buffer=config.shuffle_buffer)
        # Each epoch's stream, from where this epoch's trained steps end.
        per_step = config.batch_size // context.num_input_pipelines
        seed = stream_seed + int(state.epoch) * 1000 + context.input_pipeline_id
        return input_pipeline.train_dataset(data.records, data.stats, config.batch_size, context,
                                            shuffle_buffer=config.shuffle_buffer, seed=seed,
                                            skip=int(state.step_in_epoch) * per_step)

    summaries = Summaries(model_dir, chief, model, config, data)

    def stall_warning(message: str, step: int) -> None:
        say(chief, f"WARNING: {message}")
        summaries.warning(message, step)

    watch = StallWatch(config, data.num_classes, stall_warning)
    evaluator = evaluation.Evaluator(model, strategy, data.records, data.stats,
                                     config.eval_batch_size or config.batch_size, per_class=config.figures)
    profile_dir = (run_dir.path(model_dir, os.path.join(run_dir.TENSORBOARD, "profile"))
                   if config.profile_steps and chief else None)

    # The service's epoch ends when its job does: the trainers take batches from
    # one job as they come, so one may get more than another, and a step where
    # only some have a batch trains on those (the others' are empty). Capping
    # the epoch at records // batch steps would drop the rest of the job.
    epoch_steps = sys.maxsize if config.data_service and not config.steps_per_epoch else data.steps_per_epoch
    if int(state.epoch) >= config.epochs:
        say(chief, f"training already finished ({config.epochs} epochs)")
    iterator = None
    # The service's dispatcher, watched while the loop makes or reads its datasets (TensorFlow would wait for a
    # lost one for ever); checkpoint writes are never cut short.
    from alexnet_tf.service_client import DispatcherWatch
    service = DispatcherWatch(config.data_service, config.data_service_timeout)
    while int(state.epoch) < config.epochs:
        if iterator is None:
            with service.watching():
                iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
        verbose = chief and config.verbose
        if verbose:
            print(f"Epoch {int(state.epoch) + 1}/{config.epochs} (learning rate "
                  f"{float(state.learning_rate.numpy()):g})", flush=True)
        bar = keras.utils.Progbar(epoch_steps if epoch_steps < sys.maxsize else None, verbose=1 if verbose else 0,
                                  stateful_metrics=["loss", "top1_err", "top5_err"])
        bar.update(int(state.step_in_epoch))
        bias_lr.assign(recipe.bias_lr_multiplier(int(state.epoch) / config.epochs))
        with service.watching():
            run_epoch(loop, iterator, state, config, epoch_steps, service.unwatched(checkpoints.save), profile_dir,
                      bar, watch)

        ensure_finite(loop, int(state.global_step))
        result = epoch_result(state)
        if config.data_service:
            say(chief, f"epoch {result['epoch']}: the service's epoch gave {result['steps']} steps, "
                       f"{result['train_images']} of {data.records.meta.split('train').num_examples} training images "
                       "(each service worker's last partial batch is dropped, a lost worker's shards skipped)")
        per_class = None
        if data.has_validation:
            val = evaluator.evaluate("validation")
            per_class = val.pop("per_class", None)
            result.update({f"val_{k}": v for k, v in val.items()})
        summaries.epoch(result["epoch"], result, per_class)
        history.append(result)
        next_epoch(config, state, optimizer, result)
        checkpoints.save(int(state.global_step))
        if chief:
            run_dir.write_history(model_dir, history)
            if verbose:
                print(epoch_line(result), flush=True)
        iterator = None  # A new, differently seeded pass next epoch.

    checkpoints.clean_up()
    if chief and config.export:
        path = export.export_trained(model, model_dir)
        say(True, f"exported SavedModel to {path}")
    summaries.close()
    return TrainResult(model, history)
