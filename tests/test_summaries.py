"""TensorBoard's summaries (alexnet_tf.summaries): weight histograms counted on
the host, row for row TensorBoard's own, and their benchmark (the scalars and
figures as TensorBoard serves them from a run: test_figures.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import summaries


def test_histograms_are_tensorboards_own_counted_on_the_host(tmp_path):
    rng = np.random.default_rng(0)
    cases = {"normal": rng.normal(0, 0.01, (300, 7)).astype(np.float32), "constant": np.full(50, 1.0, np.float32),
             "empty": np.zeros(0, np.float32), "ints": np.arange(100, dtype=np.float32),
             "two chunks": rng.normal(0, 1, (1 << 22) + 1000).astype(np.float32)}
    writers = {k: tf.summary.create_file_writer(str(tmp_path / k)) for k in ("tf", "ours")}
    for step, data in enumerate(cases.values()):
        with writers["tf"].as_default(step=step):
            tf.summary.histogram("h", data)
        with writers["ours"].as_default(step=step):
            summaries.write_histogram("h", data)
    for w in writers.values():
        w.close()

    def read(kind):
        out = {}
        for name in os.listdir(tmp_path / kind):
            for event in tf.compat.v1.train.summary_iterator(str(tmp_path / kind / name)):
                for v in event.summary.value:
                    out[event.step] = (v.metadata.plugin_data.plugin_name, tf.make_ndarray(v.tensor))
        return out

    theirs, ours = read("tf"), read("ours")
    assert sorted(ours) == list(range(len(cases)))
    for step in ours:
        assert ours[step][0] == theirs[step][0] == "histograms"
        assert ours[step][1].shape == theirs[step][1].shape == (30, 3)
        np.testing.assert_allclose(ours[step][1], theirs[step][1], rtol=1e-12, atol=0)
    assert ours[0][1][:, 2].sum() == 2100  # Every value counted once.
    # Non-finite values are left out, not counted into a bucket.
    w = tf.summary.create_file_writer(str(tmp_path / "nan"))
    with w.as_default(step=0):
        summaries.write_histogram("h", np.array([1.0, np.nan, 2.0, np.inf], np.float32))
    w.close()
    (name,) = os.listdir(tmp_path / "nan")
    (rows,) = [tf.make_ndarray(v.tensor) for e in tf.compat.v1.train.summary_iterator(str(tmp_path / "nan" / name))
               for v in e.summary.value]
    assert rows[:, 2].sum() == 2 and rows[0, 0] == 1.0 and rows[-1, 1] == 2.0


@pytest.mark.slow  # Two child processes building AlexNet.
def test_bench_histograms_measures_both_ways_on_the_same_values(tmp_path, capsys):
    from benchmarks import histograms as bench

    out = tmp_path / "histograms.json"
    bench.main(["--layers", "conv1,fc8", "--runs", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    # conv1 (11x11x3x96 + 96) and fc8 (4096x1000 + 1000), both ways.
    assert r["values"] == r["tensorboard"]["values"] == 11 * 11 * 3 * 96 + 96 + 4096 * 1000 + 1000
    assert r["tensorboard"]["variables"] == r["numpy"]["variables"] == 4
    assert r["speedup"] == pytest.approx(r["tensorboard"]["seconds"] / r["numpy"]["seconds"])
    assert "| ratio (tf.summary / ours) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no trainable variables in layers 'nope'"):
        bench.main(["--layers", "nope", "--runs", "1", "--out", str(tmp_path / "x.json")])
