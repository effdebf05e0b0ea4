r"""Trains AlexNet on the records of `pipelines.build_tfrecords`.

    python -m alexnet_tf.train --data_dir=tfrecords --model_dir=runs/alexnet --strategy=mirrored
    python -m alexnet_tf.train --preset=sample --model_dir=runs/sample    # the embedded sample, on CPU
    tensorboard --logdir=runs/alexnet/tensorboard

Defaults are the paper's (§5): batch 128, SGD with momentum 0.9, weight decay
5e-4 inside the momentum update, learning rate 0.01 divided by 10 when the
validation error stops improving (at most 3 times), 90 epochs.

One custom training loop (`strategy.run` over `distribute_datasets_from_function`)
serves every strategy: `one_device`, `mirrored` (all GPUs, or logical CPU
devices on a machine without GPUs) and `multi_worker` (TF_CONFIG). Keras'
`model.fit` fails under MultiWorkerMirroredStrategy with Keras 3, this loop
does not. Killed at any moment, the same command resumes from the last
checkpoint: weights, optimizer state, epoch, step, schedule state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

from absl import app, flags, logging

CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
SAVED_MODEL = "saved_model"


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters; defaults are the paper's."""

    data_dir: str = "tfrecords"
    batch_size: int = 128  # Global, over all replicas (§5).
    epochs: int = 90  # §5: "roughly 90 cycles".
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4  # On weights (kernels), as the paper's update rule; not on biases.
    lr_schedule: str = "plateau"  # "plateau" (§5) or "step".
    lr_patience: int = 1  # Plateau: epochs without a new best validation top-1 error before dividing.
    max_lr_decays: int = 3  # §5: "reduced three times prior to termination".
    lr_decay_epochs: tuple[int, ...] = (30, 60, 80)  # Step: divide by 10 at these epochs.
    # Not in the paper (0 keeps it faithful): ramp the learning rate up linearly
    # over the first epochs (Goyal et al., 2017). Few classes make the first steps
    # unstable with the paper's fc biases of 1 (every class gets a large share of
    # each batch's gradient), so the sample preset uses it.
    warmup_epochs: float = 0.0
    dropout: float = 0.5
    grouped: bool = True  # The paper's two-group conv2/conv4/conv5.
    mean: str = "image"  # Subtract the mean image (§2) or the mean RGB ("rgb").
    mixed_precision: bool = False
    jit_compile: bool = False
    checkpoint_every_steps: int = 1000
    eval_batch_size: int = 0  # 0: batch_size.
    shuffle_buffer: int = 10_000
    seed: int | None = None
    steps_per_epoch: int = 0  # 0: training examples // batch_size.
    profile_steps: tuple[int, ...] = ()  # (first, last) global steps to trace for the profiler.
    log_images: int = 16  # Augmented training images per epoch in TensorBoard (0: none).
    histograms: bool = True  # Weight histograms in TensorBoard ...
    histogram_every: int = 1  # ... every this many epochs (60M weights take a while to summarise).
    export: bool = True  # SavedModel into <model_dir>/saved_model at the end.
    verbose: bool = True  # Progress bar and per-epoch lines on the console.


# Hyperparameters that learn the embedded sample (10 classes, 400 images) on a
# 2-core CPU within minutes; the paper's values stay the defaults.
PRESETS = {
    "paper": {},
    "sample": {
        "batch_size": 32,
        "epochs": 24,
        # Ten classes give each class a large share of every batch's gradient;
        # with the paper's initialisation (fc biases of 1) learning rates above
        # ~0.002 blow the first steps up, so 0.001, and no dropout to learn fast.
        "learning_rate": 0.001,
        "dropout": 0.0,
        "lr_schedule": "step",
        "lr_decay_epochs": (20,),
        "checkpoint_every_steps": 100,
        "shuffle_buffer": 1000,
        "log_images": 8,
        "histogram_every": 10,
    },
}


# ---------------------------------------------------------------------------
# Strategies.


def configure_cpu_devices(n: int) -> None:
    """Splits the CPU into n logical devices; must run before TensorFlow initialises."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)


def make_strategy(name: str, cpu_devices: int = 2):
    """Returns the tf.distribute strategy called `name`.

    `mirrored` uses all visible GPUs; without GPUs it mirrors over `cpu_devices`
    logical CPU devices, so the multi-device code path runs (and is tested) on CPU.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        # Listing logical devices would initialise TensorFlow; the configuration does not.
        configured = tf.config.get_logical_device_configuration(tf.config.list_physical_devices("CPU")[0])
        if not configured:
            configure_cpu_devices(cpu_devices)
        elif len(configured) < cpu_devices:
            raise RuntimeError(f"TensorFlow already runs with {len(configured)} logical CPUs, "
                               f"fewer than --cpu_devices={cpu_devices}")
        devices = [f"/cpu:{i}" for i in range(cpu_devices)]
        # NCCL is GPU-only; gather to one device for CPU replicas.
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs TF_CONFIG (cluster and task) in the environment")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}: expected one_device, mirrored or multi_worker")


def _task(strategy) -> tuple[str | None, int]:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None, 0
    return resolver.task_type, resolver.task_id or 0


def is_chief(strategy) -> bool:
    """True on the one task that writes checkpoints, summaries and the export."""
    task_type, task_id = _task(strategy)
    if task_type is None or task_type == "chief":
        return True
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


# ---------------------------------------------------------------------------
# Small pure pieces of the loop.


def learning_rate_after_epoch(config: TrainConfig, epoch: int, lr: float, val_error: float | None,
                              best: float, bad_epochs: int, decays: int) -> tuple[float, float, int, int]:
    """The schedule: returns (lr, best, bad_epochs, decays) for the next epoch.

    Args:
      epoch: The epoch just finished, 0-based.
      val_error: Its validation top-1 error, or None without a validation split
        (the plateau schedule then keeps the rate).
    """
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


class _State:
    """Loop state saved in every checkpoint beside the model and optimizer."""

    def __init__(self, config: TrainConfig):
        import tensorflow as tf

        def var(value, dtype):
            return tf.Variable(value, dtype=dtype, trainable=False)

        self.epoch = var(0, tf.int64)
        self.step_in_epoch = var(0, tf.int64)
        self.global_step = var(0, tf.int64)
        self.learning_rate = var(config.learning_rate, tf.float64)
        self.best_val_error = var(math.inf, tf.float64)
        self.bad_epochs = var(0, tf.int64)
        self.lr_decays = var(0, tf.int64)
        # Running sums of the epoch's training metrics (loss, top-1, top-5, count).
        self.sums = var([0.0, 0.0, 0.0, 0.0], tf.float64)
        self.train_seconds = var(0.0, tf.float64)

    def trackables(self) -> dict:
        return dict(vars(self))


def _say(chief: bool, message: str) -> None:
    """One line about the run on stderr (from the chief only)."""
    if chief:
        print(f"train: {message}", file=sys.stderr, flush=True)


def _to_float(x) -> float:
    return float(x.numpy() if hasattr(x, "numpy") else x)


# ---------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
    model: object  # The trained keras.Model (under the strategy's variables).
    history: list  # One dict of metrics per finished epoch.


def train_and_evaluate(config: TrainConfig, model_dir: str, strategy=None) -> TrainResult:
    """Trains (or resumes training), evaluates each epoch, exports at the end.

    Args:
      config: Hyperparameters.
      model_dir: Checkpoints, TensorBoard logs, history.json and the SavedModel go here.
      strategy: A tf.distribute strategy (default: the current/default one).

    Returns:
      The model and the history of all finished epochs (resumed runs included).
    """
    import keras
    import tensorflow as tf

    from alexnet_tf import input_pipeline, model as model_lib, records

    strategy = strategy or tf.distribute.get_strategy()
    chief = is_chief(strategy)
    meta = records.load_metadata(config.data_dir)
    stats = input_pipeline.ColorStats.from_metadata(config.data_dir, meta, config.mean)
    num_classes = meta["num_classes"]
    num_train = meta["splits"]["train"]["num_examples"]
    steps_per_epoch = config.steps_per_epoch or num_train // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {config.batch_size} is larger than the {num_train} training examples")
    if config.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"batch size {config.batch_size} does not divide over "
                         f"{strategy.num_replicas_in_sync} replicas")
    has_val = "validation" in meta["splits"] and meta["splits"]["validation"]["num_examples"] > 0

    if config.mixed_precision:
        gpu = bool(tf.config.list_physical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
    with strategy.scope():
        model = model_lib.build_alexnet(num_classes, grouped=config.grouped, dropout=config.dropout,
                                        seed=config.seed)
        optimizer = keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=config.momentum)
        if keras.mixed_precision.global_policy().name == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    state = _State(config)
    if chief:  # What an export needs besides the weights, beside the checkpoints.
        from alexnet_tf import export

        export.write_model_info(model_dir, num_classes=num_classes, grouped=config.grouped, dropout=config.dropout,
                                classes=meta["classes"], mean=stats.mean, mean_kind=config.mean,
                                square_size=stats.square_size)

    # Checkpoints: the chief writes model_dir/checkpoints; other workers must
    # save too (collectives), into a scratch folder they remove.
    ckpt_dir = os.path.join(model_dir, CHECKPOINTS)
    task_type, task_id = _task(strategy)
    save_dir = ckpt_dir if chief else os.path.join(model_dir, f".{CHECKPOINTS}-{task_type}-{task_id}")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, **state.trackables())
    manager = tf.train.CheckpointManager(checkpoint, save_dir, max_to_keep=3)
    latest = tf.train.latest_checkpoint(ckpt_dir)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        optimizer.learning_rate.assign(_to_float(state.learning_rate))
        _say(chief, f"resumed from {latest}: epoch {int(state.epoch) + 1}, step {int(state.step_in_epoch)}")
    history_path = os.path.join(model_dir, "history.json")
    history = []
    if latest and tf.io.gfile.exists(history_path):
        with tf.io.gfile.GFile(history_path) as f:
            history = [h for h in json.load(f) if h["epoch"] <= int(state.epoch)]

    global_batch = config.batch_size
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]

    def replica_train_step(inputs, labels):
        # The float part of the augmentation runs here, on the replica's device.
        images = input_pipeline.finish_batch(*inputs, stats)
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            # 0.5 * wd * |w|^2 has gradient wd * w: the paper's "- 0.0005 e w" term
            # enters the momentum update exactly as in §5.
            decay = config.weight_decay * tf.add_n([tf.nn.l2_loss(tf.cast(k, tf.float32)) for k in kernels])
            total = loss + tf.nn.scale_regularization_loss(decay)
            scaled = optimizer.scale_loss(total)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return _metric_sums(per_example, logits, labels)

    if config.jit_compile:
        replica_train_step = tf.function(replica_train_step, jit_compile=True)

    @tf.function
    def train_step(iterator):
        sums = strategy.run(replica_train_step, args=next(iterator))
        return tf.stack([strategy.reduce("SUM", s, axis=None) for s in sums])

    def dataset_fn(context):
        seed = None if config.seed is None else config.seed + int(state.epoch) * 1000 + context.input_pipeline_id
        return input_pipeline.train_dataset(
            config.data_dir, meta, stats, global_batch, context, shuffle_buffer=config.shuffle_buffer, seed=seed
        )

    summaries = _Summaries(model_dir, chief)
    preview = iter(input_pipeline.train_dataset(
        config.data_dir, meta, stats, max(config.log_images, 1), shuffle_buffer=100)) if config.log_images else None
    evaluator = Evaluator(model, strategy, config, meta, stats)

    total_epochs = config.epochs
    if int(state.epoch) >= total_epochs:
        _say(chief, f"training already finished ({total_epochs} epochs)")
    iterator = None
    while int(state.epoch) < total_epochs:
        epoch = int(state.epoch)
        if iterator is None:
            iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
        bar = keras.utils.Progbar(steps_per_epoch, verbose=1 if (chief and config.verbose) else 0,
                                  stateful_metrics=["loss", "top1_err", "top5_err"])
        bar.update(int(state.step_in_epoch))
        if chief and config.verbose:
            print(f"Epoch {epoch + 1}/{total_epochs} (learning rate {_to_float(state.learning_rate):g})",
                  flush=True)
        tick = time.monotonic()
        while int(state.step_in_epoch) < steps_per_epoch:
            step = int(state.global_step)
            warmup_steps = config.warmup_epochs * steps_per_epoch
            if step < warmup_steps:
                optimizer.learning_rate.assign(_to_float(state.learning_rate) * (step + 1) / warmup_steps)
            elif warmup_steps and step == math.ceil(warmup_steps):
                optimizer.learning_rate.assign(_to_float(state.learning_rate))
            if config.profile_steps and step == config.profile_steps[0] and chief:
                tf.profiler.experimental.start(os.path.join(model_dir, TENSORBOARD, "profile"))
            sums = tf.cast(train_step(iterator), tf.float64)
            if config.profile_steps and step == config.profile_steps[-1] and chief:
                tf.profiler.experimental.stop()
            state.sums.assign_add(sums)
            state.step_in_epoch.assign_add(1)
            state.global_step.assign_add(1)
            loss, top1, top5, count = state.sums.numpy()
            bar.update(int(state.step_in_epoch),
                       [("loss", loss / count), ("top1_err", 1 - top1 / count), ("top5_err", 1 - top5 / count)])
            if config.checkpoint_every_steps and int(state.global_step) % config.checkpoint_every_steps == 0:
                state.train_seconds.assign_add(time.monotonic() - tick)
                tick = time.monotonic()
                manager.save(checkpoint_number=int(state.global_step))
        state.train_seconds.assign_add(time.monotonic() - tick)

        loss, top1, top5, count = state.sums.numpy()
        seconds = _to_float(state.train_seconds)
        result = {
            "epoch": epoch + 1,
            "learning_rate": _to_float(state.learning_rate),
            "train_loss": loss / count,
            "train_top1_error": 1 - top1 / count,
            "train_top5_error": 1 - top5 / count,
            "images_per_second": count / max(seconds, 1e-9),
        }
        if has_val:
            val = evaluator.evaluate("validation")
            result.update({f"val_{k}": v for k, v in val.items()})
        lr, best, bad, decays = learning_rate_after_epoch(
            config, epoch, result["learning_rate"], result.get("val_top1_error"), _to_float(state.best_val_error),
            int(state.bad_epochs), int(state.lr_decays))
        summaries.epoch(epoch + 1, result, model, preview, stats, config)
        history.append(result)
        state.learning_rate.assign(lr)
        optimizer.learning_rate.assign(lr)
        state.best_val_error.assign(best)
        state.bad_epochs.assign(bad)
        state.lr_decays.assign(decays)
        state.epoch.assign_add(1)
        state.step_in_epoch.assign(0)
        state.sums.assign(tf.zeros(4, tf.float64))
        state.train_seconds.assign(0.0)
        manager.save(checkpoint_number=int(state.global_step))
        if chief:
            tf.io.gfile.makedirs(model_dir)
            records.write_json_atomically(history_path, history)
            if config.verbose:
                print(_epoch_line(result), flush=True)
        if config.seed is not None:
            iterator = None  # A new, differently seeded pass next epoch.

    if not chief and tf.io.gfile.exists(save_dir):
        tf.io.gfile.rmtree(save_dir)
    if chief and config.export:
        export_saved_model(model, model_dir, os.path.join(model_dir, SAVED_MODEL))
    summaries.close()
    return TrainResult(model, history)


def _metric_sums(per_example_loss, logits, labels):
    import tensorflow as tf

    logits = tf.cast(logits, tf.float32)
    top1 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32))
    top5 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, min(5, logits.shape[-1])), tf.float32))
    count = tf.cast(tf.shape(labels)[0], tf.float32)
    return tf.reduce_sum(per_example_loss), top1, top5, count


def _epoch_line(r: dict) -> str:
    line = (f"epoch {r['epoch']}: loss {r['train_loss']:.4f}, top-1 error {r['train_top1_error']:.2%}, "
            f"top-5 error {r['train_top5_error']:.2%}, {r['images_per_second']:.1f} images/s, "
            f"lr {r['learning_rate']:g}")
    if "val_top1_error" in r:
        line += (f" | validation loss {r['val_loss']:.4f}, top-1 error {r['val_top1_error']:.2%}, "
                 f"top-5 error {r['val_top5_error']:.2%}")
    return line


class Evaluator:
    """Validation loss and top-1/top-5 error with the central patch (or 10 patches)."""

    def __init__(self, model, strategy, config: TrainConfig, meta: dict, stats):
        import tensorflow as tf

        self.model, self.strategy, self.config, self.meta, self.stats = model, strategy, config, meta, stats
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
            return _metric_sums(per_example, probs, labels)

        @tf.function
        def distributed_step(batch):
            sums = self.strategy.run(replica_eval, args=batch)
            return tf.stack([self.strategy.reduce("SUM", s, axis=None) for s in sums])

        self._local = tf.function(lambda images, labels: tf.stack(replica_eval(images, labels)))
        self._distributed = distributed_step

    def evaluate(self, split: str = "validation", ten_crop: bool = False, progress: bool = False) -> dict:
        """Loss, top-1 and top-5 error over every example of `split`."""
        import keras
        import numpy as np

        from alexnet_tf import input_pipeline

        batch = self.config.eval_batch_size or self.config.batch_size
        if ten_crop:
            batch = max(1, batch // 10)
        if self.distributed:
            batch -= batch % self.strategy.num_replicas_in_sync
            batch = max(batch, self.strategy.num_replicas_in_sync)
            ds = self.strategy.distribute_datasets_from_function(
                lambda ctx: input_pipeline.eval_dataset(self.config.data_dir, self.meta, self.stats, batch, split,
                                                        ten_crop, ctx))
            step = self._distributed
        else:
            ds = input_pipeline.eval_dataset(self.config.data_dir, self.meta, self.stats, batch, split, ten_crop)
            step = lambda b: self._local(*b)  # noqa: E731
        sums = np.zeros(4)
        total = self.meta["splits"][split]["num_examples"]
        bar = keras.utils.Progbar(total, verbose=1 if progress else 0, unit_name="image")
        for b in ds:
            sums += step(b).numpy()
            bar.update(int(sums[3]))
        loss, top1, top5, count = sums
        expected = self.meta["splits"][split]["num_examples"]
        if int(count) != expected:
            raise RuntimeError(f"evaluated {int(count)} {split} examples, metadata.json lists {expected}")
        return {"loss": loss / count, "top1_error": 1 - top1 / count, "top5_error": 1 - top5 / count}


class _Summaries:
    """TensorBoard scalars, augmented images and weight histograms (chief only)."""

    def __init__(self, model_dir: str, chief: bool):
        import tensorflow as tf

        self.chief = chief
        if chief:
            root = os.path.join(model_dir, TENSORBOARD)
            self.train = tf.summary.create_file_writer(os.path.join(root, "train"))
            self.val = tf.summary.create_file_writer(os.path.join(root, "validation"))

    def epoch(self, epoch: int, result: dict, model, preview, stats, config: TrainConfig) -> None:
        if not self.chief:
            return
        import tensorflow as tf

        from alexnet_tf import input_pipeline

        with self.train.as_default(step=epoch):
            for k in ("loss", "top1_error", "top5_error"):
                tf.summary.scalar(k, result[f"train_{k}"])
            tf.summary.scalar("learning_rate", result["learning_rate"])
            tf.summary.scalar("images_per_second", result["images_per_second"])
            if preview is not None:
                (patches, params), _ = next(preview)
                images = input_pipeline.finish_batch(patches, params, stats)
                tf.summary.image("augmented_training_images",
                                 input_pipeline.display_images(images, stats), max_outputs=config.log_images)
            if config.histograms and epoch % max(config.histogram_every, 1) == 0:
                for v in model.trainable_variables:
                    tf.summary.histogram(v.path, v.value)
        if "val_loss" in result:
            with self.val.as_default(step=epoch):
                for k in ("loss", "top1_error", "top5_error"):
                    tf.summary.scalar(k, result[f"val_{k}"])
        self.train.flush()
        self.val.flush()

    def close(self) -> None:
        if self.chief:
            self.train.close()
            self.val.close()


def export_saved_model(model, model_dir: str, path: str) -> str:
    """Exports the trained network with its serving signatures (see alexnet_tf.export)."""
    from alexnet_tf import export, model as model_lib

    info, mean = export.read_model_info(model_dir)
    # A copy outside any distribution strategy's scope: plain variables, no replicas.
    plain = model_lib.build_alexnet(info["num_classes"], grouped=info["grouped"], dropout=info["dropout"])
    plain.set_weights(model.get_weights())
    export.export(plain, info, mean, path)
    _say(True, f"exported SavedModel to {path}")
    return path


# ---------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS
_defaults = TrainConfig()
flags.DEFINE_string("data_dir", _defaults.data_dir, "Records folder written by pipelines.build_tfrecords.")
flags.DEFINE_string("model_dir", "runs/alexnet", "Checkpoints, TensorBoard logs and the SavedModel.")
flags.DEFINE_enum("strategy", "mirrored", ["mirrored", "one_device", "multi_worker"], "Distribution strategy.")
flags.DEFINE_integer("cpu_devices", 2, "Without GPUs, --strategy=mirrored mirrors over this many logical CPUs.")
flags.DEFINE_enum("preset", "paper", sorted(PRESETS), "Hyperparameter preset; explicit flags override it.")
flags.DEFINE_integer("batch_size", _defaults.batch_size, "Global batch size.")
flags.DEFINE_integer("epochs", _defaults.epochs, "Epochs.")
flags.DEFINE_float("learning_rate", _defaults.learning_rate, "Initial learning rate.")
flags.DEFINE_float("momentum", _defaults.momentum, "SGD momentum.")
flags.DEFINE_float("weight_decay", _defaults.weight_decay, "Weight decay inside the momentum update.")
flags.DEFINE_enum("lr_schedule", _defaults.lr_schedule, ["plateau", "step"],
                  "plateau: divide by 10 when validation error stops improving; step: at --lr_decay_epochs.")
flags.DEFINE_integer("lr_patience", _defaults.lr_patience, "Plateau: epochs without improvement before dividing.")
flags.DEFINE_integer("max_lr_decays", _defaults.max_lr_decays, "Plateau: divide at most this many times.")
flags.DEFINE_list("lr_decay_epochs", [str(e) for e in _defaults.lr_decay_epochs], "Step: epochs to divide at.")
flags.DEFINE_float("warmup_epochs", 0.0, "Linear learning-rate warm-up (not in the paper; 0 = off).")
flags.DEFINE_float("dropout", _defaults.dropout, "Dropout rate of fc6 and fc7.")
flags.DEFINE_bool("grouped", _defaults.grouped, "Two-group conv2/4/5 as in the paper (--nogrouped: one tower).")
flags.DEFINE_enum("mean", _defaults.mean, ["image", "rgb"], "Subtract the mean image or the mean colour.")
flags.DEFINE_bool("mixed_precision", False, "float16 (GPU) / bfloat16 (CPU) compute, float32 variables.")
flags.DEFINE_bool("jit_compile", False, "Compile the training step with XLA.")
flags.DEFINE_integer("checkpoint_every_steps", _defaults.checkpoint_every_steps,
                     "Checkpoint every N steps (and at every epoch end).")
flags.DEFINE_integer("eval_batch_size", 0, "Evaluation batch size (0: --batch_size).")
flags.DEFINE_integer("shuffle_buffer", _defaults.shuffle_buffer, "Records in the shuffle buffer.")
flags.DEFINE_integer("seed", None, "Seed of initialisation and data order (default: random).")
flags.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch (0: training examples // batch size).")
flags.DEFINE_list("profile_steps", [], "first,last global step to trace with the TensorFlow profiler.")
flags.DEFINE_integer("log_images", _defaults.log_images, "Augmented images per epoch in TensorBoard.")
flags.DEFINE_bool("histograms", True, "Weight histograms in TensorBoard.")
flags.DEFINE_integer("histogram_every", 1, "Write weight histograms every this many epochs.")
flags.DEFINE_bool("export", True, "Export a SavedModel at the end.")


def config_from_flags() -> TrainConfig:
    """TrainConfig from the preset, overridden by every flag given explicitly."""
    values = dict(PRESETS[FLAGS.preset])
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        if name in FLAGS and (FLAGS[name].present or name not in values):
            values[name] = FLAGS[name].value
    for name in ("lr_decay_epochs", "profile_steps"):
        values[name] = tuple(int(v) for v in values[name])
    if values["profile_steps"] and len(values["profile_steps"]) != 2:
        raise app.UsageError("--profile_steps takes two numbers: first,last")
    return TrainConfig(**values)


def main(argv):
    import logging as std_logging

    # TensorFlow's and Keras' INFO lines (one per reduction, per save) drown the
    # progress; -v/--verbosity still brings them back.
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    # The strategy first: logical CPU devices can only be made before TensorFlow initialises.
    strategy = make_strategy(FLAGS.strategy, FLAGS.cpu_devices)
    from alexnet_tf import records

    try:
        records.load_metadata(config.data_dir)
    except records.MetadataError as e:
        print(f"train: error: {e}", file=sys.stderr)
        sys.exit(1)
    _say(True, f"strategy {FLAGS.strategy} with {strategy.num_replicas_in_sync} replicas; {config}")
    history = train_and_evaluate(config, FLAGS.model_dir, strategy).history
    if history and "val_top1_error" in history[-1]:
        last = history[-1]
        print(f"validation top-1 error {last['val_top1_error']:.2%}, top-5 error {last['val_top5_error']:.2%} "
              f"(top-1 accuracy {1 - last['val_top1_error']:.2%}) after {last['epoch']} epochs")


if __name__ == "__main__":
    app.run(main)
