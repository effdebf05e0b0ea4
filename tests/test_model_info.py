"""`model_info.json` as a typed object (`alexnet_tf.model_info`), and reading it from a model folder (`run_dir`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alexnet_tf import run_dir
from alexnet_tf.model_info import ModelInfo, ModelInfoError
from export_checks import run_main, tiny_info
from tfrecords import fileio

# A model_info.json as training runs have always written it: these keys, in this order.
WRITTEN = {
    "num_classes": 2, "grouped": True, "dropout": 0.5,
    "classes": [{"label": 0, "synset": "n01440764", "name": "tench"},
                {"label": 1, "synset": "n01443537", "name": "goldfish"}],
    "mean": "image", "mean_file": "mean_image.npy", "square_size": 256, "recipe": "paper",
}


def _write(folder, obj, mean=np.zeros((4, 4, 3), np.float32)):
    fileio.write_json_atomically(str(folder / run_dir.MODEL_INFO), obj)
    np.save(folder / "mean_image.npy", mean)


def test_a_runs_file_reads_as_typed_fields_and_writes_back_byte_for_byte(tmp_path):
    _write(tmp_path, WRITTEN)
    before = (tmp_path / run_dir.MODEL_INFO).read_bytes()
    info, mean = run_dir.read_model_info(str(tmp_path))
    assert (info.num_classes, info.grouped, info.dropout, info.mean, info.square_size, info.recipe) == (
        2, True, 0.5, "image", 256, "paper")
    assert info.synsets == ("n01440764", "n01443537") and info.classes[1].name == "goldfish"
    assert mean.shape == (4, 4, 3)
    with pytest.raises(AttributeError):
        info.dropout = 0.0  # Frozen: what a run wrote is not changed in memory either.
    out = tmp_path / "again"
    run_dir.write_model_info(str(out), info, mean)
    assert (out / run_dir.MODEL_INFO).read_bytes() == before
    assert np.array_equal(np.load(out / "mean_image.npy"), mean)


def test_a_folder_written_before_runs_kept_their_recipe_reads_with_none_and_writes_no_key(tmp_path):
    older = {k: v for k, v in WRITTEN.items() if k != "recipe"}
    info = ModelInfo.from_json(older, "model_info.json")
    assert info.recipe is None
    assert info.to_json() == older and list(info.to_json()) == list(older)


@pytest.mark.parametrize("change, message", [
    (lambda o: o.pop("grouped"), "grouped is missing"),
    (lambda o: o.update(num_classes="2"), 'num_classes must be an integer, got "2"'),
    (lambda o: o.update(dropout=None), "dropout must be a number, got null"),
    (lambda o: o.update(num_classes=3), "num_classes must be the length of classes \\(2\\), got 3"),
    (lambda o: o["classes"][1].update(label=0), "classes\\[1\\].label must be 1 \\(labels are positions"),
    (lambda o: o["classes"][0].pop("synset"), "classes\\[0\\].synset is missing"),
    (lambda o: o.update(mean="pixel"), 'mean must be "image" or "rgb", got "pixel"'),
    (lambda o: o.update(square_size=256.0), "square_size must be an integer, got 256.0"),
    (lambda o: o.update(recipe=7), "recipe must be a string, got 7"),
    (lambda o: o.update(classes={}), "classes must be a list"),
])
def test_a_bad_field_is_named_with_the_file_and_the_value_found(tmp_path, change, message):
    obj = json.loads(json.dumps(WRITTEN))
    change(obj)
    _write(tmp_path, obj)
    with pytest.raises(ModelInfoError, match=f"^{tmp_path / run_dir.MODEL_INFO}: {message}"):
        run_dir.read_model_info(str(tmp_path))


def test_a_damaged_file_or_a_missing_mean_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_info.json not found: is .* a model folder"):
        run_dir.read_model_info(str(tmp_path))
    (tmp_path / run_dir.MODEL_INFO).write_text('{"num_classes": 2,')
    with pytest.raises(ModelInfoError, match="model_info.json is not valid JSON"):
        run_dir.read_model_info(str(tmp_path))
    _write(tmp_path, WRITTEN)
    (tmp_path / "mean_image.npy").unlink()
    with pytest.raises(ModelInfoError, match="mean_image.npy, the mean .*model_info.json names, is missing"):
        run_dir.read_model_info(str(tmp_path))


def test_export_of_a_folder_with_a_bad_model_info_exits_1_naming_the_field(tmp_path, capsys):
    from alexnet_tf import export

    obj = tiny_info().to_json()
    obj["classes"][2]["label"] = 7
    _write(tmp_path, obj)
    code, out, err = run_main(export, ["--model_dir", str(tmp_path)], capsys)
    assert code == 1 and out == ""
    assert err == [f"export: error: {tmp_path / run_dir.MODEL_INFO}: classes[2].label must be 2 (labels are "
                   "positions in the list), got 7"]
