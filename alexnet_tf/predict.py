r"""Top-5 classes of image files, from an exported SavedModel.

    python -m alexnet_tf.predict --saved_model=runs/alexnet/saved_model cat.jpg dog.png

Each image goes through the model's own `serving_default` signature (the same
preprocessing as evaluation), one request an image. The signature takes a
batch of any size in chunks of 64 images (`export.SERVING_CHUNK`), so one
request's memory is bounded whatever its size. A missing or undecodable file
gets a one-line error and the others still run; the exit status is 1 if any
file failed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile

from absl import flags

from toolcli.command import Command

# The serving signature's refusal of an image above the pixel limit (`alexnet_tf.export`).
_TOO_LARGE = re.compile(r"of the batch is\] \[(\d+)\] \[x\] \[(\d+)\] \[pixels \(height x width\), above the limit "
                        r"of (\d+) decoded pixels")


def failure_reason(e) -> str:
    """The one line of a failed serving call (a `tf.errors.OpError`) that says what is wrong with the image.

    The message of an error inside a graph starts "Graph execution error:" and
    the node's whereabouts; what the op said stands on the line before its
    "[[{{node ...}}]]". The signature's own checks (`tf.debugging.Assert`)
    come back as "assertion failed: [part] [part] ...", rewritten here in words.
    """
    lines = [line.strip() for line in e.message.splitlines()]
    end = next((i for i, line in enumerate(lines) if line.startswith("[[")), len(lines))
    text = next((line for line in reversed(lines[:end]) if line and line != "<stack traces unavailable>"
                 and not line.startswith(("Graph execution error", "Detected at node"))), "")
    text = re.sub(r"\s*\[Op:[^\]]*\]$", "", text) or "unknown error"
    if "not a JPEG, PNG" in text:
        return "not a JPEG, PNG, GIF or BMP image"
    large = _TOO_LARGE.search(text)
    if large:
        height, width, limit = map(int, large.groups())
        return (f"{width}x{height}: {width * height:,} pixels, above the limit of {limit:,} decoded pixels "
                "(a decompression bomb, or damaged)")
    if text.startswith("assertion failed:"):
        text = " ".join(re.findall(r"\[([^\[\]]*)\]", text)) or text
    return text


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
            yield path, f"cannot be decoded ({failure_reason(e)})"
            continue
        top = [
            (n.decode(), s.decode(), float(p))
            for n, s, p in zip(out["top5_names"][0].numpy(), out["top5_synsets"][0].numpy(),
                               out["top5_probabilities"][0].numpy())
        ]
        yield path, top


@contextlib.contextmanager
def native_stderr_held():
    """Holds what is written to file descriptor 2 during the block; yields a stream to the real stderr.

    TensorFlow writes its C++ log (start-up notes logged before its log level
    applies; a failed check's "Local rendezvous is aborting ..." line beside
    the error raised to Python) and libjpeg its warnings straight to file
    descriptor 2. Held in a temporary file, they are dropped when the block
    ends (predict reports each failure itself, in one line), and written out
    when it ends in an unexpected exception, so nothing that explains a crash
    is lost.
    """
    sys.stderr.flush()
    try:
        on_descriptor = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # Replaced in this process (a caller capturing it).
        on_descriptor = False
    real = os.dup(2)
    own = os.fdopen(os.dup(real), "w", buffering=1) if on_descriptor else sys.stderr
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield own
        except BaseException as e:
            sys.stderr.flush()
            os.dup2(real, 2)
            if not isinstance(e, SystemExit):
                held.seek(0)
                os.write(2, held.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(real, 2)
            os.close(real)
            if own is not sys.stderr:
                own.close()


def define_flags() -> flags.FlagValues:
    """The predictor's flags, on a FlagValues of their own."""
    fv = flags.FlagValues()
    flags.DEFINE_string("saved_model", None, "A SavedModel exported by alexnet_tf.export (required).", flag_values=fv)
    flags.mark_flag_as_required("saved_model", flag_values=fv)
    return fv


COMMAND = Command(
    "predict", "python -m alexnet_tf.predict --saved_model=DIR IMAGE [IMAGE ...]",
    __doc__.split("\n\n", 1)[0] + "\n\nIMAGE: image files (JPEG, PNG, GIF, BMP).",
    epilog="Each image is one request to the model's serving_default signature, which decodes and runs any batch 64 "
           "images at a time (alexnet_tf.export.SERVING_CHUNK): memory stays bounded, about 200 MB over the loaded "
           "model. Images above 134,217,728 pixels (schema.MAX_PIXELS) are refused from their header.")


def main(argv=None) -> None:
    args, images = COMMAND.parse(define_flags(), argv, arguments=True)
    args.images = images
    if not images:
        COMMAND.fail("no image files given (see --help)", 2)
    with native_stderr_held() as stderr:
        failed = _run(args, stderr)
    sys.exit(1 if failed else 0)


def _run(args, stderr) -> int:
    """Prints each image's top 5; returns how many failed (their one-line errors go to `stderr`)."""
    from alexnet_tf import export

    try:
        loaded = export.load_saved_model(args.saved_model)
    except export.IncompleteSavedModel as e:
        print(f"predict: error: {e}", file=stderr)
        return 1
    failed = 0
    for path, result in predict_files(loaded, args.images):
        if isinstance(result, str):
            failed += 1
            print(f"predict: error: {path}: {result}", file=stderr)
            continue
        if not all(math.isfinite(prob) for _, _, prob in result):  # Every image would get the same: stop.
            print(f"predict: error: {args.saved_model} gives probabilities that are not finite (NaN or infinity) "
                  f"for {path}: its weights have diverged; export a checkpoint from before that", file=stderr)
            sys.exit(1)
        print(f"{path}:")
        for rank, (name, synset, prob) in enumerate(result, 1):
            print(f"  {rank}. {name} ({synset}) {prob:.2%}")
        sys.stdout.flush()
    return failed


if __name__ == "__main__":
    main()
