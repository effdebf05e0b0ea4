"""Workers that agree: sharded evaluation equal to one worker's, and a clear stop
when the workers of one run see different runs (two processes on 127.0.0.1)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import tensorflow as tf

import cluster
from alexnet_tf import distribute, evaluation, input_pipeline, model as model_lib, preprocessing, trainer
from alexnet_tf.config import TrainConfig
from tfrecords.folder import Records

EVALUATE = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    from alexnet_tf import distribute, evaluation, model, preprocessing
    from tfrecords.folder import Records
    strategy = distribute.make_strategy(sys.argv[2])
    records = Records.open(sys.argv[1])
    stats = preprocessing.ColorStats.from_records(records, "image")
    with strategy.scope():
        net = model.build_alexnet(records.num_classes, seed=3, dtype="float32")
    result = evaluation.Evaluator(net, strategy, records, stats, 16).evaluate("validation")
    print("RESULT", json.dumps(result))
""")


def _result(stdout: str) -> dict:
    (line,) = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow  # Two worker processes; the default suite keeps the two-worker training test.
def test_sharded_evaluation_equals_one_worker_exactly(built):
    out, meta = built
    assert len(Records(out, meta).shard_paths("validation")) == 1  # Split by record between the workers.
    outputs = cluster.run_workers(lambda i: ["-c", EVALUATE, out, "multi_worker"])
    sharded = [_result(stdout) for stdout, _ in outputs]
    # One worker, the same weights (seeded), the same batch size: the whole split.
    stats = preprocessing.ColorStats.from_records(Records(out, meta), "image")
    net = model_lib.build_alexnet(meta.num_classes, seed=3, dtype="float32")
    whole = evaluation.Evaluator(net, tf.distribute.get_strategy(), Records(out, meta), stats, 16).evaluate("validation")
    assert sharded[0] == sharded[1]  # Integer sums: the workers agree bit for bit.
    # Hit counts exactly; the loss to float32 precision (a multi-worker process's
    # float32 per-image losses can be one bit away from this process's).
    assert {k: v for k, v in sharded[0].items() if k != "loss"} == {k: v for k, v in whole.items() if k != "loss"}
    assert math.isclose(sharded[0]["loss"], whole["loss"], rel_tol=1e-7)
    assert 0 < whole["loss"] and 0 <= whole["top1_error"] <= 1


def test_a_diverged_network_evaluates_to_a_nan_loss_not_a_number(built):
    out, meta = built
    stats = preprocessing.ColorStats.from_records(Records(out, meta), "image")
    nan = lambda images, training: tf.fill([tf.shape(images)[0], 10], float("nan"))  # noqa: E731
    result = evaluation.Evaluator(nan, tf.distribute.get_strategy(), Records(out, meta), stats, 16).evaluate("validation")
    assert math.isnan(result["loss"]) and result["top1_error"] == 1.0


def test_each_worker_evaluates_only_its_share(built):
    out, meta = built
    stats = preprocessing.ColorStats.from_records(Records(out, meta), "image")
    counts = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=1)
        counts.append(sum(int(y.shape[0]) for _, y in input_pipeline.eval_dataset(Records(out, meta), stats, 16,
                                                                                    context=context)))
    assert counts == [20, 20] and sum(counts) == meta.splits["validation"].num_examples


def _checkpoint_at_step(data_dir: str, model_dir, step: int) -> None:
    """A checkpoint of the trainer's own structure, as a run stopped at `step` leaves it."""
    config = TrainConfig(data_dir=data_dir, batch_size=8, seed=0)
    strategy = tf.distribute.get_strategy()
    model, optimizer = trainer.build_model_and_optimizer(config, 10, strategy, "float32")
    state = trainer.LoopState(config.learning_rate)
    state.global_step.assign(step)
    state.step_in_epoch.assign(step)
    trainer.open_checkpoints(str(model_dir), strategy, True, model, optimizer, state).save(step)


def test_workers_that_see_different_runs_stop_naming_the_difference(built, tmp_path):
    out, _ = built
    chief_dir, other_dir = tmp_path / "shared", tmp_path / "elsewhere"
    _checkpoint_at_step(out, chief_dir, 5)
    # Worker 1 is given another (empty) model folder and another learning rate.
    args = [["--model_dir", str(chief_dir), "--learning_rate=0.01"],
            ["--model_dir", str(other_dir), "--learning_rate=0.02"]]
    results = cluster.start_workers(lambda i: [
        "-m", "alexnet_tf.train", "--strategy=multi_worker", "--data_dir", out, "--batch_size=8",
        "--steps_per_epoch=2", "--epochs=1", "--seed=0", "--log_images=0", "--nohistograms", "--nofigures",
        "--noexport",
        *args[i]])
    for i, (code, _, stderr) in enumerate(results):
        assert code == 1, f"worker {i}: {stderr[-2000:]}"
        assert "train: error: the workers do not see the same run" in stderr
        for fact in ("--learning_rate", "restored checkpoint", "global step"):
            assert f"{fact} (workers 1 differ from the chief" in stderr, (fact, stderr[-2000:])
        assert "Traceback" not in stderr
    assert "worker 1 has 0.02" in results[1][2] and "worker 0 has 'ckpt-5'" in results[0][2]
    assert not (other_dir / "checkpoints").exists() or not tf.train.latest_checkpoint(str(other_dir / "checkpoints"))


def test_a_resumed_run_keeps_its_seed_batch_size_and_workers():
    strategy = tf.distribute.get_strategy()
    state = trainer.LoopState(0.01)
    config = TrainConfig(batch_size=8, seed=None)
    seed = trainer.settle_stream(config, state, strategy, resumed=False)
    assert 0 <= seed == int(state.stream_seed) and int(state.global_batch) == 8 and int(state.input_pipelines) == 1
    # Resumed without --seed: the recorded one.
    assert trainer.settle_stream(config, state, strategy, resumed=True) == seed
    with pytest.raises(distribute.RunConflict, match="the checkpoint's run has --batch_size 8, this one 16"):
        trainer.settle_stream(TrainConfig(batch_size=16), state, strategy, resumed=True)
    with pytest.raises(distribute.RunConflict, match=f"has --seed {seed}, this one {seed + 1}"):
        trainer.settle_stream(TrainConfig(batch_size=8, seed=seed + 1), state, strategy, resumed=True)



def test_a_resumed_run_keeps_its_settings_and_writes_nothing_before_it_knows(built, tmp_path):
    from alexnet_tf import run_dir

    out, meta = built
    _checkpoint_at_step(out, tmp_path, 5)
    stats = preprocessing.ColorStats.from_records(Records(out, meta))
    run_dir.write_model_info(str(tmp_path), num_classes=meta.num_classes, grouped=True, dropout=0.5,
                             classes=[c.to_json() for c in meta.classes], mean=stats.mean, mean_kind="image",
                             square_size=stats.square_size, recipe="paper")
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
    trainer.check_same_run(info, mean, config, data, str(tmp_path))  # The same settings: resumes.
    with pytest.raises(distribute.RunConflict, match="subtracts another mean"):
        trainer.check_same_run(info, mean + 1, config, data, str(tmp_path))
    # A folder written before the recipe was recorded: any recipe, but still the same layout.
    del info["recipe"]
    trainer.check_same_run(info, mean, TrainConfig(data_dir=out, recipe="caffe"), data, str(tmp_path))
    with pytest.raises(distribute.RunConflict, match="--grouped"):
        trainer.check_same_run(info, mean, TrainConfig(data_dir=out, recipe="caffe", grouped=False), data,
                               str(tmp_path))
