r"""What TensorBoard's figures (`--figures`, on by default) cost per epoch, against the epoch itself, in one run.

    python -m benchmarks.figures                       # make bench-figures; about 3 minutes on 2 cores
    python -m benchmarks.figures --data_dir=data

On the embedded sample (built here unless --data_dir is given) with the
sample preset, one process:

1. trains 2 epochs without figures and takes the second epoch's training
   time (steps x batch / its images/s);
2. evaluates the validation split with the plain sums and with the
   per-class sums the figures add (median of --runs each, after a warm-up);
3. draws the figures as an epoch end does (conv1's kernels, the fixed
   images' top-5 and fc7 neighbours, over a pool of --figure_pool images)
   and writes them to a scratch TensorBoard log (median of --runs).

Prints the figures' share of an epoch (training + validation) and writes
benchmarks/results/figures-cpu.json. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from benchmarks.measure import REPO, write_result

RESULTS = os.path.join(REPO, "benchmarks", "results")


def _sample_records(work: str) -> str:
    from pipelines import build_tfrecords, make_sample

    src = make_sample.make_sample(os.path.join(work, "raw"))
    out = os.path.join(work, "records")
    build_tfrecords.run(["--imagenet_dir", src["output_dir"], "--output_dir", out,
                         "--direct_running_mode=in_memory", "--direct_num_workers=1"])
    return out


def _median_seconds(fn, runs: int) -> float:
    fn()  # Warm-up: tracing, file caches.
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(data_dir: str, work: str, runs: int, figure_pool: int) -> dict:
    import tensorflow as tf

    from alexnet_tf import config as config_lib, evaluation, summaries as summaries_lib, trainer

    config = config_lib.TrainConfig(**{**config_lib.PRESETS["sample"], "data_dir": data_dir, "epochs": 2,
                                       "figures": False, "export": False, "histograms": False, "log_images": 0,
                                       "verbose": False, "seed": 0, "figure_pool": figure_pool})
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    result = trainer.train_and_evaluate(config, os.path.join(work, "run"), strategy)
    last = result.history[-1]
    data = trainer.read_data(config, strategy)
    train_s = data.steps_per_epoch * config.batch_size / last["images_per_second"]

    def evaluator(per_class):
        return evaluation.Evaluator(result.model, strategy, data.records, data.stats, config.batch_size,
                                    per_class=per_class)

    plain, per_class = evaluator(False), evaluator(True)
    eval_s = _median_seconds(lambda: plain.evaluate("validation"), runs)
    eval_per_class_s = _median_seconds(lambda: per_class.evaluate("validation"), runs)

    t0 = time.perf_counter()
    summaries = summaries_lib.Summaries(os.path.join(work, "figures"), True, result.model,
                                        config_lib.TrainConfig(**{**vars(config), "figures": True}), data)
    setup_s = time.perf_counter() - t0
    scores = per_class.evaluate("validation")
    pc = scores.pop("per_class")
    epoch_result = {**last, **{f"val_{k}": v for k, v in scores.items()}}
    step = iter(range(10**6))
    figures_s = _median_seconds(lambda: summaries.epoch(next(step), epoch_result, pc), runs)
    # The same writes without the figures: what the figures add is the difference.
    summaries.fixed, summaries.config = None, config
    without_s = _median_seconds(lambda: summaries.epoch(next(step), epoch_result, None), runs)
    summaries.close()

    added = (eval_per_class_s - eval_s) + (figures_s - without_s)
    epoch_s = train_s + eval_s
    return {
        "train_images_per_epoch": data.steps_per_epoch * config.batch_size,
        "validation_images": data.records.meta.split("validation").num_examples,
        "figure_pool": len(summaries.fixed.labels) if summaries.fixed else min(
            figure_pool, data.records.meta.split("validation").num_examples),
        "train_epoch_seconds": train_s,
        "validation_seconds": eval_s,
        "validation_with_per_class_seconds": eval_per_class_s,
        "figures_seconds": figures_s - without_s,
        "fixed_images_setup_seconds": setup_s,
        "added_seconds_per_epoch": added,
        "share_of_epoch": added / epoch_s,
    }


def table(r: dict) -> str:
    return "\n".join([
        "| per epoch, sample preset | seconds |",
        "|---|---:|",
        f"| training ({r['train_images_per_epoch']} images) | {r['train_epoch_seconds']:.1f} |",
        f"| validation ({r['validation_images']} images), plain sums | {r['validation_seconds']:.2f} |",
        f"| validation with per-class sums | {r['validation_with_per_class_seconds']:.2f} |",
        f"| figures: kernels, top-5, fc7 neighbours over {r['figure_pool']} images, written | "
        f"{r['figures_seconds']:.2f} |",
        f"| **added by --figures** | **{r['added_seconds_per_epoch']:.2f} ({r['share_of_epoch']:.1%} of the "
        "epoch)** |",
        f"| once per run: reading the fixed images | {r['fixed_images_setup_seconds']:.2f} |",
    ])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.figures", description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=None, help="Records (default: the embedded sample, built here).")
    p.add_argument("--runs", type=int, default=3, help="Timed repetitions of each measurement (median).")
    p.add_argument("--figure_pool", type=int, default=500)
    p.add_argument("--out", default=os.path.join(RESULTS, "figures-cpu.json"))
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    with tempfile.TemporaryDirectory() as work:
        data_dir = args.data_dir or _sample_records(work)
        r = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
             "command": "python -m benchmarks.figures", **bench(data_dir, work, args.runs, args.figure_pool)}
    write_result(args.out, r, table(r))


if __name__ == "__main__":
    main()
