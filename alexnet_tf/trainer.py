"""A training run: `train_and_evaluate(config, model_dir, strategy)`.

It trains (or resumes) epoch by epoch, evaluates each, and exports at the end;
`_train_and_evaluate` tells the run's story in named steps, from these modules:

- `train_loop`: the replicated step, the device loop and the epoch in loops;
- `run_state`: the loop state, the checkpoints, the checks before a run
  resumes, and what every worker of a run must agree on;
- `summaries`: TensorBoard's scalars, images, histograms and figures;
- `stall_watch`: the warning when the loss shows the network is not learning.

This module keeps the epoch's story: its result, the learning-rate schedule
after it (`learning_rate_after_epoch`), and its line on the console.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys

import keras
import tensorflow as tf

from alexnet_tf import (distribute, evaluation, export, input_pipeline, preprocessing, recipes, run_dir, run_state,
                        service_client, stall_watch, summaries as summaries_lib, train_loop)
from alexnet_tf.config import ConfigError, TrainConfig
from alexnet_tf.run_state import LoopState
from tfrecords.folder import Records


def say(chief: bool, message: str) -> None:
    """One line about the run on stderr (from the chief only)."""
    if chief:
        print(f"train: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# The records, and what a run returns.


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


# ---------------------------------------------------------------------------
# The run, as named steps.


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
        _use_deterministic_ops()
    # Nothing in the folder is written before every check of a resumed run.
    run_state.check_resume(config, data, model_dir)
    dtype = distribute.compute_dtype(config.mixed_precision, strategy)
    model, optimizer = train_loop.build_model_and_optimizer(config, data.num_classes, strategy, dtype)
    state = LoopState(config.learning_rate)
    checkpoints = run_state.open_checkpoints(model_dir, strategy, chief, model, optimizer, state)
    resumed = checkpoints.restore() is not None
    if chief:  # What an export needs besides the weights, beside the checkpoints.
        _write_model_info(config, data, model_dir)
    distribute.check_workers_agree(strategy, run_state.run_facts(config, data, state, checkpoints.latest))
    stream_seed = run_state.settle_stream(config, state, strategy, resumed)
    history = _resume(model_dir, chief, state, optimizer, checkpoints.latest) if resumed else []

    train_epoch = _EpochTrainer(config, data, strategy, chief, model_dir, model, optimizer, state, stream_seed)
    summaries = summaries_lib.Summaries(model_dir, chief, model, config, data)
    watch = _build_stall_watch(config, data, chief, summaries)
    evaluator = evaluation.Evaluator(model, strategy, data.records, data.stats,
                                     config.eval_batch_size or config.batch_size, per_class=config.figures)
    if int(state.epoch) >= config.epochs:
        say(chief, f"training already finished ({config.epochs} epochs)")
    while int(state.epoch) < config.epochs:
        train_epoch(checkpoints.save, watch)
        result, per_class = _epoch_metrics(config, chief, data, state, evaluator)
        summaries.epoch(result["epoch"], result, per_class)
        history.append(result)
        next_epoch(config, state, optimizer, result)
        checkpoints.save(int(state.global_step))
        if chief:
            run_dir.write_history(model_dir, history)
            if config.verbose:
                print(epoch_line(result), flush=True)

    checkpoints.clean_up()
    if chief and config.export:
        path = export.export_trained(model, model_dir)
        say(True, f"exported SavedModel to {path}")
    summaries.close()
    return TrainResult(model, history)


def _use_deterministic_ops() -> None:
    """Two runs of one config (and seed) add their floats in the same order."""
    # Deterministic kernels where an op has several (cuDNN's convolutions,
    # GPU reductions); raises on an op that has no deterministic one.
    tf.config.experimental.enable_op_determinism()
    # Grappler's arithmetic optimizer regroups chains of float additions
    # (the weight-decay and loss gradients, the replicas' all-reduce) in an
    # order that follows the graph's construction, and the replicas of
    # MirroredStrategy are traced concurrently, in threads: two runs would
    # then add in different orders and differ in the last bits.
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})


def _write_model_info(config: TrainConfig, data: Data, model_dir: str) -> None:
    run_dir.write_model_info(model_dir, num_classes=data.num_classes, grouped=config.grouped,
                             dropout=config.dropout, recipe=config.recipe,
                             classes=[c.to_json() for c in data.records.meta.classes],
                             mean=data.stats.mean, mean_kind=config.mean, square_size=data.stats.square_size)


def _resume(model_dir: str, chief: bool, state: LoopState, optimizer, latest: str) -> list:
    """Sets the restored learning rate; returns the history of the epochs the checkpoint has finished."""
    optimizer.learning_rate.assign(float(state.learning_rate.numpy()))
    say(chief, f"resumed from {latest}: epoch {int(state.epoch) + 1}, step {int(state.step_in_epoch)}")
    return [h for h in run_dir.read_history(model_dir) if h["epoch"] <= int(state.epoch)]


class _EpochTrainer:
    """Trains the run's current epoch to its end: a new, differently seeded
    pass of its stream each epoch, the biases' learning rate set at its start,
    its progress bar, and a diverged run stopped at its end.

    The tf.data service's dispatcher is watched while the loop makes or reads
    its datasets (TensorFlow would wait for a lost one for ever); checkpoint
    writes are never cut short.
    """

    def __init__(self, config: TrainConfig, data: Data, strategy, chief: bool, model_dir: str, model, optimizer,
                 state: LoopState, stream_seed: int):
        self.config, self.strategy, self.chief, self.state = config, strategy, chief, state
        if config.data_service:
            say(chief, f"input stream: the tf.data service at {config.data_service}, one job per epoch "
                       f"({run_state.service_job_name(state)} first); evaluation reads the records here")
        self.recipe = recipes.get(config.recipe)
        self.loop, self.bias_lr = _build_loop(config, data, strategy, model, optimizer, state, self.recipe)
        self.dataset_fn = _dataset_fn(config, data, state, stream_seed)
        self.profile_dir = _profile_dir(config, model_dir, chief)
        self.steps = _epoch_steps(config, data)
        self.service = service_client.DispatcherWatch(config.data_service, config.data_service_timeout)

    def __call__(self, save, watch: stall_watch.StallWatch) -> None:
        """Trains to the epoch's end, with `save(global_step)` at checkpoint boundaries and `watch` on the loss.

        Raises:
          train_loop.Diverged: The weights became non-finite.
        """
        config, state, service = self.config, self.state, self.service
        with service.watching():
            iterator = iter(self.strategy.distribute_datasets_from_function(self.dataset_fn))
        bar = _progress_bar(config, self.chief, state, self.steps)
        self.bias_lr.assign(self.recipe.bias_lr_multiplier(int(state.epoch) / config.epochs))
        with service.watching():
            train_loop.run_epoch(self.loop, iterator, state, config, self.steps, service.unwatched(save),
                                 self.profile_dir, bar, watch)
        train_loop.ensure_finite(self.loop, int(state.global_step))


def _build_loop(config: TrainConfig, data: Data, strategy, model, optimizer, state: LoopState,
                recipe: recipes.Recipe) -> tuple[train_loop.TrainLoop, tf.Variable]:
    """The run's `TrainLoop`, and the variable that holds the biases' learning
    rate over the kernels' (set at each epoch's start)."""
    with strategy.scope():
        bias_lr = tf.Variable(1.0, trainable=False, dtype=tf.float32)
    loop = train_loop.TrainLoop(
        model, optimizer, strategy, config.batch_size, config.weight_decay,
        finish=lambda inputs, labels: (preprocessing.finish_batch(*inputs, data.stats), labels),
        jit_compile=config.jit_compile, state=state, warmup_steps=config.warmup_epochs * data.steps_per_epoch,
        finite=bool(config.data_service), decay_biases=recipe.decay_biases,
        bias_lr=None if recipe.bias_lr is None else bias_lr)
    return loop, bias_lr


def _dataset_fn(config: TrainConfig, data: Data, state: LoopState, stream_seed: int):
    """The training stream of the epoch `state` is in, for `distribute_datasets_from_function`."""

    def dataset_fn(context):
        if config.data_service:
            # The epoch's job, shared by every trainer process; a resumed run reads
            # on from where the job is (the dispatcher keeps it for its
            # --job_gc_timeout), records already handed out are not produced again.
            return input_pipeline.service_train_dataset(data.records, data.stats, config.batch_size, config.data_service,
                run_state.service_job_name(state), seed=stream_seed + int(state.epoch) * 1000, context=context,
                shuffle_buffer=config.shuffle_buffer)
        # Each epoch's stream, from where this epoch's trained steps end.
        per_step = config.batch_size // context.num_input_pipelines
        seed = stream_seed + int(state.epoch) * 1000 + context.input_pipeline_id
        return input_pipeline.train_dataset(data.records, data.stats, config.batch_size, context,
                                            shuffle_buffer=config.shuffle_buffer, seed=seed,
                                            skip=int(state.step_in_epoch) * per_step)

    return dataset_fn


def _build_stall_watch(config: TrainConfig, data: Data, chief: bool,
                       summaries: summaries_lib.Summaries) -> stall_watch.StallWatch:
    """The stall watch, warning on the console and in TensorBoard."""

    def stall_warning(message: str, step: int) -> None:
        say(chief, f"WARNING: {message}")
        summaries.warning(message, step)

    return stall_watch.StallWatch(config, data.num_classes, stall_warning)


def _profile_dir(config: TrainConfig, model_dir: str, chief: bool) -> str | None:
    """Where the profiler writes the traces of --profile_steps (the chief's), or None."""
    if config.profile_steps and chief:
        return run_dir.path(model_dir, os.path.join(run_dir.TENSORBOARD, "profile"))
    return None


def _epoch_steps(config: TrainConfig, data: Data) -> int:
    """The steps of an epoch: sys.maxsize where the tf.data service's job ends it.

    The service's epoch ends when its job does: the trainers take batches from
    one job as they come, so one may get more than another, and a step where
    only some have a batch trains on those (the others' are empty). Capping
    the epoch at records // batch steps would drop the rest of the job.
    """
    return sys.maxsize if config.data_service and not config.steps_per_epoch else data.steps_per_epoch


def _progress_bar(config: TrainConfig, chief: bool, state: LoopState, epoch_steps: int) -> keras.utils.Progbar:
    """The epoch's heading and progress bar on the console (the chief's, with --verbose), at its current step."""
    verbose = chief and config.verbose
    if verbose:
        print(f"Epoch {int(state.epoch) + 1}/{config.epochs} (learning rate "
              f"{float(state.learning_rate.numpy()):g})", flush=True)
    bar = keras.utils.Progbar(epoch_steps if epoch_steps < sys.maxsize else None, verbose=1 if verbose else 0,
                              stateful_metrics=["loss", "top1_err", "top5_err"])
    bar.update(int(state.step_in_epoch))
    return bar


def _epoch_metrics(config: TrainConfig, chief: bool, data: Data, state: LoopState,
                   evaluator: evaluation.Evaluator) -> tuple[dict, dict | None]:
    """The finished epoch's result, with its validation metrics, and the per-class errors (or None)."""
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
    return result, per_class


# ---------------------------------------------------------------------------
# The epoch: its result, the learning-rate schedule after it, its line.


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
    """The finished epoch's line on the console."""
    line = (f"epoch {r['epoch']}: loss {r['train_loss']:.4f}, top-1 error {r['train_top1_error']:.2%}, "
            f"top-5 error {r['train_top5_error']:.2%}, {r['images_per_second']:.1f} images/s, "
            f"lr {r['learning_rate']:g}")
    if "val_top1_error" in r:
        line += (f" | validation loss {r['val_loss']:.4f}, top-1 error {r['val_top1_error']:.2%}, "
                 f"top-5 error {r['val_top5_error']:.2%}")
    return line
