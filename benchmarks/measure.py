"""Running and recording a benchmark: wall time and peak memory of its process tree, results written as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_result(path: str, result: dict, table: str) -> None:
    """Saves a benchmark's result as JSON at `path` and prints its table."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(table)
    print(f"wrote {path}")


def run_stage(name: str, cmd: list[str], log_dir: str) -> dict:
    """Runs one command; returns its wall seconds, peak tree memory (MiB) and log path.

    Its output (stdout and stderr) goes to `<log_dir>/<name>.log`, never to a
    pipe that could fill and stall it.

    Raises:
      RuntimeError: The command failed (the tail of its log in the message).
    """
    import psutil

    log = os.path.join(log_dir, f"{name}.log")
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        root, peak = psutil.Process(proc.pid), 0.0
        while proc.poll() is None:
            try:
                tree = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in tree) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"stage {name} failed ({' '.join(cmd[2:4])}), exit {proc.returncode}:\n{tail}")
    return {"seconds": seconds, "peak_rss_mib": peak, "log": log}


def cpu_flags(cpuinfo: str | None = None) -> dict:
    """The CPU's model and the instruction sets that change TensorFlow's and oneDNN's kernels.

    Args:
      cpuinfo: The text of /proc/cpuinfo; read from the machine when None.

    Returns:
      {"model", "avx2", "avx512", "avx512_bf16"}: "avx512" is AVX-512 Foundation
      (`avx512f`). Flags are False where /proc/cpuinfo is absent (not Linux).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # The first processor speaks for all.
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", ""), "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags}


def machine() -> dict:
    """What a result was measured on: cores, memory, platform, the CPU's flags (`cpu_flags`) and the commit."""
    import platform

    import psutil

    return {"cores": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30,
            "platform": platform.platform(), "cpu": cpu_flags(), "commit": commit()}


def commit(length: int = 7) -> str | None:
    """$COMMIT where set (a checkout copied without .git), else git's HEAD abbreviated to `length`, else None."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", f"--short={length}", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
