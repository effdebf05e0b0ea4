"""Small exports for the export, evaluate and predict tests: a tiny model, its folder, a command's main."""

from __future__ import annotations

import io

import keras
import numpy as np
import pytest
from PIL import Image

from alexnet_tf import export
from alexnet_tf.model_info import ModelInfo
from tfrecords.classes import ClassInfo


def tiny_model(num_classes=3):
    """A small stand-in for AlexNet (same input, any classes): exports in about a second."""
    inputs = keras.Input((227, 227, 3))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="fc8")(x))


def tiny_info(classes=None):
    """The model_info of `classes` (three made-up ones by default), as `ClassInfo`s or their JSON."""
    classes = classes or [{"label": i, "synset": f"n0000000{i}", "name": f"class {i}"} for i in range(3)]
    classes = [c if isinstance(c, ClassInfo) else ClassInfo(**c) for c in classes]
    return ModelInfo(num_classes=len(classes), grouped=False, dropout=0.0, classes=classes, mean="rgb",
                     mean_file="mean_image.npy", square_size=256)


def tiny_export(path, model=None, info=None):
    """Exports a tiny model into `path`; returns what `export.export` returns."""
    info = info or tiny_info()
    return export.export(model or tiny_model(info.num_classes), info, np.full(3, 120.0, np.float32), str(path))


def run_main(module, argv, capsys):
    """(exit status, stdout, stderr lines) of a command's main run in this process."""
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, [l for l in err.splitlines() if l.strip()]


def jpeg(path):
    """Writes a 400x300 grey JPEG to `path`; its path as a string."""
    buf = io.BytesIO()
    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())
    return str(path)
