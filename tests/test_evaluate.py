"""`python -m alexnet_tf.evaluate`: central and ten-patch errors, and the records it refuses."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import preprocessing, run_dir
from conftest import cli as _cli, read_split
from export_checks import run_main as _main, tiny_export as _tiny_export, tiny_info as _tiny_info


@pytest.mark.slow
def test_evaluate_reports_central_and_ten_crop_errors(exported, tmp_path):
    path, model, stats, out, meta = exported
    proc = _cli("alexnet_tf.evaluate", "--saved_model", path, "--data_dir", out,
                "--output_json", str(tmp_path / "eval.json"), "--batch_size", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "paper, 1 CNN (ILSVRC-2012 val)" in proc.stdout and "40.7%" in proc.stdout and "18.2%" in proc.stdout
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_examples"] == meta.splits["validation"].num_examples
    # A direct computation over the records with the Keras model.
    rows = read_split(out, meta, "validation")
    central = tf.nn.softmax(model(tf.stack([preprocessing.preprocess_for_eval(tf.constant(r["jpeg"]), stats)
                                            for r in rows]), training=False)).numpy()
    ten = np.stack([
        tf.nn.softmax(model(preprocessing.ten_crops(tf.constant(r["jpeg"]), stats), training=False)).numpy().mean(0)
        for r in rows])
    labels = np.array([r["label"] for r in rows])
    for probs, key in ((central, "central_crop"), (ten, "ten_crops")):
        order = np.argsort(-probs, axis=1)
        assert result[key]["top1_error"] == pytest.approx(np.mean(order[:, 0] != labels), abs=1e-9)
        assert result[key]["top5_error"] == pytest.approx(
            np.mean([l not in o[:5] for l, o in zip(labels, order)]), abs=1e-9)


@pytest.mark.slow
def test_evaluate_bad_inputs(exported, tmp_path):
    path, _, _, out, _ = exported
    missing = _cli("alexnet_tf.evaluate", "--saved_model", str(tmp_path / "none"), "--data_dir", out)
    assert missing.returncode == 1 and "is not a SavedModel" in missing.stderr.strip().splitlines()[-1]
    split = _cli("alexnet_tf.evaluate", "--saved_model", path, "--data_dir", out, "--split", "test")
    assert split.returncode == 1 and "split 'test' is not in" in split.stderr.strip().splitlines()[-1]
    data = _cli("alexnet_tf.evaluate", "--saved_model", path, "--data_dir", str(tmp_path))
    assert data.returncode == 1 and "metadata.json not found" in data.stderr.strip().splitlines()[-1]


def _records_of_other_classes(out, meta, dest):
    """A copy of the records whose metadata.json names the first two classes the other way round."""
    import dataclasses
    import shutil

    from tfrecords import metadata

    shutil.copytree(out, dest)
    c = list(meta.classes)
    c[0], c[1] = (dataclasses.replace(c[0], synset=c[1].synset, name=c[1].name),
                  dataclasses.replace(c[1], synset=c[0].synset, name=c[0].name))
    metadata.write_metadata(str(dest), dataclasses.replace(meta, classes=tuple(c)))
    return str(dest), c


@pytest.mark.slow
@pytest.mark.parametrize("source", ["--saved_model", "--model_dir"])
def test_evaluate_refuses_records_of_other_classes(exported, tmp_path, source):
    path, _, _, out, meta = exported
    other, classes = _records_of_other_classes(out, meta, tmp_path / "other")
    model = path if source == "--saved_model" else os.path.dirname(path)
    r = _cli("alexnet_tf.evaluate", source, model, "--data_dir", other, "--noten_crops")
    assert r.returncode == 1
    assert (f"evaluate: error: the model and {other} have different classes: label 0 is {meta.classes[0].synset} "
            f"in the model, {classes[0].synset} in {other} (and 1 more labels differ)") in r.stderr


@pytest.mark.slow
def test_training_refuses_to_continue_a_run_on_other_classes(exported, tmp_path):
    path, _, _, out, meta = exported
    other, classes = _records_of_other_classes(out, meta, tmp_path / "other")
    model_dir = os.path.dirname(path)  # A run folder of the original classes.
    info = os.path.join(model_dir, run_dir.MODEL_INFO)
    before = open(info, "rb").read()
    r = _cli("alexnet_tf.train", "--preset=sample", f"--data_dir={other}", f"--model_dir={model_dir}",
             "--strategy=one_device")
    assert r.returncode == 1
    assert (f"train: error: the run in {model_dir} and {other} have different classes: label 0 is "
            f"{meta.classes[0].synset}") in r.stderr
    assert open(info, "rb").read() == before  # Nothing of the run was overwritten.


@pytest.mark.parametrize("source", ["--saved_model", "--model_dir"])
def test_evaluate_refuses_records_smaller_than_the_models_patches_before_any_work(built, model_folder, tmp_path,
                                                                                 capsys, monkeypatch, source):
    import dataclasses
    import shutil

    from alexnet_tf import evaluate
    from tfrecords import metadata

    out, meta = built
    small = tmp_path / "small"  # As built with --image_size=100.
    shutil.copytree(out, small)
    metadata.write_metadata(str(small), dataclasses.replace(meta, image=dataclasses.replace(meta.image, size=100)))
    if source == "--saved_model":
        model = str(tmp_path / "exported")
        _tiny_export(model, info=_tiny_info([c.to_json() for c in meta.classes]))
    else:
        model = model_folder[0]
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluation started"))
    code, stdout, err = _main(evaluate, [source, model, "--data_dir", str(small)], capsys)
    assert code == 1 and err == [f"evaluate: error: {small} holds 100x100 images, smaller than the 227x227 patches "
                                 "the model takes; rebuild the records with --image_size of at least 227 (the "
                                 "paper's 256)"]
