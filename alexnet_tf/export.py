r"""Exports a trained AlexNet as a SavedModel that any TensorFlow client can serve.

    python -m alexnet_tf.export --model_dir=runs/alexnet --export_dir=exported/alexnet
    saved_model_cli show --dir exported/alexnet --all

Training runs the same export into `<model_dir>/saved_model` when it ends.

Signatures:
  serving_default(images: string[batch]) -> probabilities, top5_labels,
      top5_probabilities, top5_synsets, top5_names
    `images` holds encoded images (JPEG, PNG, GIF or BMP bytes; the TF Serving
    convention for binary input). Preprocessing runs inside the graph and is
    the evaluation's own (`input_pipeline.preprocess_for_eval`): decode to RGB,
    shorter side to 256, central 256x256, central 227x227 patch, mean subtracted.
  preprocessed(images: float32[batch, 227, 227, 3]) -> logits, probabilities
    For inputs already preprocessed that way (e.g. the paper's ten patches).

The class list travels as an asset (`assets/classes.tsv`: label, synset,
name, one line per label), from which the signature's synsets and names are
looked up; the loaded object also carries `mean` (the mean image subtracted).
Loading needs TensorFlow only.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

MODEL_INFO = "model_info.json"
MEAN_IMAGE = "mean_image.npy"
CLASSES_ASSET = "classes.tsv"
MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP"}


def write_model_info(model_dir: str, *, num_classes: int, grouped: bool, dropout: float, classes: list,
                     mean: np.ndarray, mean_kind: str, square_size: int) -> None:
    """Saves beside the checkpoints what an export needs besides the weights."""
    import tensorflow as tf

    from alexnet_tf import records

    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(os.path.join(model_dir, MEAN_IMAGE), "wb") as f:
        np.save(f, np.asarray(mean, np.float32))
    records.write_json_atomically(os.path.join(model_dir, MODEL_INFO), {
        "num_classes": num_classes, "grouped": grouped, "dropout": dropout, "classes": classes,
        "mean": mean_kind, "mean_file": MEAN_IMAGE, "square_size": square_size,
    })


def read_model_info(model_dir: str) -> tuple[dict, np.ndarray]:
    import tensorflow as tf

    path = os.path.join(model_dir, MODEL_INFO)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: is {model_dir} a model folder written by alexnet_tf.train?")
    with tf.io.gfile.GFile(path) as f:
        info = json.load(f)
    with tf.io.gfile.GFile(os.path.join(model_dir, info["mean_file"]), "rb") as f:
        return info, np.load(f)


def load_trained_model(model_dir: str, checkpoint: str | None = None):
    """The Keras model of a model folder, with the weights of its latest (or given) checkpoint."""
    import tensorflow as tf

    from alexnet_tf import model as model_lib
    from alexnet_tf.train import CHECKPOINTS

    info, mean = read_model_info(model_dir)
    checkpoint = checkpoint or tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINTS))
    if not checkpoint:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(model_dir, CHECKPOINTS)}")
    model = model_lib.build_alexnet(info["num_classes"], grouped=info["grouped"], dropout=info["dropout"])
    tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial().assert_existing_objects_matched()
    return model, info, mean


def export(model, info: dict, mean: np.ndarray, export_dir: str) -> str:
    """Writes the SavedModel to `export_dir` (replaced whole, via a temporary folder).

    Built with Keras' `ExportArchive`, which saves the variables where
    graph-mode loaders (saved_model_cli, TF Serving) find them.
    """
    import keras
    import tensorflow as tf

    from alexnet_tf import input_pipeline

    crop = model.input_shape[1]
    k = min(5, info["num_classes"])
    mean_var = tf.Variable(np.asarray(mean, np.float32), trainable=False, name="mean")
    stats = input_pipeline.ColorStats.for_evaluation(mean_var, info["square_size"])

    def one(image_bytes):
        known = tf.reduce_any([tf.equal(tf.strings.substr(image_bytes, 0, len(m)), m) for m in MAGIC])
        # A clear error for the request; the serving process carries on.
        tf.debugging.Assert(known, ["input is not a JPEG, PNG, GIF or BMP image; it starts with",
                                    tf.strings.substr(image_bytes, 0, 8)])
        return input_pipeline.preprocess_for_eval(image_bytes, stats, crop)

    def predict(images):
        logits = tf.cast(model(images, training=False), tf.float32)
        return logits, tf.nn.softmax(logits)

    def serve(images):
        batch = tf.map_fn(one, images, fn_output_signature=tf.TensorSpec([crop, crop, 3], tf.float32))
        _, probs = predict(batch)
        top = tf.math.top_k(probs, k=k)
        return {
            "probabilities": probs,
            "top5_labels": tf.cast(top.indices, tf.int64),
            "top5_probabilities": top.values,
            "top5_synsets": synsets.lookup(tf.cast(top.indices, tf.int64)),
            "top5_names": names.lookup(tf.cast(top.indices, tf.int64)),
        }

    def preprocessed(images):
        logits, probs = predict(images)
        return {"logits": logits, "probabilities": probs}

    tmp = f"{export_dir.rstrip('/')}.tmp-{os.getpid()}"
    with tempfile.TemporaryDirectory() as scratch:
        asset_path = os.path.join(scratch, CLASSES_ASSET)
        with open(asset_path, "w") as f:  # Line i holds label i: "label<TAB>synset<TAB>name".
            for c in info["classes"]:
                f.write(f"{c['label']}\t{c['synset']}\t{c['name']}\n")
        # Tables initialised from the asset: the class list the signature answers
        # with is the one shipped in assets/classes.tsv.
        synsets, names = (
            tf.lookup.StaticHashTable(
                tf.lookup.TextFileInitializer(asset_path, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
                                              tf.string, column, delimiter="\t"), default_value="")
            for column in (1, 2)
        )
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.track(synsets)
        archive.track(names)
        archive.add_variable_collection("mean", [mean_var])
        archive.add_endpoint("serving_default", serve, [tf.TensorSpec([None], tf.string, name="images")])
        archive.add_endpoint("preprocessed", preprocessed,
                             [tf.TensorSpec([None, crop, crop, 3], tf.float32, name="images")])
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
        archive.write_out(tmp, verbose=False)
    if tf.io.gfile.exists(export_dir):
        tf.io.gfile.rmtree(export_dir)
    tf.io.gfile.rename(tmp, export_dir)
    return export_dir


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m alexnet_tf.export", description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True, help="Model folder written by alexnet_tf.train.")
    p.add_argument("--export_dir", default=None, help="Where the SavedModel goes (default <model_dir>/saved_model).")
    p.add_argument("--checkpoint", default=None, help="A checkpoint path (default: the latest).")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model, info, mean = load_trained_model(args.model_dir, args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        sys.exit(1)
    out = export(model, info, mean, args.export_dir or os.path.join(args.model_dir, "saved_model"))
    print(f"export: wrote {out} (signatures serving_default, preprocessed)")


if __name__ == "__main__":
    main()
