r"""Exports a trained AlexNet as a SavedModel that any TensorFlow client can serve.

    python -m alexnet_tf.export --model_dir=runs/alexnet --export_dir=exported/alexnet
    saved_model_cli show --dir exported/alexnet --all

Training runs the same export into `<model_dir>/saved_model` when it ends.

Signatures:
  serving_default(images: string[batch]) -> probabilities, top5_labels,
      top5_probabilities, top5_synsets, top5_names
    `images` holds encoded images (JPEG, PNG, GIF or BMP bytes; the TF Serving
    convention for binary input). Preprocessing runs inside the graph and is
    the evaluation's own (`preprocessing.preprocess_for_eval`): decode to RGB
    as the build does (`preprocessing.decode_rgb`: transparency on white),
    shorter side to 256, central 256x256, central 227x227 patch, mean subtracted.
  preprocessed(images: float32[batch, 227, 227, 3]) -> logits, probabilities, fc7
    For inputs already preprocessed that way (e.g. the paper's ten patches);
    fc7 is the last hidden layer (4096 wide, after its ReLU), the features the
    paper compares images by (Figure 4).
  Both take a batch of any size and work through it SERVING_CHUNK (64) images
  at a time, one chunk after another: a request's memory is one chunk's
  decoding and activations, whatever its size (plus the request and its
  outputs). The outputs are those of the whole batch at once.

The class list travels as an asset (`assets/classes.tsv`: label, synset,
name, one line per label), from which the signature's synsets and names are
looked up; the loaded object also carries `mean` (the mean image subtracted)
and `conv1_kernel` and `conv1_groups` (the first layer's kernels and the
groups they feed, for the paper's Figure 3).
Loading needs TensorFlow only.

The folder (`export_folder`): a new or empty folder is filled; one that holds an earlier export
(`saved_model.pb` and `assets/classes.tsv`) is replaced whole; any other
folder is refused (exit 1) and left as it is. The SavedModel is written into
a sibling `<export_dir>.tmp-<pid>` and swapped in with one atomic exchange
(Linux `renameat2(RENAME_EXCHANGE)`), so a SavedModel is at `<export_dir>` at
every moment; the earlier one is deleted after. Where the exchange is not
available (other systems, some filesystems, object stores) the earlier export
is first renamed aside to `<export_dir>.old-<pid>`, the new one renamed in,
then the aside copy deleted; an export killed between those two renames
leaves the earlier SavedModel at `<export_dir>.old-<pid>`, which the next
export (or `recover`) renames back. Leftover temporary folders of exports
that died are removed by the next export into the same folder.
"""

from __future__ import annotations

import os
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import flags

from alexnet_tf import model as model_lib, preprocessing, run_dir
from alexnet_tf.model_info import ModelInfo
from tfrecords import fileio
from toolcli.command import Command
from alexnet_tf.export_folder import (CLASSES_ASSET, ExportError, OLD_TAG, SAVED_MODEL_PB, TMP_TAG, check_export_dir,
                                      check_finite, export_leftover, is_export, recover, resolve, siblings, swap_in,
                                      write_out)

# Images a signature decodes and runs through the network at once: a request of
# any size is served in chunks of this many, one after another, so its memory is
# one chunk's (about 200 MB over the loaded model on a CPU) plus the request's own
# bytes and its outputs. Served whole, 2,000 JPEGs took 9.4 GB over the model.
SERVING_CHUNK = 64



class IncompleteSavedModel(ValueError):
    """A folder given as a SavedModel that is not (or not a whole) one."""



def read_class_synsets(saved_model: str) -> list[str]:
    """The synsets, in label order, of an exported model (its `assets/classes.tsv`)."""
    path = os.path.join(saved_model, "assets", CLASSES_ASSET)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: {saved_model} was not exported by alexnet_tf.export "
                                "(its class list is missing)")
    with tf.io.gfile.GFile(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    if any(len(r) < 2 or not r[0].isdigit() or int(r[0]) != i for i, r in enumerate(rows)):
        raise ValueError(f"{path}: expected lines 'label<TAB>synset<TAB>name' with labels 0, 1, 2, ...")
    return [r[1] for r in rows]


def _missing_part(saved_model: str) -> str | None:
    """What an export at `saved_model` lacks, in words; None when all its parts are there."""
    variables = os.path.join(saved_model, "variables")
    if not tf.io.gfile.exists(os.path.join(variables, "variables.index")):
        return "variables/variables.index is missing"
    if not tf.io.gfile.glob(os.path.join(variables, "variables.data-*")):
        return "variables/variables.data-* is missing"
    if not tf.io.gfile.exists(os.path.join(saved_model, "assets", CLASSES_ASSET)):
        return f"assets/{CLASSES_ASSET} is missing"
    return None


def load_saved_model(saved_model: str):
    """`tf.saved_model.load` of an export; IncompleteSavedModel (one line, naming the folder) for anything less.

    Checks its parts (saved_model.pb, the variables' index and data, the
    class list) before loading; a damaged part (a truncated file) is named
    by the loader's first line.
    """
    if not tf.io.gfile.exists(os.path.join(saved_model, SAVED_MODEL_PB)):
        what = "no saved_model.pb" if tf.io.gfile.isdir(saved_model) else "no such folder"
        aside = [p for p, _ in siblings(resolve(saved_model), OLD_TAG) if is_export(p)]
        hint = (f"; an interrupted export left the earlier one at {aside[0]}: run the export again, which puts it "
                "back") if aside and not tf.io.gfile.exists(saved_model) else ""
        raise IncompleteSavedModel(f"{saved_model} is not a SavedModel ({what}){hint}")
    missing = _missing_part(saved_model)
    if missing:
        raise IncompleteSavedModel(f"{saved_model} is not a complete SavedModel: {missing}")
    from google.protobuf.message import DecodeError

    try:
        return tf.saved_model.load(saved_model)
    except (DecodeError, OSError, ValueError, LookupError, tf.errors.OpError) as e:
        if isinstance(e, DecodeError) or SAVED_MODEL_PB in str(e):
            what = f"{SAVED_MODEL_PB} cannot be parsed (truncated or damaged)"
        else:
            what = f"its variables cannot be read ({fileio.error_reason(e)})"
        raise IncompleteSavedModel(f"{saved_model} is not a complete SavedModel: {what}") from None


def conv1_groups(loaded) -> int:
    """Groups conv1's kernels feed (conv2's) in a loaded export; 1 for exports that do not say."""
    return int(loaded.conv1_groups[0].numpy()) if hasattr(loaded, "conv1_groups") else 1


def export(model, info: ModelInfo, mean: np.ndarray, export_dir: str) -> str:
    """Writes the SavedModel to `export_dir` (replaced whole, via a temporary folder).

    Built with Keras' `ExportArchive`, which saves the variables where
    graph-mode loaders (saved_model_cli, TF Serving) find them.

    Raises ExportError (nothing written, nothing removed) when `export_dir`
    is a folder holding anything but an earlier export, NonFiniteWeights when
    the weights are not all finite, ExportError when writing fails (a full
    disk: the temporary folder removed, the earlier export kept).
    See the module's docstring for the sequence that replaces a folder.
    """
    recover(export_dir)
    check_export_dir(export_dir)
    check_finite(model, mean)
    target = resolve(export_dir)
    crop = model.input_shape[1]
    k = min(5, info.num_classes)
    mean_var = tf.Variable(np.asarray(mean, np.float32), trainable=False, name="mean")
    layers = {layer.name: layer for layer in model.layers}  # AlexNet's; other networks lack the figures' parts.
    grouped = isinstance(layers.get("conv2"), model_lib.GroupedConv2D)
    groups = tf.Variable(2 if grouped else 1, trainable=False, name="conv1_groups")
    stats = preprocessing.ColorStats.for_evaluation(mean_var, info.square_size)

    def one(args):
        image_bytes, index = args
        known = tf.reduce_any([tf.equal(tf.strings.substr(image_bytes, 0, len(m)), m)
                               for m in preprocessing.IMAGE_MAGIC])
        # A clear error for the request, naming the batch element; the serving
        # process carries on. The first bytes go in as numbers: raw binary in an
        # error message is not valid UTF-8 for the client that decodes it.
        check = tf.debugging.Assert(known, ["input is not a JPEG, PNG, GIF or BMP image: element", index,
                                            "of the batch starts with bytes",
                                            tf.io.decode_raw(tf.strings.substr(image_bytes, 0, 8), tf.uint8)])
        # Decoding waits for the checks: otherwise they race, and a non-image
        # sometimes fails first in the decoder with a less telling message.
        with tf.control_dependencies([check]):
            hw = preprocessing.header_size(image_bytes)
            small = tf.debugging.Assert(
                hw[0] * hw[1] <= preprocessing.MAX_PIXELS,
                ["image", index, "of the batch is", hw[0], "x", hw[1], "pixels (height x width), above the limit "
                 f"of {preprocessing.MAX_PIXELS} decoded pixels"])
        with tf.control_dependencies([small]):
            return preprocessing.preprocess_for_eval(tf.identity(image_bytes), stats, crop)

    both = keras.Model(model.inputs, [layers["fc7"].output, model.output]) if "fc7" in layers else None
    num_classes = info.num_classes

    def predict(images):
        logits = tf.cast(model(images, training=False), tf.float32)
        return logits, tf.nn.softmax(logits)

    def in_chunks(fn, inputs, outputs: dict):
        """{name: fn(inputs[i:i + SERVING_CHUNK], i)[name] for each chunk, concatenated}.

        One chunk at a time (parallel_iterations=1): the memory a call takes
        is one chunk's decoding and activations, whatever the batch size.
        `outputs` maps each name to the shape of one row.
        """
        chunk = SERVING_CHUNK
        n = tf.shape(inputs, out_type=tf.int32)[0]
        chunks = (n + chunk - 1) // chunk
        arrays = {name: tf.TensorArray(tf.float32, size=chunks, infer_shape=False, element_shape=[None, *shape])
                  for name, shape in outputs.items()}

        def body(i, arrays):
            out = fn(inputs[i * chunk:(i + 1) * chunk], i * chunk)
            return i + 1, {name: a.write(i, out[name]) for name, a in arrays.items()}

        _, arrays = tf.while_loop(lambda i, _: i < chunks, body, (tf.constant(0), arrays), parallel_iterations=1)
        # Shaped from the input's shape: a caller whose batch size is static
        # (the evaluation's ten patches) sees it in the outputs' shapes too.
        return {name: tf.reshape(a.concat(), tf.concat([tf.shape(inputs)[:1], outputs[name]], 0))
                for name, a in arrays.items()}

    def serve_chunk(images, first):
        batch = tf.map_fn(one, (images, first + tf.range(tf.size(images))),
                          fn_output_signature=tf.TensorSpec([crop, crop, 3], tf.float32))
        _, probs = predict(batch)
        return {"probabilities": probs}

    def serve(images):
        """Encoded images -> probabilities and the top 5, SERVING_CHUNK images decoded and run at a time."""
        probs = in_chunks(serve_chunk, images, {"probabilities": [num_classes]})["probabilities"]
        top = tf.math.top_k(probs, k=k)
        return {
            "probabilities": probs,
            "top5_labels": tf.cast(top.indices, tf.int64),
            "top5_probabilities": top.values,
            "top5_synsets": synsets.lookup(tf.cast(top.indices, tf.int64)),
            "top5_names": names.lookup(tf.cast(top.indices, tf.int64)),
        }

    def preprocessed_chunk(images, first):
        if both is None:
            logits, probs = predict(images)
            return {"logits": logits, "probabilities": probs}
        fc7, logits = both(images, training=False)
        logits = tf.cast(logits, tf.float32)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits), "fc7": tf.cast(fc7, tf.float32)}

    def preprocessed(images):
        """Network inputs -> logits, probabilities (and fc7), SERVING_CHUNK images run at a time."""
        outputs = {"logits": [num_classes], "probabilities": [num_classes]}
        if both is not None:
            outputs["fc7"] = [int(both.outputs[0].shape[-1])]
        return in_chunks(preprocessed_chunk, images, outputs)

    tmp = f"{target}{TMP_TAG}{os.getpid()}"
    if tf.io.gfile.exists(tmp):
        if not export_leftover(tmp):
            raise ExportError(f"{tmp} (the export's temporary folder) exists and holds other files; move it away")
        tf.io.gfile.rmtree(tmp)
    with tempfile.TemporaryDirectory() as scratch:
        asset_path = os.path.join(scratch, CLASSES_ASSET)
        with open(asset_path, "w") as f:  # Line i holds label i: "label<TAB>synset<TAB>name".
            for c in info.classes:
                f.write(f"{c.label}\t{c.synset}\t{c.name}\n")
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
        if "conv1" in layers:
            archive.add_variable_collection("conv1_kernel", [layers["conv1"].kernel])
            archive.add_variable_collection("conv1_groups", [groups])
        archive.add_endpoint("serving_default", serve, [tf.TensorSpec([None], tf.string, name="images")])
        archive.add_endpoint("preprocessed", preprocessed,
                             [tf.TensorSpec([None, crop, crop, 3], tf.float32, name="images")])
        write_out(archive, tmp, export_dir)
    try:
        swap_in(tmp, target)
    except (OSError, tf.errors.OpError) as e:
        raise ExportError(f"cannot move the new SavedModel {tmp} to {export_dir} ({fileio.error_reason(e)}); "
                          "the next export puts back or tidies what is left") from None
    return export_dir


def export_trained(model, model_dir: str, export_dir: str | None = None) -> str:
    """Exports a model trained into `model_dir` (under any strategy, in any precision) in float32.

    The weights are copied into a float32 copy of the network built outside
    any distribution strategy (plain variables, no replicas), so the SavedModel
    computes in float32 whatever policy trained it.
    """
    info, mean = run_dir.read_model_info(model_dir)
    plain = run_dir.build_model(info)
    plain.set_weights(model.get_weights())
    return export(plain, info, mean, export_dir or run_dir.path(model_dir, run_dir.SAVED_MODEL))


def define_flags() -> flags.FlagValues:
    """The exporter's flags, on a FlagValues of their own."""
    fv = flags.FlagValues()
    flags.DEFINE_string("model_dir", None, "Model folder written by alexnet_tf.train (required).", flag_values=fv)
    flags.DEFINE_string("export_dir", None, "Where the SavedModel goes (default <model_dir>/saved_model): a new or "
                        "empty folder, or an earlier export, which is replaced whole; any other folder is refused and "
                        "left as it is.", flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "A checkpoint path (default: the latest).", flag_values=fv)
    flags.mark_flag_as_required("model_dir", flag_values=fv)
    return fv


COMMAND = Command("export", "python -m alexnet_tf.export --model_dir=DIR [--export_dir=DIR] [--checkpoint=PATH]",
                  __doc__)


def main(argv=None) -> None:
    args, _ = COMMAND.parse(define_flags(), argv)
    export_dir = args.export_dir or run_dir.path(args.model_dir, run_dir.SAVED_MODEL)
    try:
        check_export_dir(export_dir)  # Before the checkpoint is read: a refused folder costs nothing.
        model, info, mean = run_dir.load_trained_model(args.model_dir, args.checkpoint)
        out = export(model, info, mean, export_dir)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (OSError, tf.errors.OpError) as e:
        print(f"export: error: cannot export to {export_dir}: {fileio.error_reason(e)}", file=sys.stderr)
        sys.exit(1)
    print(f"export: wrote {out} (signatures serving_default, preprocessed)")


if __name__ == "__main__":
    main()
