"""--deterministic: a run killed with SIGKILL at a random step and started again
ends bit-identical to the same run uninterrupted (which is also a second run
of the same command), under one_device and under mirrored."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from cluster import REPO

# Fields that measure the machine, not the training.
TIMING = {"images_per_second"}
# 2 epochs of 3 steps; checkpoints at steps 2 and 4 (mid-epoch) and 3 and 6 (epoch ends).
ARGS = ["--cpu_devices=2", "--batch_size=8", "--eval_batch_size=16", "--steps_per_epoch=3", "--epochs=2",
        "--steps_per_loop=1", "--checkpoint_every_steps=2", "--log_images=2", "--nohistograms", "--nofigures",
        "--noexport", "--deterministic", "--seed=7"]


def _command(data_dir, model_dir, strategy):
    return [sys.executable, "-m", "alexnet_tf.train", "--data_dir", data_dir, "--model_dir", str(model_dir),
            f"--strategy={strategy}", *ARGS]


def _run(command):
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _latest_step(model_dir) -> int:
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def _kill_between_checkpoints(command, model_dir, rng: random.Random) -> int:
    """Starts the run and kills it (SIGKILL) a random moment after its checkpoint
    at a random mid-epoch step; returns the step it had checkpointed last."""
    after = rng.choice([2, 4])
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _latest_step(model_dir) < after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.2))  # Into the next step.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _latest_step(model_dir)
    assert after <= killed_at < 6, f"the run finished or never reached step {after} before the kill"
    return killed_at


def _outcome(model_dir):
    history = [{k: v for k, v in h.items() if k not in TIMING} for h in json.loads((model_dir / "history.json").read_text())]
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir / "checkpoints")))
    state = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
             if "train_seconds" not in name and "save_counter" not in name}
    return history, state


@pytest.mark.slow  # Four short runs of AlexNet: about a minute on 2 cores.
@pytest.mark.parametrize("strategy", ["one_device", "mirrored"])
def test_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(built, tmp_path, strategy):
    out, _ = built
    rng = random.Random()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_command(out, straight, strategy))
    killed_at = _kill_between_checkpoints(_command(out, killed, strategy), killed, rng)
    again = _run(_command(out, killed, strategy))
    resumed = re.search(r"resumed from \S+/ckpt-(\d+): epoch (\d), step (\d)", again.stderr)
    assert resumed and int(resumed.group(1)) == killed_at, again.stderr[-2000:]
    assert int(resumed.group(3)) > 0, f"killed at step {killed_at}, an epoch's end: no mid-epoch resume to check"

    h1, s1 = _outcome(straight)
    h2, s2 = _outcome(killed)
    assert h1 == h2 and [h["epoch"] for h in h1] == [1, 2]
    assert s1.keys() == s2.keys() and sum("_trainable_variables" in k for k in s1) == 16  # The weights.
    assert any(k.startswith("model_state/") for k in s1)  # The dropout masks' seed state travels too.
    assert s1["run_id/.ATTRIBUTES/VARIABLE_VALUE"] != s2["run_id/.ATTRIBUTES/VARIABLE_VALUE"]  # Two runs.
    for name in s1:
        if not name.startswith("run_id/"):
            np.testing.assert_array_equal(s1[name], s2[name], err_msg=f"{name} (killed after step {killed_at})")
    assert int(s1["global_step/.ATTRIBUTES/VARIABLE_VALUE"]) == 6


def test_deterministic_needs_a_seed(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "alexnet_tf.train", "--deterministic", "--model_dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "deterministic needs a seed: give --seed" in proc.stderr
