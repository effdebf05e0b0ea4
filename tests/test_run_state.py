"""The run's state (alexnet_tf.run_state): checkpoints found when their list is
lost, a damaged or unwritable checkpoint named in one line, a checkpoint of an
earlier version restored, and a resumed run that keeps its seed, batch size,
workers and settings."""

from __future__ import annotations

import dataclasses
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import distribute, preprocessing, run_dir, run_state, trainer
from alexnet_tf.config import TrainConfig
from alexnet_tf.run_state import LoopState
from conftest import checkpoint_at_step, model_info
from tfrecords.folder import Records


# -- checkpoints ----------------------------------------------------------------------


def _checkpoints(model_dir, state=None, **extra):
    state = state or LoopState(0.01)
    return state, run_state._Checkpoints(str(model_dir), tf.distribute.get_strategy(), True, **state.trackables(),
                                         **extra)


def _saved_steps(model_dir):
    state, checkpoints = _checkpoints(model_dir)
    for step in (1, 2, 3):
        state.global_step.assign(step)
        checkpoints.save(step)
    return model_dir / run_dir.CHECKPOINTS


@pytest.mark.parametrize("state_file", ["missing", "garbled", "names a checkpoint that is gone"])
def test_a_lost_checkpoint_list_resumes_from_the_newest_readable_checkpoint(tmp_path, capsys, state_file):
    ckpt_dir = _saved_steps(tmp_path)
    listing = ckpt_dir / run_dir.CHECKPOINT_STATE
    if state_file == "missing":
        listing.unlink()
    elif state_file == "garbled":
        listing.write_bytes(b"\x00\xffnot { a checkpoint state")
    else:
        listing.write_text('model_checkpoint_path: "ckpt-9"\n')
    # ckpt-3's index damaged: the newest readable one is ckpt-2.
    (ckpt_dir / "ckpt-3.index").write_bytes(b"garbage")
    state, checkpoints = _checkpoints(tmp_path)
    assert checkpoints.restore() == str(ckpt_dir / "ckpt-2") and int(state.global_step) == 2
    assert "resuming from ckpt-2, the newest readable checkpoint" in capsys.readouterr().out
    assert tf.train.latest_checkpoint(str(ckpt_dir)) == str(ckpt_dir / "ckpt-2")  # The list written again.
    # The run goes on from there and its manager keeps the earlier ones in its count.
    checkpoints.save(4)
    assert tf.train.get_checkpoint_state(str(ckpt_dir)).all_model_checkpoint_paths == [
        str(ckpt_dir / f"ckpt-{step}") for step in (1, 2, 4)]


def test_checkpoint_files_none_of_which_is_readable_stop_the_run(tmp_path):
    ckpt_dir = _saved_steps(tmp_path)
    (ckpt_dir / run_dir.CHECKPOINT_STATE).unlink()
    for step in (1, 2, 3):
        (ckpt_dir / f"ckpt-{step}.index").write_bytes(b"garbage")
    with pytest.raises(run_dir.RunDirError, match=r"holds checkpoints \(ckpt-1, ckpt-2, ckpt-3\) but none is readable"):
        _checkpoints(tmp_path)


def test_a_damaged_checkpoint_is_named_not_taken_for_a_records_shard(tmp_path):
    ckpt_dir = _saved_steps(tmp_path)
    (data,) = [p for p in ckpt_dir.iterdir() if p.name.startswith("ckpt-3.data")]
    damaged = bytearray(data.read_bytes())
    damaged[0] ^= 0xFF
    data.write_bytes(bytes(damaged))
    _, checkpoints = _checkpoints(tmp_path)
    with pytest.raises(run_dir.RunDirError, match=rf"checkpoint {ckpt_dir / 'ckpt-3'} cannot be read \(.*Checksum "
                                                  r"does not match.*\): it is damaged. Move its files \(ckpt-3\.\*\) "
                                                  "aside to resume from ckpt-2"):
        checkpoints.restore()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs the right to mount, as root has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(small_disk):
    weights = tf.Variable(tf.zeros([64 * 1024]))  # 256 KiB a checkpoint.
    state, checkpoints = _checkpoints(small_disk, weights=weights)
    checkpoints.save(1)
    (small_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 400 * 1024))  # Room for one more, not two.
    with pytest.raises(run_dir.RunDirError, match=r"cannot write checkpoint ckpt-\d into .*No space left on device.*"
                                                  "its partial files are removed and the earlier checkpoints kept"):
        checkpoints.save(2)
        checkpoints.save(3)
    ckpt_dir = small_disk / run_dir.CHECKPOINTS
    assert not [p for p in ckpt_dir.iterdir() if "_temp" in p.name]
    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    np.testing.assert_array_equal(tf.train.load_variable(latest, "weights/.ATTRIBUTES/VARIABLE_VALUE"), weights)


def test_a_checkpoint_without_the_run_id_still_restores(tmp_path):
    """Checkpoints written before the loop state had `run_id` resume; it is drawn afresh."""
    state = LoopState(0.01)
    state.global_step.assign(7)
    older = {k: v for k, v in state.trackables().items() if k != "run_id"}
    tf.train.Checkpoint(**older).save(str(tmp_path / "checkpoints" / "ckpt"))
    fresh = LoopState(0.01)
    checkpoints = run_state._Checkpoints(str(tmp_path), tf.distribute.get_strategy(), True, **fresh.trackables())
    assert checkpoints.restore() and int(fresh.global_step) == 7 and int(fresh.run_id) == -1
    # Anything else missing still fails.
    del older["global_step"]
    tf.train.Checkpoint(**older).save(str(tmp_path / "other" / "checkpoints" / "ckpt"))
    broken = run_state._Checkpoints(str(tmp_path / "other"), tf.distribute.get_strategy(), True,
                                    **LoopState(0.01).trackables())
    with pytest.raises(AssertionError, match="not bound to checkpointed values"):
        broken.restore()


# -- before a run resumes ---------------------------------------------------------------


def test_a_resumed_run_keeps_its_settings_and_writes_nothing_before_it_knows(built, tmp_path):
    out, meta = built
    checkpoint_at_step(out, tmp_path, 5)
    stats = preprocessing.ColorStats.from_records(Records(out, meta))
    run_dir.write_model_info(str(tmp_path), model_info(meta, square_size=stats.square_size, recipe="paper"),
                             stats.mean)
    before = {name: (tmp_path / name).read_bytes() for name in (run_dir.MODEL_INFO, run_dir.MEAN_IMAGE)}
    strategy = tf.distribute.get_strategy()
    for change, message in (({"recipe": "caffe"}, "has --recipe=paper, this one --recipe=caffe"),
                            ({"grouped": False}, "has --grouped=True, this one --grouped=False"),
                            ({"dropout": 0.9}, "has --dropout=0.5, this one --dropout=0.9"),
                            ({"mean": "rgb"}, "has --mean=image, this one --mean=rgb")):
        config = TrainConfig(data_dir=out, batch_size=8, steps_per_epoch=1, epochs=1, seed=0, **change)
        with pytest.raises(distribute.RunConflict, match=f"the run in {tmp_path} {message}: a resumed run keeps"):
            trainer.train_and_evaluate(config, str(tmp_path), strategy)
        # Refused before writing: a later export of the run still has its own mean.
        assert {name: (tmp_path / name).read_bytes() for name in before} == before
    config = TrainConfig(data_dir=out, batch_size=8, steps_per_epoch=1, epochs=1, seed=0)
    data = trainer.read_data(config, strategy)
    info, mean = run_dir.read_model_info(str(tmp_path))
    run_state.check_same_run(info, mean, config, data, str(tmp_path))  # The same settings: resumes.
    with pytest.raises(distribute.RunConflict, match="subtracts another mean"):
        run_state.check_same_run(info, mean + 1, config, data, str(tmp_path))
    # A folder written before the recipe was recorded: any recipe, but still the same layout.
    info = dataclasses.replace(info, recipe=None)
    run_state.check_same_run(info, mean, TrainConfig(data_dir=out, recipe="caffe"), data, str(tmp_path))
    with pytest.raises(distribute.RunConflict, match="--grouped"):
        run_state.check_same_run(info, mean, TrainConfig(data_dir=out, recipe="caffe", grouped=False), data,
                                 str(tmp_path))
