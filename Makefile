# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DATA ?= data
RUN ?= runs/demo

.PHONY: install demo test test-all bench bench-build bench-service bench-figures bench-histograms bench-recipes bench-loop bench-gpu gpu-run cluster-build rehearsal clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# Builds the embedded sample's records, verifies them, and trains AlexNet on them
# from scratch under --strategy=mirrored: every GPU, or one CPU replica without
# GPUs (two logical CPU replicas on 2 cores train about a fifth slower; the
# tests run that path).
# Ends with the time it took (the install before it not counted) and where to look next.
demo: $(STAMP)
	@start=$$(date +%s) && set -x && \
	$(PY) -m pipelines.build_tfrecords --output_dir=$(DATA) --overwrite && \
	$(PY) -m pipelines.verify_tfrecords --data_dir=$(DATA) && \
	rm -rf $(RUN) && \
	$(PY) -m alexnet_tf.train --preset=sample --strategy=mirrored --cpu_devices=1 \
		--data_dir=$(DATA) --model_dir=$(RUN) && \
	{ set +x; } 2>/dev/null && \
	echo "demo: build, verify and training took $$(( $$(date +%s) - start )) s. Next:" && \
	echo "  $(VENV)/bin/tensorboard --logdir $(RUN)/tensorboard      # curves, Figures 3 and 4" && \
	echo "  $(PY) -m alexnet_tf.evaluate --model_dir=$(RUN) --data_dir=$(DATA) --report=reports/demo" && \
	echo "  $(PY) -m alexnet_tf.predict --saved_model=$(RUN)/saved_model IMAGE.jpg"

test: $(STAMP)
	$(PY) -m pytest -q --durations=10

# Side-by-side measurements (not tests); torch is the peer. The pinned CPU wheel
# avoids pulling a multi-GB CUDA build; override TORCH to taste.
TORCH ?= torch==2.13.0
bench: $(STAMP)
	$(PY) -m pip install --quiet '$(TORCH)' psutil
	$(PY) -m benchmarks.run

# The build alone: against the same per-image work in a bare loop (target >= 0.9 at
# 4N), --noresize against tensorflow-datasets (>= 1.5), peak memory at 16M vs M, the
# DaskRunner on 2 local workers vs the local runner (>= 0.9); BENCH_BUILD='--only dask'.
bench-build: $(STAMP)
	$(PY) -m pip install --quiet psutil
	$(PY) -m benchmarks.build $(BENCH_BUILD)

# The input stream through the tf.data service (1 and 2 local workers) against the
# local stream, and images/s per service core; benchmarks/results/data-service.json.
bench-service: $(STAMP)
	$(PY) -m pip install --quiet psutil
	$(PY) -m benchmarks.data_service $(BENCH_SERVICE)

# What TensorBoard's figures (--figures) add to an epoch of the sample preset;
# benchmarks/results/figures-cpu.json.
bench-figures: $(STAMP)
	$(PY) -m benchmarks.figures $(BENCH_FIGURES)

# TensorBoard's weight histograms: tf.summary.histogram against the trainer's own, side by side.
bench-histograms: $(STAMP)
	$(PY) -m benchmarks.histograms $(BENCH_HISTOGRAMS)

# The three --recipe values trained side by side on the sample and on a 1000-class
# ImageNet-shaped sample: loss curves, final errors, stall warnings;
# benchmarks/results/recipes.json. About 50 minutes on 2 cores.
bench-recipes: $(STAMP)
	$(PY) -m benchmarks.recipes $(BENCH_RECIPES)

# The training loop's own overhead on CPU: ours against a bare tf.function loop.
bench-loop: $(STAMP)
	$(PY) -m benchmarks.loop

# Training, input and serving images/s on the GPUs present (TensorFlow must see them:
# pip install -e '.[cuda]'); writes benchmarks/results/gpu-<n>x-<gpu>.json and prints a
# Markdown table. Without a GPU it says so and stops.
bench-gpu: $(STAMP)
	$(PY) -m benchmarks.gpu

# Everything measured on a GPU machine in one command (benchmarks/gpu_run.sh: the kit's check, the
# gpu tests, records built there, bench-gpu, its table), each step's log and exit status in
# $(OUT); about 9.5 minutes at most. On the GPU machine, through the GPU kit (docs/performance.md):
#   bash .gpukit/device.sh run -- make gpu-run OUT=$OUT
OUT ?= gpu-run
gpu-run: $(STAMP)
	PYTHON=$(PY) bash benchmarks/gpu_run.sh $(OUT)

# The build on a local dask.distributed cluster (a scheduler and 2 workers on 127.0.0.1, Beam's
# DaskRunner) against the local runner: the two datasets must be byte-identical (exit 1 otherwise);
# both times side by side; benchmarks/results/cluster-build.json. About a minute and a half on 2 cores;
# CLUSTER_BUILD='--images 8000' for more.
CLUSTER_BUILD ?=
cluster-build: $(STAMP)
	$(PY) -m pip install --quiet psutil
	$(PY) -m benchmarks.cluster_build $(CLUSTER_BUILD)

# The whole chain at ImageNet's shape (1000 synsets, ImageNet's image sizes, the
# default shard counts): sample -> build -> verify -> train -> evaluate -> export
# -> serve, one table row per stage; benchmarks/results/rehearsal.json. About 11
# minutes on 2 cores; REHEARSAL='--train_per_class=40 --steps=500' scales it up.
REHEARSAL ?=
rehearsal: $(STAMP)
	$(PY) -m pip install --quiet psutil
	$(PY) -m benchmarks.rehearsal $(REHEARSAL)

test-all: $(STAMP)
	$(PY) -m pytest -q -m '' --durations=10

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
