#!/usr/bin/env bash
# Everything measured on a GPU machine, in one command, into one folder.
#
#   bash benchmarks/gpu_run.sh OUT_DIR         # make gpu-run OUT=OUT_DIR
#   bash .gpukit/device.sh run -- bash benchmarks/gpu_run.sh "$OUT"   # on the GPU machine, through the GPU kit
#   bash benchmarks/gpu_run.sh --cpu OUT_DIR   # the same steps with tiny settings on the CPU (or GPU_RUN_CPU=1)
#
# The steps, in order. Each one's stdout and stderr go to OUT_DIR/<step>.log; its exit status,
# seconds and budget to OUT_DIR/steps.json (and a line of OUT_DIR/summary.txt); a failing step
# does not stop the later ones. The script exits 0 only when every step did.
#   gpucheck   python3 .gpukit/gpucheck.py: the GPU kit's check (GPU visible, kernels against the
#              CPU, XLA, mixed precision, MirroredStrategy on 2 logical GPUs, a bf16 matmul's TFLOP/s);
#              where the kit is absent, a line says so (status 0)
#   gpu_tests  python -m pytest -m gpu -q
#   records    the ImageNet-shaped sample (all 1000 classes, ImageNet's image sizes) generated and
#              built into records with every core (build_tfrecords' default); with DATA_DIR set,
#              those records are used and nothing is built
#   bench      python -m benchmarks.gpu on those records into OUT_DIR/gpu.json (its rows: the
#              docstring of benchmarks/gpu.py); the JSON is rewritten after every row
#   report     the Markdown table (OUT_DIR/gpu-table.md) and the result under the name
#              benchmarks/results gives it (OUT_DIR/gpu-<n>x-<gpu>.json), from OUT_DIR/gpu.json
#
# Budget on the GPU machine, seconds (a command may run 600 there; device.sh's start takes some):
#   gpucheck 75 + gpu_tests 90 + records 80 + bench 300 + report 20 = 565
# Each step runs under `timeout` at its budget (exit 124: it ran out; the process group is killed
# 15 s later). benchmarks.gpu starts no row after --budget_s = bench's budget - 50 (a row
# compiles AlexNet, up to ~30 s, and serving exports a SavedModel), so it still writes its JSON.
# In CPU mode the budgets are the same; the steps take seconds (records ~25 s on 2 cores).
#
# Environment: PYTHON (default python3; device.sh puts the kit's Python first on PATH),
# GPUCHECK (default .gpukit/gpucheck.py), DATA_DIR (records to use: no records step build),
# COMMIT (recorded in the JSON where the checkout was copied without .git), GPU_RUN_CPU=1 (--cpu),
# STEPS (the steps to run, default all: "gpucheck gpu_tests records bench report"; e.g. STEPS=bench
# to measure again on a machine that went cold after the tests).
set -uo pipefail

CPU=${GPU_RUN_CPU:-0}
if [ "${1:-}" = --cpu ]; then CPU=1; shift; fi
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: bash benchmarks/gpu_run.sh [--cpu] OUT_DIR" >&2
  exit 2
fi
STEPS=" ${STEPS:-gpucheck gpu_tests records bench report} "
for s in $STEPS; do
  case $s in gpucheck|gpu_tests|records|bench|report) ;; *) echo "gpu_run: unknown step $s in STEPS" >&2; exit 2;; esac
done
wants() { [[ $STEPS == *" $1 "* ]]; }
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || { echo "gpu_run: no Python at PYTHON=$PYTHON" >&2; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || { echo "gpu_run: cannot make the output folder $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
GPUCHECK=${GPUCHECK:-$REPO/.gpukit/gpucheck.py}
cd "$REPO" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-run.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export COMMIT=${COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || true)}

if [ "$CPU" = 1 ]; then
  GPUCHECK_ARGS=(--allow_cpu --matmul_n=256)
  SAMPLE_ARGS=(--train_per_class=1 --val_images=50)
  BENCH_ARGS=(--allow_cpu --model=tiny --matmul_n=256 --batches=4 --steps=2 --runs=2 --warmup_steps=1
              --serving_batches=1,2 --images=40)
else
  GPUCHECK_ARGS=()
  SAMPLE_ARGS=(--train_per_class=3 --val_images=300)
  BENCH_ARGS=(--steps=10 --runs=3 --warmup_steps=3 --images=2000)  # --images: only without records
fi
BENCH_BUDGET=300

: > "$OUT/steps.tsv"
: > "$OUT/summary.txt"
FAILED=0

# step NAME BUDGET COMMAND...: runs COMMAND under timeout, output into NAME.log, status into steps.tsv.
step() {
  local name=$1 budget=$2 start=$SECONDS status
  shift 2
  echo "gpu_run: $name (budget ${budget} s): $*" >&2
  timeout --kill-after=15 "$budget" "$@" > "$OUT/$name.log" 2>&1
  status=$?
  record "$name" "$status" "$((SECONDS - start))" "$budget" "$([ "$status" = 124 ] && echo "timed out")"
}

# record NAME STATUS SECONDS BUDGET NOTE
record() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUT/steps.tsv"
  printf '%-10s exit %-3s %4s s of %4s s  %s\n' "$@" | tee -a "$OUT/summary.txt" >&2
  [ "$2" = 0 ] || FAILED=$((FAILED + 1))
}

# 1. The kit's own check.
if ! wants gpucheck; then :
elif [ -f "$GPUCHECK" ]; then
  step gpucheck 75 "$PYTHON" "$GPUCHECK" "${GPUCHECK_ARGS[@]}"
else
  echo "gpucheck: $GPUCHECK is absent (the GPU kit's prepare.sh makes .gpukit/); nothing checked" \
    | tee "$OUT/gpucheck.log" >&2
  record gpucheck 0 0 75 absent
fi

# 2. The suite's GPU tests (skipped where TensorFlow sees no GPU).
wants gpu_tests && step gpu_tests 90 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider

# 3. Records from the ImageNet-shaped sample, built on this machine.
if ! wants records; then :
elif [ -n "${DATA_DIR:-}" ]; then
  echo "records: using DATA_DIR=$DATA_DIR; nothing built" > "$OUT/records.log"
  record records 0 0 80 "DATA_DIR given"
else
  step records 80 bash -c '"$0" -m pipelines.make_sample --shape=imagenet --output_dir="$1/raw" "${@:3}" &&
    "$0" -m pipelines.build_tfrecords --imagenet_dir="$1/raw" --output_dir="$1/records" \
      --train_shards=64 --validation_shards=8 && echo "records: built with $2 cores"' \
    "$PYTHON" "$WORK" "$(nproc)" "${SAMPLE_ARGS[@]}"
  [ -f "$WORK/records/metadata.json" ] && DATA_DIR=$WORK/records
fi

# 4. The measurements (without records, benchmarks.gpu generates a small sample of its own).
wants bench && step bench "$BENCH_BUDGET" "$PYTHON" -m benchmarks.gpu "${BENCH_ARGS[@]}" --budget_s=$((BENCH_BUDGET - 50)) \
  --output="$OUT/gpu.json" ${DATA_DIR:+--data_dir="$DATA_DIR"}

# 5. The table and the result under its benchmarks/results name.
if ! wants report; then :
elif [ -f "$OUT/gpu.json" ]; then
  step report 20 "$PYTHON" -m benchmarks.gpu --render="$OUT/gpu.json" --copy_to="$OUT"
else
  echo "report: no $OUT/gpu.json (see bench.log)" > "$OUT/report.log"
  record report 1 0 20 "no gpu.json"
fi

# steps.json from steps.tsv (names and notes are plain words).
{
  echo "{\"cpu_mode\": $([ "$CPU" = 1 ] && echo true || echo false), \"steps\": ["
  sep=""
  while IFS=$'\t' read -r name status seconds budget note; do
    printf '%s {"name": "%s", "status": %s, "seconds": %s, "budget_s": %s, "note": "%s"}' \
      "$sep" "$name" "$status" "$seconds" "$budget" "$note"
    sep=$',\n'
  done < "$OUT/steps.tsv"
  printf '\n], "failed": %s}\n' "$FAILED"
} > "$OUT/steps.json"
rm -f "$OUT/steps.tsv"
echo "gpu_run: $FAILED step(s) failed; everything is in $OUT" >&2
[ "$FAILED" = 0 ]
