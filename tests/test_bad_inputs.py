"""Bad input to training and evaluation: each case one clear line, a non-zero exit,
and nothing written (table-driven)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import cluster
from tfrecords import integrity, metadata
from tfrecords.folder import Records


def _remove_validation_shard(d, meta):
    os.remove(Records(d, meta).shard_paths("validation")[0])
    return f"1 shard(s) listed in {metadata.metadata_path(d)} are missing: {Records(d, meta).shard_paths('validation')[0]}"


def _empty_mean_image(d, meta):
    path = os.path.join(d, meta.color_stats.mean_image_file)
    open(path, "wb").close()
    return f"{path} is not a NumPy array file"


def _missing_mean_image(d, meta):
    path = os.path.join(d, meta.color_stats.mean_image_file)
    os.remove(path)
    return f"{path} is missing"


def _wrong_mean_image(d, meta):
    import numpy as np

    path = os.path.join(d, meta.color_stats.mean_image_file)
    np.save(path, np.zeros((4, 4, 3), np.float32))
    return f"{path} holds a float32 array of shape (4, 4, 3), not the 256x256x3 float mean image"


def _damage(d, meta, at):
    path = Records(d, meta).shard_paths("validation")[0]
    data = bytearray(open(path, "rb").read())
    assert len(data) > integrity.HEAD_BYTES + 10_000
    data[at:at + 10] = b"X" * 10
    open(path, "wb").write(bytes(data))
    return path


def _damaged_validation_shard(d, meta):  # Past the bytes checked at start: found by the records' CRC, named.
    path = _damage(d, meta, integrity.HEAD_BYTES + 5000)
    return f"records shard {path} is damaged (corrupted record at "


def _damaged_shard_head(d, meta):  # Within them: found at start, named.
    path = _damage(d, meta, 5000)
    return (f"1 shard(s) in {d} are not the ones its metadata.json lists: {os.path.basename(path)} is not the file "
            "this build wrote (its first bytes differ: damaged, or from another build)")


def _swapped_train_shards(d, meta):
    a, b = Records(d, meta).shard_paths("train")[:2]
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)
    a, b = os.path.basename(a), os.path.basename(b)
    return f"2 shard(s) in {d} are not the ones its metadata.json lists: {a} holds the bytes of {b} (swapped or copied)"


def _untouched(d, meta):
    return None


TRAIN = "alexnet_tf.train"
EVALUATE = "alexnet_tf.evaluate"

CASES = {
    "missing validation shard (train)": (TRAIN, _remove_validation_shard, [], 1, None),
    "missing validation shard (evaluate)": (EVALUATE, _remove_validation_shard, [], 1, None),
    "empty mean_image.npy": (TRAIN, _empty_mean_image, [], 1, None),
    "missing mean_image.npy": (TRAIN, _missing_mean_image, [], 1, None),
    "mean image of another size": (TRAIN, _wrong_mean_image, [], 1, None),
    "--batch_size=0": (TRAIN, _untouched, ["--batch_size=0"], 1, "batch_size must be at least 1, got 0"),
    "--batch_size=-8": (TRAIN, _untouched, ["--batch_size=-8"], 1, "batch_size must be at least 1, got -8"),
    "--epochs=0": (TRAIN, _untouched, ["--epochs=0"], 1, "epochs must be at least 1, got 0"),
    "--learning_rate=-0.01": (TRAIN, _untouched, ["--learning_rate=-0.01"], 1,
                              "learning_rate must be 0 or more, got -0.01"),
    "--batch_size=100000": (TRAIN, _untouched, ["--batch_size=100000"], 1,
                            "--batch_size=100000 is larger than the 119 training examples of"),
    "--cpu_devices=0": (TRAIN, _untouched, ["--strategy=mirrored", "--cpu_devices=0"], 1,
                        "--cpu_devices and --gpu_split must be at least 1"),
    "batch 8 over 3 replicas": (TRAIN, _untouched, ["--strategy=mirrored", "--cpu_devices=3", "--batch_size=8"], 1,
                                "--batch_size=8 does not divide over the 3 replicas"),
    "--dropout=1.5": (TRAIN, _untouched, ["--dropout=1.5"], 1,
                      "--dropout must be in [0, 1) (the share of fc6/fc7 units dropped), got 1.5"),
    "--momentum=-1": (TRAIN, _untouched, ["--momentum=-1"], 1, "--momentum must be in [0, 1), got -1"),
    "--learning_rate=inf": (TRAIN, _untouched, ["--learning_rate=inf"], 1,
                            "--learning_rate must be a finite number, got inf"),
    "--warmup_epochs=-1": (TRAIN, _untouched, ["--warmup_epochs=-1"], 1, "--warmup_epochs must be 0 or more, got -1"),
    "damaged validation shard (evaluate)": (EVALUATE, _damaged_validation_shard, [], 1, None),
    "damaged start of a validation shard (evaluate)": (EVALUATE, _damaged_shard_head, [], 1, None),
    "two training shards swapped (train)": (TRAIN, _swapped_train_shards, [], 1, None),
    "evaluate --batch_size=0": (EVALUATE, _untouched, ["--batch_size=0"], 2, "--batch_size must be at least 1, got 0"),
}


# Cases that start TensorFlow on the records take seconds each: one of them (a damaged folder) runs in the
# default suite, the others in `make test-all`; the flag checks all run before TensorFlow starts.
DEFAULT_DATA_CASE = "two training shards swapped (train)"


def _case(name):
    fast = CASES[name][1] is _untouched and "replicas" not in name and "100000" not in name
    return name if fast or name == DEFAULT_DATA_CASE else pytest.param(name, marks=pytest.mark.slow)


@pytest.mark.parametrize("case", [_case(name) for name in sorted(CASES)])
def test_bad_input(built, exported_model_dir, tmp_path, case):
    module, damage, flags, code, says = CASES[case]
    out, meta = built
    data = str(tmp_path / "records")
    shutil.copytree(out, data)
    says = damage(data, meta) or says
    model_dir = tmp_path / "run"
    if module == TRAIN:
        argv = ["--preset=sample", f"--data_dir={data}", f"--model_dir={model_dir}", "--strategy=one_device", *flags]
    else:
        argv = ["--model_dir", exported_model_dir, "--data_dir", data, "--noten_crops", *flags]
    r = subprocess.run([sys.executable, "-m", module, *argv], cwd=cluster.REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == code, r.stderr[-2000:]
    assert says in r.stderr
    if "a records shard in" in says:
        assert f"`python -m pipelines.verify_tfrecords --data_dir={data}` names it" in r.stderr
    assert "Traceback" not in r.stderr
    assert not model_dir.exists()  # Nothing written.


@pytest.fixture(scope="module")
def exported_model_dir(model_folder):
    """A model folder of the records' classes, for evaluate."""
    return model_folder[0]
