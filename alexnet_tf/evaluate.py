r"""Top-1 and top-5 error of a trained AlexNet, with the central patch and with the paper's ten patches.

    python -m alexnet_tf.evaluate --saved_model=runs/alexnet/saved_model --data_dir=tfrecords
    python -m alexnet_tf.evaluate --model_dir=runs/alexnet --split=validation --output_json=eval.json

Prints a table in the paper's format (Table 2) with the paper's ILSVRC-2012
validation figures for one CNN beside it, and writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Krizhevsky et al. (2012), Table 2, "1 CNN", validation set (10-patch averaging, §4.1).
PAPER_ONE_CNN_VAL = {"top1_error": 0.407, "top5_error": 0.182}


class _SavedModelAdapter:
    """Calls the SavedModel's `preprocessed` endpoint like a Keras model."""

    def __init__(self, loaded):
        self.loaded = loaded

    def __call__(self, images, training=False):
        return self.loaded.preprocessed(images)["logits"]


def load(saved_model: str | None, model_dir: str | None):
    """(model-like callable, mean, its classes' synsets in label order) from a SavedModel or a model folder."""
    import tensorflow as tf

    from alexnet_tf import export, run_dir

    if saved_model:
        if not tf.io.gfile.exists(os.path.join(saved_model, "saved_model.pb")):
            raise FileNotFoundError(f"{saved_model} is not a SavedModel (no saved_model.pb)")
        loaded = tf.saved_model.load(saved_model)
        mean = loaded.mean[0].numpy()
        return _SavedModelAdapter(loaded), mean, export.read_class_synsets(saved_model)
    model, info, mean = run_dir.load_trained_model(model_dir)
    return model, mean, [c["synset"] for c in info["classes"]]


def evaluate(model, mean, data_dir: str, split: str = "validation", batch_size: int = 100,
             progress: bool = True, ten_crops: bool = True) -> dict:
    """Central-patch and (with `ten_crops`, ten times the work) ten-patch errors of `model` on a split."""
    import numpy as np
    import tensorflow as tf

    from alexnet_tf import input_pipeline, records
    from alexnet_tf.evaluation import Evaluator

    meta = records.load_metadata(data_dir)
    if split not in meta.splits:
        raise ValueError(f"split {split!r} is not in {records.metadata_path(data_dir)} "
                         f"(it has {sorted(meta.splits)})")
    records.check_shards_exist(data_dir, meta, [split])
    stats = input_pipeline.ColorStats.for_evaluation(
        np.asarray(mean, np.float32), meta.image.size if meta.image.resized else None)
    evaluator = Evaluator(model, tf.distribute.get_strategy(), data_dir, meta, stats, batch_size)
    result = {
        "split": split,
        "num_examples": meta.splits[split].num_examples,
        "central_crop": evaluator.evaluate(split, progress=progress),
    }
    if ten_crops:
        result["ten_crops"] = evaluator.evaluate(split, ten_crop=True, progress=progress)
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m alexnet_tf.evaluate", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--saved_model", help="A SavedModel exported by alexnet_tf.export (or training).")
    src.add_argument("--model_dir", help="A model folder written by alexnet_tf.train (latest checkpoint).")
    p.add_argument("--data_dir", default="tfrecords", help="Records folder with metadata.json.")
    p.add_argument("--split", default="validation")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--output_json", default=None, help="Also write the results here.")
    p.add_argument("--noten_crops", dest="ten_crops", action="store_false",
                   help="The central patch only (the ten patches cost ten times as much).")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    import tensorflow as tf

    from alexnet_tf import records

    try:
        model, mean, synsets = load(args.saved_model, args.model_dir)
        meta = records.load_metadata(args.data_dir)
        records.check_same_classes(synsets, [c.synset for c in meta.classes], "the model", args.data_dir)
        result = evaluate(model, mean, args.data_dir, args.split, args.batch_size, ten_crops=args.ten_crops)
    except (FileNotFoundError, ValueError, records.MetadataError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        sys.exit(1)
    except tf.errors.DataLossError as e:
        print(f"evaluate: error: {records.data_loss_message(e, args.data_dir)}", file=sys.stderr)
        sys.exit(1)
    print(table(result))
    if args.output_json:
        records.write_json_atomically(args.output_json, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
