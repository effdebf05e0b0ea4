"""The model folder a training run writes, and loading a trained model from it.

    <model_dir>/checkpoints/      tf.train.Checkpoint: model, optimizer, loop state
    <model_dir>/tensorboard/      train/, validation/ (and profile/) summaries
    <model_dir>/history.json      one dict of metrics per finished epoch
    <model_dir>/model_info.json   what an export needs besides the weights
    <model_dir>/mean_image.npy    the mean subtracted from every input
    <model_dir>/saved_model/      the export, when training ends

Used by training, `alexnet_tf.export`, `alexnet_tf.evaluate` and `alexnet_tf.predict`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time

import numpy as np
import tensorflow as tf

from alexnet_tf import model as model_lib
from alexnet_tf.model_info import ModelInfo, ModelInfoError
from tfrecords import fileio

CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
SAVED_MODEL = "saved_model"
HISTORY = "history.json"
MODEL_INFO = "model_info.json"
MEAN_IMAGE = "mean_image.npy"
LOCK = ".train.lock"
CHECKPOINT_STATE = "checkpoint"  # tf.train.CheckpointManager's list of the checkpoints it keeps.


class RunDirError(RuntimeError):
    """The model folder cannot be used as it is (held by another run, its
    checkpoints unreadable): one line that names the problem and the way on."""


def path(model_dir: str, name: str) -> str:
    return os.path.join(model_dir, name)


def write_model_info(model_dir: str, info: ModelInfo, mean: np.ndarray) -> None:
    """Saves beside the checkpoints what an export needs besides the weights: `info` and the mean."""
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(path(model_dir, info.mean_file), "wb") as f:
        np.save(f, np.asarray(mean, np.float32))
    fileio.write_json_atomically(path(model_dir, MODEL_INFO), info.to_json())


def read_model_info(model_dir: str) -> tuple[ModelInfo, np.ndarray]:
    """(model_info.json, the mean it names) of a model folder.

    Raises:
      FileNotFoundError: The folder has no model_info.json.
      ModelInfoError: model_info.json is not valid JSON, a field is missing or
        wrong, or the mean it names is missing.
    """
    info_path = path(model_dir, MODEL_INFO)
    if not tf.io.gfile.exists(info_path):
        raise FileNotFoundError(f"{info_path} not found: is {model_dir} a model folder written by alexnet_tf.train?")
    with tf.io.gfile.GFile(info_path) as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ModelInfoError(f"{info_path} is not valid JSON ({e})") from None
    info = ModelInfo.from_json(obj, info_path)
    mean_path = path(model_dir, info.mean_file)
    if not tf.io.gfile.exists(mean_path):
        raise ModelInfoError(f"{mean_path}, the mean {info_path} names, is missing: the model folder is damaged")
    with tf.io.gfile.GFile(mean_path, "rb") as f:
        return info, np.load(f)


def build_model(info: ModelInfo):
    """A float32 Keras AlexNet of the shape `info` describes, outside any strategy."""
    return model_lib.build_alexnet(info.num_classes, grouped=info.grouped, dropout=info.dropout, dtype="float32")


@contextlib.contextmanager
def run_lock(model_dir: str):
    """Holds `<model_dir>/.train.lock` while a training run writes the folder.

    A second run on the same folder stops at once, naming the holder: two
    runs would interleave their checkpoints. The lock is the kernel's
    (`flock`), so a run that dies, even by kill -9, releases it: nothing
    stale is left to remove. On gs:// and other remote stores there is no
    such lock: the folder is not locked there.

    Raises:
      RunDirError: Another process holds the folder.
    """
    if "://" in model_dir:
        yield
        return
    os.makedirs(model_dir, exist_ok=True)
    lock = path(model_dir, LOCK)
    with contextlib.ExitStack() as held:
        try:
            f = held.enter_context(fileio.held_lock(lock, wait=False))
        except BlockingIOError:
            with open(lock) as f:
                holder = f.read().strip() or "a process that has not yet said which"
            raise RunDirError(f"--model_dir {model_dir} is in use by another training run ({holder}); wait for it "
                              "to end, or use another --model_dir") from None
        if f is not None:  # None: no kernel lock on this OS.
            f.seek(0)
            f.truncate()
            f.write(f"host {socket.gethostname()}, pid {os.getpid()}, started "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
            f.flush()
        try:
            yield
        finally:
            if f is not None:
                f.truncate(0)


def checkpoint_steps(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, prefix) of every `ckpt-N` in `ckpt_dir` with an index file, oldest first."""
    if not tf.io.gfile.isdir(ckpt_dir):
        return []
    found = [re.fullmatch(r"ckpt-(\d+)\.index", name) for name in tf.io.gfile.listdir(ckpt_dir)]
    return sorted((int(m.group(1)), os.path.join(ckpt_dir, f"ckpt-{m.group(1)}")) for m in found if m)


def _readable(prefix: str) -> bool:
    try:
        tf.train.load_checkpoint(prefix)
        return True
    except (tf.errors.OpError, ValueError):
        return False


def latest_checkpoint(model_dir: str, repair: bool = False) -> str | None:
    """The newest checkpoint of a model folder.

    tf.train.CheckpointManager names it in `checkpoints/checkpoint`. Where
    that file is missing, garbled or names a checkpoint that is gone, but
    `ckpt-N` files are there, the newest readable one is the latest: trusting
    the file would start the run again from step 0 and overwrite its
    checkpoints. With `repair` (the chief of a training run), the file is
    written again, naming the readable checkpoints, and a warning says so.

    Raises:
      RunDirError: There are checkpoint files, but none is readable.
    """
    ckpt_dir = path(model_dir, CHECKPOINTS)
    try:
        latest = tf.train.latest_checkpoint(ckpt_dir)
    except (tf.errors.OpError, ValueError):  # Garbled beyond TensorFlow's own checks (not UTF-8).
        latest = None
    found = checkpoint_steps(ckpt_dir)
    if latest or not found:
        return latest
    readable = [prefix for _, prefix in found if _readable(prefix)]
    if not readable:
        raise RunDirError(f"{ckpt_dir} holds checkpoints ({', '.join(os.path.basename(p) for _, p in found)}) but "
                          "none is readable, and its `checkpoint` file names none: move them aside to start the "
                          "run again, or use another --model_dir")
    if repair:
        # With their times, so that the manager counts them among the ones it keeps.
        state = "".join([f'model_checkpoint_path: "{os.path.basename(readable[-1])}"\n'] +
                        [f'all_model_checkpoint_paths: "{os.path.basename(p)}"\n' for p in readable] +
                        [f"all_model_checkpoint_timestamps: {tf.io.gfile.stat(p + '.index').mtime_nsec / 1e9}\n"
                         for p in readable])
        with tf.io.gfile.GFile(path(ckpt_dir, CHECKPOINT_STATE) + ".tmp", "w") as f:
            f.write(state)
        tf.io.gfile.rename(path(ckpt_dir, CHECKPOINT_STATE) + ".tmp", path(ckpt_dir, CHECKPOINT_STATE), overwrite=True)
        print(f"WARNING: {ckpt_dir}/{CHECKPOINT_STATE} was missing or unreadable; resuming from "
              f"{os.path.basename(readable[-1])}, the newest readable checkpoint (the file is written again)",
              flush=True)
    return readable[-1]


def load_trained_model(model_dir: str, checkpoint: str | None = None):
    """(model, info, mean): the Keras model of a model folder with its latest (or given) checkpoint's weights."""
    info, mean = read_model_info(model_dir)
    checkpoint = checkpoint or latest_checkpoint(model_dir)
    if not checkpoint:
        raise FileNotFoundError(f"no checkpoint in {path(model_dir, CHECKPOINTS)}")
    model = build_model(info)
    tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial().assert_existing_objects_matched()
    return model, info, mean


def read_history(model_dir: str) -> list[dict]:
    history_path = path(model_dir, HISTORY)
    if not tf.io.gfile.exists(history_path):
        return []
    with tf.io.gfile.GFile(history_path) as f:
        return json.load(f)


def write_history(model_dir: str, history: list[dict]) -> None:
    tf.io.gfile.makedirs(model_dir)
    fileio.write_json_atomically(path(model_dir, HISTORY), history)
