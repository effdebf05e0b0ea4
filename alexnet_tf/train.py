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

from absl import flags, logging

from alexnet_tf import config as config_lib
from alexnet_tf import recipes
from toolcli import quiet
from toolcli.command import Command, FlagGroup


def define_flags() -> flags.FlagValues:
    """The trainer's flags: how it runs, then one flag per TrainConfig field, with the field's default and help."""
    fv = flags.FlagValues()
    flags.DEFINE_string("model_dir", "runs/alexnet", "Checkpoints, TensorBoard logs and the SavedModel.", flag_values=fv)
    flags.DEFINE_enum("strategy", "mirrored", ["mirrored", "one_device", "multi_worker"], "Distribution strategy.",
                      flag_values=fv)
    flags.DEFINE_integer("cpu_devices", 2, "Without GPUs, --strategy=mirrored mirrors over this many logical CPUs.",
                         flag_values=fv)
    flags.DEFINE_integer("gpu_split", 1, "Split every physical GPU into this many logical GPUs (replicas), so the "
                         "mirrored path, all-reduce included, runs on one card.", flag_values=fv)
    flags.DEFINE_integer("gpu_split_memory_mb", 0, "Memory of each logical GPU of --gpu_split (0: 90% of the "
                         "card's, divided equally).", flag_values=fv)
    flags.DEFINE_enum("preset", "paper", sorted(config_lib.PRESETS), "Hyperparameter preset; explicit flags override "
                      "it.", flag_values=fv)
    flags.DEFINE_bool("verbose_startup", False, "Let TensorFlow's start-up notes (its C++ INFO lines, absl's notice) "
                      "and Python INFO logs through to the console (toolcli.quiet names what is kept off it "
                      "without); --verbose is the progress bar.", flag_values=fv)
    hints = typing.get_type_hints(config_lib.TrainConfig)
    for field in dataclasses.fields(config_lib.TrainConfig):
        name, default, help = field.name, field.default, field.metadata["help"]
        kind = hints[name]
        if field.metadata.get("choices"):
            flags.DEFINE_enum(name, default, list(field.metadata["choices"]), help, flag_values=fv)
        elif kind is bool:
            flags.DEFINE_bool(name, default, help, flag_values=fv)
        elif kind is int or kind == (int | None):
            flags.DEFINE_integer(name, default, help, flag_values=fv)
        elif kind is float:
            flags.DEFINE_float(name, default, help, flag_values=fv)
        elif kind is str:
            flags.DEFINE_string(name, default, help, flag_values=fv)
        else:  # tuple[int, ...]
            flags.DEFINE_list(name, [str(v) for v in default], help, flag_values=fv)
    return fv


def _hyperparameters() -> FlagGroup:
    """The TrainConfig flags, with what besides the command line sets their defaults (the reference page's note)."""
    names = tuple(f.name for f in dataclasses.fields(config_lib.TrainConfig))
    recipe_sets = sorted({name for r in recipes.RECIPES.values() for name in r.config})
    note = ("One flag per field of `alexnet_tf.config.TrainConfig`. The defaults shown are the flags' own, the "
            "paper's (§5): a run takes the `--recipe`'s values (" + ", ".join(f"`--{n}`" for n in recipe_sets)
            + "), then the preset's (`--preset=sample`: "
            + ", ".join(f"`--{n}`" for n in config_lib.PRESETS["sample"]) + "), then every flag given explicitly.")
    return FlagGroup("Hyperparameters (TrainConfig; --preset and --recipe set their defaults)", names, note)


COMMAND = Command("train", "python -m alexnet_tf.train [flags]", __doc__, usage_status=1, groups=(_hyperparameters(),))


def config_from_flags(fv: flags.FlagValues) -> config_lib.TrainConfig:
    """TrainConfig from the recipe, overridden by the preset, overridden by every flag given explicitly."""
    explicit = {f.name: fv[f.name].value for f in dataclasses.fields(config_lib.TrainConfig) if fv[f.name].present}
    try:
        for name in ("lr_decay_epochs", "profile_steps"):
            if name in explicit:
                explicit[name] = tuple(int(v) for v in explicit[name])
        recipe = explicit.pop("recipe", None)
        return config_lib.make_config(fv.preset, recipe, **explicit)  # Unset fields: the flags' defaults.
    except ValueError as e:
        fail(f"--{e}" if str(e).split(" ")[0] in fv else str(e))


def fail(message: str) -> NoReturn:
    """The run cannot start or go on: one line on stderr, exit status 1."""
    COMMAND.fail(message, 1)


def main(argv=None) -> None:
    """The command: `argv` (default: the process's arguments) parsed, then the run, with start-up noise kept off."""
    fv = define_flags()
    COMMAND.parse(fv, argv)
    with quiet.quiet_start(fv.verbose_startup):
        _train(fv)


def _train(fv: flags.FlagValues) -> None:
    # TensorFlow's and Keras' INFO lines (one per reduction, per save) drown the
    # progress; --verbose_startup brings them back.
    if not fv.verbose_startup:
        std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
        logging.set_verbosity(logging.WARNING)
    if fv.cpu_devices < 1 or fv.gpu_split < 1 or fv.gpu_split_memory_mb < 0:
        fail(f"--cpu_devices and --gpu_split must be at least 1 and --gpu_split_memory_mb 0 or more, got "
             f"{fv.cpu_devices}, {fv.gpu_split} and {fv.gpu_split_memory_mb}")
    config = config_from_flags(fv)
    # The strategy first: logical devices can only be made before TensorFlow initialises.
    import tensorflow as tf

    from alexnet_tf import distribute, export_folder, run_dir, service_client, stall_watch, train_loop, trainer
    from alexnet_tf.model_info import ModelInfoError
    from tfrecords import metadata
    from tfrecords.folder import Records

    strategy = distribute.make_strategy(fv.strategy, fv.cpu_devices, fv.gpu_split, fv.gpu_split_memory_mb)
    try:
        records = Records.open(config.data_dir)  # Opened and checked once, for the whole run.
        if config.data_service:
            service_client.check_reachable(config.data_service)
        if config.export:  # The folder the run ends by exporting into: refused now, not after the training.
            export_folder.check_export_dir(run_dir.path(fv.model_dir, run_dir.SAVED_MODEL))
    except (metadata.MetadataError, service_client.ServiceError, ValueError, export_folder.ExportError) as e:
        fail(str(e))
    dtype = distribute.compute_dtype(config.mixed_precision, strategy)
    distribute.say(True, f"strategy {fv.strategy} with {strategy.num_replicas_in_sync} replicas, compute dtype "
                      f"{dtype}{', XLA' if config.jit_compile else ''}; {config}")
    try:
        history = trainer.train_and_evaluate(config, fv.model_dir, strategy, records).history
    except (distribute.RunConflict, metadata.MetadataError, config_lib.ConfigError,
            ModelInfoError) as e:  # Before anything is written.
        fail(str(e))
    except (run_dir.RunDirError, train_loop.Diverged) as e:  # The checkpoints written so far stay.
        fail(str(e))
    except export_folder.ExportError as e:  # At the end: the checkpoints are written, only the SavedModel is not.
        fail(f"{e} (the run's checkpoints in {fv.model_dir} are kept)")
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
              f"(top-1 accuracy {1 - last['val_top1_error']:.2%}) after {last['epoch']} epochs; "
              f"trained at {training_rate(history):.1f} images/s")


def training_rate(history: list[dict]) -> float:
    """Training images/s over the run's epochs: their training images over the time their training steps took."""
    images = sum(epoch.get("train_images", 0) for epoch in history)  # Absent in histories of older runs.
    seconds = sum(epoch.get("train_images", 0) / epoch["images_per_second"] for epoch in history
                  if epoch["images_per_second"] > 0)
    return images / seconds if seconds else 0.0


if __name__ == "__main__":
    main()
