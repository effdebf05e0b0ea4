"""The measurements of `python -m benchmarks.gpu`: one function per kind of row, each returning images/s.

Training rows run the project's own `train_loop.build_model_and_optimizer`
and `train_loop.TrainLoop`; each figure is the median of `runs` timed calls of
`steps` steps after one untimed warm-up call (tracing, XLA compilation).
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import time
import traceback

import numpy as np
from tfrecords.folder import Records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Model FLOPs of one training image of the paper's net (forward and backward),
# the numerator of model FLOPs utilisation (MFU). Derivation: the forward pass
# of the grouped net on a 227x227x3 image is 724.4 M multiply-adds (conv1
# 105.4 M, conv2 223.9 M, conv3 149.5 M, conv4 112.1 M, conv5 74.8 M, fc6-fc8
# 58.6 M; `count_train_flops` counts them from the built model's kernels),
# 2 FLOPs each: 1.45 GFLOP; the backward pass costs twice the forward (the
# gradients with respect to the activations and to the weights), so a
# training image is 3 x 1.45 = 4.35 GFLOP. Pooling, LRN, ReLU, dropout, the
# loss and the SGD update are left out (under 1%), as MFU usually counts.
ALEXNET_TRAIN_FLOPS_PER_IMAGE = 4.35e9


def say(message: str) -> None:
    """One progress line on stderr."""
    print(f"bench-gpu: {message}", file=sys.stderr, flush=True)


def count_train_flops(model) -> float:
    """Training FLOPs per image of a built Keras model: 3 x 2 x its kernels' multiply-adds.

    A kernel's multiply-adds per image are its size (filter height x width x
    input channels of a group x filters, or inputs x outputs of a dense layer)
    times the output's spatial positions.
    """
    macs = 0
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        positions = math.prod(layer.output.shape[1:-1]) if len(layer.output.shape) == 4 else 1
        macs += math.prod(kernel.shape) * positions
    return 3 * 2 * float(macs)


def tiny_net(num_classes: int = 1000, grouped: bool = True, dropout: float = 0.5, seed: int | None = None,
             dtype: str | None = None):
    """A two-layer stand-in for `model.build_alexnet` (same signature and input) for --model=tiny."""
    import keras

    x = inputs = keras.Input((227, 227, 3), name="image")
    x = keras.layers.Conv2D(8, 11, strides=4, activation="relu", name="conv1", dtype=dtype)(x)
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype)(x)
    x = keras.layers.Dropout(dropout, dtype=dtype)(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="fc8", dtype="float32")(x), name="tiny")


def build_net(model: str, num_classes: int, dtype: str | None = None):
    """A float32 (or `dtype`) network of the kind --model names, outside any strategy."""
    from alexnet_tf import model as model_lib

    return (model_lib.build_alexnet if model == "alexnet" else tiny_net)(num_classes, dtype=dtype)


def train_flops_per_image(model: str, num_classes: int) -> float:
    """The paper's constant for --model=alexnet (1000 classes); otherwise counted from the net."""
    if model == "alexnet" and num_classes == 1000:
        return ALEXNET_TRAIN_FLOPS_PER_IMAGE
    return count_train_flops(build_net(model, num_classes, "float32"))


def median_rate(run, runs: int) -> float:
    """Median images/s over `runs` calls of `run()`, which returns the images it processed."""
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        images = run()
        rates.append(images / (time.perf_counter() - start))
    return float(np.median(rates))


def measure(name: str, fn, deadline: float | None = None, unit: str = "images/s", **fields) -> dict:
    """Measures one row, and goes on past an out-of-memory error or a spent time budget.

    Args:
      name: The row, for the progress line.
      fn: Returns the row's images/s.
      deadline: time.monotonic() after which the row is not started (None: no limit).
      unit: Of the figure, for the progress line.
      **fields: Recorded in the row beside the figure (e.g. global_batch).

    Returns:
      {**fields, "images_per_second": fn(), "seconds": the row's time}; out
      of memory, past the deadline or failed, images_per_second is None and
      "error" says why ("out of memory: ...", "skipped: ...", "failed: ...").
    """
    import keras
    import tensorflow as tf

    if deadline is not None and time.monotonic() > deadline:
        say(f"{name}: skipped, the time budget is spent")
        return skipped(**fields)
    say(f"{name} ...")
    start = time.perf_counter()
    try:
        row = {**fields, "images_per_second": fn()}
        say(f"{name}: {row['images_per_second']:,.1f} {unit}")
    except tf.errors.ResourceExhaustedError as e:
        row = {**fields, "images_per_second": None, "error": f"out of memory: {e.message.splitlines()[0][:300]}"}
        say(f"{name}: {row['error']}")
    except Exception as e:  # noqa: BLE001 - one row's failure (a kernel, a compiler) must not lose the others.
        first = (str(e).strip().splitlines() or [""])[0][:300]
        row = {**fields, "images_per_second": None, "error": f"failed: {type(e).__name__}: {first}"}
        say(f"{name}: {row['error']}")
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - start, 2)  # With compilation: what the row cost of the budget.
    keras.backend.clear_session()
    gc.collect()
    return row


def skipped(**fields) -> dict:
    """A row not started because the time budget (--budget_s) was spent."""
    return {**fields, "images_per_second": None, "error": "skipped: the time budget (--budget_s) was spent"}


def matmul_tflops(n: int, chain: int = 10, reps: int = 5) -> float:
    """TFLOP/s of bfloat16 n x n matmuls on the default device: the peak MFU is measured against.

    `chain` products run back to back inside one tf.function (no host round
    trip between them), `reps` times after a warm-up call.
    """
    import tensorflow as tf

    x = tf.cast(tf.random.normal((n, n), seed=1), tf.bfloat16)
    w = tf.cast(tf.random.normal((n, n), stddev=1.0 / math.sqrt(n), seed=2), tf.bfloat16)

    @tf.function
    def products(x, w):
        for _ in range(chain):
            x = tf.matmul(x, w)  # w scaled by 1/sqrt(n) keeps the values from overflowing bfloat16.
        return x[0, 0]

    float(products(x, w))
    start = time.perf_counter()
    for _ in range(reps):
        last = products(x, w)
    float(last)  # Waits for the device.
    return 2 * n ** 3 * chain * reps / (time.perf_counter() - start) / 1e12


# ---------------------------------------------------------------------------
# Data.


def make_records(work: str, images: int) -> str:
    """Generates a clean sample of about `images` training images and builds records from it."""
    from pipelines import make_sample

    raw, out = os.path.join(work, "raw"), os.path.join(work, "records")
    say(f"generating {images} sample images in {raw}")
    make_sample.make_sample(raw, train_per_class=max(4, images // 10), val_per_class=max(1, images // 500),
                            quirks=False)
    say(f"building records in {out}")
    subprocess.run([sys.executable, "-m", "pipelines.build_tfrecords", f"--imagenet_dir={raw}",
                    f"--output_dir={out}", "--train_shards=32", "--validation_shards=4", "--overwrite"],
                   cwd=REPO, check=True, stdout=sys.stderr)  # stdout keeps only the table.
    return out


def synthetic_dataset(global_batch: int, context, stats, num_classes: int, seed: int = 0):
    """An endless dataset repeating one random batch, structured as `train_dataset`'s.

    Args:
      global_batch: Examples per step over all replicas.
      context: The tf.distribute.InputContext of this input pipeline.
      stats: Colour statistics `finish_batch` uses (patch positions fit its square).
      num_classes: Labels are drawn from [0, num_classes).
      seed: Seed of the random patches, parameters and labels.

    Returns:
      A dataset of ((uint8 patches, preprocessing.Augment), int32 labels) batches.
    """
    import tensorflow as tf

    from alexnet_tf import preprocessing

    batch = context.get_per_replica_batch_size(global_batch)
    rng = np.random.default_rng(seed + context.input_pipeline_id)
    patches = rng.integers(0, 256, (batch, 227, 227, 3), np.uint8)
    room = stats.square_size - 227 + 1
    aug = preprocessing.Augment(top=rng.integers(0, room, batch).astype(np.int32),
                                left=rng.integers(0, room, batch).astype(np.int32),
                                flip=rng.integers(0, 2, batch).astype(bool),
                                alpha=rng.normal(0, 0.1, (batch, 3)).astype(np.float32))
    labels = rng.integers(0, num_classes, batch, np.int32)
    return tf.data.Dataset.from_tensors(((patches, aug), labels)).repeat()


# ---------------------------------------------------------------------------
# Rows.


def build_model_and_optimizer(model: str, num_classes: int, strategy, compute_dtype: str):
    """`train_loop.build_model_and_optimizer` with the paper's config; --model=tiny swaps only the network."""
    from alexnet_tf import model as model_lib, recipes, train_loop
    from alexnet_tf.config import TrainConfig

    build = model_lib.build_alexnet if model == "alexnet" else tiny_net
    return train_loop.build_model_and_optimizer(TrainConfig(), num_classes, strategy, compute_dtype, recipes.PAPER,
                                                build=build)


def train_rate(args, strategy, compute_dtype: str, jit: bool, global_batch: int, dataset_fn, stats) -> float:
    """Median training images/s of `train_loop.TrainLoop` fed by `dataset_fn(context)`.

    Args:
      args: The parsed flags (model, num_classes, warmup_steps, steps, runs).
      strategy: The tf.distribute strategy the model is built and run under.
      compute_dtype: "float32", "float16" (mixed, with dynamic loss scaling) or "bfloat16" (mixed).
      jit: Compile each replica's forward and backward pass with XLA.
      global_batch: Examples per step over all replicas.
      dataset_fn: Makes one input pipeline's dataset of ((patches, augment), labels).
      stats: Colour statistics for `finish_batch`, which runs inside the step.
    """
    from alexnet_tf import preprocessing, train_loop
    from alexnet_tf.config import TrainConfig

    model, optimizer = build_model_and_optimizer(args.model, args.num_classes, strategy, compute_dtype)
    loop = train_loop.TrainLoop(model, optimizer, strategy, global_batch, TrainConfig().weight_decay,
                                finish=lambda inputs, labels: (preprocessing.finish_batch(*inputs, stats), labels),
                                jit_compile=jit)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    loop.run(iterator, args.warmup_steps)[0].numpy()
    # The device's own count of the images it trained on (index 3 of the metric sums).
    return median_rate(lambda: float(loop.run(iterator, args.steps)[0].numpy()[3]), args.runs)


def stream_rate(args, data_dir: str, meta, stats, global_batch: int) -> float:
    """Median images/s of `input_pipeline.train_dataset` iterated on the host without a model."""
    from alexnet_tf import input_pipeline

    iterator = iter(input_pipeline.train_dataset(Records(data_dir, meta), stats, global_batch,
                                                 shuffle_buffer=args.shuffle_buffer))

    def run():
        for _ in range(args.steps):
            next(iterator)
        return global_batch * args.steps

    for _ in range(args.warmup_steps):
        next(iterator)
    return median_rate(run, args.runs)


def serve_rate(args, serve, images) -> float:
    """Median images/s of calls of the signature `serve` on the batch of JPEG bytes `images`."""
    batch = int(images.shape[0])

    def run():
        for _ in range(args.steps):
            serve(images=images)["probabilities"].numpy()
        return batch * args.steps

    for _ in range(args.warmup_steps):
        serve(images=images)["probabilities"].numpy()
    return median_rate(run, args.runs)


def serving_rates(args, data_dir: str, meta, stats, work: str, deadline: float | None = None) -> dict:
    """images/s of the exported SavedModel's serving_default on JPEG bytes, per batch size."""
    import tensorflow as tf

    from alexnet_tf import export, run_dir
    from alexnet_tf.model_info import ModelInfo
    from tfrecords import schema

    if deadline is not None and time.monotonic() > deadline:
        return {str(b): skipped(batch=b) for b in args.serving_batches}
    # fc8 is --num_classes wide; the records' classes name its first outputs.
    info = ModelInfo(num_classes=args.num_classes, grouped=args.model == "alexnet", dropout=0.5,
                     classes=meta.classes, mean="image", mean_file=run_dir.MEAN_IMAGE, square_size=stats.square_size)
    say("exporting a float32 SavedModel")
    path = export.export(build_net(args.model, args.num_classes, "float32"), info, stats.mean,
                         os.path.join(work, "saved_model"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    most = max(args.serving_batches)
    jpegs = [schema.parse_example(r)[schema.ENCODED].numpy()
             for r in tf.data.TFRecordDataset(Records(data_dir, meta).shard_paths("train")).take(most)]
    rows = {}
    for batch in args.serving_batches:
        images = tf.constant([jpegs[i % len(jpegs)] for i in range(batch)])
        rows[str(batch)] = measure(f"serving, batch {batch}", lambda: serve_rate(args, serve, images), deadline,
                                   batch=batch)
    return rows
