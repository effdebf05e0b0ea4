"""The SavedModel (serving signatures), `alexnet_tf.evaluate` and `alexnet_tf.predict`."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from alexnet_tf import export, input_pipeline, run_dir
from conftest import read_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def exported(built, model_folder):
    """The shared model folder and its export via the CLI."""
    out, meta = built
    model_dir, model, stats = model_folder
    export_dir = os.path.join(model_dir, "exported")
    proc = _cli("alexnet_tf.export", "--model_dir", model_dir, "--export_dir", export_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return export_dir, model, stats, out, meta


def test_serving_signature_matches_the_keras_model(exported):
    path, model, stats, out, meta = exported
    loaded = tf.saved_model.load(path)
    rows = read_split(out, meta, "validation")[:4]
    result = loaded.signatures["serving_default"](images=tf.constant([r["jpeg"] for r in rows]))
    x = tf.stack([input_pipeline.preprocess_for_eval(tf.constant(r["jpeg"]), stats) for r in rows])
    expected = tf.nn.softmax(model(x, training=False)).numpy()
    np.testing.assert_allclose(result["probabilities"].numpy(), expected, rtol=1e-4, atol=1e-6)
    order = np.argsort(-expected, axis=1)[:, :5]
    np.testing.assert_array_equal(result["top5_labels"].numpy(), order)
    np.testing.assert_allclose(result["top5_probabilities"].numpy(), np.take_along_axis(expected, order, 1),
                               rtol=1e-4, atol=1e-6)
    synsets = [[meta.classes[i].synset.encode() for i in row] for row in order]
    names = [[meta.classes[i].name.encode() for i in row] for row in order]
    assert result["top5_synsets"].numpy().tolist() == synsets
    assert result["top5_names"].numpy().tolist() == names
    # The preprocessed signature gives the logits of the same network.
    logits = loaded.signatures["preprocessed"](images=x)["logits"].numpy()
    np.testing.assert_allclose(logits, model(x, training=False).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(loaded.mean[0].numpy(), stats.mean)


def test_export_carries_fc7_and_conv1s_kernels_for_the_figures(exported):
    from alexnet_tf import figures

    path, model, _, _, _ = exported
    loaded = tf.saved_model.load(path)
    np.testing.assert_array_equal(loaded.conv1_kernel[0].numpy(), figures.conv1_kernel(model))
    assert export.conv1_groups(loaded) == 2
    x = tf.random.stateless_normal((2, 227, 227, 3), seed=(3, 3)) * 40
    fc7 = loaded.signatures["preprocessed"](images=x)["fc7"].numpy()
    np.testing.assert_allclose(fc7, figures.feature_model(model)(x)[0].numpy(), rtol=1e-4, atol=1e-4)
    assert fc7.shape == (2, 4096) and (fc7 >= 0).all()  # After fc7's ReLU.


def test_png_input_and_any_size(exported):
    path, model, stats, out, meta = exported
    loaded = tf.saved_model.load(path)
    jpeg = read_split(out, meta, "validation")[0]["jpeg"]
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, format="PNG")
    big = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).resize((400, 300)).save(big, format="JPEG")
    result = loaded.signatures["serving_default"](images=tf.constant([jpeg, png.getvalue(), big.getvalue()]))
    probs = result["probabilities"].numpy()
    assert probs.shape == (3, meta.num_classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # The PNG holds the JPEG's decoded pixels: the same answer.
    np.testing.assert_allclose(probs[1], probs[0], rtol=1e-4, atol=1e-6)


def test_the_colour_under_a_transparent_pixel_never_changes_the_prediction(exported):
    from conftest import encode

    path, _, _, out, meta = exported
    serve = tf.saved_model.load(path).signatures["serving_default"]
    base = np.asarray(Image.open(io.BytesIO(read_split(out, meta, "validation")[0]["jpeg"])).convert("RGB"))
    hidden = np.zeros(base.shape[:2], bool)
    hidden[:, :100] = True  # The left 100 columns are fully transparent.

    def rgba_png(colour):
        rgba = np.dstack([base, np.full(base.shape[:2], 255, np.uint8)])
        rgba[hidden] = [*colour, 0]
        return encode(Image.fromarray(rgba, "RGBA"), "PNG")

    quantized = Image.fromarray(base).quantize(255)  # Index 255 is free for the transparent colour.
    indices = np.asarray(quantized).copy()
    indices[hidden] = 255

    def gif(colour):
        p = Image.fromarray(indices, "P")
        p.putpalette(quantized.getpalette()[:765] + list(colour))
        return encode(p, "GIF", transparency=255, optimize=False)

    def on_white(rgb):  # What the build stores: the transparent pixels white.
        rgb = rgb.copy()
        rgb[hidden] = 255
        return encode(Image.fromarray(rgb), "PNG")

    shown = np.asarray(quantized.convert("RGB"))
    images = [rgba_png((255, 0, 0)), rgba_png((0, 0, 255)), on_white(base),
              gif((255, 0, 0)), gif((0, 0, 0)), on_white(shown)]
    probs = serve(images=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_array_equal(probs[0], probs[1])
    np.testing.assert_array_equal(probs[0], probs[2])
    np.testing.assert_array_equal(probs[3], probs[4])  # TensorFlow alone shows a GIF's transparent pixels black.
    np.testing.assert_array_equal(probs[3], probs[5])
    assert not np.array_equal(probs[0], probs[3])  # The comparisons can tell images apart.


def test_serving_in_chunks_gives_the_whole_batchs_outputs(exported, tmp_path, monkeypatch):
    path, model, stats, out, meta = exported
    model_dir = os.path.dirname(path)
    monkeypatch.setattr(export, "SERVING_CHUNK", 3)
    chunked = tf.saved_model.load(export.export_trained(model, model_dir, str(tmp_path / "chunked")))
    monkeypatch.setattr(export, "SERVING_CHUNK", 1000)  # The whole request at once.
    whole = tf.saved_model.load(export.export_trained(model, model_dir, str(tmp_path / "whole")))
    rows = read_split(out, meta, "validation")
    images = tf.constant([rows[i % len(rows)]["jpeg"] for i in range(8)])  # Chunks of 3, 3 and 2.
    a, b = (m.signatures["serving_default"](images=images) for m in (chunked, whole))
    assert a.keys() == b.keys() and a["probabilities"].shape == (8, meta.num_classes)
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
    x = tf.stack([input_pipeline.preprocess_for_eval(images[i], stats) for i in range(8)])
    a, b = (m.signatures["preprocessed"](images=x) for m in (chunked, whole))
    assert sorted(a) == ["fc7", "logits", "probabilities"]
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
    empty = chunked.signatures["serving_default"](images=tf.constant([], tf.string))
    assert empty["probabilities"].shape == (0, meta.num_classes) and empty["top5_names"].shape == (0, 5)
    # A caller's static batch size stays in the outputs' shapes (the evaluation's ten patches reshape by it).
    shapes = {}

    @tf.function
    def call(x):
        out = chunked.preprocessed(x)
        shapes.update({k: tuple(v.shape) for k, v in out.items()})
        return out["logits"]

    call.get_concrete_function(tf.TensorSpec([80, 227, 227, 3]))
    assert shapes == {"logits": (80, meta.num_classes), "probabilities": (80, meta.num_classes), "fc7": (80, 4096)}


MANY = textwrap.dedent("""
    import resource, sys
    import tensorflow as tf
    serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    jpeg = open(sys.argv[2], "rb").read()
    serve(images=tf.constant([jpeg]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = serve(images=tf.constant([jpeg] * int(sys.argv[3])))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(out["probabilities"].shape[0], before // 1024, after // 1024)
""")


@pytest.mark.slow  # 1000 images through the network: about a minute on 2 cores.
def test_a_large_request_takes_one_chunks_memory(exported, tmp_path):
    path, _, _, out, meta = exported
    image = tmp_path / "x.jpg"
    image.write_bytes(read_split(out, meta, "validation")[0]["jpeg"])
    r = subprocess.run([sys.executable, "-c", MANY, path, str(image), "1000"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    n, before_mib, after_mib = map(int, r.stdout.split())
    assert n == 1000
    # In chunks of 64: about 200 MiB over the loaded model. At once, 1000 images took about 5 GB.
    assert after_mib - before_mib < 600, (before_mib, after_mib)


def test_class_list_is_an_asset(exported):
    path, _, _, _, meta = exported
    lines = open(os.path.join(path, "assets", export.CLASSES_ASSET)).read().splitlines()
    assert lines == [f"{c.label}\t{c.synset}\t{c.name}" for c in meta.classes]


def test_undecodable_input_is_a_clear_error_and_serving_goes_on(exported):
    path, _, _, out, meta = exported
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF or BMP image"):
        serve(images=tf.constant([b"<html>404</html>"]))
    jpeg = read_split(out, meta, "validation")[0]["jpeg"]
    with pytest.raises(tf.errors.InvalidArgumentError):
        serve(images=tf.constant([jpeg[:200]]))  # Truncated inside the header.
    # Binary non-images: the same error (not a UnicodeDecodeError), naming the batch element.
    for binary, first in ((gzip.compress(b"x" * 100), [31, 139]), (bytes(range(250, 256)) + b"\0\1", [250, 251])):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"not a JPEG, PNG, GIF or BMP image: element\] \[1\] \[of the batch starts with "
                                 rf"bytes\] \[{first[0]} {first[1]}"):
            serve(images=tf.constant([jpeg, binary]))
    assert serve(images=tf.constant([jpeg]))["probabilities"].shape == (1, meta.num_classes)


def test_an_image_above_the_pixel_limit_is_refused_from_its_header(exported):
    from alexnet_tf import input_pipeline
    from conftest import png_claiming
    from pipelines import image_processing

    assert input_pipeline.MAX_PIXELS == image_processing.MAX_PIXELS  # Serving refuses what the build refuses.
    path, _, _, out, meta = exported
    serve = tf.saved_model.load(path).signatures["serving_default"]
    jpeg = read_split(out, meta, "validation")[0]["jpeg"]
    # 96 bytes claiming 30000 x 20000: refused before any decoding (which would take 1.8 GB).
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"image\] \[1\] \[of the batch is\] \[20000\] \[x\] \[30000\] \[pixels "
                             r"\(height x width\), above the limit of 134217728 decoded pixels"):
        serve(images=tf.constant([jpeg, png_claiming(30000, 20000)]))
    assert serve(images=tf.constant([jpeg]))["probabilities"].shape == (1, meta.num_classes)


THIN = textwrap.dedent("""
    import io, resource, sys
    import numpy as np, tensorflow as tf
    from PIL import Image
    serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    def png(w, h):
        b = io.BytesIO(); Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(b, format="PNG"); return b.getvalue()
    serve(images=tf.constant([png(400, 300)]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = serve(images=tf.constant([png(20000, 1), png(1, 20000)]))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(out["probabilities"].shape[0], before // 1024, after // 1024)
""")


def test_long_thin_images_take_bounded_memory_in_serving(exported):
    path = exported[0]
    r = subprocess.run([sys.executable, "-c", THIN, path], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n, before_mib, after_mib = map(int, r.stdout.split())
    assert n == 2
    # Cropped to 1x1 before scaling: no more than noise. Scaled whole first, a
    # 20000x1 image became 5,120,000x256 pixels (several GB).
    assert after_mib - before_mib < 100, (before_mib, after_mib)


def test_fresh_process_with_only_tensorflow(exported, tmp_path):
    path, _, _, out, meta = exported
    image = tmp_path / "x.jpg"
    image.write_bytes(read_split(out, meta, "validation")[0]["jpeg"])
    code = (
        "import sys, tensorflow as tf\n"
        f"m = tf.saved_model.load({path!r})\n"
        f"r = m.signatures['serving_default'](images=tf.constant([open({str(image)!r}, 'rb').read()]))\n"
        "assert not any(k.startswith(('alexnet_tf', 'pipelines')) for k in sys.modules)\n"
        "print(r['top5_names'].numpy()[0][0].decode())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() in {c.name for c in meta.classes}


def test_saved_model_cli_lists_and_runs_it(exported, tmp_path):
    path, _, _, out, meta = exported
    show = subprocess.run([os.path.join(BIN, "saved_model_cli"), "show", "--dir", path, "--all"],
                          capture_output=True, text=True, timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    assert "signature_def['serving_default']" in show.stdout and "signature_def['preprocessed']" in show.stdout
    assert "top5_names" in show.stdout and "DT_STRING" in show.stdout
    inputs = tmp_path / "in.npy"
    np.save(inputs, np.array([read_split(out, meta, "validation")[0]["jpeg"]]))
    run = subprocess.run([os.path.join(BIN, "saved_model_cli"), "run", "--dir", path, "--tag_set", "serve",
                          "--signature_def", "serving_default", "--inputs", f"images={inputs}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Result for output key top5_names" in run.stdout
    assert any(c.name in run.stdout for c in meta.classes)


def test_keras_users_can_wrap_it_with_tfsmlayer(exported):
    path, model, stats, out, meta = exported
    layer = keras.layers.TFSMLayer(path, call_endpoint="preprocessed")
    x = tf.stack([input_pipeline.preprocess_for_eval(tf.constant(r["jpeg"]), stats)
                  for r in read_split(out, meta, "validation")[:2]])
    np.testing.assert_allclose(layer(x)["logits"].numpy(), model(x, training=False).numpy(), rtol=1e-4, atol=1e-4)


def test_export_of_a_folder_that_is_not_a_model(tmp_path):
    proc = _cli("alexnet_tf.export", "--model_dir", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("export: error: ")
    assert "model_info.json not found" in proc.stderr


# -- evaluate ---------------------------------------------------------------------


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
    central = tf.nn.softmax(model(tf.stack([input_pipeline.preprocess_for_eval(tf.constant(r["jpeg"]), stats)
                                            for r in rows]), training=False)).numpy()
    ten = np.stack([
        tf.nn.softmax(model(input_pipeline.ten_crops(tf.constant(r["jpeg"]), stats), training=False)).numpy().mean(0)
        for r in rows])
    labels = np.array([r["label"] for r in rows])
    for probs, key in ((central, "central_crop"), (ten, "ten_crops")):
        order = np.argsort(-probs, axis=1)
        assert result[key]["top1_error"] == pytest.approx(np.mean(order[:, 0] != labels), abs=1e-9)
        assert result[key]["top5_error"] == pytest.approx(
            np.mean([l not in o[:5] for l, o in zip(labels, order)]), abs=1e-9)


def test_evaluate_bad_inputs(exported, tmp_path):
    path, _, _, out, _ = exported
    missing = _cli("alexnet_tf.evaluate", "--saved_model", str(tmp_path / "none"), "--data_dir", out)
    assert missing.returncode == 1 and "is not a SavedModel" in missing.stderr.strip().splitlines()[-1]
    split = _cli("alexnet_tf.evaluate", "--saved_model", path, "--data_dir", out, "--split", "test")
    assert split.returncode == 1 and "split 'test' is not in" in split.stderr.strip().splitlines()[-1]
    data = _cli("alexnet_tf.evaluate", "--saved_model", path, "--data_dir", str(tmp_path))
    assert data.returncode == 1 and "metadata.json not found" in data.stderr.strip().splitlines()[-1]


# -- predict ----------------------------------------------------------------------


def test_predict_prints_top5_and_reports_bad_files_one_line_each(exported, tmp_path):
    path, _, _, out, meta = exported
    rows = read_split(out, meta, "validation")[:2]
    good = []
    for i, r in enumerate(rows):
        good.append(tmp_path / f"good{i}.jpg")
        good[-1].write_bytes(r["jpeg"])
    (tmp_path / "page.jpg").write_bytes(b"<html>not an image</html>")
    (tmp_path / "archive.jpg").write_bytes(gzip.compress(b"not an image either"))
    proc = _cli("alexnet_tf.predict", "--saved_model", path, str(good[0]), str(tmp_path / "missing.jpg"),
                str(tmp_path / "page.jpg"), str(tmp_path / "archive.jpg"), str(good[1]))
    assert proc.returncode == 1
    blocks = proc.stdout.strip().split("\n")
    assert blocks[0] == f"{good[0]}:" and blocks[6] == f"{good[1]}:" and len(blocks) == 12
    names = {c.name for c in meta.classes}
    for line in blocks[1:6] + blocks[7:12]:
        rank, rest = line.strip().split(". ", 1)
        assert rest.rsplit(" (", 1)[0] in names and line.endswith("%")
    errors = [l for l in proc.stderr.splitlines() if l.startswith("predict: error:")]
    assert errors == [
        f"predict: error: {tmp_path / 'missing.jpg'}: no such file",
        f"predict: error: {tmp_path / 'page.jpg'}: cannot be decoded (not a JPEG, PNG, GIF or BMP image)",
        f"predict: error: {tmp_path / 'archive.jpg'}: cannot be decoded (not a JPEG, PNG, GIF or BMP image)",
    ]


def _records_of_other_classes(out, meta, dest):
    """A copy of the records whose metadata.json names the first two classes the other way round."""
    import dataclasses
    import shutil

    from alexnet_tf import records

    shutil.copytree(out, dest)
    c = list(meta.classes)
    c[0], c[1] = (dataclasses.replace(c[0], synset=c[1].synset, name=c[1].name),
                  dataclasses.replace(c[1], synset=c[0].synset, name=c[0].name))
    records.write_metadata(str(dest), dataclasses.replace(meta, classes=tuple(c)))
    return str(dest), c


@pytest.mark.parametrize("source", ["--saved_model", "--model_dir"])
def test_evaluate_refuses_records_of_other_classes(exported, tmp_path, source):
    path, _, _, out, meta = exported
    other, classes = _records_of_other_classes(out, meta, tmp_path / "other")
    model = path if source == "--saved_model" else os.path.dirname(path)
    r = _cli("alexnet_tf.evaluate", source, model, "--data_dir", other, "--noten_crops")
    assert r.returncode == 1
    assert (f"evaluate: error: the model and {other} have different classes: label 0 is {meta.classes[0].synset} "
            f"in the model, {classes[0].synset} in {other} (and 1 more labels differ)") in r.stderr


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


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A valid 16x16 JPEG whose frame header (SOF0) claims width x height: a forged size in a tiny file."""
    from conftest import encode

    data = bytearray(encode(Image.new("RGB", (16, 16), (10, 200, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def predicted_bad_files(exported, tmp_path_factory):
    """predict run on a good image and on bad ones: (completed process, {kind: path})."""
    path, _, _, out, meta = exported
    folder = tmp_path_factory.mktemp("predict")
    jpeg = read_split(out, meta, "validation")[0]["jpeg"]
    files = {"good": jpeg, "page": b"<html>not an image</html>", "forged": _jpeg_claiming(30000, 20000),
             "truncated": jpeg[:len(jpeg) // 2]}  # libjpeg writes its own warning to stderr for this one.
    paths = {}
    for kind, data in files.items():
        paths[kind] = folder / f"{kind}.jpg"
        paths[kind].write_bytes(data)
    return _cli("alexnet_tf.predict", "--saved_model", path, *map(str, paths.values())), paths


def test_predict_writes_only_its_own_one_line_errors_to_stderr(predicted_bad_files):
    proc, paths = predicted_bad_files
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0] == f"{paths['good']}:" and len(proc.stdout.splitlines()) == 6
    # No TensorFlow log line (a failed Assert's), no libjpeg warning, no start-up note: one line a bad file.
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr
    assert lines[0] == f"predict: error: {paths['page']}: cannot be decoded (not a JPEG, PNG, GIF or BMP image)"
    assert lines[1].startswith(f"predict: error: {paths['forged']}: cannot be decoded (")
    assert lines[2].startswith(f"predict: error: {paths['truncated']}: cannot be decoded (")
    assert "Graph execution error" not in proc.stderr and "[[" not in proc.stderr


def test_predict_names_the_pixel_limit_and_the_size_of_a_forged_image(predicted_bad_files):
    from alexnet_tf import records

    proc, paths = predicted_bad_files
    assert (f"predict: error: {paths['forged']}: cannot be decoded (30000x20000: 600,000,000 pixels, above the "
            f"limit of {records.MAX_PIXELS:,} decoded pixels (a decompression bomb, or damaged))"
            ) in proc.stderr.splitlines()


def test_predict_drops_native_stderr_only_when_it_ends_normally(capfd):
    from alexnet_tf import predict

    with predict.native_stderr_held() as own:
        os.write(2, b"a native log line\n")
        print("predict's own line", file=own)
    err = capfd.readouterr().err
    assert err == "predict's own line\n"
    with pytest.raises(RuntimeError):
        with predict.native_stderr_held():
            os.write(2, b"what explains the crash\n")
            raise RuntimeError("unexpected")
    assert "what explains the crash" in capfd.readouterr().err  # Written out, not lost.


def test_predicts_help_states_the_bounds(capsys):
    from alexnet_tf import predict, records

    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"batch {export.SERVING_CHUNK} images at a time" in text
    assert f"above {records.MAX_PIXELS:,} pixels" in text
