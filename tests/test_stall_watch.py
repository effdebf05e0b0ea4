"""The stall watch (alexnet_tf.stall_watch): one warning when the loss stays at
chance level or becomes non-finite, and a stop with --stop_if_stalled (in a
run, on the console and in TensorBoard: test_recipes.py)."""

from __future__ import annotations

import numpy as np
import pytest

from alexnet_tf.config import TrainConfig
from alexnet_tf.stall_watch import StallWatch, Stalled


def _sums(loss, count=32):
    return np.array([loss * count, 0, 0, count])


def test_stall_watch_warns_once_at_chance_level_after_the_set_steps():
    said = []
    watch = StallWatch(TrainConfig(stall_steps=100), 1000, lambda m, s: said.append((m, s)))
    chance = np.log(1000)
    assert watch.check(_sums(chance), 99) is None  # Too early.
    assert watch.check(_sums(0.94 * chance), 100) is None  # Learning.
    message = watch.check(_sums(chance - 0.01), 200)
    assert "after 200 steps" in message and "ln 1000 = 6.908" in message and "--recipe=caffe" in message
    assert said == [(message, 200)] and watch.check(_sums(chance), 300) is None  # Once.
    assert "other recipes: --recipe=paper" in StallWatch(TrainConfig(recipe="caffe", stall_steps=1), 10).check(
        _sums(3.0), 5)


def test_a_non_finite_loss_warns_at_once_and_stop_if_stalled_raises():
    watch = StallWatch(TrainConfig(stall_steps=0), 10)
    assert "became nan by step 3: the run diverged" in watch.check(_sums(np.nan), 3)
    stop = StallWatch(TrainConfig(stop_if_stalled=True), 10)
    with pytest.raises(Stalled, match="Stopped \\(--stop_if_stalled\\)"):
        stop.check(_sums(np.inf), 1)
