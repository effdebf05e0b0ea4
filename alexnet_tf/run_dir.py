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

import json
import os

import numpy as np
import tensorflow as tf

from alexnet_tf import model as model_lib, records

CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
SAVED_MODEL = "saved_model"
HISTORY = "history.json"
MODEL_INFO = "model_info.json"
MEAN_IMAGE = "mean_image.npy"


def path(model_dir: str, name: str) -> str:
    return os.path.join(model_dir, name)


def write_model_info(model_dir: str, *, num_classes: int, grouped: bool, dropout: float, classes: list,
                     mean: np.ndarray, mean_kind: str, square_size: int, recipe: str | None = None) -> None:
    """Saves beside the checkpoints what an export needs besides the weights."""
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(path(model_dir, MEAN_IMAGE), "wb") as f:
        np.save(f, np.asarray(mean, np.float32))
    records.write_json_atomically(path(model_dir, MODEL_INFO), {
        "num_classes": num_classes, "grouped": grouped, "dropout": dropout, "classes": classes,
        "mean": mean_kind, "mean_file": MEAN_IMAGE, "square_size": square_size,
        **({"recipe": recipe} if recipe else {}),
    })


def read_model_info(model_dir: str) -> tuple[dict, np.ndarray]:
    """(model_info.json as a dict, the mean image) of a model folder."""
    info_path = path(model_dir, MODEL_INFO)
    if not tf.io.gfile.exists(info_path):
        raise FileNotFoundError(f"{info_path} not found: is {model_dir} a model folder written by alexnet_tf.train?")
    with tf.io.gfile.GFile(info_path) as f:
        info = json.load(f)
    with tf.io.gfile.GFile(path(model_dir, info["mean_file"]), "rb") as f:
        return info, np.load(f)


def build_model(info: dict):
    """A float32 Keras AlexNet of the shape `info` describes, outside any strategy."""
    return model_lib.build_alexnet(info["num_classes"], grouped=info["grouped"], dropout=info["dropout"],
                                   dtype="float32")


def latest_checkpoint(model_dir: str) -> str | None:
    return tf.train.latest_checkpoint(path(model_dir, CHECKPOINTS))


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
    records.write_json_atomically(path(model_dir, HISTORY), history)
