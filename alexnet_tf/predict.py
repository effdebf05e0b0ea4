r"""Top-5 classes of image files, from an exported SavedModel.

    python -m alexnet_tf.predict --saved_model=runs/alexnet/saved_model cat.jpg dog.png

Each image goes through the model's own `serving_default` signature (the same
preprocessing as evaluation). A missing or undecodable file gets a one-line
error and the others still run; the exit status is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import math
import sys


def predict_files(loaded, paths: list[str]):
    """Yields (path, top-5 list of (name, synset, probability)) or (path, error message)."""
    import tensorflow as tf

    serve = loaded.signatures["serving_default"]
    for path in paths:
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                data = f.read()
        except (tf.errors.NotFoundError, OSError):
            yield path, "no such file"
            continue
        except tf.errors.OpError as e:
            yield path, f"unreadable: {e.message.splitlines()[0]}"
            continue
        try:
            out = serve(images=tf.constant([data]))
        except UnicodeDecodeError:  # Models exported before the check's message was made ASCII.
            yield path, "cannot be decoded (not a JPEG, PNG, GIF or BMP image)"
            continue
        except tf.errors.OpError as e:  # One bad file: say so and go on with the others.
            reason = e.message.strip().splitlines()[0]
            if "not a JPEG, PNG" in e.message:
                reason = "not a JPEG, PNG, GIF or BMP image"
            yield path, f"cannot be decoded ({reason})"
            continue
        top = [
            (n.decode(), s.decode(), float(p))
            for n, s, p in zip(out["top5_names"][0].numpy(), out["top5_synsets"][0].numpy(),
                               out["top5_probabilities"][0].numpy())
        ]
        yield path, top


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m alexnet_tf.predict", description=__doc__.splitlines()[0])
    p.add_argument("--saved_model", required=True, help="A SavedModel exported by alexnet_tf.export.")
    p.add_argument("images", nargs="+", help="Image files (JPEG, PNG, GIF, BMP).")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from alexnet_tf import export

    try:
        loaded = export.load_saved_model(args.saved_model)
    except export.IncompleteSavedModel as e:
        print(f"predict: error: {e}", file=sys.stderr)
        sys.exit(1)
    failed = 0
    for path, result in predict_files(loaded, args.images):
        if isinstance(result, str):
            failed += 1
            print(f"predict: error: {path}: {result}", file=sys.stderr)
            continue
        if not all(math.isfinite(prob) for _, _, prob in result):  # Every image would get the same: stop.
            print(f"predict: error: {args.saved_model} gives probabilities that are not finite (NaN or infinity) "
                  f"for {path}: its weights have diverged; export a checkpoint from before that", file=sys.stderr)
            sys.exit(1)
        print(f"{path}:")
        for rank, (name, synset, prob) in enumerate(result, 1):
            print(f"  {rank}. {name} ({synset}) {prob:.2%}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
