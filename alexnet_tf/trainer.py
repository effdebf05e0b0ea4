"""A training run: `train_and_evaluate(config, model_dir, strategy)`.

It trains (or resumes) epoch by epoch, evaluates each, and exports at the end.
`train_and_evaluate` tells the run's story in named steps, one module each:

- `read_data` (here): the records, opened and checked once against the run;
- `run_state`: the checks before a run resumes, the loop state, the
  checkpoints, and what every worker of a run must agree on;
- `train_loop`: the network and its optimizer, the replicated step and the
  device loop;
- `epochs`: the epochs, each trained, evaluated, reported and checkpointed;
- `export`: the SavedModel at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses

import tensorflow as tf

from alexnet_tf import distribute, epochs, export, preprocessing, recipes, run_dir, run_state, train_loop
from alexnet_tf.config import ConfigError, TrainConfig
from tfrecords.folder import Records


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


def read_data(config: TrainConfig, strategy, records: Records | None = None) -> Data:
    """The records (`records`, or opened from --data_dir), checked against the batch size and the replicas."""
    records = records or Records.open(config.data_dir)
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


def train_and_evaluate(config: TrainConfig, model_dir: str, strategy=None, records: Records | None = None) -> TrainResult:
    """Trains (or resumes training), evaluates each epoch, exports at the end.

    Args:
      config: Hyperparameters.
      model_dir: Checkpoints, TensorBoard logs, history.json and the SavedModel go here.
      strategy: A tf.distribute strategy (default: the current/default one).
      records: `config.data_dir`, already opened (default: opened here).

    Returns:
      The model and the history of all finished epochs (resumed runs included).
    """
    strategy = strategy or tf.distribute.get_strategy()
    chief = distribute.is_chief(strategy)
    data = read_data(config, strategy, records)  # Its errors leave no trace in model_dir.
    # The chief holds the folder: a second run on it stops before it writes.
    with run_dir.run_lock(model_dir) if chief else contextlib.nullcontext():
        if config.deterministic:
            distribute.use_deterministic_ops()
        dtype = distribute.compute_dtype(config.mixed_precision, strategy)
        recipe = recipes.get(config.recipe)
        model, optimizer = train_loop.build_model_and_optimizer(config, data.num_classes, strategy, dtype, recipe)
        # Checked (a resumed run), restored, what an export needs written, the workers agreed.
        with run_state.start(config, data, model_dir, strategy, chief, model, optimizer) as run:
            history = epochs.train_epochs(config, data, run, recipe, model, optimizer, strategy, chief, model_dir)
        if chief and config.export:
            path = export.export_trained(model, model_dir)
            distribute.say(True, f"exported SavedModel to {path}")
    return TrainResult(model, history)
