"""`python -m alexnet_tf.predict`: top-5 classes of image files, and one line for each file or model it cannot use."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
from PIL import Image

from alexnet_tf import export, export_folder
from conftest import cli as _cli, read_split
from export_checks import jpeg as _jpeg, run_main as _main, tiny_export as _tiny_export, tiny_model as _tiny_model


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
    from tfrecords import schema

    proc, paths = predicted_bad_files
    assert (f"predict: error: {paths['forged']}: cannot be decoded (30000x20000: 600,000,000 pixels, above the "
            f"limit of {schema.MAX_PIXELS:,} decoded pixels (a decompression bomb, or damaged))"
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
    from alexnet_tf import predict
    from tfrecords import schema

    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"batch {export.SERVING_CHUNK} images at a time" in text
    assert f"above {schema.MAX_PIXELS:,} pixels" in text


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


def test_predict_points_to_the_earlier_export_an_interrupted_swap_left_aside(tmp_path, capsys):
    from alexnet_tf import predict

    _tiny_export(tmp_path / "exported.old-4194305")  # The fallback swap, killed between its two renames.
    code, out, err = _main(predict, ["--saved_model", str(tmp_path / "exported"), _jpeg(tmp_path / "a.jpg")], capsys)
    assert code == 1 and err == [f"predict: error: {tmp_path / 'exported'} is not a SavedModel (no such folder); an "
                                 f"interrupted export left the earlier one at {tmp_path / 'exported.old-4194305'}: "
                                 "run the export again, which puts it back"]
    assert export_folder.recover(str(tmp_path / "exported")) == str(tmp_path / "exported.old-4194305")
    assert export_folder.is_export(str(tmp_path / "exported")) and sorted(os.listdir(tmp_path)) == ["a.jpg", "exported"]
