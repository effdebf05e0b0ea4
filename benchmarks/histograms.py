r"""Weight histograms for TensorBoard: `tf.summary.histogram` against
training's own `summaries.write_histogram`, over AlexNet's trainable
variables, in one run.

    python -m benchmarks.histograms                    # make bench-histograms; about a minute on 2 cores
    python -m benchmarks.histograms --layers=conv1,fc8  # a part of the network

Each way runs in a child process of its own: it builds AlexNet (the paper's
initialisation, no data), writes one histogram of every trainable variable
of the chosen layers to a scratch log once as a warm-up and then --runs
times, and reports the median seconds and its peak resident memory above
what it held before the first histogram. Both write the same rows (tested in
tests/test_summaries.py). Writes benchmarks/results/histograms-cpu.json. Not a
test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

from benchmarks.measure import REPO, write_result

RESULTS = os.path.join(REPO, "benchmarks", "results")
WAYS = ("tensorboard", "numpy")

CHILD = r"""
import json, resource, statistics, sys, time
import tensorflow as tf
from alexnet_tf import model as model_lib, summaries

way, layers, runs, logdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = model_lib.build_alexnet(1000)
chosen = [v for v in model.trainable_variables if not layers or v.path.split("/")[0] in layers.split(",")]
if not chosen:
    sys.exit(f"no trainable variables in layers {layers!r}")
writer = tf.summary.create_file_writer(logdir)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def once(step):
    with writer.as_default(step=step):
        for v in chosen:
            if way == "tensorboard":
                tf.summary.histogram(v.path, v.value)
            else:
                summaries.write_histogram(v.path, v.numpy())
    writer.flush()


once(0)
times = []
for step in range(1, runs + 1):
    t0 = time.perf_counter()
    once(step)
    times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({"seconds": statistics.median(times), "values": sum(int(v.numpy().size) for v in chosen),
                              "variables": len(chosen), "peak_extra_mb": (peak - base) / 1024}))
"""


def measure(way: str, layers: str, runs: int, logdir: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, way, layers, str(runs), logdir], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks.histograms: the {way} child failed:\n{proc.stderr[-3000:]}")
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def table(r: dict) -> str:
    rows = ["| way | seconds per write of all | peak memory added (MB) |", "|---|---:|---:|"]
    for way, name in (("tensorboard", "`tf.summary.histogram`"), ("numpy", "`summaries.write_histogram`")):
        rows.append(f"| {name} | {r[way]['seconds']:.2f} | {r[way]['peak_extra_mb']:.0f} |")
    rows.append(f"| ratio (tf.summary / ours) | {r['speedup']:.1f}x | {r['memory_ratio']:.1f}x |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.histograms", description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="", help="Comma-separated layer names (default: every layer).")
    p.add_argument("--runs", type=int, default=3, help="Timed repetitions after a warm-up (median).")
    p.add_argument("--out", default=os.path.join(RESULTS, "histograms-cpu.json"))
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    with tempfile.TemporaryDirectory() as work:
        ways = {way: measure(way, args.layers, args.runs, os.path.join(work, way)) for way in WAYS}
    r = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
         "command": "python -m benchmarks.histograms" + (f" --layers={args.layers}" if args.layers else ""),
         "layers": args.layers or "all", "values": ways["numpy"]["values"], **ways,
         "speedup": ways["tensorboard"]["seconds"] / max(ways["numpy"]["seconds"], 1e-9),
         "memory_ratio": ways["tensorboard"]["peak_extra_mb"] / max(ways["numpy"]["peak_extra_mb"], 1.0)}
    write_result(args.out, r, table(r))


if __name__ == "__main__":
    main()
