"""Test helper: worker processes of one TF_CONFIG cluster on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from alexnet_tf.data_service import free_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_workers(argv_of, n: int = 2, timeout: int = 600) -> list[tuple[int, str, str]]:
    """Runs `python argv_of(i)` as worker i of an n-worker cluster; returns each one's (exit code, stdout, stderr)."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(n)]}
    procs = []
    for i in range(n):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        procs.append(subprocess.Popen([sys.executable, *argv_of(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def run_workers(argv_of, n: int = 2, timeout: int = 600) -> list[tuple[str, str]]:
    """`start_workers`, returning each worker's (stdout, stderr).

    Fails the calling test with the stderr of any worker that exits non-zero.
    """
    results = start_workers(argv_of, n, timeout)
    for i, (code, _, stderr) in enumerate(results):
        assert code == 0, f"worker {i} failed:\n{stderr[-3000:]}"
    return [(out, err) for _, out, err in results]
