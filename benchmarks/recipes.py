r"""The three recipes (`--recipe`) side by side: loss curves, final errors and stall warnings.

    python -m benchmarks.recipes                      # make bench-recipes; about 50 minutes on 2 cores
    python -m benchmarks.recipes --problems=sample --epochs=4

Two generated problems, each recipe trained on each with `python -m
alexnet_tf.train` (one process per run, --seed=0, one device, no figures):

- sample: the embedded 10-class sample (400 training, 100 validation
  images) with the sample preset's batch (16), learning rate (0.001) and no
  dropout, for --epochs epochs, divided by 10 at epoch --epochs - 2: the same
  schedule for all three, so what differs is each recipe's initialisation and
  per-parameter learning rates. --stall_steps is set so that the watch
  checks before the end.
- demo: the sample preset as `make demo` trains it (its own epochs,
  recipe, cuda_convnet2, momentum correction and stall check at step 120):
  does a healthy run stay silent?
- imagenet1000: the ImageNet-shaped sample (all 1000 synsets, ImageNet's
  image sizes, --imagenet_per_class training images a class) at each
  recipe's own learning rate (0.01), batch 32, in "epochs" of
  --imagenet_steps steps with a constant rate: the first steps of a
  1000-class run, where the paper's initialisation is said to stall.

Writes benchmarks/results/recipes.json (every epoch's training loss and
validation errors per run, and any warning the run gave) and prints a
Markdown table. Not a test: nothing here asserts a result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

from alexnet_tf import config as config_lib
from benchmarks.measure import REPO
from tfrecords.folder import Records

RESULTS = os.path.join(REPO, "benchmarks", "results")
RECIPES = ("paper", "caffe", "cuda_convnet2")


def _build(raw: str, out: str, *flags: str) -> None:
    from pipelines import build_tfrecords

    build_tfrecords.run(["--imagenet_dir", raw, "--output_dir", out, "--max_reject_fraction=0.1",
                         "--direct_running_mode=multi_processing", f"--direct_num_workers={os.cpu_count()}", *flags])


def _train(data_dir: str, model_dir: str, flags: list[str]) -> dict:
    cmd = [sys.executable, "-m", "alexnet_tf.train", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
           "--strategy=one_device", "--seed=0", "--nofigures", "--nohistograms", "--log_images=0", "--noexport",
           *flags]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    warnings = [line.split("WARNING: ", 1)[1] for line in r.stderr.splitlines() if "train: WARNING: " in line]
    history_path = os.path.join(model_dir, "history.json")
    history = json.load(open(history_path)) if os.path.exists(history_path) else []
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
    return {
        "command": " ".join(["python -m alexnet_tf.train", *cmd[3:]]).replace(model_dir, "MODEL_DIR"),
        "exit_status": r.returncode, "seconds": round(seconds, 1), "warning": warnings[0] if warnings else None,
        "curve": [{k: h.get(k) for k in ("epoch", "train_loss", "train_top1_error", "val_loss", "val_top1_error",
                                          "val_top5_error", "learning_rate")} for h in history],
    }


def _save(result: dict, path: str) -> None:
    """Written after every run: a long benchmark stopped half-way keeps what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def run(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__.splitlines()[0])
    p.add_argument("--problems", default="sample,demo,imagenet1000")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--epochs", type=int, default=12, help="sample: epochs.")
    p.add_argument("--imagenet_per_class", type=int, default=2, help="imagenet1000: training images a class.")
    p.add_argument("--imagenet_steps", type=int, default=10, help="imagenet1000: steps per 'epoch'.")
    p.add_argument("--imagenet_epochs", type=int, default=6, help="imagenet1000: 'epochs'.")
    p.add_argument("--output", default=os.path.join(RESULTS, "recipes.json"))
    args = p.parse_args(argv)
    problems = args.problems.split(",")
    recipes = args.recipes.split(",")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "command": "python -m benchmarks.recipes " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": {}}
    from pipelines import make_sample

    with tempfile.TemporaryDirectory() as work:
        if "sample" in problems:
            raw = make_sample.make_sample(os.path.join(work, "sample-raw"))["output_dir"]
            data = os.path.join(work, "sample")
            _build(raw, data)
            num_train = Records.open(data).meta.split("train").num_examples
            steps = num_train // config_lib.PRESETS["sample"]["batch_size"] * args.epochs
            for recipe in recipes:
                flags = ["--preset=sample", f"--recipe={recipe}", f"--epochs={args.epochs}",
                         f"--lr_decay_epochs={max(args.epochs - 2, 1)}", f"--stall_steps={max(steps - 24, 1)}"]
                r = _train(data, os.path.join(work, f"sample-{recipe}"), flags)
                result["runs"][f"sample/{recipe}"] = r
                _save(result, args.output)
                print(f"sample/{recipe}: {summary(r)}", flush=True)
        if "demo" in problems:
            if "sample" not in problems:
                raw = make_sample.make_sample(os.path.join(work, "sample-raw"))["output_dir"]
                data = os.path.join(work, "sample")
                _build(raw, data)
            r = _train(data, os.path.join(work, "demo"), ["--preset=sample"])
            name = f"demo/{config_lib.PRESETS['sample']['recipe']}"
            result["runs"][name] = r
            _save(result, args.output)
            print(f"{name}: {summary(r)}", flush=True)
        if "imagenet1000" in problems:
            raw = os.path.join(work, "imagenet-raw")
            make_sample.make_imagenet_sample(raw, train_per_class=args.imagenet_per_class, val_images=200)
            data = os.path.join(work, "imagenet")
            _build(raw, data, "--train_shards=16", "--validation_shards=2")
            for recipe in recipes:
                flags = [f"--recipe={recipe}", "--batch_size=32", f"--steps_per_epoch={args.imagenet_steps}",
                         f"--epochs={args.imagenet_epochs}", "--lr_schedule=step", "--lr_decay_epochs=1000",
                         f"--stall_steps={args.imagenet_steps * (args.imagenet_epochs - 1)}",
                         f"--steps_per_loop={args.imagenet_steps}"]
                r = _train(data, os.path.join(work, f"imagenet-{recipe}"), flags)
                result["runs"][f"imagenet1000/{recipe}"] = r
                _save(result, args.output)
                print(f"imagenet1000/{recipe}: {summary(r)}", flush=True)
    _save(result, args.output)
    print(table(result))
    print(f"wrote {args.output}")
    return result


def _f(x, pct=False) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.1%}" if pct else f"{x:.3f}"


def summary(r: dict) -> str:
    last = r["curve"][-1] if r["curve"] else {}
    return (f"exit {r['exit_status']}, {len(r['curve'])} epochs, loss {_f(last.get('train_loss'))}, "
            f"val top-1 {_f(last.get('val_top1_error'), True)}, {r['seconds']:.0f} s"
            + (", warned" if r["warning"] else ""))


def table(result: dict) -> str:
    lines = ["| problem / recipe | training loss by epoch | final val top-1 | final val top-5 | warned |",
             "|---|---|---:|---:|---|"]
    for name, r in result["runs"].items():
        last = r["curve"][-1] if r["curve"] else {}
        curve = " ".join(_f(c["train_loss"]) for c in r["curve"])
        lines.append(f"| {name} | {curve} | {_f(last.get('val_top1_error'), True)} | "
                     f"{_f(last.get('val_top5_error'), True)} | {'yes' if r['warning'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run()
