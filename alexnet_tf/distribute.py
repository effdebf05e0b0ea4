"""Strategies, logical devices, the chief (and its lines on the console), and the compute precision.

Logical devices (`cpu_devices`, `gpu_split`) can only be made before TensorFlow
initialises its devices, so `make_strategy` is the first TensorFlow call of a run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import tensorflow as tf

STRATEGIES = ("mirrored", "one_device", "multi_worker")
# Of each physical GPU's memory, the share `gpu_split` hands to its logical GPUs;
# the rest is left for CUDA's own context and libraries.
GPU_SPLIT_MEMORY_SHARE = 0.9


def say(chief: bool, message: str) -> None:
    """One line about the run on stderr (from the chief only)."""
    if chief:
        print(f"train: {message}", file=sys.stderr, flush=True)


def use_deterministic_ops() -> None:
    """Two runs of one config (and seed) add their floats in the same order."""
    # Deterministic kernels where an op has several (cuDNN's convolutions,
    # GPU reductions); raises on an op that has no deterministic one.
    tf.config.experimental.enable_op_determinism()
    # Grappler's arithmetic optimizer regroups chains of float additions
    # (the weight-decay and loss gradients, the replicas' all-reduce) in an
    # order that follows the graph's construction, and the replicas of
    # MirroredStrategy are traced concurrently, in threads: two runs would
    # then add in different orders and differ in the last bits.
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})


def configure_cpu_devices(n: int) -> None:
    """Splits the CPU into n logical devices; must run before TensorFlow initialises."""
    cpus = tf.config.list_physical_devices("CPU")
    configured = tf.config.get_logical_device_configuration(cpus[0])
    if configured:
        if len(configured) < n:
            raise RuntimeError(f"TensorFlow already runs with {len(configured)} logical CPUs, fewer than {n}")
        return
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)


def gpu_memory_mib(index: int) -> int | None:
    """Total memory of physical GPU `index` in MiB, from nvidia-smi (None where it is missing)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        return int(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def configure_gpu_split(n: int, memory_mib: int = 0) -> int:
    """Splits every physical GPU into n logical GPUs of equal memory.

    The mirrored path (replicas, all-reduce between them) then runs on one
    card. Must run before TensorFlow initialises its devices.

    Args:
      n: Logical GPUs per physical GPU (1: leave them whole).
      memory_mib: Memory of each logical GPU; 0 divides 90% of the card's
        memory (read with nvidia-smi) between them.

    Returns:
      The number of logical GPUs made.
    """
    if n < 1:
        raise ValueError(f"gpu_split must be at least 1, got {n}")
    gpus = tf.config.list_physical_devices("GPU")
    if n == 1 or not gpus:
        return len(gpus)
    for i, gpu in enumerate(gpus):
        per = memory_mib
        if not per:
            total = gpu_memory_mib(i)
            if total is None:
                raise RuntimeError(f"cannot read the memory of GPU {i} (no nvidia-smi); "
                                   "give --gpu_split_memory_mb")
            per = int(total * GPU_SPLIT_MEMORY_SHARE) // n
        tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=per)] * n)
    return len(gpus) * n


def make_strategy(name: str, cpu_devices: int = 2, gpu_split: int = 1, gpu_split_memory_mb: int = 0):
    """Returns the tf.distribute strategy called `name`.

    `mirrored` uses all visible GPUs (each split into `gpu_split` logical GPUs);
    without GPUs it mirrors over `cpu_devices` logical CPU devices, so the
    multi-device code path runs (and is tested) on CPU.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus and gpu_split > 1:
        configure_gpu_split(gpu_split, gpu_split_memory_mb)
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        if gpus:
            if gpu_split > 1:
                # NCCL refuses two ranks on one physical GPU; copy to one device and back.
                return tf.distribute.MirroredStrategy(cross_device_ops=tf.distribute.ReductionToOneDevice())
            return tf.distribute.MirroredStrategy()
        configure_cpu_devices(cpu_devices)
        devices = [f"/cpu:{i}" for i in range(cpu_devices)]
        # NCCL is GPU-only; gather to one device for CPU replicas.
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if "TF_CONFIG" not in os.environ:
        raise ValueError("--strategy=multi_worker needs TF_CONFIG (cluster and task) in the environment")
    return tf.distribute.MultiWorkerMirroredStrategy()


def task(strategy) -> tuple[str | None, int]:
    """(task type, task id) of this process in a multi-worker job, or (None, 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None, 0
    return resolver.task_type, resolver.task_id or 0


def is_chief(strategy) -> bool:
    """True on the one task that writes checkpoints, summaries and the export."""
    task_type, task_id = task(strategy)
    if task_type is None or task_type == "chief":
        return True
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def uses_gpus(strategy) -> bool:
    """True if the strategy's replicas run on GPUs (the default strategy: if this process has one)."""
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # The default strategy has no devices of its own: ops go to the first GPU, if any.
        return bool(tf.config.list_logical_devices("GPU"))
    return any("GPU" in d.upper() for d in devices)


def cpu_has_bfloat16() -> bool:
    """True if the CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere it is emulated, and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(mixed_precision: str, strategy) -> str:
    """The compute dtype a --mixed_precision setting means on the strategy's devices.

    `auto` (the default) is float16 with dynamic loss scaling on GPUs, where
    every generation from Volta on has float16 tensor cores; bfloat16 on CPUs
    that compute it natively; float32 (the paper) on other CPUs, where bfloat16
    is emulated and several times slower than float32.
    """
    if mixed_precision == "off":
        return "float32"
    if mixed_precision == "auto":
        if uses_gpus(strategy):
            return "float16"
        return "bfloat16" if cpu_has_bfloat16() else "float32"
    if mixed_precision in ("float16", "bfloat16"):
        return mixed_precision
    raise ValueError(f"mixed_precision must be off, auto, float16 or bfloat16, got {mixed_precision!r}")


def num_workers(strategy) -> int:
    """Worker processes (chief included) of a multi-worker job; 1 otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    cluster = resolver.cluster_spec().as_dict()
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def worker_index(strategy) -> int:
    """This process's place among the workers: the chief is 0."""
    task_type, task_id = task(strategy)
    if task_type in (None, "chief"):
        return 0
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return task_id + (1 if "chief" in cluster else 0)


def all_workers(strategy, values) -> np.ndarray:
    """Every worker's `values` (int64, one row per worker, the chief's first).

    One collective all-reduce: each worker fills its own row of a zero matrix
    on each of its replicas, the sum is divided by the replicas per worker.
    Every worker must call it at the same point. Without several workers it
    returns this process's row alone.
    """
    row = np.asarray(values, np.int64).reshape(-1)
    n = num_workers(strategy)
    if n == 1:
        return row[None]
    table = np.zeros((n, row.size), np.int64)
    table[worker_index(strategy)] = row
    per_replica = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(table))
    total = strategy.reduce("SUM", per_replica, axis=None).numpy()
    return total // len(strategy.extended.worker_devices)


class RunConflict(ValueError):
    """This process cannot join the run it was started into (another run's
    checkpoint, or workers that see different runs)."""


def _fingerprint(value) -> int:
    """A 56-bit hash of a value's repr: the same on every machine and Python version."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:7], "little")


def check_workers_agree(strategy, facts: dict, draw=()) -> tuple[int, ...]:
    """Stops every worker of a multi-worker run whose workers do not see the same run;
    returns the chief's `draw`.

    Args:
      facts: Name -> value (any value with a stable repr): what must be equal
        on every worker. Compared by hash in one collective; nothing to do
        with a single worker.
      draw: Non-negative integers below 2**52 each worker drew (a seed, a run's
        identity), of which every worker takes the chief's, in the same collective.

    Raises:
      RunConflict: On every worker, naming each fact that differs, the workers
        that differ from the chief, and this worker's value.
    """
    names = list(facts)
    rows = all_workers(strategy, [_fingerprint(facts[n]) for n in names] + list(draw))
    chief_draw = tuple(int(v) for v in rows[0, len(names):])
    if len(rows) == 1:
        return chief_draw
    differ = []
    for j, name in enumerate(names):
        others = [i for i in range(1, len(rows)) if rows[i, j] != rows[0, j]]
        if others:
            differ.append(f"{name} (workers {', '.join(map(str, others))} differ from the chief; "
                          f"worker {worker_index(strategy)} has {facts[name]!r})")
    if differ:
        raise RunConflict(
            "the workers do not see the same run: " + "; ".join(differ) + ". Every worker must run the same "
            "command with the same --model_dir (shared storage, where the chief's checkpoints are) and the "
            "same records")
    return chief_draw
