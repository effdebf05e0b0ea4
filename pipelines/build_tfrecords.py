r"""Raw ILSVRC2012 -> sharded TFRecords, colour statistics and metadata.json.

    python -m pipelines.build_tfrecords                       # the embedded sample
    python -m pipelines.build_tfrecords --imagenet_dir=/data/imagenet --output_dir=tfrecords
    python -m pipelines.build_tfrecords --imagenet_dir=gs://b/imagenet --output_dir=gs://b/tfrecords \
        --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp
    python -m pipelines.build_tfrecords --imagenet_dir=/shared/imagenet --output_dir=/shared/tfrecords \
        --runner=DaskRunner --dask_client_address=tcp://scheduler:8786    # pip install 'alexnet-tf[dask]'

Flags below are this pipeline's; every other argument goes to Beam's
`PipelineOptions` (runner, workers, cloud options; `pipelines.runners`). On the
default local runner all cores are used (multi-processing).

This module is the driver: it plans the reading (`imagenet_layout`), runs
`BuildRecords` (list members -> assign shards -> write shards, with
colour statistics and counts; each step a named composite transform), then
checks read = written + rejected per split and writes mean_image.npy and
metadata.json (typed: `metadata.Metadata`) last, atomically.

Each build writes into a staging folder of its own inside --output_dir
(marked with the build's id) and moves the checked dataset in at the end: a
failed, killed or out-of-space build leaves the folder's dataset as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time

from absl import flags

from toolcli import quiet
from toolcli.command import Command

with quiet.held_imports():  # Beam's import-time warnings wait for --verbose_startup.
    import apache_beam as beam
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

from pipelines import (build_report, build_summary, class_labels, imagenet_layout, members, output_folder, runners,
                       shard_writing, transforms)
from pipelines.runners import BUNDLE_ERROR_LOGGERS, LOCAL_RUNNERS, BuildError
from tfrecords import classes, fileio, metadata, schema

log = logging.getLogger("pipelines.build_tfrecords")

# --image_size: at least the network's 227x227 input patches (tfrecords.schema.CROP;
# the trainer refuses smaller records), at most 1024, 4x the paper's 256: per worker the
# image, its JPEG and the int64 mean-image sum grow with its square (about 25 MB at 1024,
# 1.5 GB at 8000).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = schema.CROP, 1024
BuildConfig = transforms.BuildConfig  # Re-exported: what every worker needs to know.


# ---------------------------------------------------------------------------
# Driver.


def define_flags() -> flags.FlagValues:
    """The build's own flags (every other argument goes to Beam's PipelineOptions)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("imagenet_dir", None, "Folder with ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar, or "
                        "extracted train/<synset>/ and val/ (flat or per synset). Only regular files (or links to "
                        f"them) of at most {members.MAX_MEMBER_BYTES // 2**20} MiB are read as images; others are "
                        "rejected. Default: the embedded sample, built into a cache folder on first use.",
                        flag_values=fv)
    flags.DEFINE_string("val_labels", None, "Validation labels, one synset per line in file-number order. Default: "
                        "<imagenet_dir>/validation_labels.txt if present, else the 50,000-line ILSVRC2012 list "
                        "shipped with tensorflow-datasets. UTF-8 (a byte-order mark is allowed) or UTF-16 with its "
                        f"mark, at most {class_labels.MAX_LABEL_FILE_BYTES // 2**20} MiB.", flag_values=fv)
    flags.DEFINE_string("output_dir", "data", "Where shards and metadata.json go; outside --imagenet_dir.",
                        flag_values=fv)
    flags.DEFINE_integer("train_shards", 1024, "Training shards.", flag_values=fv)
    flags.DEFINE_integer("validation_shards", 128, "Validation shards.", flag_values=fv)
    flags.DEFINE_integer("image_size", 256, "§2 of the paper: shorter side scaled to this, then the central square "
                         f"is stored; {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (the network's {MIN_IMAGE_SIZE}x"
                         f"{MIN_IMAGE_SIZE} patches are cut from it).", flag_values=fv)
    flags.DEFINE_bool("resize", True, "--noresize: keep the original JPEG bytes of valid RGB JPEGs (others are "
                      "re-encoded at their size).", flag_values=fv)
    flags.DEFINE_integer("jpeg_quality", 90, "Quality of re-encoded JPEGs.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the shuffled training order.", flag_values=fv)
    flags.DEFINE_float("max_reject_fraction", 0.01, "Fail if more than this fraction of the inputs is rejected.",
                       flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace a dataset already in --output_dir (whole); without it the run "
                      "refuses.", flag_values=fv)
    flags.DEFINE_string("sample_dir", None, "Cache folder of the embedded sample (used without --imagenet_dir).",
                        flag_values=fv)
    flags.DEFINE_bool("verbose_startup", False, "Let Beam's and TensorFlow's start-up notes and warnings through "
                      "to the console (toolcli.quiet names what is kept off it without).", flag_values=fv)
    return fv


COMMAND = Command(
    "build_tfrecords", "python -m pipelines.build_tfrecords [flags] [Beam's PipelineOptions]",
    "Raw ILSVRC2012 (archives or extracted folders) -> sharded TFRecords + metadata.json. Unknown arguments go to "
    "Apache Beam's PipelineOptions (e.g. --runner=DataflowRunner, or --runner=DaskRunner "
    "--dask_client_address=tcp://HOST:8786 on a dask.distributed cluster).")


def parse(argv: list[str] | None = None):
    """(the build's flag values, the arguments for Beam) of a command line."""
    return COMMAND.parse(define_flags(), argv, known_only=True)


def _check_flags(args) -> None:
    if args.train_shards < 1 or args.validation_shards < 1:
        raise BuildError("--train_shards and --validation_shards must be at least 1")
    if not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        raise BuildError(f"--image_size must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (at least the network's "
                         f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} input patches; the paper's is 256), got {args.image_size}")
    if not 1 <= args.jpeg_quality <= 100:
        raise BuildError(f"--jpeg_quality must be in 1..100, got {args.jpeg_quality}")
    if not 0.0 <= args.max_reject_fraction <= 1.0:
        raise BuildError(f"--max_reject_fraction must be in [0, 1], got {args.max_reject_fraction}")


def _ours() -> list[str]:
    return [f"--{name}" for name in define_flags()]


def _beam_options(beam_args: list[str]):
    return runners.beam_options(beam_args, _ours())


def run(argv: list[str] | None = None) -> metadata.Metadata:
    """Runs the whole build; returns the metadata written.

    Raises:
      BuildError, imagenet_layout.LayoutError: with a one-line reason.
    """
    return _run(*parse(argv))


def _run(args, beam_args: list[str]) -> metadata.Metadata:
    _check_flags(args)
    options = _beam_options(beam_args)  # A mistyped flag stops the build before the sample is made or the input read.
    started = time.time()
    if args.imagenet_dir is None:
        from pipelines import make_sample

        manifest = make_sample.ensure_sample(args.sample_dir)
        args.imagenet_dir = os.path.dirname(manifest["train_tar"])
        print(f"build_tfrecords: no --imagenet_dir, using the embedded sample in {args.imagenet_dir}",
              file=sys.stderr)
    layout = imagenet_layout.plan(args.imagenet_dir, args.val_labels)
    imagenet_layout.check_output_outside(args.imagenet_dir, args.output_dir)
    print(f"build_tfrecords: {layout.describe()}", file=sys.stderr)
    _check_class_text(layout.classes)
    runner = options.view_as(StandardOptions).runner
    if runners.is_dask(runner):
        print(f"build_tfrecords: runner DaskRunner on {runners.DaskCluster(options).check()}", file=sys.stderr)
    created = not fileio.exists(args.output_dir)
    try:
        with output_folder.BuildLock(args.output_dir) as lock:
            meta, workers = _build_locked(args, layout, options, runner, started, lock.me)
    except BaseException as e:
        # A folder this run created and left empty goes too.
        if created and fileio.isdir(args.output_dir) and not fileio.listdir(args.output_dir):
            fileio.rmtree(args.output_dir)
        full = None if isinstance(e, BuildError) else output_folder.disk_full(e)
        if full:  # Before the pipeline: the lock, the staging folder's marker.
            raise BuildError(f"{full} in --output_dir {args.output_dir}: the build stopped before writing any "
                             "records; free some space (or choose another --output_dir) and run it again") from None
        raise
    print(f"build_tfrecords: {build_report.report(meta, args.output_dir, layout.skipped, workers)}", file=sys.stderr)
    return meta


def _build_locked(args, layout, options, runner, started, me: dict) -> tuple[metadata.Metadata, list[str]]:
    """The build under the lock: into a staging folder of its own, then swapped in whole.

    On any failure the staging folder is removed and the folder's earlier
    dataset, if any, stays as it was.
    """
    output_folder.clear_gone_builds(args.output_dir, me)
    existing = output_folder.prepare_output(args.output_dir, args.overwrite)
    staging = output_folder.make_staging(args.output_dir, me)
    before = os.environ.get(output_folder.BUILD_ENV)
    os.environ[output_folder.BUILD_ENV] = me["build"]  # Inherited by the local workers.
    try:
        built = _build(args, layout, options, runner, started, staging)
    except BaseException as e:
        # Workers the runner started may still be finishing a bundle: let them end first.
        output_folder.wait_for_processes(me["build"], 30.0, quiet=True)
        try:
            output_folder.remove_build_folder(staging, me["build"])
        except BuildError as unmarked:
            print(f"build_tfrecords: note: {unmarked}", file=sys.stderr)
        full = output_folder.disk_full(e)
        if full:
            kept = "; the dataset already there is intact" if existing else ""
            raise BuildError(f"{full} in --output_dir {args.output_dir}: the build stopped and removed what it had "
                             f"written{kept}; free some space (or choose another --output_dir) and run it again"
                             ) from None
        raise
    finally:
        if before is None:
            os.environ.pop(output_folder.BUILD_ENV, None)
        else:
            os.environ[output_folder.BUILD_ENV] = before
    output_folder.swap_in(staging, args.output_dir, existing, me["build"])
    return built


class TracebackFilter:
    """Drops Python tracebacks from a stream of lines, keeping every other line.

    Beam's SDK worker prints the traceback of every failing bundle to its
    stderr, unconditionally; on the local runner those are this console, and
    the driver reports the same failure once (in one line where it knows it).
    """

    START = "Traceback (most recent call last):"
    CHAINED = ("During handling of the above exception, another exception occurred:",
               "The above exception was the direct cause of the following exception:")

    def __init__(self):
        self.inside = self.ended = False

    def keep(self, line: str) -> bool:
        text = line.rstrip("\r\n")
        if text == self.START or text in self.CHAINED:
            self.inside, self.ended = True, False
            return False
        if self.inside:
            if not text or text.startswith(" "):  # Frames, source lines, carets.
                return False
            self.inside, self.ended = False, True  # The exception's own line ends it.
            return False
        if self.ended and not text:  # The blank line printed after one.
            return False
        self.ended = False
        return True


def _tracebacks_dropped():
    """This process's stderr (fd 2), which the local workers inherit, through a `TracebackFilter`."""
    return quiet.relay_stderr(TracebackFilter().keep)


def _check_class_text(synsets) -> None:
    """Stops on a class whose synset or name is not one line of text (a tab, newline or other control character).

    Such a class would train and export, and then break the exported model's
    class table (one class a line, tab-separated).
    """
    for label, (synset, name) in enumerate(zip(synsets, class_labels.class_names(synsets))):
        for what, text in (("synset", synset), ("name", name)):
            bad = classes.control_character(text)
            if bad:
                raise BuildError(f"class {label} (synset {json.dumps(synset)}) has a control character ({bad}) in its "
                                 f"{what} {json.dumps(text)}: synsets and class names must be one line of text; "
                                 "rename its folder or archive")


class BuildRecords(beam.PTransform):
    """PCollection[ReadUnit] -> shards written under `output_dir`, and the summary file."""

    def __init__(self, config: BuildConfig, output_dir: str, build_dir: str):
        super().__init__()
        self.config, self.output_dir, self.build_dir = config, output_dir, build_dir

    def expand(self, units):
        listed = units | "ListMembers" >> transforms.ListMembers(self.config)
        written = (
            listed["items"]
            | "AssignShards" >> transforms.AssignShards(dict(self.config.num_shards))
            | "WriteShards" >> shard_writing.WriteShards(self.config, self.output_dir)
        )
        rejected = (listed["rejected"], written["rejected"]) | "AllRejected" >> beam.Flatten()
        sums = written["sums"] | "ColorStats" >> shard_writing.ComputeColorStats()
        return ((written["shards"], rejected, listed["read"], sums)
                | "WriteSummary" >> build_summary.WriteSummary(self.build_dir))


def _build(args, layout, options, runner, started, target: str) -> tuple[metadata.Metadata, list[str]]:
    """Runs the pipeline into `target` and writes its metadata.json there (see `build_report.finalize`)."""
    config = BuildConfig(
        classes=tuple(layout.classes),
        names=tuple(class_labels.class_names(layout.classes)),
        image_size=args.image_size,
        resize=args.resize,
        jpeg_quality=args.jpeg_quality,
        seed=args.seed,
        num_shards=(("train", args.train_shards), ("validation", args.validation_shards)),
        progress=runner in LOCAL_RUNNERS,
    )
    fileio.makedirs(target)
    build_dir = os.path.join(target, output_folder.BUILD_DIR)
    units = [u for s in layout.splits.values() for u in s.units]
    local_processes = (runner in LOCAL_RUNNERS
                       and options.view_as(DirectOptions).direct_running_mode == "multi_processing")
    # Local workers print their own progress; elsewhere it is read off the shards written.
    watch = contextlib.nullcontext() if runner in LOCAL_RUNNERS else runners.ShardWatch(target)
    with _tracebacks_dropped() if local_processes else contextlib.nullcontext(), watch:
        p = beam.Pipeline(options=options)
        _ = (
            p
            # ListMembers spreads the units itself.
            | "Units" >> beam.Create(units, reshuffle=False)  # PCollection[ReadUnit]
            | "Build" >> BuildRecords(config, target, build_dir)
        )
        runners.run(p)
    return build_report.finalize(target, build_dir, layout, args, config, started)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Beam's local runner relays every worker log line at INFO; keep the console readable.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)  # A Dask client's and local cluster's chatter.
    for name in BUNDLE_ERROR_LOGGERS:  # In-process workers: the failure is reported once, below.
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args, beam_args = parse(argv)
    try:
        with quiet.quiet_start(args.verbose_startup):
            _run(args, beam_args)
    except (BuildError, imagenet_layout.LayoutError) as e:
        print(f"build_tfrecords: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # The folders themselves: a read-only or full disk, a file where a folder should be.
        where = f"{e.filename}: " if e.filename else ""
        print(f"build_tfrecords: error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    # Run through the importable module, not __main__, so that the classes the
    # workers unpickle resolve to `pipelines.build_tfrecords.*`.
    from pipelines import build_tfrecords

    build_tfrecords.main()
