"""The recorded recipes (--recipe), their schedules and multipliers, and the stall warning in a run
(the bias learning rate in the loop: test_train_loop.py; the watch itself: test_stall_watch.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import config as config_lib, model as model_lib, recipes
from alexnet_tf.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The paper's in the default suite, the others in `make test-all`.
@pytest.mark.parametrize("name", [n if n == "paper" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in recipes.RECIPES])
def test_every_recipe_builds_the_same_network_initialised_as_its_source_says(name):
    recipe = recipes.get(name)
    paper = model_lib.build_alexnet(1000, seed=0)
    model = model_lib.build_alexnet(1000, seed=0, init=recipe.init)
    assert [l.name for l in model.layers] == [l.name for l in paper.layers]
    assert model.count_params() == paper.count_params()
    for layer, (std, bias) in recipe.init.items():
        kernel, b = (v.numpy() for v in model.get_layer(layer).weights)
        assert np.std(kernel) == pytest.approx(std, rel=0.05), layer
        assert abs(np.mean(kernel)) < std / 10
        assert (b == np.float32(bias)).all(), layer


def test_the_recipes_record_their_sources_values():
    assert recipes.PAPER.init["conv2"] == (0.01, 1.0) and recipes.PAPER.init["conv3"] == (0.01, 0.0)
    assert recipes.CAFFE.init["fc6"] == (0.005, 0.1) and recipes.CAFFE.init["conv4"] == (0.01, 0.1)
    assert recipes.CUDA_CONVNET2.init["conv3"] == (0.03, 0.0) and recipes.CUDA_CONVNET2.init["fc8"] == (0.01, -7.0)
    assert not any(r.decay_biases for r in recipes.RECIPES.values())
    with pytest.raises(ValueError, match="unknown recipe 'alex'; expected one of paper, caffe, cuda_convnet2"):
        recipes.get("alex")


def test_dexp_is_cuda_convnet2s_discretised_exponential():
    # LearningRates.md: dexp[base=0.01;numSteps=4;tgtFactor=1000] is 0.01, divided by 1000^(1/3)
    # at 25%, 50% and 75% of training, ending at 0.00001.
    rates = [recipes.dexp(p, 0.01, 1000, 4) for p in (0.0, 0.25, 0.26, 0.5, 0.51, 0.75, 0.76, 1.0)]
    np.testing.assert_allclose(rates, [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-9)


def test_schedules_and_bias_learning_rates_per_recipe():
    config = config_lib.make_config(recipe="cuda_convnet2")
    lrs = [recipes.learning_rate_after_epoch(config, e, 0.0, None, np.inf, 0, 0)[0] for e in range(-1, 90)]
    # Each epoch at the rate its start gives (epoch e starts at e / 90 of the run).
    assert lrs[0] == 0.01 and lrs[23] == pytest.approx(0.01 / 250 ** (1 / 3)) and lrs[22] == 0.01
    assert lrs[-1] == pytest.approx(0.01 / 250) and len(set(np.round(lrs, 12))) == 4
    assert recipes.CUDA_CONVNET2.bias_lr_multiplier(0.0) == pytest.approx(2.0)  # epsB 0.02 over epsW 0.01.
    assert recipes.CUDA_CONVNET2.bias_lr_multiplier(0.3) == pytest.approx(0.02 / (0.01 / 250 ** (1 / 3)))
    assert recipes.CUDA_CONVNET2.bias_lr_multiplier(0.9) == pytest.approx(0.002 / (0.01 / 250))
    assert recipes.CAFFE.bias_lr_multiplier(0.7) == 2.0 and recipes.PAPER.bias_lr_multiplier(0.7) == 1.0
    caffe = config_lib.make_config(recipe="caffe")
    assert [recipes.learning_rate_after_epoch(caffe, e, 0.0, None, np.inf, 0, 0)[0] for e in (18, 19, 39)] == \
        pytest.approx([0.01, 0.001, 0.0001])


def test_recipe_then_preset_then_flags():
    caffe = config_lib.make_config(recipe="caffe")
    assert (caffe.batch_size, caffe.lr_schedule, caffe.lr_decay_epochs, caffe.epochs) == (256, "step",
                                                                                           (20, 40, 60, 80), 90)
    assert config_lib.make_config() == TrainConfig()  # The paper's recipe is the defaults.
    sample = config_lib.make_config("sample", "caffe")
    assert (sample.recipe, sample.batch_size, sample.learning_rate) == ("caffe", 16, 0.001)
    assert config_lib.make_config("sample").recipe == "cuda_convnet2"  # The preset's own recipe, unless one is given.
    assert config_lib.make_config("sample", "caffe", batch_size=64).batch_size == 64
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig(recipe="alex")


# -- the stall warning -------------------------------------------------------------


def _train(*args):
    return subprocess.run([sys.executable, "-m", "alexnet_tf.train", "--strategy=one_device", "--batch_size=8",
                           "--eval_batch_size=16", "--nofigures", "--log_images=0", "--nohistograms", "--noexport",
                           "--seed=0", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_forced_stall_warns_in_the_console_and_tensorboard(built, tmp_path):
    r = _train(f"--data_dir={built[0]}", f"--model_dir={tmp_path}", "--learning_rate=0", "--stall_steps=2",
               "--steps_per_epoch=2", "--epochs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "train: WARNING: the training loss is" in line]
    assert len(warnings) == 1 and "after 2 steps" in warnings[0]
    texts = []
    for name in os.listdir(tmp_path / "tensorboard" / "train"):
        for event in tf.compat.v1.train.summary_iterator(str(tmp_path / "tensorboard" / "train" / name)):
            texts += [(event.step, tf.make_ndarray(v.tensor).item().decode()) for v in event.summary.value
                      if v.tag == "warnings"]
    assert texts == [(2, warnings[0].split("WARNING: ", 1)[1])]
    assert len(json.loads((tmp_path / "history.json").read_text())) == 2  # Only a warning: the run went on.


@pytest.mark.slow  # A second training process; the watch's raising is tested in test_stall_watch.py.
def test_stop_if_stalled_ends_the_run_with_status_3(built, tmp_path):
    r = _train(f"--data_dir={built[0]}", f"--model_dir={tmp_path}", "--learning_rate=0", "--stall_steps=2",
               "--steps_per_epoch=2", "--epochs=3", "--stop_if_stalled", "--steps_per_loop=1")
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Stopped (--stop_if_stalled)" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "history.json").exists()  # Stopped in the first epoch, at step 2.


def test_plateau_divides_by_ten_after_patience_at_most_three_times():
    c = TrainConfig(lr_patience=2)
    lr, best, bad, decays = 0.01, math.inf, 0, 0
    errors = [0.9, 0.8, 0.85, 0.81, 0.7, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75]
    lrs = []
    for epoch, err in enumerate(errors):
        lr, best, bad, decays = recipes.learning_rate_after_epoch(c, epoch, lr, err, best, bad, decays)
        lrs.append(lr)
    # Two epochs without a new best (0.85, 0.81) -> /10; later plateaus -> /10 twice more, then no more.
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5])
    assert decays == 3 and best == 0.7


def test_step_schedule():
    c = TrainConfig(lr_schedule="step", lr_decay_epochs=(2, 4))
    lrs = [recipes.learning_rate_after_epoch(c, e, 0.01, 0.5, 1.0, 0, 0)[0] for e in range(5)]
    assert lrs == pytest.approx([0.01, 0.001, 0.001, 1e-4, 1e-4])


def _sgd_on(variables, momentum=0.9, learning_rate=0.01, loss_scaled=False):
    import keras
    optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    if loss_scaled:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    return optimizer


@pytest.mark.parametrize("loss_scaled", [False, True])
def test_momentum_correction_scales_each_velocity_by_its_rates_change(loss_scaled):
    import keras
    from alexnet_tf.run_state import LoopState
    variables = [keras.Variable(np.zeros(3, np.float32), name="kernel"),
                 keras.Variable(np.zeros(3, np.float32), name="bias")]
    # cuda_convnet2's bias multiplier over 8 epochs: 2x in the first quarter, 12.6x in the second.
    config = TrainConfig(recipe="cuda_convnet2", epochs=8, learning_rate=0.01, lr_schedule="step",
                         lr_decay_epochs=(3,), momentum_correction=True)
    recipe = recipes.get("cuda_convnet2")
    optimizer = _sgd_on(variables, loss_scaled=loss_scaled)
    velocities = getattr(optimizer, "inner_optimizer", optimizer).momentums
    for v in velocities:
        v.assign(np.array([1.0, -2.0, 4.0], np.float32))
    state = LoopState(0.01)
    state.epoch.assign(1)  # Epoch 2 ends: same rate, same multiplier (both in the first quarter).
    recipes.next_epoch(config, state, optimizer, {"learning_rate": 0.01}, recipe, variables)
    np.testing.assert_array_equal(velocities[0].numpy(), [1.0, -2.0, 4.0])
    np.testing.assert_array_equal(velocities[1].numpy(), [1.0, -2.0, 4.0])
    # Epoch 3 ends: the step schedule divides by 10, and the biases' multiplier goes 2x -> 12.6x.
    recipes.next_epoch(config, state, optimizer, {"learning_rate": 0.01}, recipe, variables)
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(0.001)
    multiplier = recipe.bias_lr_multiplier(3 / 8) / recipe.bias_lr_multiplier(2 / 8)
    assert multiplier == pytest.approx(250 ** (1 / 3))
    np.testing.assert_allclose(velocities[0].numpy(), np.array([1.0, -2.0, 4.0]) * 0.1, rtol=1e-6)
    np.testing.assert_allclose(velocities[1].numpy(), np.array([1.0, -2.0, 4.0]) * 0.1 * multiplier, rtol=1e-6)


def test_without_momentum_correction_the_velocity_is_kept():
    import keras
    from alexnet_tf.run_state import LoopState
    variables = [keras.Variable(np.ones(2, np.float32), name="kernel")]
    optimizer = _sgd_on(variables)
    optimizer.momentums[0].assign([3.0, 5.0])
    config = TrainConfig(lr_schedule="step", lr_decay_epochs=(1,))
    assert config.momentum_correction is False  # The paper's rule by default.
    state = LoopState(0.01)
    recipes.next_epoch(config, state, optimizer, {"learning_rate": 0.01}, recipes.get("paper"), variables)
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(0.001)
    np.testing.assert_array_equal(optimizer.momentums[0].numpy(), [3.0, 5.0])


def test_momentum_correction_refuses_slots_that_do_not_match_the_variables():
    import keras
    variables = [keras.Variable(np.ones(2, np.float32), name="kernel")]
    optimizer = _sgd_on(variables)
    with pytest.raises(ValueError, match="1 momentum slots for 2 variables"):
        recipes.correct_momentum(optimizer, [*variables, variables[0]], 0.1, 0.1)
    recipes.correct_momentum(_sgd_on(variables, momentum=0.0), variables, 0.1, 0.1)  # No velocity: nothing to do.


@pytest.mark.parametrize("correct", [False, True])
def test_a_learning_rate_drop_swings_the_weights_out_unless_the_momentum_is_corrected(correct):
    # SGD with §5's momentum on a steep quadratic, 0.5 x^2, at a rate where it
    # oscillates; then the rate drops tenfold. The old velocity, pulled back ten
    # times more weakly, swings x further out: the loss of the next steps rises.
    import keras
    x = keras.Variable(np.array([1.0], np.float32), name="kernel")
    optimizer = _sgd_on([x], learning_rate=1.0)

    def steps(n):
        losses = []
        for _ in range(n):
            optimizer.apply_gradients([(tf.convert_to_tensor(x.value), x)])  # d(0.5 x^2)/dx = x.
            losses.append(0.5 * float(x.numpy()[0]) ** 2)
        return np.mean(losses[-10:])

    before = steps(40)
    if correct:
        recipes.correct_momentum(optimizer, [x], 0.1, 0.1)
    optimizer.learning_rate.assign(0.1)
    after = steps(10)
    if correct:
        assert after < before / 2
    else:
        assert after > 2 * before
