"""Training checks that need a process of their own (logical CPU devices, TF_CONFIG).

Run by tests/test_train_loop.py; each writes its findings as JSON:

    python tests/train_checks.py jit one_device OUT.json     # XLA vs not, same init and data
    python tests/train_checks.py jit mirrored OUT.json       # two logical CPUs
    TF_CONFIG=... python tests/train_checks.py jit multi_worker OUT.json
    python tests/train_checks.py overflow OUT.json           # float16, only replica 1 overflows
"""

from __future__ import annotations

import json
import os
import sys

if sys.argv[1:2] == ["jit"]:
    # XLA's CPU convolutions are Eigen's. With oneDNN's (TensorFlow's default on
    # CPUs with AVX512_VNNI or AVX512_BF16) the forward pass differs from XLA's
    # by float32 rounding, which is enough to move a max-pooling window's argmax
    # between near-equal values and route part of a gradient elsewhere (0.3% of
    # the update after two steps). The check is of the loop's XLA wiring, so both
    # sides use the same kernels on every CPU kind.
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"

import keras
import numpy as np
import tensorflow as tf

from alexnet_tf import distribute, recipes, train_loop
from alexnet_tf.config import TrainConfig

GLOBAL_BATCH = 8
STEPS = 2
CLASSES = 10


def _strategy(name: str):
    if name == "multi_worker":
        return distribute.make_strategy("multi_worker")
    distribute.configure_cpu_devices(2)
    return distribute.make_strategy(name, cpu_devices=2)


def _synthetic(strategy):
    """The same fixed batches in every run: each input pipeline its own, seeded by its id."""

    def dataset_fn(context):
        b = context.get_per_replica_batch_size(GLOBAL_BATCH)
        rng = np.random.default_rng(context.input_pipeline_id)
        images = rng.normal(0, 40, (STEPS * b, 227, 227, 3)).astype(np.float32)
        labels = rng.integers(0, CLASSES, STEPS * b).astype(np.int32)
        return tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(b, drop_remainder=True)

    return iter(strategy.distribute_datasets_from_function(dataset_fn))


def _train(strategy, jit: bool):
    config = TrainConfig(dropout=0.0, seed=0, mixed_precision="off")
    model, optimizer = train_loop.build_model_and_optimizer(config, CLASSES, strategy, "float32", recipes.get(config.recipe))
    before = model.get_weights()
    loop = train_loop.TrainLoop(model, optimizer, strategy, GLOBAL_BATCH, config.weight_decay, jit_compile=jit)
    sums = loop.run(_synthetic(strategy), STEPS)[0].numpy()
    replicas_agree = all(
        all(np.array_equal(r.numpy(), strategy.experimental_local_results(v)[0].numpy())
            for r in strategy.experimental_local_results(v))
        for v in model.trainable_variables)
    return before, model.get_weights(), sums, replicas_agree


def check_jit(name: str) -> dict:
    strategy = _strategy(name)
    w0, plain, sums_plain, agree_plain = _train(strategy, jit=False)
    _, xla, sums_xla, agree_xla = _train(strategy, jit=True)
    # Compare the updates, not the weights (which the initialisation dominates).
    update_diff = max(float(np.abs((x - a) - (p - a)).max()) for a, p, x in zip(w0, plain, xla))
    update_size = max(float(np.abs(p - a).max()) for a, p in zip(w0, plain))
    return {
        "replicas": strategy.num_replicas_in_sync,
        "update_max_abs": update_size,
        "update_max_abs_diff": update_diff,
        "sums_plain": sums_plain.tolist(),
        "sums_xla": sums_xla.tolist(),
        "replicas_agree": agree_plain and agree_xla,
    }


def _tiny_float16_model(strategy):
    with strategy.scope():
        inputs = keras.Input((8,))
        x = keras.layers.Dense(16, activation="relu", dtype="mixed_float16", name="hidden")(inputs)
        logits = keras.layers.Dense(3, dtype="float32", name="logits")(x)
        model = keras.Model(inputs, logits)
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        optimizer.build(model.trainable_variables)
    return model, optimizer


def _replica_values(strategy, model):
    return [[r.numpy() for r in strategy.experimental_local_results(v)] for v in model.trainable_variables]


def check_overflow() -> dict:
    """float16 over two replicas where only replica 1's batch overflows, then a clean step."""
    strategy = _strategy("mirrored")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8)).astype(np.float32)
    y = np.array([0, 1, 2, 0], np.int32)
    bad = x.copy()
    bad[2:] = np.inf  # MirroredStrategy splits a global batch in order: rows 2-3 are replica 1's.

    def batches(images):
        return iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((images, y)).repeat()))

    out = {}
    model, optimizer = _tiny_float16_model(strategy)
    loop = train_loop.TrainLoop(model, optimizer, strategy, global_batch=4)
    w0 = _replica_values(strategy, model)
    scale0 = float(optimizer.dynamic_scale.numpy())
    loop.run(batches(bad), 1)
    w1 = _replica_values(strategy, model)
    out["overflow_step"] = {
        "scale_before": scale0,
        "scale_after": float(optimizer.dynamic_scale.numpy()),
        "weights_unchanged_on_every_replica": all(
            np.array_equal(a, b) for va, vb in zip(w0, w1) for a, b in zip(va, vb)),
        "all_finite": all(np.isfinite(r).all() for v in w1 for r in v),
    }
    loop.run(batches(x), 1)
    w2 = _replica_values(strategy, model)
    out["clean_step"] = {
        "scale_after": float(optimizer.dynamic_scale.numpy()),
        "weights_changed": any(not np.array_equal(a[0], b[0]) for a, b in zip(w1, w2)),
        "replicas_agree": all(np.array_equal(v[0], r) for v in w2 for r in v),
        "all_finite": all(np.isfinite(r).all() for v in w2 for r in v),
    }

    # For the record: Keras' optimizer alone, without the cross-replica check.
    model, optimizer = _tiny_float16_model(strategy)

    def keras_only(images, labels):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(keras.losses.sparse_categorical_crossentropy(
                labels, model(images, training=True), from_logits=True), global_batch_size=4)
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    tf.function(lambda batch: strategy.run(keras_only, args=batch))(next(batches(bad)))
    out["keras_alone_all_finite"] = all(np.isfinite(r).all() for v in _replica_values(strategy, model) for r in v)
    return out


def main(argv):
    if argv[1] == "jit":
        result = check_jit(argv[2])
        path = argv[3]
    elif argv[1] == "overflow":
        result = check_overflow()
        path = argv[2]
    else:
        raise SystemExit(f"unknown check {argv[1]!r}")
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv)
