r"""The build against its own limit, tensorflow-datasets and itself on a Dask cluster, as ratios from one run.

    python -m benchmarks.build                  # part of `make bench`; ~10 minutes on 2 cores
    python -m benchmarks.build --images 500     # a quick look

Four measurements, each the wall time of a whole command (interpreter start
to exit) on the same input, run one after the other on an otherwise idle
machine:

1. **limit** (target >= 0.9; median of 3 alternating runs): `build_tfrecords` with default flags against
   `benchmarks.bare_build` (the same per-image work in one process per core:
   read, decode, convert, scale and crop to 256, encode, colour statistics; no
   Beam, no TensorFlow, no writes) on an ImageNet-shaped sample of 4N images
   (`make_sample --shape=imagenet`: 1000 classes, ImageNet's size mix).
2. **tfds** (target >= 1.5): `build_tfrecords --noresize` (check every image,
   keep the bytes) against tensorflow-datasets' `imagenet2012` builder, which
   also keeps the bytes, on the same 4N images; the default build too.
3. **memory** (target <= 1.1): peak resident memory of the whole process tree
   of `build_tfrecords` at 16M images against M images (the small sample, so
   that 16M stays quick; memory does not depend on the image size).
4. **dask** (target >= 0.9; median of 3 alternating runs): `build_tfrecords
   --runner=DaskRunner` on a dask.distributed cluster of a scheduler and 2
   worker processes (1 thread each) on 127.0.0.1 against the local runner's
   default (all cores), on the same 4N images; peak memory of the driver and
   of each worker. The cluster starts once, before the first run, as a user's
   cluster would already be running.

Writes `benchmarks/results/build.json` (with the CPU's AVX-512 flags, which
change the kernels TensorFlow runs) and prints a Markdown table. Measurements
not selected with `--only` keep their earlier results there, each with the
date and machine it was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from tfrecords import metadata, schema
from benchmarks.dask_cluster import dask_flags, local_cluster
from benchmarks.measure import REPO, machine, run_stage

RESULTS = os.path.join(REPO, "benchmarks", "results")
MEASUREMENTS = ("limit", "tfds", "memory", "dask")


def _last_line(r: dict) -> str:
    with open(r["log"]) as f:
        return f.read().strip().splitlines()[-1]


def run_build(src: str, out: str, *flags: str, stage: str = "build") -> dict:
    """One `build_tfrecords` command: its images, seconds, images/s and peak memory; its output in `<stage>.log`
    beside `out`."""
    r = run_stage(stage, [sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", src,
                          "--output_dir", out, "--overwrite", *flags], os.path.dirname(out))
    with open(os.path.join(out, schema.METADATA_FILE)) as f:
        meta = metadata.Metadata.from_json(json.load(f))
    images = sum(s.num_read for s in meta.splits.values())
    return {"images": images, "seconds": r["seconds"], "images_per_second": images / r["seconds"],
            "peak_rss_mib": r["peak_rss_mib"]}


def imagenet_sample(path: str, images: int) -> dict:
    from pipelines import make_sample

    per_class = max(1, round(images / 1000))
    return make_sample.make_imagenet_sample(path, train_per_class=per_class,
                                            val_images=max(1, per_class * 1000 // 20), progress=lambda _: None)


def limit(src: str, total: int, work: str, repeats: int = 3) -> dict:
    """The pipeline against the bare per-image loop on the ImageNet-shaped sample in `src`.

    The two alternate `repeats` times; the ratio is of the medians (a shared
    machine's speed drifts by 10% from minute to minute).
    """
    bare_runs, ours_runs = [], []
    for _ in range(repeats):
        bare = run_stage("bare", [sys.executable, "-m", "benchmarks.bare_build", src], work)
        if json.loads(_last_line(bare))["images"] != total:
            raise RuntimeError(f"bare loop read {_last_line(bare)}, expected {total} images")
        bare_runs.append(bare)
        ours_runs.append(run_build(src, os.path.join(work, "records-4N")))
        shutil.rmtree(os.path.join(work, "records-4N"), ignore_errors=True)
    bare, ours = _median_run(bare_runs, total), _median_run(ours_runs, total)
    return {"images": total, "bare_loop": bare, "pipeline": ours, "ratio": bare["seconds"] / ours["seconds"]}


def _median_run(runs: list[dict], total: int) -> dict:
    """The median of `runs`' seconds and its images/s, their highest peak memory, and every run's seconds."""
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"seconds": seconds, "images_per_second": total / seconds,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "runs_seconds": [r["seconds"] for r in runs]}


def versus_tfds(src: str, work: str) -> dict:
    """`--noresize` and the default build against the tfds imagenet2012 builder on `src`."""
    noresize = run_build(src, os.path.join(work, "records-noresize"), "--noresize")
    default = run_build(src, os.path.join(work, "records-default"))
    code = (
        "import sys, tensorflow_datasets as tfds\n"
        "b = tfds.builder('imagenet2012', data_dir=sys.argv[2])\n"
        "b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=sys.argv[1]))\n"
    )
    tfds = run_stage("tfds", [sys.executable, "-c", code, src, os.path.join(work, "tfds")], work)
    tfds_rate = noresize["images"] / tfds["seconds"]
    for name in ("records-noresize", "records-default", "tfds"):
        shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    return {
        "images": noresize["images"],
        "noresize": noresize,
        "default": default,
        "tfds": {"seconds": tfds["seconds"], "images_per_second": tfds_rate, "peak_rss_mib": tfds["peak_rss_mib"]},
        "ratio_noresize": noresize["images_per_second"] / tfds_rate,
        "ratio_default": default["images_per_second"] / tfds_rate,
    }


def memory(work: str, images: int, keep_records: str | None = None) -> dict:
    """Peak memory of the build at 16M against M images of the small sample."""
    from pipelines import make_sample

    runs = {}
    for label, n in (("M", images), ("16M", 16 * images)):
        src = os.path.join(work, f"small-{label}")
        make_sample.make_sample(src, train_per_class=max(4, n // 10), val_per_class=max(1, n // 100), quirks=False)
        out = os.path.join(work, f"records-{label}")
        runs[label] = run_build(src, out)
        shutil.rmtree(src, ignore_errors=True)
        if label == "M" and keep_records:
            shutil.rmtree(keep_records, ignore_errors=True)
            shutil.move(out, keep_records)
        shutil.rmtree(out, ignore_errors=True)
    return {**runs, "ratio": runs["16M"]["peak_rss_mib"] / runs["M"]["peak_rss_mib"]}


def on_dask(src: str, total: int, work: str, repeats: int = 3, workers: int = 2) -> dict:
    """The build on DaskRunner (a `workers`-process cluster on 127.0.0.1) against the local runner on `src`.

    The two alternate `repeats` times on the same cluster; the ratio is of the
    medians. Worker memory is each worker's peak (its process tree) over all
    the Dask runs.
    """
    local_runs, dask_runs = [], []
    out = os.path.join(work, "records-dask")
    with local_cluster(n_workers=workers) as cluster:
        for _ in range(repeats):
            local_runs.append(run_build(src, out, stage="local"))
            dask_runs.append(run_build(src, out, *dask_flags(cluster.address), stage="dask"))
            shutil.rmtree(out, ignore_errors=True)
        workers_mib = cluster.peak_rss_mib()
    for r in local_runs + dask_runs:
        if r["images"] != total:
            raise RuntimeError(f"a build read {r['images']} images, expected {total}")
    local, dask = _median_run(local_runs, total), _median_run(dask_runs, total)
    dask["driver_peak_rss_mib"] = dask.pop("peak_rss_mib")  # The build command's process tree: the client.
    dask["worker_peak_rss_mib"] = workers_mib
    return {"images": total, "workers": workers, "local": local, "dask": dask,
            "ratio": local["seconds"] / dask["seconds"]}


def bench(work: str, images: int, memory_images: int, only: set[str], keep_records: str | None = None,
          repeats: int = 3) -> dict:
    result = {}
    if only & {"limit", "tfds", "dask"}:
        src = os.path.join(work, "imagenet-4N")
        sample = imagenet_sample(src, 4 * images)
    if "limit" in only:
        result["limit"] = limit(src, sample["num_train"] + sample["num_val"], work, repeats)
        print(json.dumps({"limit": result["limit"]}), flush=True)
    if "tfds" in only:
        result["tfds"] = versus_tfds(src, work)
        print(json.dumps({"tfds": result["tfds"]}), flush=True)
    if "memory" in only:
        result["memory"] = memory(work, memory_images, keep_records)
        print(json.dumps({"memory": result["memory"]}), flush=True)
    if "dask" in only:
        result["dask"] = on_dask(src, sample["num_train"] + sample["num_val"], work, repeats)
        print(json.dumps({"dask": result["dask"]}), flush=True)
    return result


def table(r: dict) -> str:
    rows = []
    if "limit" in r:
        x = r["limit"]
        rows.append((f"build, 4N={x['images']} ImageNet-shaped: pipeline vs bare loop (img/s)",
                     x["pipeline"]["images_per_second"], x["bare_loop"]["images_per_second"], x["ratio"], ">= 0.9"))
    if "tfds" in r:
        x = r["tfds"]
        rows.append((f"build --noresize, 4N={x['images']}: vs tfds imagenet2012 (img/s)",
                     x["noresize"]["images_per_second"], x["tfds"]["images_per_second"], x["ratio_noresize"],
                     ">= 1.5"))
        rows.append((f"build (resize to 256), 4N={x['images']}: vs tfds (img/s)",
                     x["default"]["images_per_second"], x["tfds"]["images_per_second"], x["ratio_default"], ""))
    if "memory" in r:
        x = r["memory"]
        rows.append((f"build peak memory, 16M={x['16M']['images']} vs M={x['M']['images']} (MiB)",
                     x["16M"]["peak_rss_mib"], x["M"]["peak_rss_mib"], x["ratio"], "<= 1.1"))
    if "dask" in r:
        x = r["dask"]
        rows.append((f"build, 4N={x['images']}: DaskRunner ({x['workers']} workers) vs local runner (img/s)",
                     x["dask"]["images_per_second"], x["local"]["images_per_second"], x["ratio"], ">= 0.9"))
    lines = ["| measure | ours | peer | ratio | target |", "|---|---:|---:|---:|---|"]
    lines += [f"| {n} | {a:.1f} | {p:.1f} | {q:.2f} | {t} |" for n, a, p, q, t in rows]
    if "dask" in r:
        x = r["dask"]
        workers = ", ".join(f"{m:.0f}" for m in x["dask"]["worker_peak_rss_mib"])
        lines.append(f"\nDaskRunner peak memory (MiB): driver {x['dask']['driver_peak_rss_mib']:.0f}, "
                     f"workers {workers}; local runner's whole process tree {x['local']['peak_rss_mib']:.0f}.")
    cpu = r["machine"].get("cpu")
    if cpu:
        yes = {True: "yes", False: "no"}
        lines.append(f"\nCPU: {cpu['model'] or 'unknown'}, {r['machine']['cores']} cores; "
                     f"AVX-512: {yes[cpu['avx512']]}, AVX512_BF16: {yes[cpu['avx512_bf16']]}.")
    return "\n".join(lines)


def merge(previous: dict, result: dict) -> dict:
    """`result` with the measurements it lacks taken from `previous`, each stamped with its own date and machine."""
    kept = {}
    for name in MEASUREMENTS:
        if name in previous and name not in result:
            kept[name] = {"date": previous.get("date"), "machine": previous.get("machine"), **previous[name]}
    return {**result, **kept}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.build", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="N: ImageNet-shaped images (the limit uses 4N).")
    p.add_argument("--memory_images", type=int, default=1000, help="M: small-sample images (and 16M).")
    p.add_argument("--only", default=",".join(MEASUREMENTS), help=f"Comma-separated: {', '.join(MEASUREMENTS)}.")
    p.add_argument("--repeats", type=int, default=3, help="Alternating runs of limit and dask (median taken).")
    p.add_argument("--output", default=os.path.join(RESULTS, "build.json"), help="Where the JSON goes.")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if args.images < 1 or args.memory_images < 10 or args.repeats < 1:
        p.error("--images and --repeats must be >= 1 and --memory_images >= 10")
    if only - set(MEASUREMENTS):
        p.error(f"--only: unknown measurement(s) {', '.join(sorted(only - set(MEASUREMENTS)))}")
    work = tempfile.mkdtemp(prefix="alexnet-bench-build-")
    try:
        result = bench(work, args.images, args.memory_images, only, repeats=args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": machine(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "images": args.images, "memory_images": args.memory_images, **result}
    kept = result
    if os.path.exists(args.output):
        with open(args.output) as f:
            kept = merge(json.load(f), result)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(kept, f, indent=1)
    print(table(result))  # This run's measurements only.


if __name__ == "__main__":
    main()
