"""Where `python -m benchmarks.gpu` ran (GPU, driver, CUDA, cuDNN, commit, cores) and its Markdown table.

Imports no TensorFlow at module level: `benchmarks.tables` draws the table of a
recorded `gpu-*.json` with it.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time

from benchmarks import measure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Rows of train_synthetic: key -> (compute dtype, XLA). float16 wraps the optimizer in dynamic loss scaling.
PRECISIONS = {
    "float32": ("float32", False), "float32_xla": ("float32", True),
    "float16": ("float16", False), "float16_xla": ("float16", True),
    "bfloat16": ("bfloat16", False), "bfloat16_xla": ("bfloat16", True),
}
LABELS = {"float32": "float32", "float32_xla": "float32, XLA",
          "float16": "float16, loss scaling", "float16_xla": "float16, loss scaling, XLA",
          "bfloat16": "bfloat16", "bfloat16_xla": "bfloat16, XLA"}
# The precision of the records and split rows when no synthetic row was measured.
DEFAULT_BEST = "float16_xla"
TARGETS = {
    "train_synthetic": ">= 10,000 img/s on one H100",
    "train_records": ">= 0.9x synthetic with 16 host cores",
}


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def result_file_name(result: dict) -> str:
    """The name under benchmarks/results: gpu-<count>x-<gpu name>.json (gpu-cpu-<model>.json without a GPU)."""
    d = result["device"]
    return f"gpu-{d['count']}x-{slug(d['name'])}.json" if d["count"] else f"gpu-cpu-{result['model']}.json"


def _run(*command: str) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def nvidia_smi() -> dict:
    """Name, driver, memory and compute capability of GPU 0, and the driver's CUDA version ({} without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return {}
    found = {}
    row = _run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
               "--format=csv,noheader,nounits")
    if row:
        fields = [f.strip() for f in row.splitlines()[0].split(",")]
        found.update(zip(("name", "driver", "memory_mib", "compute_capability"), fields))
    header = _run("nvidia-smi") or ""
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    if cuda:
        found["driver_cuda"] = cuda.group(1)
    return found


def cuda_libraries() -> list[str]:
    """The CUDA libraries this process has mapped (which cuBLAS, cuDNN, NCCL really ran)."""
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            return sorted({line.split()[-1].rsplit("/", 1)[-1] for line in f
                           if any(k in line for k in ("libcu", "libnccl", "libnvrtc", "libnvJit"))})
    except OSError:
        return []


def environment(gpus, tf) -> dict:
    """The fields of a result that say where and when it was measured.

    Args:
      gpus: tf.config.list_physical_devices("GPU").
      tf: The tensorflow module.
    """
    details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
    smi = nvidia_smi() if gpus else {}
    build = tf.sysconfig.get_build_info()
    cc = details.get("compute_capability")
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": measure.commit(12),
        "machine": {"cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "python": platform.python_version()},
        "device": {"kind": "GPU" if gpus else "CPU", "name": details.get("device_name") or smi.get("name") or
                   ("gpu" if gpus else "CPU"), "count": len(gpus),
                   "compute_capability": ".".join(map(str, cc)) if cc else smi.get("compute_capability"),
                   "memory_mib": smi.get("memory_mib"), "driver": smi.get("driver"),
                   "driver_cuda": smi.get("driver_cuda")},
        "tensorflow": tf.__version__,
        "built_for": {"cuda": build.get("cuda_version"), "cudnn": build.get("cudnn_version")},
        "host_cores": os.cpu_count(),
    }


# ---------------------------------------------------------------------------
# The table.


def _fmt(rate: float | None, error: str | None = None) -> str:
    return f"{rate:,.0f}" if rate is not None else f"null ({(error or 'not measured').split(':')[0]})"


def _mfu(row: dict) -> str:
    return f"{row['mfu']:.1%}" if row.get("mfu") is not None else ""


def _rate(rows: dict, key: str, batch: str) -> float | None:
    return rows.get(key, {}).get(batch, {}).get("images_per_second")


def table(r: dict) -> str:
    """The Markdown table of a result (a partial one too: rows not measured are left out)."""
    head = ("| measure | compute | batch / replica | global batch | images/s | MFU | real / synthetic | limited by "
            "| target |")
    lines = [head, "|" + "---|" * 9]
    syn, rec, inp = r.get("train_synthetic", {}), r.get("train_records", {}), r.get("input_stream", {})
    best = r.get("best_precision", DEFAULT_BEST)
    for key, rows in syn.items():
        for b, row in rows.items():
            target = TARGETS["train_synthetic"] if key == best else ""
            lines.append(f"| train, synthetic data | {LABELS[key]} | {b} | {row['global_batch']} | "
                         f"{_fmt(row['images_per_second'], row.get('error'))} | {_mfu(row)} | | | {target} |")
    split = r.get("train_split", {})
    for key, rows in split.get("rows", {}).items():
        for b, row in rows.items():
            lines.append(f"| train, synthetic, {split.get('replicas')} replicas on one GPU (gpu_split="
                         f"{split.get('gpu_split')}) | {LABELS[key]} | {b} | {row.get('global_batch') or '–'} | "
                         f"{_fmt(row['images_per_second'], row.get('error'))} | {_mfu(row)} | | | |")
    for key, rows in rec.items():
        for b, row in rows.items():
            real, fake, alone = row["images_per_second"], _rate(syn, key, b), inp.get(b, {}).get("images_per_second")
            ratio, limit = "", ""
            if real is not None and fake is not None:
                ratio = f"{real / fake:.2f}x"
            if fake is not None and alone is not None:
                side = "input stream" if alone < fake else r["device"]["kind"]
                limit = f"{side} (input alone {alone:,.0f} vs synthetic {fake:,.0f} img/s)"
            lines.append(f"| train, real records | {LABELS[key]} | {b} | {row['global_batch']} | "
                         f"{_fmt(real, row.get('error'))} | {_mfu(row)} | {ratio} | {limit} | "
                         f"{TARGETS['train_records']} |")
    for b, row in inp.items():
        per_core, vs = row.get("images_per_second_per_core"), row.get("vs_train_synthetic")
        note = "; ".join(([f"{per_core:,.0f} img/s per core"] if per_core is not None else [])
                         + ([f"{vs:.2f}x the training step's synthetic rate"] if vs is not None else []))
        lines.append(f"| input stream alone ({r['host_cores']} host cores) | uint8 | {b} | {row['global_batch']} | "
                     f"{_fmt(row['images_per_second'], row.get('error'))} | | | {note} | |")
    for b, row in r.get("serving", {}).items():
        lines.append(f"| serving_default, JPEG bytes | float32 | {b} | {b} | "
                     f"{_fmt(row['images_per_second'], row.get('error'))} | | | | |")
    d = r["device"]
    where = f"{d['count']}x {d['name']}" if d["count"] else "CPU (no GPU)"
    if d.get("driver"):
        where += f" (driver {d['driver']}, CUDA {d.get('driver_cuda') or 'not recorded'})"
    lines.append(f"\n{where}, TensorFlow {r['tensorflow']}, {r['host_cores']} host cores, "
                 f"{r['replicas']} replica(s), model {r['model']}, {r['steps']} steps x {r['runs']} runs (median).")
    matmul = r.get("matmul")
    if matmul and matmul.get("tflops"):
        lines.append(f"MFU: model FLOPs ({r['flops_per_train_image'] / 1e9:.3g} GFLOP per training image) over a "
                     f"measured bfloat16 {matmul['n']}^2 matmul's {matmul['tflops']:,.1f} TFLOP/s.")
    return "\n".join(lines)
