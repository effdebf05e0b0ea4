"""Training: the schedule, a short run, mirrored replicas, two workers (kill-and-resume: test_reproducible)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import cluster
from alexnet_tf import evaluation, run_dir, trainer
from alexnet_tf.config import TrainConfig
from tfrecords.folder import Records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch_size=8", "--eval_batch_size=16", "--log_images=0", "--nohistograms", "--nofigures", "--noexport",
        "--seed=0"]


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "alexnet_tf.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, **kw)


def test_presets_keep_the_papers_defaults():
    paper = TrainConfig()
    assert (paper.batch_size, paper.learning_rate, paper.momentum, paper.weight_decay, paper.epochs) == (
        128, 0.01, 0.9, 5e-4, 90)
    assert paper.lr_schedule == "plateau" and paper.max_lr_decays == 3 and paper.grouped


# -- a short run, in process --------------------------------------------------


@pytest.mark.slow
def test_ten_crop_evaluation_averages_softmax_over_the_ten_patches(built):
    from alexnet_tf import model as model_lib, preprocessing
    from conftest import read_split

    out, meta = built
    stats = preprocessing.ColorStats.from_records(Records(out, meta))
    model = model_lib.build_alexnet(meta.num_classes, seed=3)
    strategy = tf.distribute.get_strategy()
    got = evaluation.Evaluator(model, strategy, Records(out, meta), stats, 16).evaluate("validation", ten_crop=True)
    top1 = top5 = loss = 0.0
    rows = read_split(out, meta, "validation")
    for r in rows:
        crops = preprocessing.ten_crops(tf.constant(r["jpeg"]), stats)
        probs = tf.nn.softmax(model(crops, training=False)).numpy().astype(np.float64).mean(axis=0)
        order = np.argsort(-probs)
        top1 += order[0] == r["label"]
        top5 += r["label"] in order[:5]
        loss += -np.log(probs[r["label"]] + 1e-12)
    n = len(rows)
    assert got["top1_error"] == pytest.approx(1 - top1 / n, abs=1e-9)
    assert got["top5_error"] == pytest.approx(1 - top5 / n, abs=1e-9)
    assert got["loss"] == pytest.approx(loss / n, rel=1e-4)
    central = evaluation.Evaluator(model, strategy, Records(out, meta), stats, 16).evaluate("validation")
    assert set(central) == {"loss", "top1_error", "top5_error"}


def _event_tags(folder):
    tags = set()
    for name in tf.io.gfile.listdir(folder):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
            tags.update(v.tag for v in event.summary.value)
    return tags


@pytest.mark.slow
def test_short_run_logs_checkpoints_exports_and_resumes(built, tmp_path):
    out, meta = built
    config = TrainConfig(data_dir=out, batch_size=8, eval_batch_size=16, epochs=2, steps_per_epoch=2,
                               checkpoint_every_steps=1, log_images=2, seed=0, verbose=False, profile_steps=(1, 2),
                               figures=False)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    result = trainer.train_and_evaluate(config, str(tmp_path), strategy)
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert 0 <= h["train_top1_error"] <= 1 and 0 <= h["val_top5_error"] <= h["val_top1_error"] <= 1
        assert h["images_per_second"] > 0 and h["learning_rate"] == 0.01 and h["val_loss"] > 0
    assert json.loads((tmp_path / "history.json").read_text()) == history
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-4")

    train_tags = _event_tags(str(tmp_path / "tensorboard" / "train"))
    assert {"loss", "top1_error", "top5_error", "learning_rate", "images_per_second",
            "augmented_training_images", "conv1/kernel", "fc8/bias"} <= train_tags
    val_tags = _event_tags(str(tmp_path / "tensorboard" / "validation"))
    assert {"loss", "top1_error", "top5_error"} <= val_tags
    assert "conv1_kernels" not in train_tags and "top5_predictions" not in val_tags  # --nofigures.
    traces = tf.io.gfile.glob(str(tmp_path / "tensorboard" / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1  # The profiler traced the requested steps.

    loaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    x = tf.random.stateless_normal((2, 227, 227, 3), seed=(1, 1)) * 40
    exported = loaded.signatures["preprocessed"](images=x)["logits"].numpy()
    # The export computes in float32 whatever precision trained (bfloat16 by
    # default on CPUs with AVX512_BF16): the trained weights in float32 give its logits.
    plain = run_dir.build_model(run_dir.read_model_info(str(tmp_path))[0])
    plain.set_weights(result.model.get_weights())
    # float32 to its rounding: oneDNN's kernels for a graph and for eager calls
    # (AVX-512 and AVX2 alike) may sum in other orders, about 1e-4 of the logits' scale.
    reference = plain(x, training=False).numpy()
    np.testing.assert_allclose(exported, reference, rtol=0, atol=1e-3 * np.abs(reference).max())
    trained = result.model(x, training=False).numpy()
    # The layers' precision (the functional model's own policy stays float32).
    scale = 1e-3 if result.model.get_layer("conv1").compute_dtype == "float32" else 5e-2
    np.testing.assert_allclose(exported, trained, rtol=0, atol=scale * np.abs(trained).max())

    # The same call with more epochs continues where the first stopped.
    more = trainer.train_and_evaluate(TrainConfig(**{**vars(config), "epochs": 3}), str(tmp_path), strategy)
    assert [h["epoch"] for h in more.history] == [1, 2, 3] and more.history[:2] == history
    ckpt = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert tf.train.load_variable(ckpt, "global_step/.ATTRIBUTES/VARIABLE_VALUE") == 6


def test_bad_data_dir_is_a_clear_error(tmp_path):
    proc = _run(["--data_dir", str(tmp_path / "none"), "--model_dir", str(tmp_path / "m"), "--strategy=one_device"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"train: error: {tmp_path / 'none'}/metadata.json not found")


# -- mirrored over two logical CPU devices ------------------------------------


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices(built, tmp_path):
    out, _ = built
    flags = [f for f in TINY if f != "--nofigures"] + ["--figure_pool=20"]  # The figures drawn from a mirrored model.
    proc = _run(["--data_dir", out, "--model_dir", str(tmp_path), "--strategy=mirrored", "--cpu_devices=2",
                 "--steps_per_epoch=2", "--epochs=1", *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with 2 replicas" in proc.stderr
    assert "validation top-1 error" in proc.stdout
    (h,) = json.loads((tmp_path / "history.json").read_text())
    assert h["epoch"] == 1 and 0 <= h["val_top1_error"] <= 1
    assert "conv1_kernels" in _event_tags(str(tmp_path / "tensorboard" / "train"))
    assert {"top5_predictions", "fc7_nearest_neighbours", "per_class_top1_error", "worst_classes"} <= _event_tags(
        str(tmp_path / "tensorboard" / "validation"))


# -- two workers on 127.0.0.1 -------------------------------------------------

WORKER = textwrap.dedent("""
    import sys, numpy as np
    from alexnet_tf import distribute, trainer
    from alexnet_tf.config import TrainConfig
    strategy = distribute.make_strategy("multi_worker")
    config = TrainConfig(data_dir=sys.argv[1], batch_size=8, eval_batch_size=16, epochs=1,
                         steps_per_epoch=2, log_images=0, histograms=False, export=False, seed=0,
                         verbose=False)
    result = trainer.train_and_evaluate(config, sys.argv[2], strategy)
    np.savez(sys.argv[3], *[w for w in result.model.get_weights()])
    print("VAL", result.history[-1]["val_top1_error"])
""")


@pytest.mark.slow
def test_two_workers_train_to_identical_weights(built, tmp_path):
    out, _ = built
    outputs = cluster.run_workers(lambda i: ["-c", WORKER, out, str(tmp_path / "model"), str(tmp_path / f"w{i}.npz")])
    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert len(w0.files) == len(w1.files) == 16
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k])
    # Training moved the weights away from the (seeded, identical) initialisation.
    from alexnet_tf.model import build_alexnet

    init = build_alexnet(10, seed=0).get_weights()
    np.testing.assert_array_equal(init[1], 0.0)  # conv1 bias starts at 0 ...
    assert np.abs(w0["arr_1"]).max() > 0  # ... and moved.
    vals = [line for stdout, _ in outputs for line in stdout.splitlines() if line.startswith("VAL")]
    assert len(vals) == 2 and vals[0] == vals[1]
    # Only the chief wrote checkpoints and summaries; the other worker cleaned up.
    assert tf.train.latest_checkpoint(str(tmp_path / "model" / "checkpoints"))
    assert not [n for n in os.listdir(tmp_path / "model") if n.startswith(".checkpoints-")]


def test_the_runs_training_rate_weighs_each_epoch_by_its_time():
    from alexnet_tf.train import training_rate

    # 100 images in 10 s, then 300 in 10 s: 20 images/s over the run (the mean of the two rates would be 20 too,
    # so a third epoch of 100 images in 1 s tells them apart: 500 / 21).
    history = [{"train_images": 100, "images_per_second": 10.0}, {"train_images": 300, "images_per_second": 30.0},
               {"train_images": 100, "images_per_second": 100.0}]
    assert training_rate(history) == pytest.approx(500 / 21)
    assert training_rate([{"images_per_second": 5.0}]) == 0.0  # A history written before epochs counted images.
