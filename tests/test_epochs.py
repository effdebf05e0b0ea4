"""The epochs' stream seed, each epoch's job name, result and console line, and the release of
finished input iterators (`alexnet_tf.epochs`)."""

from __future__ import annotations

import threading

import pytest

from alexnet_tf import distribute, epochs
from alexnet_tf.config import TrainConfig
from alexnet_tf.run_state import LoopState


def test_a_resumed_run_keeps_its_seed_batch_size_and_workers():
    state = LoopState(0.01)
    config = TrainConfig(batch_size=8, seed=None)
    seed = epochs.settle_stream(config, state, False, 1, (1234, 99))
    assert seed == 1234 == int(state.stream_seed) and int(state.run_id) == 99
    assert int(state.global_batch) == 8 and int(state.input_pipelines) == 1
    # Resumed without --seed: the recorded seed and identity, not the ones drawn this time.
    assert epochs.settle_stream(config, state, True, 1, (5678, 7)) == seed and int(state.run_id) == 99
    with pytest.raises(distribute.RunConflict, match="the checkpoint's run has --batch_size 8, this one 16"):
        epochs.settle_stream(TrainConfig(batch_size=16), state, True, 1, (5678, 7))
    with pytest.raises(distribute.RunConflict, match=f"has --seed {seed}, this one {seed + 1}"):
        epochs.settle_stream(TrainConfig(batch_size=8, seed=seed + 1), state, True, 1, (5678, 7))
    with pytest.raises(distribute.RunConflict, match="has workers \\(input pipelines\\) 1, this one 2"):
        epochs.settle_stream(config, state, True, 2, (5678, 7))
    # A checkpoint written before runs had an identity takes the one drawn now.
    state.run_id.assign(-1)
    assert epochs.settle_stream(config, state, True, 1, (5678, 7)) == seed and int(state.run_id) == 7


def test_a_finished_iterator_is_let_go_on_its_own_thread_and_waited_for_at_the_end():
    gate, seen = threading.Event(), []

    class SlowToEnd:  # Stands for an input iterator whose teardown waits.
        def __del__(self):
            # Waits for the caller to go on: had `drop` torn it down in place, the caller could not.
            seen.append((threading.current_thread().name, gate.wait(30)))

    with epochs.Releases() as releases:
        releases.drop([SlowToEnd()])
        gate.set()
    assert seen == [("release-input-iterator", True)]  # Done by the end of the block.
