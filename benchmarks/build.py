r"""The build against its own limit and against tensorflow-datasets, as ratios from one run.

    python -m benchmarks.build                  # part of `make bench`; ~10 minutes on 2 cores
    python -m benchmarks.build --images 500     # a quick look

Three measurements, each the wall time of a whole command (interpreter start
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

Writes `benchmarks/results/build.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from alexnet_tf import records
from benchmarks.measure import REPO, run_stage

RESULTS = os.path.join(REPO, "benchmarks", "results")


def _last_line(r: dict) -> str:
    with open(r["log"]) as f:
        return f.read().strip().splitlines()[-1]


def run_build(src: str, out: str, *flags: str, stage: str = "build") -> dict:
    """One `build_tfrecords` command: its images, seconds, images/s and peak memory; its output in `<stage>.log`
    beside `out`."""
    r = run_stage(stage, [sys.executable, "-m", "pipelines.build_tfrecords", "--imagenet_dir", src,
                          "--output_dir", out, "--overwrite", *flags], os.path.dirname(out))
    with open(os.path.join(out, records.METADATA_FILE)) as f:
        meta = records.Metadata.from_json(json.load(f))
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
    bare_s = statistics.median(r["seconds"] for r in bare_runs)
    ours_s = statistics.median(r["seconds"] for r in ours_runs)
    return {
        "images": total,
        "bare_loop": {"seconds": bare_s, "images_per_second": total / bare_s,
                      "peak_rss_mib": max(r["peak_rss_mib"] for r in bare_runs),
                      "runs_seconds": [r["seconds"] for r in bare_runs]},
        "pipeline": {"seconds": ours_s, "images_per_second": total / ours_s,
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in ours_runs),
                     "runs_seconds": [r["seconds"] for r in ours_runs]},
        "ratio": bare_s / ours_s,
    }


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


def bench(work: str, images: int, memory_images: int, only: set[str], keep_records: str | None = None) -> dict:
    result = {}
    if only & {"limit", "tfds"}:
        src = os.path.join(work, "imagenet-4N")
        sample = imagenet_sample(src, 4 * images)
    if "limit" in only:
        result["limit"] = limit(src, sample["num_train"] + sample["num_val"], work)
        print(json.dumps({"limit": result["limit"]}), flush=True)
    if "tfds" in only:
        result["tfds"] = versus_tfds(src, work)
        print(json.dumps({"tfds": result["tfds"]}), flush=True)
    if "memory" in only:
        result["memory"] = memory(work, memory_images, keep_records)
        print(json.dumps({"memory": result["memory"]}), flush=True)
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
    lines = ["| measure | ours | peer | ratio | target |", "|---|---:|---:|---:|---|"]
    lines += [f"| {n} | {a:.1f} | {p:.1f} | {q:.2f} | {t} |" for n, a, p, q, t in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.build", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="N: ImageNet-shaped images (the limit uses 4N).")
    p.add_argument("--memory_images", type=int, default=1000, help="M: small-sample images (and 16M).")
    p.add_argument("--only", default="limit,tfds,memory", help="Comma-separated: limit, tfds, memory.")
    args = p.parse_args(argv)
    if args.images < 1 or args.memory_images < 10:
        p.error("--images must be >= 1 and --memory_images >= 10")
    import psutil

    work = tempfile.mkdtemp(prefix="alexnet-bench-build-")
    try:
        result = bench(work, args.images, args.memory_images, set(args.only.split(",")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": {"cores": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30,
                          "platform": platform.platform()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "images": args.images, "memory_images": args.memory_images, **result}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "build.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))


if __name__ == "__main__":
    main()
