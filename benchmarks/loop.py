r"""The training loop's own overhead: the project's loop against a bare tf.function loop.

    python -m benchmarks.loop                 # about a minute on 2 cores
    python -m benchmarks.loop --steps 2000 --batch 16

A tiny model on small synthetic images on the CPU, so that each step costs
little and whatever the loop adds around the step shows. Both sides run the
same replicated step (`train_loop.TrainLoop.replica_step`: forward, backward, SGD
update, metric sums) over the same in-memory dataset:

- bare: `@tf.function def step(it): strategy.run(replica_step, next(it))`,
  called once per step from Python, nothing else;
- ours: `train_loop.run_epoch` as training runs it: device loops of
  `--steps_per_loop` steps with the metric sums kept on the device, the host
  reading them once per loop for the progress bar; also with
  `--steps_per_loop=1` (a host round trip every step, the loop before).

Prints images/s of each and the ratio to bare (target: ours >= 0.95x), and
writes JSON to benchmarks/results/loop-cpu.json. Not a test: nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from alexnet_tf import train_loop
from alexnet_tf.config import TrainConfig
from alexnet_tf.run_state import LoopState

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _tiny_model():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def _setup(strategy, batch: int, state=None):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = _tiny_model()
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices((
        rng.normal(size=(64 * batch, 32, 32, 3)).astype(np.float32),
        rng.integers(0, 10, 64 * batch).astype(np.int32))).repeat().batch(batch, drop_remainder=True)
    iterator = iter(strategy.distribute_datasets_from_function(lambda ctx: data.prefetch(tf.data.AUTOTUNE)))
    loop = train_loop.TrainLoop(model, optimizer, strategy, batch, weight_decay=5e-4, state=state)
    return model, loop, iterator


def bare_rate(strategy, batch: int, steps: int) -> float:
    model, loop, iterator = _setup(strategy, batch)

    @tf.function
    def step(it):
        strategy.run(loop.replica_step, args=next(it))

    for _ in range(20):  # Trace and warm up.
        step(iterator)
    model.trainable_variables[0].numpy()
    start = time.perf_counter()
    for _ in range(steps):
        step(iterator)
    model.trainable_variables[0].numpy()  # Wait for the device.
    return steps * batch / (time.perf_counter() - start)


def ours_rate(strategy, batch: int, steps: int, steps_per_loop: int) -> float:
    state = LoopState(0.01)
    model, loop, iterator = _setup(strategy, batch, state)
    config = TrainConfig(steps_per_loop=steps_per_loop, checkpoint_every_steps=0)
    train_loop.run_epoch(loop, iterator, state, config, 20)  # Trace and warm up.
    state.step_in_epoch.assign(0)
    state.global_step.assign(0)
    start = time.perf_counter()
    train_loop.run_epoch(loop, iterator, state, config, steps)  # With its progress bar (not shown).
    model.trainable_variables[0].numpy()
    return steps * batch / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loop", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps_per_loop", type=int, default=TrainConfig().steps_per_loop)
    p.add_argument("--repeats", type=int, default=3, help="Alternating runs of each side; the median counts.")
    p.add_argument("--output", default=os.path.join(RESULTS, "loop-cpu.json"))
    args = p.parse_args(argv)

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    runs = {"bare": [], "ours": [], "ours_steps_per_loop_1": []}
    for i in range(args.repeats):
        runs["bare"].append(bare_rate(strategy, args.batch, args.steps))
        runs["ours"].append(ours_rate(strategy, args.batch, args.steps, args.steps_per_loop))
        runs["ours_steps_per_loop_1"].append(ours_rate(strategy, args.batch, args.steps, 1))
        print(f"run {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()), flush=True)
    median = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__},
        "steps": args.steps, "batch": args.batch, "steps_per_loop": args.steps_per_loop, "runs": runs,
        "images_per_second": median,
        "ratio_ours_to_bare": median["ours"] / median["bare"],
        "ratio_steps_per_loop_1_to_bare": median["ours_steps_per_loop_1"] / median["bare"],
        "target": ">= 0.95",
    }
    print(f"{'loop':40s}{'images/s':>10s}{'vs bare':>9s}")
    for name, label in (("bare", "bare tf.function loop, one call a step"),
                        ("ours", f"ours, steps_per_loop={args.steps_per_loop}"),
                        ("ours_steps_per_loop_1", "ours, steps_per_loop=1")):
        print(f"{label:40s}{median[name]:>10.0f}{median[name] / median['bare']:>8.2f}x")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
