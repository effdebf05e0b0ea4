r"""Trains AlexNet on the records of `pipelines.build_tfrecords`.

    python -m alexnet_tf.train --data_dir=data --model_dir=runs/alexnet --strategy=mirrored
    python -m alexnet_tf.train --preset=sample --model_dir=runs/sample    # the embedded sample, on CPU
    python -m alexnet_tf.train --strategy=mirrored --gpu_split=2 ...      # two replicas on one GPU
    tensorboard --logdir=runs/alexnet/tensorboard

Defaults are the paper's (§5): batch 128, SGD with momentum 0.9, weight decay
5e-4 inside the momentum update, learning rate 0.01 divided by 10 when the
validation error stops improving (at most 3 times), 90 epochs. Every
hyperparameter flag comes from a field of `alexnet_tf.config.TrainConfig`; the
loop is `alexnet_tf.trainer.train_and_evaluate`.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import sys
import typing
from typing import NoReturn

from absl import app, flags, logging

from alexnet_tf import config as config_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", "runs/alexnet", "Checkpoints, TensorBoard logs and the SavedModel.")
flags.DEFINE_enum("strategy", "mirrored", ["mirrored", "one_device", "multi_worker"], "Distribution strategy.")
flags.DEFINE_integer("cpu_devices", 2, "Without GPUs, --strategy=mirrored mirrors over this many logical CPUs.")
flags.DEFINE_integer("gpu_split", 1, "Split every physical GPU into this many logical GPUs (replicas), so the "
                     "mirrored path, all-reduce included, runs on one card.")
flags.DEFINE_integer("gpu_split_memory_mb", 0, "Memory of each logical GPU of --gpu_split (0: 90% of the "
                     "card's, divided equally).")
flags.DEFINE_enum("preset", "paper", sorted(config_lib.PRESETS), "Hyperparameter preset; explicit flags override it.")


def _define_hyperparameter_flags() -> None:
    """One flag per TrainConfig field, with the field's default and help."""
    hints = typing.get_type_hints(config_lib.TrainConfig)
    for field in dataclasses.fields(config_lib.TrainConfig):
        name, default, help = field.name, field.default, field.metadata["help"]
        kind = hints[name]
        if field.metadata.get("choices"):
            flags.DEFINE_enum(name, default, list(field.metadata["choices"]), help)
        elif kind is bool:
            flags.DEFINE_bool(name, default, help)
        elif kind is int or kind == (int | None):
            flags.DEFINE_integer(name, default, help)
        elif kind is float:
            flags.DEFINE_float(name, default, help)
        elif kind is str:
            flags.DEFINE_string(name, default, help)
        else:  # tuple[int, ...]
            flags.DEFINE_list(name, [str(v) for v in default], help)


_define_hyperparameter_flags()


def config_from_flags() -> config_lib.TrainConfig:
    """TrainConfig from the recipe, overridden by the preset, overridden by every flag given explicitly."""
    explicit = {f.name: FLAGS[f.name].value for f in dataclasses.fields(config_lib.TrainConfig)
                if FLAGS[f.name].present}
    try:
        for name in ("lr_decay_epochs", "profile_steps"):
            if name in explicit:
                explicit[name] = tuple(int(v) for v in explicit[name])
        recipe = explicit.pop("recipe", None)
        return config_lib.make_config(FLAGS.preset, recipe, **explicit)  # Unset fields: the flags' defaults.
    except ValueError as e:
        fail(f"--{e}" if str(e).split(" ")[0] in FLAGS else str(e))


def fail(message: str) -> NoReturn:
    """The run cannot start or go on: one line on stderr, exit status 1."""
    print(f"train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv):
    # TensorFlow's and Keras' INFO lines (one per reduction, per save) drown the
    # progress; -v/--verbosity still brings them back.
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (every setting is a --flag; see --help)")
    if FLAGS.cpu_devices < 1 or FLAGS.gpu_split < 1 or FLAGS.gpu_split_memory_mb < 0:
        fail(f"--cpu_devices and --gpu_split must be at least 1 and --gpu_split_memory_mb 0 or more, got "
             f"{FLAGS.cpu_devices}, {FLAGS.gpu_split} and {FLAGS.gpu_split_memory_mb}")
    config = config_from_flags()
    # The strategy first: logical devices can only be made before TensorFlow initialises.
    import tensorflow as tf

    from alexnet_tf import distribute, export_folder, run_dir, service_client, stall_watch, train_loop, trainer
    from alexnet_tf.model_info import ModelInfoError
    from tfrecords import metadata
    from tfrecords.folder import Records

    strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.cpu_devices, FLAGS.gpu_split, FLAGS.gpu_split_memory_mb)
    try:
        records = Records.open(config.data_dir)  # Opened and checked once, for the whole run.
        if config.data_service:
            service_client.check_reachable(config.data_service)
        if config.export:  # The folder the run ends by exporting into: refused now, not after the training.
            export_folder.check_export_dir(run_dir.path(FLAGS.model_dir, run_dir.SAVED_MODEL))
    except (metadata.MetadataError, service_client.ServiceError, ValueError, export_folder.ExportError) as e:
        fail(str(e))
    dtype = distribute.compute_dtype(config.mixed_precision, strategy)
    distribute.say(True, f"strategy {FLAGS.strategy} with {strategy.num_replicas_in_sync} replicas, compute dtype "
                      f"{dtype}{', XLA' if config.jit_compile else ''}; {config}")
    try:
        history = trainer.train_and_evaluate(config, FLAGS.model_dir, strategy, records).history
    except (distribute.RunConflict, metadata.MetadataError, config_lib.ConfigError,
            ModelInfoError) as e:  # Before anything is written.
        fail(str(e))
    except (run_dir.RunDirError, train_loop.Diverged) as e:  # The checkpoints written so far stay.
        fail(str(e))
    except export_folder.ExportError as e:  # At the end: the checkpoints are written, only the SavedModel is not.
        fail(f"{e} (the run's checkpoints in {FLAGS.model_dir} are kept)")
    except stall_watch.Stalled:  # Already said, on the console and in TensorBoard.
        sys.exit(3)
    except tf.errors.NotFoundError as e:  # A dispatcher restarted without its journal; checkpoints stay.
        message = service_client.forgotten_job_message(e, config.data_service) if config.data_service else None
        if message is None:
            raise
        fail(message)
    except tf.errors.DataLossError as e:  # Checkpoints up to here stay: the run resumes once it is rebuilt.
        print(f"train: error: {records.data_loss_message(e)}", file=sys.stderr)
        sys.exit(1)
    if history and "val_top1_error" in history[-1]:
        last = history[-1]
        print(f"validation top-1 error {last['val_top1_error']:.2%}, top-5 error {last['val_top5_error']:.2%} "
              f"(top-1 accuracy {1 - last['val_top1_error']:.2%}) after {last['epoch']} epochs")


HELP_FLAGS = ("-h", "-?", "-help", "--help", "--helpshort", "--helpfull", "--helpxml")


def run() -> None:
    """The command: absl's flags and `main`, where asking for help exits 0 (absl's own exits 1)."""
    asked = any(a.split("=")[0] in HELP_FLAGS for a in sys.argv[1:])
    try:
        app.run(main)
    except SystemExit as e:
        if asked and e.code == 1:
            sys.exit(0)
        raise


if __name__ == "__main__":
    run()
