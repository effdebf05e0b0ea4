r"""Training, input and serving throughput on the GPUs present, in one command.

    python -m benchmarks.gpu                          # make bench-gpu
    python -m benchmarks.gpu --data_dir=data     # real records already built
    python -m benchmarks.gpu --allow_cpu --output=/tmp/gpu.json --model=tiny --matmul_n=256 \
        --batches=4 --steps=2 --runs=2 --warmup_steps=1 --serving_batches=1,2   # the code path on a CPU
    python -m benchmarks.gpu --render=/tmp/gpu.json --copy_to=DIR   # the table of a result; copied under its name

Measures, under `make_strategy("mirrored")` over every GPU (`benchmarks/gpu_rows.py`):
0. matmul: a bfloat16 --matmul_n^2 matmul's TFLOP/s, the peak each training
   figure's model FLOPs utilisation (MFU) is stated against.
1. train_synthetic: training images/s of the paper's grouped AlexNet on
   synthetic uint8 patches and random labels (prefetched onto the device by
   the distributed iterator), in float32, float16 (dynamic loss scaling) and
   bfloat16, each with and without XLA, at each per-replica batch. The fastest
   at the largest batch is the run's best precision.
2. train_records: the same step in the best precision fed by the real input
   stream (`input_pipeline.train_dataset`, `preprocessing.finish_batch` in the
   step), against the synthetic rate. Without --data_dir, --images sample images
   are generated and built into records first.
3. input_stream: images/s of `train_dataset` alone, on every host core; per
   core, and against the training step's synthetic rate.
4. train_split: the best precision on --split logical GPUs of each card
   (`--gpu_split`, MirroredStrategy), in a child process (logical devices are
   made before TensorFlow starts).
5. serving: images/s of the exported SavedModel's `serving_default` on JPEG bytes.

Each figure is the median of --runs timed calls of --steps steps, after one
warm-up call (compilation). With --budget_s, rows not started by then are
recorded as skipped; the JSON is rewritten after every row, so a run stopped
from outside keeps what it measured. Writes
benchmarks/results/gpu-<count>x-<gpu name>.json and prints a Markdown table.
Without a GPU it says so and exits 0, unless --allow_cpu (then --output is
required). Not a test: the targets are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import gpu_report, gpu_rows
from benchmarks.gpu_report import DEFAULT_BEST, PRECISIONS, TARGETS
from benchmarks.gpu_rows import measure, say
from tfrecords.folder import Records

REPO = gpu_report.REPO
RESULTS = os.path.join(REPO, "benchmarks", "results")


def write_json(path: str, result: dict) -> None:
    """Writes `result` to `path` whole (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def best_precision(synthetic: dict) -> str:
    """The precision with the highest synthetic rate at the largest batch it was measured at."""
    best, key_of_best = (0, 0.0), DEFAULT_BEST
    for key, rows in synthetic.items():
        for batch, row in rows.items():
            if row["images_per_second"] is not None and (int(batch), row["images_per_second"]) > best:
                best, key_of_best = (int(batch), row["images_per_second"]), key
    return key_of_best


def add_mfu(result: dict) -> None:
    """Each training row's model FLOPs utilisation against the measured matmul rate."""
    peak = (result.get("matmul") or {}).get("tflops")
    tables = [result.get("train_synthetic", {}), result.get("train_records", {}),
              result.get("train_split", {}).get("rows", {})]
    for rows in (rows for t in tables for rows in t.values()):
        for row in rows.values():
            rate = row["images_per_second"]
            row["mfu"] = rate * result["flops_per_train_image"] / (peak * 1e12) if rate and peak else None


def failed_rows(result: dict) -> list[str]:
    """The rows whose measurement raised an error other than running out of memory or time, by path."""
    found = []

    def walk(node, path):
        if isinstance(node, dict) and "images_per_second" in node:
            if str(node.get("error", "")).startswith("failed"):
                found.append("/".join(path))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, path + [key])

    walk({k: result.get(k, {}) for k in ("train_synthetic", "train_split", "train_records", "input_stream",
                                          "serving")}, [])
    return found


def split_rows(args, data_dir: str, precisions: list[str], work: str, deadline: float | None) -> dict:
    """The training rows on --split logical GPUs per card, measured by a child process of this command."""
    out = os.path.join(work, "split.json")
    left = int(deadline - time.monotonic()) if deadline is not None else 0
    if deadline is not None and left < 1:
        return {"gpu_split": args.split,
                "rows": {k: {str(b): gpu_rows.skipped(global_batch=None) for b in args.batches} for k in precisions}}
    command = [sys.executable, "-m", "benchmarks.gpu", "--split_child", f"--gpu_split={args.split}",
               f"--precisions={','.join(precisions)}", f"--data_dir={data_dir}", f"--output={out}",
               f"--batches={','.join(map(str, args.batches))}", f"--steps={args.steps}", f"--runs={args.runs}",
               f"--warmup_steps={args.warmup_steps}", f"--model={args.model}", f"--num_classes={args.num_classes}",
               f"--budget_s={left}"] + (["--allow_cpu"] if args.allow_cpu else [])
    say(f"the rows on {args.split} logical GPUs per card, in a child process")
    code = subprocess.run(command, cwd=REPO, stdout=sys.stderr).returncode
    error = {"global_batch": None, "images_per_second": None, "error": f"failed: the child process exited {code}"}
    rows = {k: {str(b): dict(error) for b in args.batches} for k in precisions}
    if not os.path.exists(out):
        return {"gpu_split": args.split, "rows": rows}
    with open(out) as f:  # Rewritten after every row: what a child that died had measured.
        child = json.load(f)
    for key, measured in child["train_synthetic"].items():
        rows[key].update(measured)
    return {"gpu_split": args.split, "replicas": child["replicas"], "rows": rows}


def render(path: str, copy_to: str | None) -> int:
    """Prints the table of the result at `path`; with `copy_to`, writes it there too (gpu-table.md),
    beside a copy of the result under its benchmarks/results name."""
    with open(path) as f:
        result = json.load(f)
    text = gpu_report.table(result)
    if copy_to:
        os.makedirs(copy_to, exist_ok=True)
        target = os.path.join(copy_to, gpu_report.result_file_name(result))
        if os.path.abspath(target) != os.path.abspath(path):
            shutil.copyfile(path, target)
        with open(os.path.join(copy_to, "gpu-table.md"), "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def _batches(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive comma-separated integers, got {text!r}")
    return values


def _precisions(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in PRECISIONS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(PRECISIONS)}, got {text!r}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=None, help="Built records for the real-data rows (default: generate).")
    p.add_argument("--images", type=int, default=5000, help="Training images to generate without --data_dir.")
    p.add_argument("--batches", type=_batches, default=[128, 256], help="Per-replica training batch sizes.")
    p.add_argument("--precisions", type=_precisions, default=list(PRECISIONS),
                   help=f"Rows of train_synthetic, comma-separated (default all: {','.join(PRECISIONS)}).")
    p.add_argument("--serving_batches", type=_batches, default=[1, 64], help="Serving batch sizes.")
    p.add_argument("--steps", type=int, default=20, help="Steps (batches, serving calls) per timed run.")
    p.add_argument("--runs", type=int, default=5, help="Timed runs per row; the median is reported.")
    p.add_argument("--warmup_steps", type=int, default=5, help="Steps of the untimed first run (compilation).")
    p.add_argument("--num_classes", type=int, default=0, help="Width of fc8 (default: the records' classes).")
    p.add_argument("--shuffle_buffer", type=int, default=10_000, help="Records in the input stream's shuffle buffer.")
    p.add_argument("--model", choices=("alexnet", "tiny"), default="alexnet",
                   help="tiny: a two-layer stand-in, to test the code path on a CPU.")
    p.add_argument("--matmul_n", type=int, default=8192, help="Side of the bfloat16 matmul MFU is measured against.")
    p.add_argument("--split", type=int, default=2, help="Logical GPUs per card of the train_split rows (1: none).")
    p.add_argument("--budget_s", type=int, default=0, help="Seconds after which no row is started (0: no limit).")
    p.add_argument("--allow_cpu", action="store_true", help="Without a GPU, run on the CPU instead of stopping.")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/gpu-<n>x-<gpu>.json; "
                   "required on the CPU, and then outside benchmarks/results).")
    p.add_argument("--render", default=None, metavar="JSON", help="Print the table of this result and stop.")
    p.add_argument("--copy_to", default=None, help="With --render: copy the result into this folder, named as "
                   "benchmarks/results names it.")
    p.add_argument("--split_child", action="store_true", help=argparse.SUPPRESS)  # split_rows' child process.
    p.add_argument("--gpu_split", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.num_classes < 0:
        p.error("--num_classes must be 0 (the records' classes) or more")
    if min(args.steps, args.runs, args.warmup_steps, args.matmul_n, args.split) < 1:
        p.error("--steps, --runs, --warmup_steps, --matmul_n and --split must be at least 1")
    if args.budget_s < 0:
        p.error("--budget_s must be 0 (no limit) or more")
    if args.copy_to and not args.render:
        p.error("--copy_to goes with --render")
    return p, args


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    if args.render:
        return render(args.render, args.copy_to)
    import tensorflow as tf

    from alexnet_tf import distribute, input_pipeline, preprocessing
    from tfrecords import metadata

    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.allow_cpu:
        print("bench-gpu: no GPU found; nothing measured, nothing written (--allow_cpu runs it on the CPU).")
        return 0
    if not gpus and (not args.output or os.path.abspath(args.output).startswith(RESULTS + os.sep)):
        parser.error("on the CPU, --output is required and must lie outside benchmarks/results")
    # Without a GPU, one CPU device, and the split rows mirror over --split of them (as over a card's logical GPUs).
    strategy = distribute.make_strategy("mirrored", cpu_devices=args.gpu_split, gpu_split=args.gpu_split)
    replicas = strategy.num_replicas_in_sync
    result = {**gpu_report.environment(gpus, tf), "replicas": replicas}
    output = args.output or os.path.join(RESULTS, gpu_report.result_file_name({**result, "model": args.model}))
    say(f"{len(gpus) or 'no'} GPU(s) ({result['device']['name']}), {replicas} replica(s), "
        f"{os.cpu_count()} host cores")

    work = tempfile.mkdtemp(prefix="bench-gpu-")
    try:
        data_dir = args.data_dir or gpu_rows.make_records(work, args.images)
        meta = metadata.load_metadata(data_dir)
        args.num_classes = args.num_classes or meta.num_classes
        if meta.num_classes > args.num_classes:
            parser.error(f"{data_dir} has {meta.num_classes} classes, more than --num_classes={args.num_classes}")
        stats = preprocessing.ColorStats.from_records(Records(data_dir, meta))
        result.update({
            "per_replica_batches": args.batches, "steps": args.steps, "runs": args.runs,
            "warmup_steps": args.warmup_steps, "model": args.model, "num_classes": args.num_classes,
            "budget_s": args.budget_s or None,
            "data": {"data_dir": args.data_dir or "generated", "train_images": meta.split("train").num_examples},
            "targets": TARGETS, "flops_per_train_image": gpu_rows.train_flops_per_image(args.model, args.num_classes),
            "train_synthetic": {}, "train_records": {}, "input_stream": {}, "train_split": {}, "serving": {},
        })

        def save():
            add_mfu(result)
            write_json(output, result)

        def records_fn(global_batch):
            return lambda context: input_pipeline.train_dataset(Records(data_dir, meta), stats, global_batch, context,
                                                                shuffle_buffer=args.shuffle_buffer)

        def synthetic_fn(global_batch):
            return lambda context: gpu_rows.synthetic_dataset(global_batch, context, stats, args.num_classes)

        def train_row(name, key, per_replica, dataset_fn):
            dtype, jit = PRECISIONS[key]
            gb = per_replica * replicas
            return measure(f"train, {name}, {key}, batch {per_replica}/replica",
                           lambda: gpu_rows.train_rate(args, strategy, dtype, jit, gb, dataset_fn(gb), stats),
                           deadline, global_batch=gb)

        if not args.split_child:
            matmul = measure(f"bfloat16 {args.matmul_n}^2 matmul", lambda: gpu_rows.matmul_tflops(args.matmul_n),
                             deadline, unit="TFLOP/s")
            result["matmul"] = {"dtype": "bfloat16", "n": args.matmul_n, "tflops": matmul.pop("images_per_second"),
                                **matmul}
        for per_replica in args.batches:
            for key in args.precisions:
                result["train_synthetic"].setdefault(key, {})[str(per_replica)] = train_row(
                    "synthetic", key, per_replica, synthetic_fn)
                save()
        if args.split_child:
            return 0
        best = result["best_precision"] = best_precision(result["train_synthetic"])
        for per_replica in args.batches:
            gb, b = per_replica * replicas, str(per_replica)
            result["train_records"].setdefault(best, {})[b] = row = train_row("records", best, per_replica,
                                                                             records_fn)
            synthetic = result["train_synthetic"].get(best, {}).get(b, {}).get("images_per_second")
            row["vs_synthetic"] = row["images_per_second"] / synthetic if row["images_per_second"] and synthetic \
                else None
            result["input_stream"][b] = row = measure(
                f"input stream alone, batch {gb}", lambda: gpu_rows.stream_rate(args, data_dir, meta, stats, gb),
                deadline, global_batch=gb)
            rate = row["images_per_second"]
            row["images_per_second_per_core"] = rate / os.cpu_count() if rate else None
            row["vs_train_synthetic"] = rate / synthetic if rate and synthetic else None
            save()
        if args.split > 1:
            result["train_split"] = split_rows(args, data_dir, [best], work, deadline)
            save()
        result["serving"] = gpu_rows.serving_rates(args, data_dir, meta, stats, work, deadline)
        save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["cuda_libraries"] = gpu_report.cuda_libraries()
    save()
    say(f"wrote {output}")
    print(gpu_report.table(result))
    failed = failed_rows(result)
    if failed:
        say(f"{len(failed)} row(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
