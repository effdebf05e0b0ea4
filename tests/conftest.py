"""Shared fixtures: a small embedded sample and records built from it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pytest

from tfrecords.folder import Records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# One in-process worker: fast to start, and the same transforms as multi-processing.
LOCAL_BEAM = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def cli(module, *args):
    """Runs `python -m module args` from the repository; the finished process."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """A small sample in the raw ILSVRC2012 layout (12 train, 4 val images a class)."""
    from pipelines import make_sample

    return make_sample.make_sample(str(tmp_path_factory.mktemp("sample")), train_per_class=12, val_per_class=4)


def build(imagenet_dir, output_dir, *extra):
    """Runs the pipeline in-process; returns metadata."""
    from pipelines import build_tfrecords

    return build_tfrecords.run(
        ["--imagenet_dir", str(imagenet_dir), "--output_dir", str(output_dir), *extra, *LOCAL_BEAM]
    )


@pytest.fixture(scope="session")
def built(sample, tmp_path_factory):
    """(output_dir, metadata) of the sample built with default flags."""
    out = tmp_path_factory.mktemp("records")
    return str(out), build(sample["output_dir"], out)


def read_split(data_dir, meta, split):
    """All records of a split as dicts of Python values, with their shard file."""
    import tensorflow as tf

    from tfrecords import schema

    rows = []
    for path in Records(data_dir, meta).shard_paths(split):
        for raw in tf.data.TFRecordDataset(path):
            ex = schema.parse_example(raw)
            rows.append(
                {
                    "shard": os.path.basename(path),
                    "jpeg": ex[schema.ENCODED].numpy(),
                    "label": int(ex[schema.LABEL]),
                    "synset": ex[schema.SYNSET].numpy().decode(),
                    "text": ex[schema.TEXT].numpy().decode(),
                    "filename": ex[schema.FILENAME].numpy().decode(),
                    "height": int(ex[schema.HEIGHT]),
                    "width": int(ex[schema.WIDTH]),
                    "format": ex[schema.FORMAT].numpy().decode(),
                    "colorspace": ex[schema.COLORSPACE].numpy().decode(),
                }
            )
    return rows


def tar_members(path):
    """{member name: bytes} of a tar file."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def extract_sample(sample, dest, val_by_class=False):
    """Writes the sample as extracted folders: train/<synset>/*.JPEG and val/ (flat or per class)."""
    labels = open(sample["val_labels"]).read().split()
    for class_tar, data in tar_members(sample["train_tar"]).items():
        synset = class_tar[: -len(".tar")]
        os.makedirs(os.path.join(dest, "train", synset), exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar:
                with open(os.path.join(dest, "train", synset, m.name), "wb") as f:
                    f.write(tar.extractfile(m).read())
    for name, data in tar_members(sample["val_tar"]).items():
        folder = os.path.join(dest, "val")
        if val_by_class:
            folder = os.path.join(folder, labels[int(name[-13:-5]) - 1])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return str(dest)


@pytest.fixture(scope="session")
def model_folder(built, tmp_path_factory):
    """(model_dir, keras model, stats): a model folder of the records' classes, as training
    leaves it, with seeded weights (no history.json)."""
    import tensorflow as tf

    from alexnet_tf import model as model_lib, preprocessing, run_dir

    out, meta = built
    model_dir = tmp_path_factory.mktemp("model")
    stats = preprocessing.ColorStats.from_records(Records(out, meta))
    model = model_lib.build_alexnet(meta.num_classes, seed=7)
    # Smaller fc8 weights: softmax outputs that are not all 0 or 1, so comparisons mean something.
    fc8 = model.get_layer("fc8")
    fc8.kernel.assign(fc8.kernel * 0.05)
    run_dir.write_model_info(str(model_dir), model_info(meta, square_size=256), stats.mean)
    tf.train.Checkpoint(model=model).save(str(model_dir / "checkpoints" / "ckpt"))
    return str(model_dir), model, stats


def model_info(meta, **changes):
    """The model_info of a run on the records of `meta` with the default settings (changed by `changes`)."""
    from alexnet_tf import run_dir
    from alexnet_tf.model_info import ModelInfo

    fields = dict(num_classes=meta.num_classes, grouped=True, dropout=0.5, classes=meta.classes, mean="image",
                  mean_file=run_dir.MEAN_IMAGE, square_size=256)
    return ModelInfo(**{**fields, **changes})


def checkpoint_at_step(data_dir: str, model_dir, step: int) -> None:
    """A checkpoint of the trainer's own structure, as a run stopped at `step` leaves it."""
    import tensorflow as tf

    from alexnet_tf import recipes, run_state, train_loop
    from alexnet_tf.config import TrainConfig

    config = TrainConfig(data_dir=data_dir, batch_size=8, seed=0)
    strategy = tf.distribute.get_strategy()
    model, optimizer = train_loop.build_model_and_optimizer(config, 10, strategy, "float32", recipes.get(config.recipe))
    state = run_state.LoopState(config.learning_rate)
    state.global_step.assign(step)
    state.step_in_epoch.assign(step)
    run_state.open_checkpoints(str(model_dir), strategy, True, model, optimizer, state).save(step)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def encode(image, fmt: str, **options) -> bytes:
    """A PIL image's bytes in `fmt` (PNG, GIF, ...), with Pillow's save options."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def gif_with_own_colour_table(gif: bytes) -> bytes:
    """The same GIF with its global colour table moved into its first frame's own (local) table."""
    flags = gif[10]
    size = 3 * (2 << (flags & 7))
    table, rest = gif[13:13 + size], gif[13 + size:]
    o = 0
    while rest[o] == 0x21:  # Extensions before the image: label, then sub-blocks up to a 0 length.
        o += 2
        while rest[o]:
            o += rest[o] + 1
        o += 1
    assert rest[o] == 0x2C, "no image descriptor"
    descriptor = bytearray(rest[o:o + 10])
    descriptor[9] = 0x80 | (flags & 7)
    return (gif[:10] + bytes([flags & 0x7F]) + gif[11:13] + rest[:o] + bytes(descriptor) + table
            + rest[o + 10:])


def encode_array(array, fmt: str = "JPEG", mode: str | None = None, **options) -> bytes:
    """A uint8 array's bytes in `fmt`, converted to the PIL `mode` first if given."""
    from PIL import Image

    img = Image.fromarray(array)
    return encode(img.convert(mode) if mode else img, fmt, **options)


def blocky_image(h: int, w: int, seed: int = 0):
    """A random h x w RGB uint8 image of 8x8 blocks: survives JPEG."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w]


@pytest.fixture(scope="session")
def exported(built, model_folder):
    """The shared model folder and its export via the CLI: (export_dir, model, stats, records dir, metadata)."""
    out, meta = built
    model_dir, model, stats = model_folder
    export_dir = os.path.join(model_dir, "exported")
    proc = cli("alexnet_tf.export", "--model_dir", model_dir, "--export_dir", export_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return export_dir, model, stats, out, meta


@pytest.fixture(scope="session")
def data(built):
    """(records dir, metadata, colour statistics, the first 3 validation rows) for the stream's tests."""
    from alexnet_tf import preprocessing

    out, meta = built
    stats = preprocessing.ColorStats.from_records(Records(out, meta))
    return out, meta, stats, read_split(out, meta, "validation")[:3]
