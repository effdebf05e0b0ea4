"""The SavedModel: serving signatures against the Keras model, any input size and format, loading it anywhere."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from alexnet_tf import export, export_folder, preprocessing
from conftest import BIN, cli as _cli, read_split
from export_checks import jpeg as _jpeg, run_main as _main, tiny_export as _tiny_export


def test_serving_signature_matches_the_keras_model(exported):
    path, model, stats, out, meta = exported
    loaded = tf.saved_model.load(path)
    rows = read_split(out, meta, "validation")[:4]
    result = loaded.signatures["serving_default"](images=tf.constant([r["jpeg"] for r in rows]))
    x = tf.stack([preprocessing.preprocess_for_eval(tf.constant(r["jpeg"]), stats) for r in rows])
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


@pytest.mark.slow
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
    x = tf.stack([preprocessing.preprocess_for_eval(images[i], stats) for i in range(8)])
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
    lines = open(os.path.join(path, "assets", export_folder.CLASSES_ASSET)).read().splitlines()
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
    from conftest import png_claiming
    from pipelines import image_processing

    assert preprocessing.MAX_PIXELS == image_processing.MAX_PIXELS  # Serving refuses what the build refuses.
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


@pytest.mark.slow
def test_long_thin_images_take_bounded_memory_in_serving(exported):
    path = exported[0]
    r = subprocess.run([sys.executable, "-c", THIN, path], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n, before_mib, after_mib = map(int, r.stdout.split())
    assert n == 2
    # Cropped to 1x1 before scaling: no more than noise. Scaled whole first, a
    # 20000x1 image became 5,120,000x256 pixels (several GB).
    assert after_mib - before_mib < 100, (before_mib, after_mib)


@pytest.mark.slow
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


@pytest.mark.slow
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
    x = tf.stack([preprocessing.preprocess_for_eval(tf.constant(r["jpeg"]), stats)
                  for r in read_split(out, meta, "validation")[:2]])
    np.testing.assert_allclose(layer(x)["logits"].numpy(), model(x, training=False).numpy(), rtol=1e-4, atol=1e-4)


def test_export_of_a_folder_that_is_not_a_model(tmp_path):
    proc = _cli("alexnet_tf.export", "--model_dir", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("export: error: ")
    assert "model_info.json not found" in proc.stderr


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
        "class list missing": lambda d: os.remove(os.path.join(d, "assets", export_folder.CLASSES_ASSET)),
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
