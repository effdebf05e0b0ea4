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

from alexnet_tf import export, export_folder, input_pipeline, run_dir
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
    # One request an image: a row's float sums may depend on the batch around it (Eigen's
    # kernels, where oneDNN is off), and the question here is the decode alone.
    probs = [serve(images=tf.constant([image]))["probabilities"].numpy()[0] for image in images]
    np.testing.assert_array_equal(probs[0], probs[1])
    np.testing.assert_array_equal(probs[0], probs[2])
    np.testing.assert_array_equal(probs[3], probs[4])  # TensorFlow alone shows a GIF's transparent pixels black.
    np.testing.assert_array_equal(probs[3], probs[5])
    assert not np.array_equal(probs[0], probs[3])  # The comparisons can tell images apart.


def _same_outputs(a, b, key):
    """Equal, floats to float32's rounding: a chunk of 3 and a batch of 8 may take kernels that sum in
    other orders (Eigen's, where oneDNN is off: 7e-9 apart in a probability)."""
    if np.issubdtype(a.dtype, np.floating):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max())), err_msg=key)
    else:
        np.testing.assert_array_equal(a, b, err_msg=key)


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
        _same_outputs(a[key].numpy(), b[key].numpy(), key)
    x = tf.stack([input_pipeline.preprocess_for_eval(images[i], stats) for i in range(8)])
    a, b = (m.signatures["preprocessed"](images=x) for m in (chunked, whole))
    assert sorted(a) == ["fc7", "logits", "probabilities"]
    for key in a:
        _same_outputs(a[key].numpy(), b[key].numpy(), key)
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


# -- the export folder: what is replaced, what is refused, interruptions ------------


def _tiny_model(num_classes=3):
    """A small stand-in for AlexNet (same input, any classes): exports in about a second."""
    inputs = keras.Input((227, 227, 3))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="fc8")(x))


def _tiny_info(classes=None):
    classes = classes or [{"label": i, "synset": f"n0000000{i}", "name": f"class {i}"} for i in range(3)]
    return {"num_classes": len(classes), "classes": classes, "square_size": 256}


def _tiny_export(path, model=None, info=None):
    info = info or _tiny_info()
    return export.export(model or _tiny_model(info["num_classes"]), info, np.full(3, 120.0, np.float32), str(path))


@pytest.fixture
def tiny_run(monkeypatch):
    """Makes `export.main` find the tiny model in any --model_dir (as if trained there)."""
    info, model = _tiny_info(), _tiny_model()
    monkeypatch.setattr(export.run_dir, "load_trained_model", lambda *a: (model, info, np.full(3, 120.0)))
    return model, info


def _main(module, argv, capsys):
    """(exit status, stdout, stderr lines) of a command's main run in this process."""
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, [l for l in err.splitlines() if l.strip()]


def _tree(path):
    """{relative path: bytes} of every file under `path`."""
    return {os.path.relpath(os.path.join(r, f), path): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(path) for f in files}


def test_export_refuses_a_folder_holding_other_files_and_keeps_them(tmp_path, capsys, tiny_run):
    target = tmp_path / "models"
    target.mkdir()
    (target / "other_model.h5").write_bytes(b"someone else's weights")
    (target / "notes").mkdir()
    (target / "notes" / "a.txt").write_text("keep me")
    before = _tree(target)
    code, out, err = _main(export, ["--model_dir", str(tmp_path / "run"), "--export_dir", str(target)], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"export: error: {target} is not empty (notes, other_model.h5) and is not a SavedModel "
                             "written by alexnet_tf.export")
    assert _tree(target) == before
    assert sorted(os.listdir(tmp_path)) == ["models"]  # No temporary folder either.
    with pytest.raises(export.ExportError, match="is not empty"):  # The library call refuses the same.
        _tiny_export(target)
    assert _tree(target) == before


def test_export_to_the_current_folder_is_refused_and_its_files_kept(tmp_path, capsys, monkeypatch, tiny_run):
    (tmp_path / "data.csv").write_text("1,2,3\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print('hi')\n")
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    for where in (".", str(tmp_path), "src/.."):
        code, out, err = _main(export, ["--model_dir", "../run", "--export_dir", where], capsys)
        assert code == 1 and len(err) == 1 and err[0].startswith(f"export: error: --export_dir {where} is the "
                                                                 "current folder or holds it"), err
        assert _tree(tmp_path) == before
    # An empty current folder too: replacing it would leave the shell in a removed folder.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    code, _, err = _main(export, ["--model_dir", "../run", "--export_dir", "."], capsys)
    assert code == 1 and "is the current folder" in err[0] and os.listdir(empty) == []


def test_export_replaces_an_earlier_export_whole(tmp_path, capsys, monkeypatch):
    target = tmp_path / "exported"
    _tiny_export(target)
    (target / "assets" / "stale.txt").write_text("from the earlier export")
    assert export.is_export(str(target))
    info = _tiny_info([{"label": i, "synset": f"n1000000{i}", "name": f"new {i}"} for i in range(4)])
    model = _tiny_model(4)
    monkeypatch.setattr(export.run_dir, "load_trained_model", lambda *a: (model, info, np.full(3, 120.0)))
    export.main(["--model_dir", "run", "--export_dir", str(target)])  # Success returns (no SystemExit).
    assert "export: wrote" in capsys.readouterr().out
    assert not (target / "assets" / "stale.txt").exists()
    assert export.read_class_synsets(str(target)) == [f"n1000000{i}" for i in range(4)]
    loaded = tf.saved_model.load(str(target))
    assert loaded.preprocessed(tf.zeros([1, 227, 227, 3]))["logits"].shape == (1, 4)
    assert sorted(os.listdir(tmp_path)) == ["exported"]  # Nothing left beside it.
    # An empty folder is filled.
    (tmp_path / "empty").mkdir()
    _tiny_export(tmp_path / "empty")
    assert export.is_export(str(tmp_path / "empty"))


class _Killed(BaseException):
    """Stands for kill -9 in the middle of the swap: nothing after it runs (no clean-up either)."""


def _fake_export(path, tag):
    """A folder with an export's marks (saved_model.pb, assets/classes.tsv) and `tag` in its files."""
    os.makedirs(os.path.join(path, "assets"))
    os.makedirs(os.path.join(path, "variables"))
    for name in ("saved_model.pb", "variables/variables.index", "variables/variables.data-00000-of-00001"):
        with open(os.path.join(path, name), "w") as f:
            f.write(f"{tag} {name}")
    with open(os.path.join(path, "assets", export.CLASSES_ASSET), "w") as f:
        f.write(f"0\t{tag}\tname\n")
    return _tree(path)


def _killing_after(n, monkeypatch):
    """Makes the swap's renames, exchanges and deletions die (_Killed) after the first `n` of them."""
    done = []
    for obj, name in ((tf.io.gfile, "rename"), (tf.io.gfile, "rmtree"), (export_folder, "_exchange")):
        real = getattr(obj, name)

        def step(*args, _real=real, **kwargs):
            if len(done) >= n:
                raise _Killed
            done.append(args)
            return _real(*args, **kwargs)

        monkeypatch.setattr(obj, name, step)
    return done


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_kill_at_any_point_of_the_swap_leaves_a_whole_export(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(export_folder, "_exchange", lambda a, b: False)
    elif not export._exchange(str(tmp_path), str(tmp_path)):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or filesystem")
    steps = None
    for n in range(10):
        case = tmp_path / str(n)
        target, tmp = str(case / "exported"), str(case / f"exported.tmp-{os.getpid()}")
        old, new = _fake_export(target, "old"), _fake_export(tmp, "new")
        with monkeypatch.context() as m:
            done = _killing_after(n, m)
            try:
                export.swap_in(tmp, target)
                steps = len(done)
            except _Killed:
                pass
        # Right after the kill: the old or the new export at the target, or (only between the
        # fallback's two renames) none there and the old one put back by the next export.
        if not os.path.exists(target):
            assert not exchange and export.recover(target) is not None
        assert _tree(target) in (old, new), n
        # The next export tidies what the killed one left.
        export.recover(target)
        assert sorted(os.listdir(case)) == ["exported"] and _tree(target) in (old, new), (n, os.listdir(case))
        if steps is not None:
            assert _tree(target) == new
            break
    # The exchange and the deletion; or the exchange tried, two renames and the deletion.
    assert steps == (2 if exchange else 4)


def test_the_exchange_is_atomic_on_this_system(tmp_path):
    a, b = _fake_export(str(tmp_path / "a"), "a"), _fake_export(str(tmp_path / "b"), "b")
    if not export._exchange(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or filesystem")
    assert _tree(str(tmp_path / "a")) == b and _tree(str(tmp_path / "b")) == a


def test_recover_leaves_folders_that_are_not_an_exports_leftovers(tmp_path):
    target = str(tmp_path / "exported")
    _fake_export(target, "current")
    mine = tmp_path / "exported.tmp-1"  # A user's folder that happens to have the temporary name.
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    dead = 2 ** 22 + 1  # Above Linux's pid_max: no such process.
    leftover = tmp_path / f"exported.tmp-{dead}"
    _fake_export(str(leftover), "half")
    export.recover(target)
    assert (mine / "thesis.tex").read_text() == "keep" and not leftover.exists()


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    # As TensorFlow's SaveV2 says it (TF 2.21, a full tmpfs).
    tf.errors.ResourceExhaustedError(None, None, "{{function_node __wrapped__SaveV2_dtypes_37_device_/job:localhost/"
                                     "replica:0/task:0/device:CPU:0}} /x/exported.tmp-1/variables/variables_temp/"
                                     "part-00000-of-00001.data-00000-of-00001.tempstate1; No space left on device "
                                     "[Op:SaveV2]")], ids=["OSError", "tf.errors"])
def test_a_full_disk_is_one_line_and_keeps_the_earlier_export(tmp_path, capsys, monkeypatch, tiny_run, error):
    import errno

    assert errno.ENOSPC == 28
    target = tmp_path / "exported"
    _tiny_export(target)
    before = _tree(target)

    def full_disk(obj, path, *args, **kwargs):  # Part of the SavedModel written, then the disk is full.
        os.makedirs(os.path.join(path, "variables"))
        with open(os.path.join(path, "variables", "variables.data-00000-of-00001"), "wb") as f:
            f.write(b"\0" * 1000)
        raise error

    monkeypatch.setattr(tf.saved_model, "save", full_disk)  # What Keras' ExportArchive.write_out calls.
    code, out, err = _main(export, ["--model_dir", "run", "--export_dir", str(target)], capsys)
    assert code == 1 and err == [f"export: error: cannot write the SavedModel for {target} (No space left on "
                                 "device); the earlier SavedModel there is unchanged"]
    assert _tree(target) == before and sorted(os.listdir(tmp_path)) == ["exported"]  # The temporary folder is gone.
    # A first export: nothing at all is left.
    code, out, err = _main(export, ["--model_dir", "run", "--export_dir", str(tmp_path / "new")], capsys)
    assert code == 1 and "No space left on device" in err[0] and sorted(os.listdir(tmp_path)) == ["exported"]


def test_weights_that_are_not_finite_are_not_exported(tmp_path, capsys, tiny_run):
    model, info = tiny_run
    bias = model.get_layer("fc8").bias
    bias.assign([0.0, np.nan, np.inf])
    with pytest.raises(export.NonFiniteWeights, match=r"fc8/bias holds 1 NaN and 1 infinite values \(of 3\)"):
        _tiny_export(tmp_path / "new", model, info)
    assert os.listdir(tmp_path) == []
    earlier = tmp_path / "exported"
    _tiny_export(earlier)
    before = _tree(earlier)
    for target in (tmp_path / "new", earlier):
        code, out, err = _main(export, ["--model_dir", "run", "--export_dir", str(target)], capsys)
        assert code == 1 and err == ["export: error: the model's weights are not all finite: fc8/bias holds 1 NaN "
                                     "and 1 infinite values (of 3); the run diverged, export a checkpoint from "
                                     "before it (--checkpoint)"]
        assert sorted(os.listdir(tmp_path)) == ["exported"] and _tree(earlier) == before
    # The first one named: conv1's kernel comes before fc8's bias.
    model.get_layer("fc8").kernel.assign(np.full((3, 3), np.nan))
    with pytest.raises(export.NonFiniteWeights, match=r"fc8/kernel holds 9 NaN"):
        export.check_finite(model)
    with pytest.raises(export.NonFiniteWeights, match="the mean image holds 1 NaN"):
        export.check_finite(_tiny_model(), np.array([1.0, np.nan, 2.0]))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_an_export_killed_at_any_step_leaves_an_export_in_place(tmp_path, monkeypatch, exchange):
    """The whole export() over an earlier export, killed after 0, 1, 2, ... of its renames and deletions."""
    import shutil

    if not exchange:
        monkeypatch.setattr(export_folder, "_exchange", lambda a, b: False)
    target, earlier = tmp_path / "exported", tmp_path / "earlier"
    old_synsets, new_synsets = [f"n2000000{i}" for i in range(3)], [f"n0000000{i}" for i in range(3)]
    _tiny_export(earlier, info=_tiny_info([{"label": i, "synset": s, "name": s} for i, s in enumerate(old_synsets)]))
    model = _tiny_model()
    for n in range(6):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(earlier, target)
        with monkeypatch.context() as m:
            _killing_after(n, m)
            try:
                _tiny_export(target, model)
                finished = True
            except _Killed:
                finished = False
        export.recover(str(target))  # What the next export does first.
        assert export.is_export(str(target)) and export._missing_part(str(target)) is None, n
        assert export.read_class_synsets(str(target)) in ([old_synsets] if n == 0 else [old_synsets, new_synsets])
        assert sorted(os.listdir(tmp_path)) == ["earlier", "exported"], n
        if finished:
            break
    assert finished and export.read_class_synsets(str(target)) == new_synsets
    loaded = tf.saved_model.load(str(target))  # Whole: it loads and answers.
    assert loaded.preprocessed(tf.zeros([1, 227, 227, 3]))["logits"].shape == (1, 3)


def _jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())
    return str(path)


def test_predict_says_when_the_models_output_is_not_finite(tmp_path, capsys, monkeypatch):
    from alexnet_tf import predict

    model = _tiny_model()
    model.get_layer("fc8").bias.assign([0.0, np.nan, 0.0])
    with monkeypatch.context() as m:  # A SavedModel of a diverged run (exported before the export refused one).
        m.setattr(export, "check_finite", lambda *a: None)
        _tiny_export(tmp_path / "diverged", model)
    images = [_jpeg(tmp_path / "a.jpg"), _jpeg(tmp_path / "b.jpg")]
    code, out, err = _main(predict, ["--saved_model", str(tmp_path / "diverged"), *images], capsys)
    assert code == 1 and "nan" not in out.lower()
    assert err == [f"predict: error: {tmp_path / 'diverged'} gives probabilities that are not finite (NaN or "
                   f"infinity) for {images[0]}: its weights have diverged; export a checkpoint from before that"]
    # A sound model: the top 5 as before.
    _tiny_export(tmp_path / "sound")
    code, out, err = _main(predict, ["--saved_model", str(tmp_path / "sound"), images[0]], capsys)
    assert code == 0 and err == [] and out.splitlines()[0] == f"{images[0]}:" and out.count("%") == 3


def _damaged_copies(source, dest):
    """{what is wrong: a copy of the export `source` damaged that way}."""
    import shutil

    damage = {
        "saved_model.pb truncated": lambda d: _truncate(os.path.join(d, "saved_model.pb")),
        "saved_model.pb missing": lambda d: os.remove(os.path.join(d, "saved_model.pb")),
        "variables/ missing": lambda d: shutil.rmtree(os.path.join(d, "variables")),
        "variables data truncated": lambda d: _truncate(
            os.path.join(d, "variables", "variables.data-00000-of-00001")),
        "variables data missing": lambda d: os.remove(os.path.join(d, "variables", "variables.data-00000-of-00001")),
        "class list missing": lambda d: os.remove(os.path.join(d, "assets", export.CLASSES_ASSET)),
    }
    copies = {}
    for i, (what, apply) in enumerate(damage.items()):
        copies[what] = os.path.join(dest, f"damaged{i}")
        shutil.copytree(source, copies[what])
        apply(copies[what])
    return copies


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


DAMAGE_MESSAGES = {
    "saved_model.pb truncated": "is not a complete SavedModel: saved_model.pb cannot be parsed (truncated or damaged)",
    "saved_model.pb missing": "is not a SavedModel (no saved_model.pb)",
    "variables/ missing": "is not a complete SavedModel: variables/variables.index is missing",
    "variables data truncated": "is not a complete SavedModel: its variables cannot be read (",
    "variables data missing": "is not a complete SavedModel: variables/variables.data-* is missing",
    "class list missing": "is not a complete SavedModel: assets/classes.tsv is missing",
}


def test_predict_and_evaluate_name_a_half_written_saved_model_in_one_line(tmp_path, capsys):
    from alexnet_tf import evaluate, predict

    _tiny_export(tmp_path / "whole")
    image = _jpeg(tmp_path / "a.jpg")
    for what, path in _damaged_copies(str(tmp_path / "whole"), str(tmp_path)).items():
        for module, argv in ((predict, ["--saved_model", path, image]),
                             (evaluate, ["--saved_model", path, "--data_dir", str(tmp_path)])):
            code, out, err = _main(module, argv, capsys)
            name = module.__name__.rsplit(".", 1)[1]
            assert code == 1 and out == "" and len(err) == 1, (what, name, err)
            assert err[0].startswith(f"{name}: error: {path} {DAMAGE_MESSAGES[what]}"), (what, err)


@pytest.mark.parametrize("source", ["--saved_model", "--model_dir"])
def test_evaluate_refuses_records_smaller_than_the_models_patches_before_any_work(built, model_folder, tmp_path,
                                                                                 capsys, monkeypatch, source):
    import dataclasses
    import shutil

    from alexnet_tf import evaluate, records

    out, meta = built
    small = tmp_path / "small"  # As built with --image_size=100.
    shutil.copytree(out, small)
    records.write_metadata(str(small), dataclasses.replace(meta, image=dataclasses.replace(meta.image, size=100)))
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


def test_training_refuses_at_start_a_saved_model_folder_holding_other_files(built, tmp_path):
    out, _ = built
    folder = tmp_path / "run" / "saved_model"
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("not an export")
    r = _cli("alexnet_tf.train", "--preset=sample", f"--data_dir={out}", f"--model_dir={tmp_path / 'run'}",
             "--strategy=one_device", "--epochs=1", "--steps_per_epoch=1", "--batch_size=8")
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (f"train: error: {folder} is not empty (mine.txt) and is not a "
                                                 "SavedModel written by alexnet_tf.export; nothing was written: "
                                                 "name a new or empty folder")
    assert (folder / "mine.txt").read_text() == "not an export"
    assert sorted(os.listdir(tmp_path / "run")) == ["saved_model"]  # Refused before the run wrote anything.


KILLED_EXPORTER = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_export import _tiny_export, _tiny_info
    print("ready", flush=True)
    n = 0
    while True:  # Export after export over the same folder, until killed.
        n += 1
        _tiny_export(sys.argv[1], info=_tiny_info([{"label": i, "synset": f"n{n:08d}", "name": str(i)}
                                                   for i in range(3)]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_kill_9_during_exports_always_leaves_a_whole_saved_model(tmp_path, exchange):
    """A process exporting over and over into one folder, killed with SIGKILL at random moments."""
    import random
    import signal
    import time

    target = tmp_path / "exported"
    _tiny_export(target)
    script = KILLED_EXPORTER if exchange else KILLED_EXPORTER.replace(
        "from test_export import", "from alexnet_tf import export; export._exchange = lambda a, b: False\n"
                                   "from test_export import")
    rng = random.Random(0)
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target), os.path.dirname(__file__)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.5, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        export.recover(str(target))
        assert export.is_export(str(target)) and export._missing_part(str(target)) is None
        loaded = tf.saved_model.load(str(target))
        assert loaded.preprocessed(tf.zeros([1, 227, 227, 3]))["logits"].shape == (1, 3)
        assert sorted(os.listdir(tmp_path)) == ["exported"]


def test_predict_points_to_the_earlier_export_an_interrupted_swap_left_aside(tmp_path, capsys):
    from alexnet_tf import predict

    _tiny_export(tmp_path / "exported.old-4194305")  # The fallback swap, killed between its two renames.
    code, out, err = _main(predict, ["--saved_model", str(tmp_path / "exported"), _jpeg(tmp_path / "a.jpg")], capsys)
    assert code == 1 and err == [f"predict: error: {tmp_path / 'exported'} is not a SavedModel (no such folder); an "
                                 f"interrupted export left the earlier one at {tmp_path / 'exported.old-4194305'}: "
                                 "run the export again, which puts it back"]
    assert export.recover(str(tmp_path / "exported")) == str(tmp_path / "exported.old-4194305")
    assert export.is_export(str(tmp_path / "exported")) and sorted(os.listdir(tmp_path)) == ["a.jpg", "exported"]
