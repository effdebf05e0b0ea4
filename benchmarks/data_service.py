r"""The input stream through the tf.data service against the local stream, as ratios from one run.

    python -m benchmarks.data_service                     # make bench-service (and make bench); ~1 minute on 2 cores
    python -m benchmarks.data_service --data_dir=data

Three streams of the same training batches (`crop_for_train` on every record,
batches of --batch), read as fast as this process can take them, no model:

1. local: `input_pipeline.train_dataset`, the trainer's own stream, on this host;
2. service, 1 worker and 2 workers: the same per-record work done by
   `python -m alexnet_tf.data_service worker` processes on this host, sent
   over gRPC on loopback (`input_pipeline.train_dataset` with `service`, over --passes
   passes of the records so that one job is long enough to time).

Each figure is the median of --runs timed windows of --batches batches after
--warmup batches. For the service, the worker processes' CPU time over the
window gives images per worker CPU-second, i.e. images/s per service core:
what sizes a service cluster (cores per GPU = a GPU's training images/s /
images/s per core). Writes benchmarks/results/data-service.json and prints a
Markdown table. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.measure import REPO
from tfrecords.folder import Records

RESULTS = os.path.join(REPO, "benchmarks", "results")


def _sample_records(work: str, per_class: int) -> str:
    from pipelines import build_tfrecords, make_sample

    src = make_sample.make_sample(os.path.join(work, "raw"), train_per_class=per_class, val_per_class=1)
    out = os.path.join(work, "records")
    # The sample holds one truncated JPEG on purpose: a small sample may reject more than 1%.
    build_tfrecords.run(["--imagenet_dir", src["output_dir"], "--output_dir", out, "--max_reject_fraction=0.1",
                         "--direct_running_mode=multi_processing", f"--direct_num_workers={os.cpu_count()}"])
    return out


def _window(iterator, batch: int, batches: int, procs) -> dict:
    """Images/s of `batches` batches, and the CPU seconds the service workers
    (`procs`) and this reading process spent meanwhile."""
    import psutil

    cpu = lambda ps: sum(sum(p.cpu_times()[:2]) for p in ps)  # noqa: E731 (user + system)
    me = [psutil.Process()]
    w0, r0, t0 = cpu(procs), cpu(me), time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - t0
    return {"images_per_second": batch * batches / seconds, "worker_cpu_seconds": cpu(procs) - w0,
            "reader_cpu_seconds": cpu(me) - r0, "images": batch * batches}


def _measure(make_iterator, batch: int, args, procs=()) -> dict:
    iterator = make_iterator()
    for _ in range(args.warmup):
        next(iterator)
    windows = [_window(iterator, batch, args.batches, procs) for _ in range(args.runs)]
    rate = statistics.median(w["images_per_second"] for w in windows)
    images = sum(w["images"] for w in windows)
    out = {"images_per_second": rate, "windows": windows,
           "reader_cpu_ms_per_image": 1000 * sum(w["reader_cpu_seconds"] for w in windows) / images}
    if procs:
        cpu = sum(w["worker_cpu_seconds"] for w in windows)
        out["images_per_worker_cpu_second"] = images / max(cpu, 1e-9)
    return out


def bench(data_dir: str, work: str, batch: int, args) -> dict:
    import psutil

    from alexnet_tf import data_service, input_pipeline as ip, preprocessing
    from tfrecords import metadata

    meta = metadata.load_metadata(data_dir)
    stats = preprocessing.ColorStats.from_records(Records(data_dir, meta))
    result = {"batch": batch, "train_records": meta.split("train").num_examples,
              "local": _measure(lambda: iter(ip.train_dataset(Records(data_dir, meta), stats, batch, shuffle_buffer=1000)),
                                batch, args)}

    def service_stream(address: str, job: str):
        return iter(ip.train_dataset(Records(data_dir, meta), stats, batch, seed=1, shuffle_buffer=1000,
                                     service=address, job_name=job, passes=args.passes))

    for n in (1, 2):
        with data_service.LocalService(work, workers=n) as svc:
            procs = [psutil.Process(p.pid) for p in svc.workers]
            result[f"service_{n}_workers"] = _measure(lambda: service_stream(svc.address, f"bench-{n}"), batch,
                                                      args, procs)
        result[f"ratio_service_{n}_workers_vs_local"] = (
            result[f"service_{n}_workers"]["images_per_second"] / result["local"]["images_per_second"])
    result["images_per_second_per_service_core"] = max(
        result[f"service_{n}_workers"]["images_per_worker_cpu_second"] for n in (1, 2))
    result["cores_per_gpu"] = cores_per_gpu(result["images_per_second_per_service_core"])
    return result


def cores_per_gpu(per_core: float, results: str = RESULTS) -> list[dict]:
    """Service cores to feed one GPU at the training rates `make bench-gpu` has recorded
    (its synthetic-input step: the GPU's own limit), the best batch of each precision."""
    rows = []
    for path in sorted(glob.glob(os.path.join(results, "gpu-*.json"))):
        with open(path) as f:
            gpu = json.load(f)
        count = max(int(gpu.get("device", {}).get("count") or 1), 1)
        for precision, by_batch in (gpu.get("train_synthetic") or {}).items():
            rates = [r["images_per_second"] for r in by_batch.values() if r.get("images_per_second")]
            if rates:
                rate = max(rates) / count
                rows.append({"source": os.path.basename(path), "precision": precision,
                             "gpu_images_per_second": rate, "service_cores": rate / per_core})
    return rows


def table(r: dict) -> str:
    local = r["local"]["images_per_second"]
    lines = ["| stream | images/s | vs local | images/s per service worker core | reader CPU ms/image |",
             "|---|---:|---:|---:|---:|",
             f"| local (`train_dataset`, this process) | {local:.0f} | 1.00 | | "
             f"{r['local']['reader_cpu_ms_per_image']:.2f} |"]
    for n in (1, 2):
        s = r[f"service_{n}_workers"]
        lines.append(f"| tf.data service, {n} worker{'s' if n > 1 else ''} | {s['images_per_second']:.0f} | "
                     f"{r[f'ratio_service_{n}_workers_vs_local']:.2f} | {s['images_per_worker_cpu_second']:.0f} | "
                     f"{s['reader_cpu_ms_per_image']:.2f} |")
    per_core = r["images_per_second_per_service_core"]
    lines.append(f"\nservice cores per GPU = the GPU's training images/s / {per_core:.0f}")
    for row in r["cores_per_gpu"]:
        lines.append(f"- {row['source']} {row['precision']}: {row['gpu_images_per_second']:.0f} images/s per GPU "
                     f"-> {row['service_cores']:.1f} cores")
    m = r["machine"]
    lines.append(f"\nmachine: {m['cores']} cores, {m['platform']}; batch {r['batch']}, "
                 f"{r['train_records']} training records")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_service", description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=None, help="Records to read (default: a generated sample is built).")
    p.add_argument("--per_class", type=int, default=60, help="Generated sample: training images per class.")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=60, help="Batches per timed window.")
    p.add_argument("--warmup", type=int, default=5, help="Batches before the first window.")
    p.add_argument("--runs", type=int, default=3, help="Timed windows; the median counts.")
    p.add_argument("--passes", type=int, default=40, help="Passes over the records in the service's one job.")
    p.add_argument("--output", default=os.path.join(RESULTS, "data-service.json"))
    return p


def run(argv=()) -> dict:
    """Measures with the command's flags (`argv`); writes --output and returns the result."""
    args = _parser().parse_args(list(argv))
    need = (args.warmup + args.batches * args.runs) * args.batch
    work = tempfile.mkdtemp(prefix="bench-service-")
    try:
        data_dir = args.data_dir or _sample_records(work, args.per_class)
        from tfrecords import metadata

        available = metadata.load_metadata(data_dir).split("train").num_examples * args.passes
        if available < need * 1.2:
            sys.exit(f"benchmarks.data_service: the service's job holds {available} images, the windows need "
                     f"{need}: raise --passes")
        result = {"machine": {"cores": os.cpu_count(), "platform": platform.platform()},
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  **bench(data_dir, work, args.batch, args)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> None:
    print(table(run(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
