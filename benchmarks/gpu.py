r"""Training, input and serving throughput on the GPUs present, in one command.

    python -m benchmarks.gpu                          # make bench-gpu
    python -m benchmarks.gpu --data_dir=data     # real records already built
    python -m benchmarks.gpu --allow_cpu --output=/tmp/gpu.json --model=tiny \
        --batches=4 --steps=2 --runs=2 --warmup_steps=1 --serving_batches=1,2   # the code path on a CPU

Measures, under `make_strategy("mirrored")` over every GPU:
1. train_synthetic: training images/s of the paper's grouped AlexNet on
   synthetic uint8 patches and random labels (prefetched onto the device by
   the distributed iterator), in float32, float16 (dynamic loss scaling) and
   float16 with XLA, at each per-replica batch.
2. train_records: the same step (float16 with XLA) fed by the real input
   stream (`input_pipeline.train_dataset`, `preprocessing.finish_batch` in the step). Without
   --data_dir, --images sample images are generated and built into records first.
3. input_stream: images/s of `train_dataset` alone, on every host core.
4. serving: images/s of the exported SavedModel's `serving_default` on JPEG bytes.

Training uses the project's own `train_loop.build_model_and_optimizer` and
`train_loop.TrainLoop`. Each figure is the median of --runs timed calls of
--steps steps, after one warm-up call (compilation). Writes
benchmarks/results/gpu-<count>x-<gpu name>.json and prints a Markdown table.
Without a GPU it says so and exits 0, unless --allow_cpu (then --output is
required). Not a test: the targets are printed, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from tfrecords.folder import Records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
# Rows of train_synthetic: key -> (compute dtype, XLA).
PRECISIONS = {"float32": ("float32", False), "float16": ("float16", False), "float16_xla": ("float16", True)}
RECORDS_PRECISION = "float16_xla"
LABELS = {"float32": "float32", "float16": "float16, loss scaling", "float16_xla": "float16, loss scaling, XLA"}
TARGETS = {
    "train_synthetic": ">= 10,000 img/s on one H100",
    "train_records": ">= 0.9x synthetic with 16 host cores",
}


def say(message: str) -> None:
    """One progress line on stderr."""
    print(f"bench-gpu: {message}", file=sys.stderr, flush=True)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


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


def build_model_and_optimizer(model: str, num_classes: int, strategy, compute_dtype: str):
    """`train_loop.build_model_and_optimizer` with the paper's config; --model=tiny swaps only the network."""
    from alexnet_tf import model as model_lib, recipes, train_loop
    from alexnet_tf.config import TrainConfig

    build = model_lib.build_alexnet if model == "alexnet" else tiny_net
    return train_loop.build_model_and_optimizer(TrainConfig(), num_classes, strategy, compute_dtype, recipes.PAPER,
                                                build=build)


def median_rate(run, runs: int) -> float:
    """Median images/s over `runs` calls of `run()`, which returns the images it processed."""
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        images = run()
        rates.append(images / (time.perf_counter() - start))
    return float(np.median(rates))


def measure(name: str, fn, **fields) -> dict:
    """Measures one row, and goes on past an out-of-memory error.

    Args:
      name: The row, for the progress line.
      fn: Returns the row's images/s.
      **fields: Recorded in the row beside the figure (e.g. global_batch).

    Returns:
      {**fields, "images_per_second": fn()}; out of memory, images_per_second
      is None and "error" says why.
    """
    import keras
    import tensorflow as tf

    say(f"{name} ...")
    try:
        row = {**fields, "images_per_second": fn()}
        say(f"{name}: {row['images_per_second']:,.0f} images/s")
    except tf.errors.ResourceExhaustedError as e:
        row = {**fields, "images_per_second": None, "error": f"out of memory: {e.message.splitlines()[0][:300]}"}
        say(f"{name}: {row['error']}")
    keras.backend.clear_session()
    gc.collect()
    return row


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


def train_rate(args, strategy, compute_dtype: str, jit: bool, global_batch: int, dataset_fn, stats) -> float:
    """Median training images/s of `train_loop.TrainLoop` fed by `dataset_fn(context)`.

    Args:
      args: The parsed flags (model, num_classes, warmup_steps, steps, runs).
      strategy: The tf.distribute strategy the model is built and run under.
      compute_dtype: "float32" or "float16" (mixed, with dynamic loss scaling).
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


def serving_rates(args, data_dir: str, meta, stats, work: str) -> dict:
    """images/s of the exported SavedModel's serving_default on JPEG bytes, per batch size."""
    import tensorflow as tf

    from alexnet_tf import export
    from tfrecords import schema

    info = {"num_classes": args.num_classes, "classes": [c.to_json() for c in meta.classes],
            "square_size": stats.square_size}
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
        rows[str(batch)] = measure(f"serving, batch {batch}", lambda: serve_rate(args, serve, images), batch=batch)
    return rows


# ---------------------------------------------------------------------------
# Report.


def _fmt(rate: float | None, error: str | None = None) -> str:
    return f"{rate:,.0f}" if rate is not None else f"null ({(error or 'not measured').split(':')[0]})"


def table(r: dict) -> str:
    """The README's Markdown table of a result."""
    head = ("| measure | compute | batch / replica | global batch | images/s | real / synthetic | limited by "
            "| target |")
    lines = [head, "|" + "---|" * 8]
    syn, rec, inp = r["train_synthetic"], r["train_records"], r["input_stream"]
    for key, rows in syn.items():
        for b, row in rows.items():
            target = TARGETS["train_synthetic"] if key == RECORDS_PRECISION else ""
            lines.append(f"| train, synthetic data | {LABELS[key]} | {b} | {row['global_batch']} | "
                         f"{_fmt(row['images_per_second'], row.get('error'))} | | | {target} |")
    for key, rows in rec.items():
        for b, row in rows.items():
            real, fake, alone = row["images_per_second"], syn[key][b]["images_per_second"], \
                inp[b]["images_per_second"]
            ratio, limit = "", ""
            if real is not None and fake is not None:
                ratio = f"{real / fake:.2f}x"
            if fake is not None and alone is not None:
                side = "input stream" if alone < fake else r["device"]["kind"]
                limit = f"{side} (input alone {alone:,.0f} vs synthetic {fake:,.0f} img/s)"
            lines.append(f"| train, real records | {LABELS[key]} | {b} | {row['global_batch']} | "
                         f"{_fmt(real, row.get('error'))} | {ratio} | {limit} | {TARGETS['train_records']} |")
    for b, row in inp.items():
        lines.append(f"| input stream alone ({r['host_cores']} host cores) | uint8 | {b} | {row['global_batch']} | "
                     f"{_fmt(row['images_per_second'], row.get('error'))} | | | |")
    for b, row in r["serving"].items():
        lines.append(f"| serving_default, JPEG bytes | float32 | {b} | {b} | "
                     f"{_fmt(row['images_per_second'], row.get('error'))} | | | |")
    d = r["device"]
    where = f"{d['count']}x {d['name']}" if d["count"] else "CPU (no GPU)"
    lines.append(f"\n{where}, TensorFlow {r['tensorflow']}, {r['host_cores']} host cores, "
                 f"{r['replicas']} replica(s), model {r['model']}, {r['steps']} steps x {r['runs']} runs (median).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Driver.


def _batches(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive comma-separated integers, got {text!r}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=None, help="Built records for the real-data rows (default: generate).")
    p.add_argument("--images", type=int, default=5000, help="Training images to generate without --data_dir.")
    p.add_argument("--batches", type=_batches, default=[128, 256], help="Per-replica training batch sizes.")
    p.add_argument("--serving_batches", type=_batches, default=[1, 64], help="Serving batch sizes.")
    p.add_argument("--steps", type=int, default=20, help="Steps (batches, serving calls) per timed run.")
    p.add_argument("--runs", type=int, default=5, help="Timed runs per row; the median is reported.")
    p.add_argument("--warmup_steps", type=int, default=5, help="Steps of the untimed first run (compilation).")
    p.add_argument("--num_classes", type=int, default=1000, help="Width of fc8 (the paper: 1000).")
    p.add_argument("--shuffle_buffer", type=int, default=10_000, help="Records in the input stream's shuffle buffer.")
    p.add_argument("--model", choices=("alexnet", "tiny"), default="alexnet",
                   help="tiny: a two-layer stand-in, to test the code path on a CPU.")
    p.add_argument("--allow_cpu", action="store_true", help="Without a GPU, run on the CPU instead of stopping.")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/gpu-<n>x-<gpu>.json; "
                   "required on the CPU, and then outside benchmarks/results).")
    args = p.parse_args(argv)
    if min(args.steps, args.runs, args.warmup_steps) < 1:
        p.error("--steps, --runs and --warmup_steps must be at least 1")
    return p, args


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    import tensorflow as tf

    from alexnet_tf import distribute, input_pipeline, preprocessing
    from tfrecords import metadata

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.allow_cpu:
        print("bench-gpu: no GPU found; nothing measured, nothing written (--allow_cpu runs it on the CPU).")
        return 0
    if gpus:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "gpu")
        output = args.output or os.path.join(RESULTS, f"gpu-{len(gpus)}x-{slug(name)}.json")
    else:
        name = "CPU"
        if not args.output or os.path.abspath(args.output).startswith(RESULTS + os.sep):
            parser.error("on the CPU, --output is required and must lie outside benchmarks/results")
        output = args.output
    strategy = distribute.make_strategy("mirrored")
    replicas = strategy.num_replicas_in_sync
    say(f"{len(gpus) or 'no'} GPU(s) ({name}), {replicas} replica(s), {os.cpu_count()} host cores")

    work = tempfile.mkdtemp(prefix="bench-gpu-")
    try:
        data_dir = args.data_dir or make_records(work, args.images)
        meta = metadata.load_metadata(data_dir)
        if meta.num_classes > args.num_classes:
            parser.error(f"{data_dir} has {meta.num_classes} classes, more than --num_classes={args.num_classes}")
        stats = preprocessing.ColorStats.from_records(Records(data_dir, meta))
        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": {"kind": "GPU" if gpus else "CPU", "name": name, "count": len(gpus)},
            "tensorflow": tf.__version__, "host_cores": os.cpu_count(), "replicas": replicas,
            "per_replica_batches": args.batches, "steps": args.steps, "runs": args.runs,
            "warmup_steps": args.warmup_steps, "model": args.model, "num_classes": args.num_classes,
            "data": {"data_dir": args.data_dir or "generated",
                     "train_images": meta.split("train").num_examples},
            "targets": TARGETS,
            "train_synthetic": {}, "train_records": {}, "input_stream": {}, "serving": {},
        }

        def records_fn(global_batch):
            return lambda context: input_pipeline.train_dataset(Records(data_dir, meta), stats, global_batch, context, shuffle_buffer=args.shuffle_buffer)

        def synthetic_fn(global_batch):
            return lambda context: synthetic_dataset(global_batch, context, stats, args.num_classes)

        for per_replica in args.batches:
            gb = per_replica * replicas
            for key, (dtype, jit) in PRECISIONS.items():
                result["train_synthetic"].setdefault(key, {})[str(per_replica)] = measure(
                    f"train, synthetic, {key}, batch {per_replica}/replica",
                    lambda: train_rate(args, strategy, dtype, jit, gb, synthetic_fn(gb), stats), global_batch=gb)
            dtype, jit = PRECISIONS[RECORDS_PRECISION]
            result["train_records"].setdefault(RECORDS_PRECISION, {})[str(per_replica)] = measure(
                f"train, records, {RECORDS_PRECISION}, batch {per_replica}/replica",
                lambda: train_rate(args, strategy, dtype, jit, gb, records_fn(gb), stats), global_batch=gb)
            result["input_stream"][str(per_replica)] = measure(
                f"input stream alone, batch {gb}", lambda: stream_rate(args, data_dir, meta, stats, gb),
                global_batch=gb)
        result["serving"] = serving_rates(args, data_dir, meta, stats, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    say(f"wrote {output}")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
