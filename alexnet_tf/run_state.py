"""A run's state and what keeps it: the loop state, checkpoints, resume checks and the facts workers agree on.

`start` opens a run: its checkpoints restored, what an export needs written
beside them, and every worker checked to see the same run.

Killed at any moment, the same call resumes from the last checkpoint:
weights, optimizer state, epoch, step, schedule state, and the input position
(the epoch's stream is a pure function of the seed, the epoch and the worker;
a resumed epoch skips the records already trained on, see
`epochs.settle_stream`).
A resumed run keeps the records' classes and the settings its checkpoints
were trained with (`check_resume`), checked before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing

import numpy as np
import tensorflow as tf

from alexnet_tf import distribute, run_dir
from alexnet_tf.config import TrainConfig
from alexnet_tf.model_info import ModelInfo
from tfrecords import fileio
from tfrecords.classes import ClassMismatch

if typing.TYPE_CHECKING:
    from alexnet_tf.trainer import Data


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
# Checkpoints.


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


def open_checkpoints(model_dir: str, strategy, chief: bool, model, optimizer, state: LoopState) -> _Checkpoints:
    """The run's checkpoints: the model, the optimizer and the loop state."""
    # The model's non-trainable state (the dropout layers' seed generators) is
    # not among the variables a Keras 3 model gives tf.train.Checkpoint; without
    # it a resumed run would draw the masks of its first steps again.
    return _Checkpoints(model_dir, strategy, chief, model=model, optimizer=optimizer,
                        model_state=list(model.non_trainable_variables), **state.trackables())


# ---------------------------------------------------------------------------
# Before a run resumes, and what every worker must agree on.


def check_resume(config: TrainConfig, data: Data, model_dir: str) -> None:
    """Refuses to go on with the run in `model_dir` (if there is one) on
    records of other classes, where it would pair every output with the wrong
    class, or, once it has a checkpoint, under settings it was not trained
    with (`check_same_run`). Writes nothing.

    Raises:
      distribute.RunConflict: naming what differs.
    """
    if not tf.io.gfile.exists(run_dir.path(model_dir, run_dir.MODEL_INFO)):
        return
    info, mean = run_dir.read_model_info(model_dir)
    try:
        data.records.check_classes(info.synsets, f"the run in {model_dir}")
    except ClassMismatch as e:
        raise distribute.RunConflict(f"{e}; use another --model_dir to start a new run") from None
    if run_dir.latest_checkpoint(model_dir):
        check_same_run(info, mean, config, data, model_dir)


def check_same_run(info: ModelInfo, mean: np.ndarray, config: TrainConfig, data: Data, model_dir: str) -> None:
    """Refuses to resume a run under settings its checkpoint was not trained
    with: another recipe (other bias learning rates, decay targets and
    schedule from here on), network layout (the checkpoint would not fit),
    dropout, mean (kind, or the image itself) or records' image size. A
    recipe that folders of earlier versions lack is not checked.

    Raises:
      distribute.RunConflict: naming the setting, the run's value and this one's.
    """
    now = {"recipe": config.recipe, "grouped": config.grouped, "dropout": config.dropout, "mean": config.mean,
           "square_size": data.stats.square_size}
    flags = {"square_size": "the records' image size (pipelines.build_tfrecords --image_size)"}
    for key, value in now.items():
        was = getattr(info, key)
        if was is not None and was != value:
            what = flags.get(key, f"--{key}")
            raise distribute.RunConflict(
                f"the run in {model_dir} has {what}={was}, this one {what}={value}: a resumed run keeps the settings "
                f"its checkpoints were trained with; use another --model_dir to start a new run")
    if np.shape(mean) != np.shape(data.stats.mean) or not np.array_equal(mean, np.asarray(data.stats.mean, np.float32)):
        raise distribute.RunConflict(
            f"the run in {model_dir} subtracts another mean ({run_dir.MEAN_IMAGE}) than {config.data_dir} gives: "
            "a resumed run keeps its input; use the records it was trained on, or another --model_dir")


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


# ---------------------------------------------------------------------------
# A run, started or resumed.


@dataclasses.dataclass
class Run:
    """A started (or resumed) run: its loop state, its checkpoints and its finished epochs.

    A context manager: at its end the scratch checkpoints of a worker other
    than the chief are removed.
    """

    state: LoopState
    checkpoints: _Checkpoints
    resumed: bool
    history: list  # One dict of metrics per finished epoch.
    workers: int  # Worker processes, each one input pipeline.
    drawn: tuple[int, int]  # The chief's (stream seed, run identity), for a run whose checkpoint has none yet.
    model_dir: str
    chief: bool

    def save(self, step: int) -> None:
        """A checkpoint at `step` (see `_Checkpoints.save`)."""
        self.checkpoints.save(step)

    def end_epoch(self, result: dict) -> None:
        """Adds the finished epoch's `result` to the history, checkpoints the state
        (already set for the next epoch) and writes history.json (the chief)."""
        self.history.append(result)
        self.checkpoints.save(int(self.state.global_step))
        if self.chief:
            run_dir.write_history(self.model_dir, self.history)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.checkpoints.clean_up()


def start(config: TrainConfig, data: Data, model_dir: str, strategy, chief: bool, model, optimizer) -> Run:
    """Checks that the run in `model_dir` (if any) may go on (`check_resume`),
    restores its latest checkpoint, writes beside the checkpoints what an
    export needs (the chief), and checks that every worker sees the same run.

    Nothing in the folder is written before every check of a resumed run.

    Raises:
      distribute.RunConflict: The run in `model_dir` has other classes or
        settings, or the workers do not see the same run.
      run_dir.RunDirError: The latest checkpoint is damaged.
    """
    check_resume(config, data, model_dir)
    state = LoopState(config.learning_rate)
    checkpoints = open_checkpoints(model_dir, strategy, chief, model, optimizer, state)
    resumed = checkpoints.restore() is not None
    facts = run_facts(config, data, state, checkpoints.latest)
    # Without --seed the first start draws a seed, and every start a run identity
    # (independent of --seed: two runs with one seed are still two runs); every
    # worker takes the chief's, in the collective that compares the facts.
    rng = np.random.default_rng()
    fresh = (config.seed if config.seed is not None else int(rng.integers(2**31 - 1)), int(rng.integers(2**52)))
    history = []
    if resumed:
        optimizer.learning_rate.assign(float(state.learning_rate.numpy()))
        history = [h for h in run_dir.read_history(model_dir) if h["epoch"] <= int(state.epoch)]
    if chief:
        run_dir.write_model_info(model_dir, model_info(config, data), data.stats.mean)
    drawn = distribute.check_workers_agree(strategy, facts, fresh)
    if resumed:
        distribute.say(chief, f"resumed from {checkpoints.latest}: epoch {int(state.epoch) + 1}, step "
                              f"{int(state.step_in_epoch)}")
    return Run(state, checkpoints, resumed, history, distribute.num_workers(strategy), drawn, model_dir, chief)


def model_info(config: TrainConfig, data: Data) -> ModelInfo:
    """What an export of the run needs besides the weights and the mean."""
    return ModelInfo(num_classes=data.num_classes, grouped=config.grouped, dropout=config.dropout,
                     classes=data.records.meta.classes, mean=config.mean, mean_file=run_dir.MEAN_IMAGE,
                     square_size=data.stats.square_size, recipe=config.recipe)
