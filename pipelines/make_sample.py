"""Makes the synthetic samples that stand in for ImageNet: small, deterministic, in the raw ILSVRC2012 layout.

    python -m pipelines.make_sample --output_dir /tmp/alexnet_sample

It writes:

    DIR/ILSVRC2012_img_train.tar   one ``nXXXXXXXX.tar`` per class, each holding
                                   ``nXXXXXXXX_N.JPEG`` images
    DIR/ILSVRC2012_img_val.tar     flat ``ILSVRC2012_val_%08d.JPEG`` images, 1..V
    DIR/validation_labels.txt      line i = synset of ``ILSVRC2012_val_%08d.JPEG % i``
    DIR/manifest.json              what was written, including the quirky files
    DIR/SAMPLE_COMPLETE            marker written last: the sample is complete

It stands in for ImageNet in tests and smoke runs of the data pipeline and of
training. The 10 classes are the Imagenette synsets; each class is a texture
family (stripes, rings, dots, ...) whose colours are drawn from the same
distribution for every class, so a CNN has to look at texture and shape rather
than mean colour. Like the real archives, a few files are awkward: a CMYK JPEG,
a PNG and a grayscale image under ``.JPEG`` names, and a truncated JPEG.

Same ``--seed`` and counts give byte-identical tar files.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from absl import flags

from pipelines import class_labels, sample_folder, sample_images
from pipelines.imagenet_layout import TRAIN_TAR, VAL_LABELS, VAL_TAR
from pipelines.raw_layout import val_name, write_archives
from pipelines.sample_folder import MANIFEST, MARKER
from tfrecords import fileio
from toolcli.command import Command

logger = logging.getLogger(__name__)

# The Imagenette classes, in sorted (= label index) order.
SYNSETS = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
           "n03394916", "n03417042", "n03425413", "n03445777", "n03888257")
assert len(sample_images.PATTERNS) == len(SYNSETS)  # One texture family per class.

FORMAT_VERSION = 1
MIN_TRAIN_PER_CLASS = 4
MIN_VAL_PER_CLASS = 1

# Independent random streams, so that e.g. changing the number of validation
# images does not change any training image.
_STREAM_LAYOUT, _STREAM_TRAIN, _STREAM_VAL = 0, 1, 2


def _check_args(seed: int, train_per_class: int, val_per_class: int) -> None:
    if seed < 0:  # numpy's SeedSequence takes non-negative integers only.
        raise ValueError(f"seed must be >= 0 (got {seed})")
    if train_per_class < MIN_TRAIN_PER_CLASS:
        raise ValueError(f"train_per_class must be >= {MIN_TRAIN_PER_CLASS} (got {train_per_class})")
    if val_per_class < MIN_VAL_PER_CLASS:
        raise ValueError(f"val_per_class must be >= {MIN_VAL_PER_CLASS} (got {val_per_class})")


def _params(seed: int, train_per_class: int, val_per_class: int) -> dict:
    """What the SAMPLE_COMPLETE marker records; equal params -> equal sample."""
    return {
        "version": FORMAT_VERSION,
        "seed": int(seed),
        "synsets": list(SYNSETS),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
    }


def make_sample(
    output_dir: str | os.PathLike,
    seed: int = 0,
    train_per_class: int = 40,
    val_per_class: int = 10,
    *,
    quirks: bool = True,
) -> dict:
    """Writes the synthetic ILSVRC2012-layout sample into ``output_dir``.

    Args:
        output_dir: Directory to write into; created if missing. Existing
            sample files in it are replaced.
        seed: Seed for everything random; equal arguments give byte-identical
            tar and label files.
        train_per_class: Training images per class (>= 4).
        val_per_class: Validation images per class (>= 1).
        quirks: Include the CMYK, PNG, grayscale and truncated files (False
            gives clean JPEGs only, e.g. for builders that cannot take them).

    Returns:
        The manifest (also written to ``manifest.json``): ``version``, ``seed``,
        ``synsets``, ``train_per_class``, ``val_per_class``, ``num_train``,
        ``num_val``, ``quirks`` (kind -> file; training files as
        ``<synset>/<member name>``), ``output_dir``, ``train_tar``,
        ``val_tar``, ``val_labels`` (absolute paths).

    Raises:
        ValueError: If the seed is negative or a count below its minimum.
    """
    _check_args(seed, train_per_class, val_per_class)
    start = time.perf_counter()
    out = Path(output_dir).expanduser().resolve()
    sample_folder.claim(out)

    num_classes = len(SYNSETS)
    layout = np.random.default_rng([seed, _STREAM_LAYOUT])

    # Member numbers look like real ImageNet ones (n01440764_10026.JPEG).
    number_range = max(15_000, 2 * train_per_class)
    train_names = []
    for synset in SYNSETS:
        numbers = layout.choice(number_range, size=train_per_class, replace=False) + 1
        train_names.append(sorted(f"{synset}_{n}.JPEG" for n in numbers))

    # Validation classes interleaved in a seeded random order.
    val_classes = np.repeat(np.arange(num_classes), val_per_class)
    layout.shuffle(val_classes)
    num_val = len(val_classes)

    # Each training quirk in a different class, at a random position in it.
    train_quirks = {}  # (class index, position) -> kind
    quirk_classes = layout.permutation(num_classes)[:4]
    for kind, c in zip(("cmyk", "png", "grayscale", "truncated"), quirk_classes):
        train_quirks[(int(c), int(layout.integers(train_per_class)))] = kind
    val_quirk_ids = layout.choice(num_val, size=2, replace=False) + 1
    val_quirks = {int(val_quirk_ids[0]): "grayscale", int(val_quirk_ids[1]): "png"}
    if not quirks:
        train_quirks, val_quirks = {}, {}

    quirks = {}  # From here on: kind -> file written.

    def class_images(c: int, synset: str):
        for k, name in enumerate(train_names[c]):
            rng = np.random.default_rng([seed, _STREAM_TRAIN, c, k])
            kind = train_quirks.get((c, k))
            if kind:
                quirks[kind] = f"{synset}/{name}"
            yield name, sample_images.encode(sample_images.render(c, rng), kind)

    def val_images():
        for i, c in enumerate(val_classes, start=1):
            name = val_name(i)
            rng = np.random.default_rng([seed, _STREAM_VAL, i])
            kind = val_quirks.get(i)
            if kind:
                quirks[f"val_{kind}"] = name
            yield name, sample_images.encode(sample_images.render(int(c), rng), kind)

    write_archives(out, ((s, class_images(c, s)) for c, s in enumerate(SYNSETS)), val_images(),
                   [SYNSETS[c] for c in val_classes])

    params = _params(seed, train_per_class, val_per_class)
    manifest = dict(
        params,
        num_train=train_per_class * num_classes,
        num_val=num_val,
        quirks=dict(sorted(quirks.items())),
        output_dir=str(out),
        train_tar=str(out / TRAIN_TAR),
        val_tar=str(out / VAL_TAR),
        val_labels=str(out / VAL_LABELS),
    )
    fileio.write_json_atomically(str(out / MANIFEST), manifest)
    fileio.write_json_atomically(str(out / MARKER), params)  # Last: marks the sample complete.

    logger.info(
        "Wrote %d training images (%d classes, %.1f MiB) to %s and %d validation "
        "images (%.1f MiB) to %s in %.1f s.",
        manifest["num_train"],
        num_classes,
        (out / TRAIN_TAR).stat().st_size / 2**20,
        manifest["train_tar"],
        num_val,
        (out / VAL_TAR).stat().st_size / 2**20,
        manifest["val_tar"],
        time.perf_counter() - start,
    )
    return manifest


# ---------------------------------------------------------------------------
# The ImageNet-shaped sample: ILSVRC2012's full width, its archives' layout and
# its image sizes, at any number of images.
# ---------------------------------------------------------------------------

ILSVRC_TRAIN_IMAGES = 1_281_167
ILSVRC_VAL_IMAGES = 50_000
# tensorflow-datasets' imagenet2012 builder lists the training set's odd files:
# 22 CMYK JPEGs and one PNG under a .JPEG name.
ILSVRC_CMYK, ILSVRC_PNG = 22, 1


def ilsvrc_val_labels() -> list[str]:
    """The 50,000 validation synsets tensorflow-datasets ships: line n is the
    class of ILSVRC2012_val_{n:08d}.JPEG."""
    with open(class_labels.default_val_labels_path()) as f:
        return [line.strip() for line in f if line.strip()]


def make_imagenet_sample(
    output_dir: str | os.PathLike,
    seed: int = 0,
    train_per_class: int = 8,
    val_images: int = 1000,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Writes an ImageNet-shaped synthetic sample into ``output_dir``.

    The shape of the real ILSVRC2012 archives at a chosen size: all 1000
    synsets in the standard label order, ``ILSVRC2012_img_train.tar`` of
    nested class tars, images in ImageNet's size mix (`_imagenet_size`),
    CMYK and PNG files at ImageNet's rate (22 and 1 among 1,281,167, at least
    one of each), and a flat ``ILSVRC2012_img_val.tar`` whose files carry real
    ILSVRC2012 numbers (a sparse, unsorted subset of 1..50,000), each drawn
    from the class the shipped 50,000-line label list gives its number. No
    label file is written: the build reads the shipped list, as it does for
    the real archives.

    Args:
        train_per_class: Training images per class (>= 1).
        val_images: Validation images (1..50,000).
        progress: Called with a line now and then (None: the module's logger).

    Returns:
        The manifest (also in ``manifest.json``), as `make_sample`'s, with
        ``shape`` "imagenet", ``val_numbers`` and no ``val_labels``.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (got {seed})")
    if train_per_class < 1:
        raise ValueError(f"train_per_class must be >= 1 (got {train_per_class})")
    if not 1 <= val_images <= ILSVRC_VAL_IMAGES:
        raise ValueError(f"val_images must be between 1 and {ILSVRC_VAL_IMAGES} (got {val_images})")

    say = progress or logger.info
    start = time.perf_counter()
    synsets = class_labels.ilsvrc_synsets()
    index = {s: i for i, s in enumerate(synsets)}
    val_labels = ilsvrc_val_labels()
    out = Path(output_dir).expanduser().resolve()
    sample_folder.claim(out)

    layout = np.random.default_rng([seed, _STREAM_LAYOUT, 1000])
    num_train = train_per_class * len(synsets)
    odd = {}  # (class, position) -> quirk
    for kind, count in (("cmyk", ILSVRC_CMYK), ("png", ILSVRC_PNG)):
        for _ in range(max(1, round(count * num_train / ILSVRC_TRAIN_IMAGES))):
            while True:
                key = (int(layout.integers(len(synsets))), int(layout.integers(train_per_class)))
                if key not in odd:
                    odd[key] = kind
                    break
    # Real numbers: a sparse subset of 1..50,000, in an unsorted archive order.
    val_numbers = [int(n) for n in layout.choice(ILSVRC_VAL_IMAGES, size=val_images, replace=False) + 1]

    quirks, sizes = {}, []

    def class_images(c: int, synset: str, numbers: np.ndarray):
        for k, n in enumerate(numbers):
            rng = np.random.default_rng([seed, _STREAM_TRAIN, 1000, c, k])
            size = sample_images.imagenet_size(rng)
            sizes.append(size)
            name = f"{synset}_{n}.JPEG"
            kind = odd.get((c, k))
            if kind:
                quirks.setdefault(kind, []).append(f"{synset}/{name}")
            yield name, sample_images.encode(sample_images.render_sized(c, rng, size), kind)

    def train():
        for c, synset in enumerate(synsets):
            numbers = layout.choice(max(15_000, 2 * train_per_class), size=train_per_class, replace=False) + 1
            yield synset, class_images(c, synset, numbers)
            # Resumed once the class's tar is in the archive.
            if (c + 1) % 100 == 0:
                say(f"make_sample: {c + 1}/1000 classes, {(c + 1) * train_per_class} training images, "
                    f"{time.perf_counter() - start:.0f} s")

    def val():
        for n in val_numbers:
            rng = np.random.default_rng([seed, _STREAM_VAL, 1000, n])
            size = sample_images.imagenet_size(rng)
            sizes.append(size)
            yield val_name(n), sample_images.encode(sample_images.render_sized(index[val_labels[n - 1]], rng, size), None)

    # No label file: the shipped list applies, as for the real archives.
    write_archives(out, train(), val(), None)

    pixels = np.array([h * w for h, w in sizes])
    params = {"version": FORMAT_VERSION, "shape": "imagenet", "seed": int(seed),
              "train_per_class": int(train_per_class), "val_images": int(val_images)}
    manifest = dict(
        params,
        synsets=synsets,
        num_train=num_train,
        num_val=val_images,
        val_numbers=val_numbers,
        quirks={k: sorted(v) for k, v in sorted(quirks.items())},
        median_pixels=int(np.median(pixels)),
        largest=list(max(sizes, key=lambda s: s[0] * s[1])),
        output_dir=str(out),
        train_tar=str(out / TRAIN_TAR),
        val_tar=str(out / VAL_TAR),
    )
    fileio.write_json_atomically(str(out / MANIFEST), manifest)
    fileio.write_json_atomically(str(out / MARKER), params)
    say(f"make_sample: wrote {num_train} training images (1000 classes, "
        f"{(out / TRAIN_TAR).stat().st_size / 2**20:.0f} MiB) and {val_images} validation images "
        f"({(out / VAL_TAR).stat().st_size / 2**20:.0f} MiB) to {out} in {time.perf_counter() - start:.0f} s")
    return manifest


def default_cache_dir() -> Path:
    """Where :func:`ensure_sample` keeps the sample by default.

    ``$ALEXNET_TF_CACHE/sample`` if set, else
    ``$XDG_CACHE_HOME/alexnet_tf/sample``, else ``~/.cache/alexnet_tf/sample``.
    """
    root = os.environ.get("ALEXNET_TF_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(xdg, "alexnet_tf")
    return Path(root).expanduser() / "sample"


def ensure_sample(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    train_per_class: int = 40,
    val_per_class: int = 10,
) -> dict:
    """Returns the manifest of a complete cached sample, building it if needed.

    The sample is (re)built when the ``SAMPLE_COMPLETE`` marker is missing,
    records other parameters, or a file it vouches for is gone.

    Args:
        cache_dir: Directory of the cached sample; defaults to
            :func:`default_cache_dir`.
        seed: Seed passed to :func:`make_sample`.
        train_per_class: Training images per class (>= 4).
        val_per_class: Validation images per class (>= 1).

    Returns:
        The manifest, as returned by :func:`make_sample`, with paths pointing
        into ``cache_dir``.
    """
    _check_args(seed, train_per_class, val_per_class)
    out = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    wanted = _params(seed, train_per_class, val_per_class)
    with sample_folder.dir_lock(out):
        manifest = sample_folder.read_json(out / MANIFEST)
        complete = (
            sample_folder.read_json(out / MARKER) == wanted
            and manifest is not None
            and all((out / n).is_file() for n in (TRAIN_TAR, VAL_TAR, VAL_LABELS))
        )
        if not complete:
            return make_sample(out, seed, train_per_class, val_per_class)
    logger.info("Using cached sample in %s.", out)
    # Paths follow the directory, in case it was moved or reached via a link.
    manifest.update(
        output_dir=str(out),
        train_tar=str(out / TRAIN_TAR),
        val_tar=str(out / VAL_TAR),
        val_labels=str(out / VAL_LABELS),
    )
    return manifest


def define_flags() -> flags.FlagValues:
    """The sample maker's flags, on a FlagValues of their own."""
    fv = flags.FlagValues()
    flags.DEFINE_string("output_dir", None, "Directory to write into (required).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
    flags.DEFINE_integer("train_per_class", None, f"Training images per class (default 40, >= {MIN_TRAIN_PER_CLASS}; "
                         "--shape=imagenet: 8, >= 1).", flag_values=fv)
    flags.DEFINE_integer("val_per_class", 10, f"Validation images per class (>= {MIN_VAL_PER_CLASS}).", flag_values=fv)
    flags.DEFINE_enum("shape", "small", ["small", "imagenet"], "small: 10 classes (the embedded sample's shape); "
                      "imagenet: all 1000 ILSVRC2012 synsets, ImageNet's image sizes, real validation file numbers, "
                      "no label file.", flag_values=fv)
    flags.DEFINE_integer("val_images", 1000, "--shape=imagenet: validation images (1..50000).", flag_values=fv)
    flags.mark_flag_as_required("output_dir", flag_values=fv)
    return fv


COMMAND = Command("make_sample", "python -m pipelines.make_sample --output_dir=DIR [flags]",
                  __doc__)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args, _ = COMMAND.parse(define_flags(), argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.shape == "imagenet":
        try:
            make_imagenet_sample(args.output_dir, args.seed, args.train_per_class or 8, args.val_images)
        except ValueError as e:
            COMMAND.fail(f"--{e}", 2)
        except FileExistsError as e:
            COMMAND.fail(str(e), 1)
        return 0
    train_per_class = 40 if args.train_per_class is None else args.train_per_class
    try:
        _check_args(args.seed, train_per_class, args.val_per_class)
    except ValueError as e:
        COMMAND.fail(f"--{e}", 2)
    try:
        make_sample(args.output_dir, args.seed, train_per_class, args.val_per_class)
    except FileExistsError as e:
        COMMAND.fail(str(e), 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
