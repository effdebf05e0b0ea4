"""Workers that agree: sharded evaluation equal to one worker's, and a clear stop
when the workers of one run see different runs (two processes on 127.0.0.1)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import tensorflow as tf

import cluster
from alexnet_tf import evaluation, input_pipeline, model as model_lib, preprocessing
from conftest import checkpoint_at_step
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


@pytest.mark.slow
def test_workers_that_see_different_runs_stop_naming_the_difference(built, tmp_path):
    out, _ = built
    chief_dir, other_dir = tmp_path / "shared", tmp_path / "elsewhere"
    checkpoint_at_step(out, chief_dir, 5)
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
