r"""The build on a dask.distributed cluster (Beam's DaskRunner) against the local runner: same bytes, both times.

    python -m benchmarks.cluster_build                  # `make cluster-build`; a few minutes on 2 cores
    python -m benchmarks.cluster_build --images 8000    # more images

Makes an ImageNet-shaped sample (`make_sample --shape=imagenet`: 1000 classes,
ImageNet's size mix) of about --images images, builds it with the local
runner, starts a scheduler and --workers workers on 127.0.0.1
(`benchmarks/dask_cluster.py`), builds it again on them with
`--runner=DaskRunner`, and compares the two datasets as
`python -m pipelines.verify_tfrecords --same_as` does. Prints both times and
images/s side by side; exits 1 if the datasets differ or a build fails.
Writes benchmarks/results/cluster-build.json.

The same by hand, in three terminals (a real cluster: the scheduler's host
instead of 127.0.0.1, a worker command on each machine, this project installed
on every one, and the input and output folders on storage they all reach):

    dask scheduler --host 127.0.0.1 --port 8786 --no-dashboard
    dask worker tcp://127.0.0.1:8786 --nworkers 2 --nthreads 1 --host 127.0.0.1 --no-dashboard
    python -m pipelines.build_tfrecords --imagenet_dir=/data/ILSVRC2012 --output_dir=/data/tfrecords \
        --runner=DaskRunner --dask_client_address=tcp://127.0.0.1:8786
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

from benchmarks.build import imagenet_sample, run_build
from benchmarks.dask_cluster import ClusterError, dask_flags, local_cluster
from benchmarks.measure import REPO, machine, write_result
from pipelines import verify_tfrecords

# The build's summary counts the worker processes that wrote shards ("  workers: 2 processes on 1 host wrote
# ..."); builds before DaskRunner support say nothing. Not "the Dask cluster at ...: 2 workers", which counts
# the workers there before the build.
_WORKERS = re.compile(r"^\s*workers?\s*[:=]\s*(\d+)", re.IGNORECASE | re.MULTILINE)


def workers_in_summary(output: str) -> int | None:
    """The number of workers a build's output says took part, or None when it does not say."""
    m = _WORKERS.search(output)
    return None if m is None else int(m.group(1))


def compare_builds(work: str, images: int, workers: int, shard_flags: list[str]) -> dict:
    """Builds one sample locally and on a local cluster in `work`; returns both measurements and the differences."""
    src = os.path.join(work, "imagenet")
    imagenet_sample(src, images)
    local_out, dask_out = os.path.join(work, "records-local"), os.path.join(work, "records-dask")
    local = run_build(src, local_out, *shard_flags, stage="local")
    with local_cluster(workers, log_dir=os.path.join(work, "cluster")) as cluster:
        dask = run_build(src, dask_out, *shard_flags, *dask_flags(cluster.address), stage="dask")
        dask["workers_peak_rss_mib"] = cluster.peak_rss_mib()
    with open(os.path.join(work, "dask.log")) as f:
        dask["workers_in_summary"] = workers_in_summary(f.read())
    differences, files = verify_tfrecords.compare(dask_out, local_out)
    return {"local": local, "dask": dask, "files": files, "differences": differences}


def table(r: dict) -> str:
    local, dask = r["local"], r["dask"]
    workers = " + ".join(f"{m:.0f}" for m in dask["workers_peak_rss_mib"])
    lines = ["| runner | seconds | images/s | peak MiB (driver; workers) |", "|---|---:|---:|---|",
             f"| local | {local['seconds']:.1f} | {local['images_per_second']:.1f} | {local['peak_rss_mib']:.0f} |",
             f"| DaskRunner, {r['workers']} local workers | {dask['seconds']:.1f} | {dask['images_per_second']:.1f} "
             f"| {dask['peak_rss_mib']:.0f}; {workers} |"]
    said = dask["workers_in_summary"]
    lines.append(f"\nworkers that took part, as the DaskRunner build's summary says: {'not said' if said is None else said}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster_build", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000,
                   help="Training images of the ImageNet-shaped sample (rounded to a multiple of 1000 classes), "
                        "plus 5%% for validation.")
    p.add_argument("--workers", type=int, default=2, help="Worker processes of the local cluster (1 thread each).")
    p.add_argument("--train_shards", type=int, default=12)
    p.add_argument("--validation_shards", type=int, default=4)
    p.add_argument("--work_dir", default=None, help="Where the sample, builds and logs go (default: a temporary "
                                                    "folder, removed at the end).")
    p.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "cluster-build.json"))
    args = p.parse_args(argv)
    if args.images < 1 or args.workers < 1:
        p.error("--images and --workers must be >= 1")
    work = args.work_dir or tempfile.mkdtemp(prefix="alexnet-cluster-build-")
    os.makedirs(work, exist_ok=True)
    shard_flags = [f"--train_shards={args.train_shards}", f"--validation_shards={args.validation_shards}"]
    try:
        r = compare_builds(work, args.images, args.workers, shard_flags)
    except ClusterError as e:
        print(f"cluster_build: error: {str(e).splitlines()[0]}", file=sys.stderr)
        print(f"cluster_build: logs kept in {work}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # A failed stage: "stage dask failed (...), exit 1:", then its log's tail.
        lines = str(e).strip().splitlines()
        print(f"cluster_build: error: {lines[0].split(' (')[0]}: {lines[-1]}", file=sys.stderr)
        print(f"cluster_build: logs kept in {work}", file=sys.stderr)
        return 1
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": machine(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "workers": args.workers,
              "train_shards": args.train_shards, "validation_shards": args.validation_shards,
              "same": not r["differences"], **r}
    write_result(args.output, result, table(result))
    if r["differences"]:
        for line in r["differences"][:50]:
            print(f"cluster_build: differs: {line}", file=sys.stderr)
        print(f"cluster_build: error: the DaskRunner build differs from the local one in "
              f"{len(r['differences'])} places", file=sys.stderr)
        return 1
    print(f"cluster_build: same dataset on both runners ({r['files']} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
