r"""Top-1 and top-5 error of a trained AlexNet, with the central patch and with the paper's ten patches.

    python -m alexnet_tf.evaluate --saved_model=runs/alexnet/saved_model --data_dir=data
    python -m alexnet_tf.evaluate --model_dir=runs/alexnet --split=validation --output_json=eval.json
    python -m alexnet_tf.evaluate --model_dir=runs/alexnet --report=reports/alexnet

Prints a table in the paper's format (Table 2) with the paper's ILSVRC-2012
validation figures for one CNN beside it, and writes the same as JSON. With
--report, also one self-contained HTML page (`alexnet_tf.report`): the table,
the paper's Figures 3 and 4 from this model, per-class errors, the most
confused classes and, for a model folder, its learning curves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import flags

from tfrecords import schema
from toolcli.command import Command

# Krizhevsky et al. (2012), Table 2, "1 CNN", validation set (10-patch averaging, §4.1).
PAPER_ONE_CNN_VAL = {"top1_error": 0.407, "top5_error": 0.182}


class _SavedModelAdapter:
    """Calls the SavedModel's `preprocessed` endpoint like a Keras model."""

    def __init__(self, loaded):
        self.loaded = loaded

    def __call__(self, images, training=False):
        return self.loaded.preprocessed(images)["logits"]

    def forward(self, images):
        """(fc7, or None from exports that lack it, logits)."""
        out = self.loaded.preprocessed(images)
        return out.get("fc7"), out["logits"]


@dataclasses.dataclass
class Loaded:
    model: object  # A callable (images, training=False) -> logits.
    mean: object  # The mean image (or colour) the model subtracts.
    synsets: list  # Its classes, in label order.
    forward: object  # images -> (fc7 or None, logits), for the report's figures.
    kernel: object  # conv1's kernel, or None (older exports).
    groups: int  # Bands of conv1's kernels (conv2's groups).
    history: list | None  # A model folder's history.json.
    crop: int = schema.CROP  # The side of the square patches the model takes.


def load(saved_model: str | None, model_dir: str | None) -> Loaded:
    """A SavedModel or a model folder's latest checkpoint, with what evaluation and the report need."""
    from alexnet_tf import export, figures, run_dir

    if saved_model:
        loaded = export.load_saved_model(saved_model)  # IncompleteSavedModel, a ValueError, names what is wrong.
        adapter = _SavedModelAdapter(loaded)
        kernel = loaded.conv1_kernel[0].numpy() if hasattr(loaded, "conv1_kernel") else None
        crop = loaded.signatures["preprocessed"].structured_input_signature[1]["images"].shape[1]
        return Loaded(adapter, loaded.mean[0].numpy(), export.read_class_synsets(saved_model), adapter.forward,
                      kernel, export.conv1_groups(loaded), None, int(crop))
    model, info, mean = run_dir.load_trained_model(model_dir)
    return Loaded(model, mean, list(info.synsets), figures.keras_forward(model),
                  figures.conv1_kernel(model), figures.conv1_groups(info.grouped), run_dir.read_history(model_dir),
                  int(model.input_shape[1]))


def check_image_size(records, crop: int) -> None:
    """Raises ValueError when the records' stored squares are smaller than the model's `crop` x `crop` patches."""
    square = records.meta.image.square
    if square is not None and square < crop:
        raise ValueError(f"{records.data_dir} holds {square}x{square} images, smaller than the {crop}x{crop} patches the "
                         f"model takes; rebuild the records with --image_size of at least {crop} (the paper's 256)")


def evaluate(model, mean, records, split: str = "validation", batch_size: int = 100,
             progress: bool = True, ten_crops: bool = True, per_class: bool = False) -> dict:
    """Central-patch and (with `ten_crops`, ten times the work) ten-patch errors of `model` on a split.

    `records` is the records folder, opened (`tfrecords.folder.Records`); the
    split's shards are checked here. With `per_class`, the central patch's result also has "per_class" (images,
    errors and the confusion matrix per class: `evaluation.split_sums`).
    """
    import numpy as np
    import tensorflow as tf

    from alexnet_tf import preprocessing
    from alexnet_tf.evaluation import Evaluator

    if split not in records.meta.splits:
        raise ValueError(f"split {split!r} is not in {records.metadata_path} (it has {sorted(records.meta.splits)})")
    records.check_shards([split])
    stats = preprocessing.ColorStats.for_evaluation(np.asarray(mean, np.float32), records.meta.image.square)
    strategy = tf.distribute.get_strategy()
    central = Evaluator(model, strategy, records, stats, batch_size, per_class=per_class, confusion=per_class)
    result = {
        "split": split,
        "num_examples": records.split(split).num_examples,
        "central_crop": central.evaluate(split, progress=progress),
    }
    if ten_crops:  # Plain sums: the per-class tables are the central patch's.
        result["ten_crops"] = Evaluator(model, strategy, records, stats, batch_size).evaluate(
            split, ten_crop=True, progress=progress)
    result["paper_one_cnn_validation"] = PAPER_ONE_CNN_VAL
    return result


def table(result: dict) -> str:
    """The results as a table in the paper's format."""
    rows = [
        ("central 227x227 patch", result["central_crop"]),
        ("10 patches, softmax averaged", result.get("ten_crops")),
        ("paper, 1 CNN (ILSVRC-2012 val)", result["paper_one_cnn_validation"]),
    ]
    rows = [(name, r) for name, r in rows if r is not None]
    lines = [f"{result['split']} ({result['num_examples']} images)",
             f"{'':32s}{'top-1 error':>12s}{'top-5 error':>14s}"]
    for name, r in rows:
        lines.append(f"{name:32s}{r['top1_error']:>11.1%}{r['top5_error']:>14.1%}")
    return "\n".join(lines)


def define_flags() -> flags.FlagValues:
    """The evaluator's flags, on a FlagValues of their own."""
    fv = flags.FlagValues()
    flags.DEFINE_string("saved_model", None, "A SavedModel exported by alexnet_tf.export (or training); this or "
                        "--model_dir.", flag_values=fv)
    flags.DEFINE_string("model_dir", None, "A model folder written by alexnet_tf.train (latest checkpoint); this or "
                        "--saved_model.", flag_values=fv)
    flags.DEFINE_string("data_dir", "data", "Records folder with metadata.json.", flag_values=fv)
    flags.DEFINE_string("split", "validation", "The split evaluated.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 100, "Images per batch.", flag_values=fv)
    flags.DEFINE_string("output_json", None, "Also write the results here.", flag_values=fv)
    flags.DEFINE_bool("ten_crops", True, "The paper's ten patches besides the central one (--noten_crops: the "
                      "central patch only; the ten patches cost ten times as much).", flag_values=fv)
    flags.DEFINE_string("report", None, "Also write DIR/report.html: the table, the paper's Figures 3 and 4 from "
                        "this model, per-class errors, the most confused classes and (--model_dir) the learning "
                        "curves.", flag_values=fv)
    flags.DEFINE_integer("figure_pool", 500, "--report: the first N images of the split the fc7 neighbours are "
                         "searched in.", flag_values=fv)
    flags.mark_flags_as_mutual_exclusive(["saved_model", "model_dir"], required=True, flag_values=fv)
    return fv


COMMAND = Command("evaluate", "python -m alexnet_tf.evaluate (--saved_model=DIR | --model_dir=DIR) [flags]", __doc__)


def main(argv=None) -> None:
    args, _ = COMMAND.parse(define_flags(), argv)
    if args.batch_size < 1:
        COMMAND.fail(f"--batch_size must be at least 1, got {args.batch_size}", 2)
    if args.figure_pool < 1:
        COMMAND.fail(f"--figure_pool must be at least 1, got {args.figure_pool}", 2)
    if args.report and os.path.exists(args.report) and not os.path.isdir(args.report):
        COMMAND.fail(f"--report {args.report} is a file; it takes a folder (report.html is written into it)", 2)
    import tensorflow as tf

    from tfrecords import fileio, integrity, metadata
    from tfrecords.folder import Records

    records = None  # For a damaged shard's message, once read.
    try:
        loaded = load(args.saved_model, args.model_dir)
        records = Records(args.data_dir, metadata.load_metadata(args.data_dir))
        records.check_classes(loaded.synsets, "the model")
        check_image_size(records, loaded.crop)
        result = evaluate(loaded.model, loaded.mean, records, args.split, args.batch_size,
                          ten_crops=args.ten_crops, per_class=bool(args.report))
        per_class = result["central_crop"].pop("per_class", None)
        if args.report:
            path = write_report(args, loaded, records, result, per_class)
    except (FileNotFoundError, ValueError, metadata.MetadataError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        sys.exit(1)
    except tf.errors.DataLossError as e:
        message = records.data_loss_message(e) if records else integrity.data_loss_message(e, args.data_dir)
        print(f"evaluate: error: {message}", file=sys.stderr)
        sys.exit(1)
    print(table(result))
    if args.report:
        print(f"evaluate: wrote {path}", file=sys.stderr)
    if args.output_json:
        fileio.write_json_atomically(args.output_json, result)
    print(json.dumps(result))


def write_report(args, loaded: Loaded, records, result: dict, per_class: dict) -> str:
    """Draws the figures of the loaded model and writes the report; returns its path."""
    import numpy as np

    from alexnet_tf import figures, preprocessing, report

    stats = preprocessing.ColorStats.for_evaluation(np.asarray(loaded.mean, np.float32), records.meta.image.square)
    fixed = figures.FixedImages(records, stats, args.figure_pool, split=args.split)
    drawn = fixed.draw(loaded.forward, [c.name for c in records.classes], loaded.kernel, loaded.groups)
    page = report.build(result, per_class, records.classes, drawn, source=args.saved_model or args.model_dir,
                        data_dir=args.data_dir, history=loaded.history)
    return report.write(args.report, page)


if __name__ == "__main__":
    main()
