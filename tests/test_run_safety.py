"""The model folder keeps what a run wrote: settings the records cannot take
refused before it starts, one run at a time, a diverged run stopped before it
saves or exports non-finite weights, and a damaged shard named in one line
(the checkpoints themselves: test_run_state.py)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import tensorflow as tf

import cluster
from alexnet_tf import run_dir, trainer
from alexnet_tf.config import ConfigError, TrainConfig
from tfrecords import integrity
from tfrecords.folder import Records

TINY = ["--preset=sample", "--strategy=one_device", "--batch_size=8", "--eval_batch_size=16", "--log_images=0",
        "--nohistograms", "--nofigures", "--seed=0"]


def _train(args, **kw):
    return subprocess.run([sys.executable, "-m", "alexnet_tf.train", *TINY, *args], cwd=cluster.REPO,
                          capture_output=True, text=True, timeout=600, **kw)


def _error_line(proc) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


# -- settings the records cannot take ------------------------------------------


def test_read_data_refuses_a_batch_the_records_or_replicas_cannot_take(built, monkeypatch):
    out, meta = built
    one = types.SimpleNamespace(num_replicas_in_sync=1)
    with pytest.raises(ConfigError, match=f"--batch_size=100000 is larger than the {meta.split('train').num_examples} training examples of {out}"):
        trainer.read_data(TrainConfig(data_dir=out, batch_size=100000), one)
    with pytest.raises(ConfigError, match="--batch_size=8 does not divide over the 3 replicas; use a multiple of 3"):
        trainer.read_data(TrainConfig(data_dir=out, batch_size=8), types.SimpleNamespace(num_replicas_in_sync=3))
    small = dataclasses.replace(meta, image=dataclasses.replace(meta.image, size=100))
    monkeypatch.setattr(Records, "open", classmethod(lambda cls, d, splits=None: cls(d, small)))
    monkeypatch.setattr(trainer.preprocessing.ColorStats, "from_records", lambda *a: types.SimpleNamespace())
    with pytest.raises(ConfigError, match="holds 100x100 images, smaller than the network's 227x227 input patches"):
        trainer.read_data(TrainConfig(data_dir=out, batch_size=8), one)


@pytest.mark.parametrize("field, value, says", [
    ("learning_rate", float("inf"), "learning_rate must be a finite number, got inf"),
    ("learning_rate", float("nan"), "learning_rate must be a finite number, got nan"),
    ("warmup_epochs", -1.0, "warmup_epochs must be 0 or more, got -1.0"),
    ("momentum", -1.0, r"momentum must be in \[0, 1\), got -1.0"),
    ("dropout", 1.5, r"dropout must be in \[0, 1\)"),
    ("weight_decay", -0.1, "weight_decay must be 0 or more"),
    ("lr_patience", 0, "lr_patience must be at least 1"),
    ("shuffle_buffer", 0, "shuffle_buffer must be at least 1"),
    ("lr_decay_epochs", (0,), "lr_decay_epochs at least 1"),
])
def test_train_config_refuses_values_no_run_can_use(field, value, says):
    with pytest.raises(ValueError, match=says):
        TrainConfig(**{field: value})


# -- one run per folder -------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_a_held_folder_stops_before_it_writes(built, tmp_path):
    out, _ = built
    model_dir = tmp_path / "run"
    with run_dir.run_lock(str(model_dir)):
        with pytest.raises(run_dir.RunDirError, match=f"--model_dir {model_dir} is in use by another training run "
                                                      rf"\(host [^,]+, pid {os.getpid()}, started "):
            with run_dir.run_lock(str(model_dir)):
                pass
        proc = _train([f"--data_dir={out}", f"--model_dir={model_dir}", "--steps_per_epoch=1", "--epochs=1"])
        assert _error_line(proc).startswith(f"train: error: --model_dir {model_dir} is in use by another training run")
    assert sorted(os.listdir(model_dir)) == [run_dir.LOCK]  # Nothing of the refused run.
    with run_dir.run_lock(str(model_dir)):  # Released with its holder.
        pass


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    hold = textwrap.dedent(f"""
        import sys, time
        from alexnet_tf import run_dir
        with run_dir.run_lock({str(tmp_path)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", hold], cwd=cluster.REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(run_dir.RunDirError, match=f"pid {proc.pid}"):
            with run_dir.run_lock(str(tmp_path)):
                pass
    finally:
        proc.kill()  # SIGKILL: no clean-up of its own.
        proc.wait()
    with run_dir.run_lock(str(tmp_path)):
        pass


# -- divergence ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_diverged_run_stops_keeps_finite_checkpoints_and_exports_nothing(built, tmp_path):
    out, _ = built
    proc = _train([f"--data_dir={out}", f"--model_dir={tmp_path}", "--learning_rate=1e12", "--steps_per_epoch=4",
                   "--epochs=2", "--checkpoint_every_steps=1", "--steps_per_loop=1", "--export"])
    line = _error_line(proc)
    assert line.startswith("train: error: the run diverged: its weights became non-finite by step "), line
    assert "nothing is exported" in line
    assert not (tmp_path / run_dir.SAVED_MODEL).exists() and not (tmp_path / run_dir.HISTORY).exists()
    ckpts = run_dir.checkpoint_steps(str(tmp_path / run_dir.CHECKPOINTS))
    assert ckpts  # The steps before it diverged, each with finite weights.
    for _, prefix in ckpts:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if name.startswith("model/") and np.issubdtype(np.asarray(value).dtype, np.floating):
                assert np.isfinite(value).all(), (prefix, name)


@pytest.mark.slow
def test_a_shard_damaged_past_its_checked_head_is_named_when_training_meets_it(built, tmp_path):
    import shutil

    out, meta = built
    data = tmp_path / "records"
    shutil.copytree(out, data)
    shard = Records(str(data), meta).shard_paths("train")[0]
    damaged = bytearray(open(shard, "rb").read())
    damaged[integrity.HEAD_BYTES + 5000:integrity.HEAD_BYTES + 5010] = b"X" * 10  # Past what is checked at start.
    open(shard, "wb").write(bytes(damaged))
    proc = _train([f"--data_dir={data}", f"--model_dir={tmp_path / 'run'}", "--epochs=1"])
    assert _error_line(proc).startswith(f"train: error: records shard {shard} is damaged (corrupted record at ")
