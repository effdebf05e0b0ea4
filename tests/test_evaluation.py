"""Evaluation at any batch size: a partial last batch is padded and left out of
the sums, on every CPU kind (oneDNN forced on, as TensorFlow's x86 default) and
in every precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_padding_a_batch_of_unknown_size_reaches_the_convolution(dtype):
    # The reduced form of the fault: with oneDNN on AVX-512 CPUs, a convolution
    # right after tf.pad along the batch axis saw the unpadded batch.
    kernel = tf.constant(np.random.default_rng(0).normal(size=(3, 3, 3, 4)), dtype)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], dtype)])
    def convolved_batch(x):
        return tf.shape(tf.nn.conv2d(evaluation.pad_batch(x, 4), kernel, 1, "VALID"))[0]

    for n in (1, 2, 4):
        assert int(convolved_batch(tf.ones([n, 8, 8, 3], dtype))) == 4
    padded = evaluation.pad_batch(tf.ones([3, 2, 2]), 5).numpy()
    assert padded.shape == (5, 2, 2) and padded[:3].min() == 1 and padded[3:].max() == 0


EVALUATE = textwrap.dedent("""
    import json, sys
    from alexnet_tf import distribute
    strategy = distribute.make_strategy(sys.argv[2], cpu_devices=2)
    import tensorflow as tf
    from alexnet_tf import evaluation, model, preprocessing
    from tfrecords.folder import Records
    records = Records.open(sys.argv[1])
    stats = preprocessing.ColorStats.from_records(records, "image")
    with strategy.scope():
        net = model.build_alexnet(records.num_classes, seed=3, dtype=sys.argv[3])
        fc8 = net.get_layer("fc8")
        fc8.kernel.assign(fc8.kernel * 0.05)  # Softmax outputs that are not all 0 or 1.
    results = {}
    for batch in (100, 64, 16, 7, 40):
        ev = evaluation.Evaluator(net, strategy, records, stats, batch)
        results[batch] = {"central": ev.evaluate("validation")}
        if batch in (64, 40):  # Ten patches a batch of batch // 10 images: 6 (a partial last batch) and 4.
            results[batch]["ten"] = ev.evaluate("validation", ten_crop=True)
    print("RESULT", json.dumps(results))
""")


@pytest.mark.parametrize("strategy,dtype", [
    ("one_device", "float32"),
    pytest.param("mirrored", "float32", marks=pytest.mark.slow),
    pytest.param("one_device", "mixed_bfloat16", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_every_batch_size_gives_the_same_errors(built, strategy, dtype):
    """The sample's 40 validation images at batch sizes 100 and 64 (cut to the split), 16
    and 7 (partial last batches; under mirrored, replicas left empty) and 40 (no padding)."""
    out, meta = built
    assert meta.split("validation").num_examples == 40
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", EVALUATE, out, strategy, dtype], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    results = json.loads(line[len("RESULT "):])
    reference = results["40"]
    for batch, got in results.items():
        for kind in got:
            # Hit counts exactly; the loss to float32 rounding (a convolution's
            # sums for one image can follow another order at another batch size).
            assert got[kind]["top1_error"] == reference[kind]["top1_error"], (batch, kind)
            assert got[kind]["top5_error"] == reference[kind]["top5_error"], (batch, kind)
            assert got[kind]["loss"] == pytest.approx(reference[kind]["loss"], rel=1e-4), (batch, kind)
            assert got[kind]["loss"] > 0
