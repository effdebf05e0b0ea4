"""The step and device loop (alexnet_tf.train_loop): loop lengths, the biases' learning rate, XLA under every
strategy, mixed precision over replicas, an empty batch from the service; also logical GPUs and the flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import cluster
from conftest import model_info
from alexnet_tf import distribute, export, preprocessing, recipes, run_dir, train_loop
from alexnet_tf.config import TrainConfig
from alexnet_tf.run_state import LoopState
from tfrecords.folder import Records

REPO = cluster.REPO
CHECKS = os.path.join(REPO, "tests", "train_checks.py")
HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


def _check(*args, env=None) -> dict:
    out = args[-1]
    proc = subprocess.run([sys.executable, CHECKS, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


# -- the loop's length ----------------------------------------------------------


def test_loops_are_cut_at_epoch_ends_checkpoints_and_profiler_steps():
    # 100 steps a loop, 250 an epoch: 100, 100, 50.
    assert [train_loop.loop_length(g, g, 250, 100) for g in (0, 100, 200)] == [100, 100, 50]
    # Checkpoints every 30 steps: no loop runs past a multiple of 30.
    assert train_loop.loop_length(0, 0, 250, 100, checkpoint_every=30) == 30
    assert train_loop.loop_length(45, 45, 250, 100, checkpoint_every=30) == 15
    # The profiler traces steps 10..12: one loop ends before 10, one starts at 10 and ends after 12.
    assert train_loop.loop_length(0, 0, 250, 100, profile_steps=(10, 12)) == 10
    assert train_loop.loop_length(10, 10, 250, 100, profile_steps=(10, 12)) == 3
    assert train_loop.loop_length(13, 13, 250, 100, profile_steps=(10, 12)) == 100
    # Resumed in the middle of an epoch (global step 1010, step 10 of the epoch).
    assert train_loop.loop_length(1010, 10, 250, 500, checkpoint_every=1000) == 240


def _alexnet_loop(state):
    strategy = tf.distribute.get_strategy()
    config = TrainConfig(dropout=0.0, seed=5, mixed_precision="off")
    model, optimizer = train_loop.build_model_and_optimizer(config, 10, strategy, "float32", recipes.get(config.recipe))
    return model, train_loop.TrainLoop(model, optimizer, strategy, 4, config.weight_decay, state=state)


@pytest.mark.slow
def test_one_loop_of_four_steps_trains_as_four_loops_of_one():
    rng = np.random.default_rng(0)
    images = rng.normal(0, 40, (16, 227, 227, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    results = []
    for lengths in ([4], [1, 1, 1, 1]):
        state = LoopState(0.01)
        model, loop = _alexnet_loop(state)
        iterator = iter(data)
        sums = [loop.run(iterator, n)[0].numpy() for n in lengths]
        results.append((model.get_weights(), np.sum(sums, axis=0), state))
    (w_one, sums_one, state_one), (w_four, sums_four, state_four) = results
    for a, b in zip(w_one, w_four):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sums_one, sums_four, rtol=1e-5)
    assert sums_one[3] == 16  # Four steps of four images.
    for state in (state_one, state_four):
        assert int(state.global_step) == 4 and int(state.step_in_epoch) == 4
        np.testing.assert_allclose(state.sums.numpy(), sums_one, rtol=1e-5)


def test_bias_learning_rate_multiplier_scales_only_the_biases_step():
    def one_step(bias_lr):
        keras.utils.set_random_seed(0)
        x = keras.Input((4,))
        model = keras.Model(x, keras.layers.Dense(3, name="fc")(x))
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
        optimizer.build(model.trainable_variables)
        before = [v.numpy() for v in model.trainable_variables]
        loop = train_loop.TrainLoop(model, optimizer, tf.distribute.get_strategy(), 8, weight_decay=0.0,
                                    bias_lr=bias_lr)
        data = tf.data.Dataset.from_tensors((tf.ones((8, 4)), tf.constant([0, 1, 2, 0, 1, 2, 0, 1]))).repeat()
        loop.run(iter(data), 1)
        return [v.numpy() - b for v, b in zip(model.trainable_variables, before)]

    (k1, b1), (k2, b2) = one_step(None), one_step(tf.Variable(2.0))
    np.testing.assert_allclose(k2, k1, rtol=1e-6)
    np.testing.assert_allclose(b2, 2 * b1, rtol=1e-6)
    assert np.abs(b1).max() > 0


# -- XLA under every strategy ---------------------------------------------------


def _assert_xla_matches(result, replicas):
    assert result["replicas"] == replicas
    assert result["replicas_agree"]
    assert result["update_max_abs"] > 1e-3  # Two steps moved the weights ...
    assert result["update_max_abs_diff"] < 1e-3 * result["update_max_abs"]  # ... the same with XLA and without.
    np.testing.assert_allclose(result["sums_xla"], result["sums_plain"], rtol=1e-4)


@pytest.mark.slow  # AlexNet compiled by XLA: about a minute on 2 cores.
@pytest.mark.parametrize("strategy,replicas", [("one_device", 1), ("mirrored", 2)])
def test_jit_compile_gives_the_same_training(strategy, replicas, tmp_path):
    _assert_xla_matches(_check("jit", strategy, str(tmp_path / "out.json")), replicas)


@pytest.mark.slow  # Two processes compiling AlexNet: about a minute on 2 cores.
def test_jit_compile_gives_the_same_training_on_two_workers(tmp_path):
    cluster.run_workers(lambda i: [CHECKS, "jit", "multi_worker", str(tmp_path / f"w{i}.json")])
    results = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    for r in results:
        _assert_xla_matches(r, 2)
    assert results[0]["sums_xla"] == results[1]["sums_xla"]


# -- mixed precision --------------------------------------------------------------


@pytest.mark.slow
def test_float16_overflow_on_one_replica_skips_the_step_on_all(tmp_path):
    r = _check("overflow", str(tmp_path / "out.json"))
    step = r["overflow_step"]
    assert step["weights_unchanged_on_every_replica"] and step["all_finite"]
    assert step["scale_after"] == step["scale_before"] / 2
    clean = r["clean_step"]
    assert clean["weights_changed"] and clean["replicas_agree"] and clean["all_finite"]
    assert clean["scale_after"] == step["scale_after"]


def test_compute_dtype_of_each_setting():
    cpu = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert distribute.compute_dtype("off", cpu) == "float32"
    assert distribute.compute_dtype("float16", cpu) == "float16"
    assert distribute.compute_dtype("bfloat16", cpu) == "bfloat16"
    assert distribute.compute_dtype("auto", cpu) == ("bfloat16" if distribute.cpu_has_bfloat16() else "float32")
    # The default strategy (no strategy given) has no devices of its own: this machine's CPU decides.
    default = tf.distribute.get_strategy()
    assert distribute.compute_dtype("auto", default) == distribute.compute_dtype("auto", cpu)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        TrainConfig(mixed_precision="fp8")


def _dtypes_in_graph(saved_model_dir: str) -> set[int]:
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    found = set()
    graph = sm.meta_graphs[0].graph_def
    for node in [*graph.node, *(n for fn in graph.library.function for n in fn.node_def)]:
        for attr in node.attr.values():
            if attr.type:
                found.add(attr.type)
            found.update(attr.list.type)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_export_is_float32_whatever_precision_trained(precision, built, tmp_path):
    out, meta = built
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    config = TrainConfig(data_dir=out, mixed_precision=precision, dropout=0.0, seed=1)
    model, _ = train_loop.build_model_and_optimizer(config, meta.num_classes, strategy, precision,
                                                  recipes.get(config.recipe))
    assert model.get_layer("conv1").compute_dtype == precision
    stats = preprocessing.ColorStats.from_records(Records(out, meta))
    run_dir.write_model_info(str(tmp_path), model_info(meta, dropout=0.0, square_size=stats.square_size),
                             stats.mean)
    path = export.export_trained(model, str(tmp_path))
    half = {tf.float16.as_datatype_enum, tf.bfloat16.as_datatype_enum}
    assert not half & _dtypes_in_graph(path), "the SavedModel computes in 16 bits"
    assert tf.float32.as_datatype_enum in _dtypes_in_graph(path)
    # The same numbers as a float32 network with the trained weights.
    reference = run_dir.build_model(run_dir.read_model_info(str(tmp_path))[0])
    reference.set_weights(model.get_weights())
    x = tf.random.stateless_normal((2, 227, 227, 3), seed=(1, 2)) * 40
    got = tf.saved_model.load(path).signatures["preprocessed"](images=x)["logits"]
    np.testing.assert_allclose(got.numpy(), reference(x, training=False).numpy(), rtol=1e-5, atol=1e-5)


# -- logical GPUs ------------------------------------------------------------------


def test_gpu_split_makes_n_logical_gpus_of_equal_memory(monkeypatch):
    gpus = ["GPU:0", "GPU:1"]
    made = {}
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config, "set_logical_device_configuration",
                        lambda device, configs: made.__setitem__(device, [c.memory_limit for c in configs]))
    monkeypatch.setattr(distribute, "gpu_memory_mib", lambda index: 80_000)
    assert distribute.configure_gpu_split(4) == 8
    assert made == {"GPU:0": [18_000] * 4, "GPU:1": [18_000] * 4}  # 90% of 80,000 MiB in four.
    made.clear()
    assert distribute.configure_gpu_split(2, memory_mib=1000) == 4
    assert made == {"GPU:0": [1000, 1000], "GPU:1": [1000, 1000]}
    monkeypatch.setattr(distribute, "gpu_memory_mib", lambda index: None)
    with pytest.raises(RuntimeError, match="--gpu_split_memory_mb"):
        distribute.configure_gpu_split(2)
    with pytest.raises(ValueError, match="at least 1"):
        distribute.configure_gpu_split(0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_two_replicas_on_one_gpu_in_float16_with_xla(built, tmp_path):
    out, _ = built
    proc = subprocess.run(
        [sys.executable, "-m", "alexnet_tf.train", "--data_dir", out, "--model_dir", str(tmp_path),
         "--strategy=mirrored", "--gpu_split=2", "--mixed_precision=float16", "--jit_compile", "--batch_size=16",
         "--steps_per_epoch=4", "--epochs=1", "--log_images=0", "--nohistograms"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with 2 replicas, compute dtype float16, XLA" in proc.stderr
    (h,) = json.loads((tmp_path / "history.json").read_text())
    assert np.isfinite(h["train_loss"]) and h["images_per_second"] > 0


# -- the command line ----------------------------------------------------------------


def test_every_hyperparameter_is_a_flag_and_bad_values_are_clear_errors(tmp_path):
    import dataclasses

    proc = subprocess.run([sys.executable, "-m", "alexnet_tf.train", "--helpfull"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]  # Asking for help is not an error.
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name}:" in proc.stdout or f"--[no]{field.name}:" in proc.stdout, field.name
    for bad, message in (("--mixed_precision=fp8", "mixed_precision"), ("--steps_per_loop=0", "steps_per_loop"),
                         ("--recipe=alex", "recipe"), ("--stall_margin=1.5", "stall_margin")):
        proc = subprocess.run([sys.executable, "-m", "alexnet_tf.train", bad, "--model_dir", str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


EMPTY_BATCH = textwrap.dedent("""
    import json
    import keras, numpy as np, tensorflow as tf
    from alexnet_tf import model, train_loop
    net = model.build_alexnet(10, seed=1, dtype="float32")
    opt = keras.optimizers.SGD(0.01, momentum=0.9)
    opt.build(net.trainable_variables)
    loop = train_loop.TrainLoop(net, opt, tf.distribute.get_strategy(), 8, finite=True)
    step = tf.function(loop.replica_step, input_signature=[tf.TensorSpec([None, 227, 227, 3]),
                                                           tf.TensorSpec([None], tf.int64)])
    before = [v.numpy() for v in net.trainable_variables]
    empty = step(tf.zeros([0, 227, 227, 3]), tf.zeros([0], tf.int64)).numpy()
    unchanged = all(np.array_equal(a, v.numpy()) for a, v in zip(before, net.trainable_variables))
    full = step(tf.ones([2, 227, 227, 3]), tf.constant([1, 2], tf.int64)).numpy()
    moved = not all(np.array_equal(a, v.numpy()) for a, v in zip(before, net.trainable_variables))
    print("RESULT", json.dumps([empty.tolist(), unchanged, full.tolist(), moved]))
""")


@pytest.mark.slow
def test_an_empty_batch_from_the_service_trains_as_nothing_with_onednn_on():
    """The tf.data service may give a replica no batch at a step; oneDNN's convolution returns its
    input for an empty batch (conv2 then split 3 channels in two): the step must train on nothing."""
    proc = subprocess.run([sys.executable, "-c", EMPTY_BATCH], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    empty, unchanged, full, moved = json.loads(line[len("RESULT "):])
    assert empty == [0.0, 0.0, 0.0, 0.0] and unchanged  # No loss, no hits, no count, no update.
    assert full[3] == 2.0 and full[0] > 0 and moved  # A real batch still trains.
