"""The network and its optimizer, the replicated step, and the device loop that trains an epoch.

`TrainLoop` runs `steps_per_loop` replicated training steps per call from the
host, and `run_epoch` trains to an epoch's end (with its progress bar) and
returns the epoch's training metrics.

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
"""

from __future__ import annotations

import functools
import math
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from alexnet_tf import evaluation, model as model_lib, recipes
from alexnet_tf.config import TrainConfig
from alexnet_tf.run_state import LoopState
from alexnet_tf.stall_watch import StallWatch


def build_model_and_optimizer(config: TrainConfig, num_classes: int, strategy, compute_dtype: str,
                              recipe: recipes.Recipe, build=None):
    """The network (`build`, default AlexNet initialised as `recipe` says) and its SGD optimizer
    under the strategy.

    float16 wraps the optimizer in dynamic loss scaling.
    """
    policy = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[compute_dtype]
    build = build or functools.partial(model_lib.build_alexnet, init=recipe.init)
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
        is_bias = [recipes.is_bias(v) for v in model.trainable_variables]
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
# An epoch, in device loops.


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


def run_epoch(loop: TrainLoop, iterator, state: LoopState, config: TrainConfig, steps_per_epoch: int,
              save=None, profile_dir: str | None = None, watch: StallWatch | None = None,
              verbose: bool = False) -> dict:
    """Trains to the end of the current epoch in device loops of up to `steps_per_loop` steps;
    returns the epoch's training metrics (its number, learning rate, loss, errors, images/s, images, steps).

    The host reads the metric sums once per loop, for the progress bar (on
    the console with `verbose`, after the epoch's heading), and saves a
    checkpoint (`save(global_step)`) at every `checkpoint_every_steps`
    boundary. A finite stream (`loop.finite`) may end the epoch before
    `steps_per_epoch`. `watch` looks at each loop's loss.

    Raises:
      Diverged: The weights became non-finite (checked before each
        checkpoint and at the epoch's end).
    """
    if verbose:
        print(f"Epoch {int(state.epoch) + 1}/{config.epochs} (learning rate "
              f"{float(state.learning_rate.numpy()):g})", flush=True)
    bar = keras.utils.Progbar(steps_per_epoch if steps_per_epoch < sys.maxsize else None, verbose=1 if verbose else 0,
                              stateful_metrics=["loss", "top1_err", "top5_err"])
    bar.update(int(state.step_in_epoch))
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
        ended = ran < n or step_in_epoch >= steps_per_epoch  # The stream's epoch, or the epoch's steps.
        if saving or ended or not math.isfinite(float(window[0])):
            ensure_finite(loop, global_step)  # Never a checkpoint (or an epoch's end) of non-finite weights.
        if profile_dir and global_step - 1 == config.profile_steps[-1]:
            tf.profiler.experimental.stop()
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
    sums = state.sums.numpy()
    rates = evaluation.rates(sums)
    return {
        "epoch": int(state.epoch) + 1,
        "learning_rate": float(state.learning_rate.numpy()),
        "train_loss": rates["loss"],
        "train_top1_error": rates["top1_error"],
        "train_top5_error": rates["top5_error"],
        "images_per_second": float(sums[3]) / max(float(state.train_seconds.numpy()), 1e-9),
        "train_images": int(sums[3]),
        "steps": int(state.step_in_epoch),
    }


class Diverged(RuntimeError):
    """The weights became non-finite: the run cannot go on from here."""


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
