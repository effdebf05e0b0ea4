r"""The input stream's speed in a fixed order and in none, side by side; and the cost of a resume.

    python -m benchmarks.input_determinism                    # builds a sample of 2,000 images first
    python -m benchmarks.input_determinism --data_dir=data

`input_pipeline.train_dataset` with a seed, iterated on the host without a
model: `deterministic=False` (results handed on as they finish) against
`deterministic=True` (the parallel interleave and map hand results on in a
fixed order: what training uses, with or without --deterministic). Both draw
each record's augmentation from its own stateless seed. Alternating runs, the
median counts; target: deterministic >= 0.9x.

A resumed epoch skips the records already trained on before decoding them:
the skip rate is records skipped per second (the extra time to the first
batch with `skip` records, over `skip`); the epoch of ImageNet's 1,281,167
images, skipped whole, costs 1,281,167 / rate seconds at worst.
Writes benchmarks/results/input-determinism.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import tensorflow as tf

from alexnet_tf import input_pipeline, preprocessing
from tfrecords import metadata
from benchmarks import gpu
from tfrecords.folder import Records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stream_rate(data_dir: str, meta: dict, stats, deterministic: bool, batch: int, steps: int) -> float:
    ds = input_pipeline.train_dataset(Records(data_dir, meta), stats, batch, seed=0, deterministic=deterministic)
    iterator = iter(ds)
    for _ in range(5):  # Fill the buffers.
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch / (time.perf_counter() - start)


def first_batch_seconds(data_dir: str, meta: dict, stats, batch: int, skip: int) -> float:
    start = time.perf_counter()
    next(iter(input_pipeline.train_dataset(Records(data_dir, meta), stats, batch, seed=0, skip=skip)))
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.input_determinism", description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=None, help="Records to read (default: build a clean sample first).")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", type=int, default=20_000, help="Records a resumed stream skips.")
    p.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "input-determinism.json"))
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as work:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = gpu.make_records(work, args.images)
        meta = metadata.load_metadata(data_dir)
        stats = preprocessing.ColorStats.from_records(Records(data_dir, meta))
        runs = {"nondeterministic": [], "deterministic": []}
        for i in range(args.repeats):
            for name in runs:
                runs[name].append(stream_rate(data_dir, meta, stats, name == "deterministic", args.batch, args.steps))
            print(f"run {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()),
                  flush=True)
        skips = []
        for _ in range(args.repeats):
            extra = (first_batch_seconds(data_dir, meta, stats, args.batch, args.skip)
                     - first_batch_seconds(data_dir, meta, stats, args.batch, 0))
            skips.append(args.skip / max(extra, 1e-9))
    median = {k: statistics.median(v) for k, v in runs.items()}
    ratio = median["deterministic"] / median["nondeterministic"]
    print(f"input stream images/s: nondeterministic {median['nondeterministic']:.0f}, "
          f"deterministic {median['deterministic']:.0f}: {ratio:.2f}x (target >= 0.9x)")
    skip_rate = statistics.median(skips)
    print(f"resume: {skip_rate:.0f} records skipped per second; a whole ImageNet epoch "
          f"(1,281,167 records) in {1_281_167 / skip_rate:.0f} s at worst")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"cpus": os.cpu_count(), "tensorflow": tf.__version__, "batch": args.batch, "steps": args.steps,
                   "runs": runs, "images_per_second": median, "ratio": ratio, "target": ">= 0.9",
                   "skip": args.skip, "skip_records_per_second": skips, "skip_rate_median": skip_rate,
                   "imagenet_epoch_skip_seconds": 1_281_167 / skip_rate}, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
