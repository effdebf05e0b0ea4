r"""Raw ILSVRC2012 -> sharded TFRecords, colour statistics and metadata.json.

    python -m pipelines.build_tfrecords                       # the embedded sample
    python -m pipelines.build_tfrecords --imagenet_dir=/data/imagenet --output_dir=tfrecords
    python -m pipelines.build_tfrecords --imagenet_dir=gs://b/imagenet --output_dir=gs://b/tfrecords \
        --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp

Flags below are this pipeline's; every other argument goes to Beam's
`PipelineOptions` (runner, workers, cloud options). On the default local runner
all cores are used (multi-processing).

The flow (element types in comments in `BuildRecords`):
  plan (driver: layout, classes, read units) -> list members (workers: names and
  byte ranges) -> shard by a seeded hash rank -> per shard, read, decode, check,
  re-encode and write (workers, streaming) + colour statistics of the same pixels
  -> summary -> metadata.json (driver, last, atomically, after checking
  read = written + rejected per split).

Only names and byte ranges are shuffled, never pixels: memory stays flat as
the dataset grows, on the local runner as on a cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    WorkerOptions,
    SetupOptions,
    StandardOptions,
)

from alexnet_tf import records
from pipelines import color_stats, image_processing, imagenet_layout

log = logging.getLogger("pipelines.build_tfrecords")

BUILD_DIR = "_build"  # Scratch folder inside the output folder; removed on success.
# With few images, fewer shards than asked for: each holds at least this many
# records (a shard of one or two images would also hold a single class).
MIN_RECORDS_PER_SHARD = 32
LOCAL_RUNNERS = {None, "DirectRunner", "direct", "FnApiRunner", "BundleBasedDirectRunner"}


class BuildError(RuntimeError):
    """The build cannot go on; the message says why (one line)."""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """What every worker needs to know (pickled into the DoFns)."""

    classes: tuple[str, ...]  # Synsets in label order.
    names: tuple[str, ...]  # Human-readable names, same order.
    image_size: int = 256
    resize: bool = True
    jpeg_quality: int = 90
    seed: int = 0
    num_shards: tuple[tuple[str, int], ...] = (("train", 1024), ("validation", 128))
    progress: bool = True  # Print worker progress to stderr (local runs).


def sort_key(seed: int, split: str, synset: str | None, name: str) -> int:
    """A seeded 64-bit hash; its rank fixes a record's shard and position.

    Independent of the layout (archive or folders): only the class and the file's
    base name enter, so the same images give the same shards either way.
    """
    text = f"{seed}:{split}:{synset}:{os.path.basename(name)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


class _Progress:
    """Periodic 'N images, R/s' lines from one worker."""

    def __init__(self, enabled: bool, every_s: float = 10.0):
        self.enabled, self.every_s = enabled, every_s
        self.count = self.rejected = 0
        self.start = self.last = time.monotonic()

    def tick(self, rejected: bool) -> None:
        self.count += 1
        self.rejected += rejected
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            rate = self.count / max(now - self.start, 1e-9)
            print(
                f"build_tfrecords: worker {os.getpid()}: {self.count} images "
                f"({rate:.1f} images/s), {self.rejected} rejected",
                file=sys.stderr,
                flush=True,
            )


REJECTED = "rejected"
MOMENTS = "moments"


def _rejection(split: str, name: str, reason: str):
    return beam.pvalue.TaggedOutput(REJECTED, {"split": split, "file": name, "reason": reason})


class ListUnitFn(beam.DoFn):
    """ReadUnit -> (split, key, Member) for each labelled image; tagged 'rejected'.

    Only names and byte ranges travel from here to the shard writers: image
    bytes are read once, by the writer, so no runner ever has to shuffle or
    hold the dataset's pixels.
    """

    def __init__(self, config: BuildConfig):
        self.config = config
        self.known = frozenset(config.classes)

    def process(self, unit: imagenet_layout.ReadUnit):
        count = 0
        try:
            for m in imagenet_layout.list_unit(unit):
                count += 1
                if m.synset is None:
                    yield _rejection(
                        unit.split, m.name,
                        "no validation number in the file name (expected ILSVRC2012_val_NNNNNNNN.JPEG)",
                    )
                elif m.synset not in self.known:
                    yield _rejection(unit.split, m.name, f"synset {m.synset} has no training images")
                else:
                    yield unit.split, sort_key(self.config.seed, unit.split, m.synset, m.name), m
        except imagenet_layout.UnitReadError as e:
            # What follows the damage cannot be listed; it is reported as one
            # rejected input so that read = written + rejected still holds.
            yield _rejection(unit.split, unit.name, f"damaged after {count} images: {e}")


def _sorted_keys(split_keys):
    split, keys = split_keys
    return split, np.sort(np.fromiter(keys, dtype=np.uint64))


def effective_num_shards(requested: int, num_records: int) -> int:
    """The requested count, or fewer so that each shard holds MIN_RECORDS_PER_SHARD."""
    return max(1, min(requested, num_records // MIN_RECORDS_PER_SHARD))


def assign_shard(item, sorted_keys, num_shards):
    """(split, key, member) -> ((split, shard, shards), (key, member)).

    Shards are contiguous ranges of the hash rank, so each holds floor or ceil of
    N/shards records (none empty) and a random mix of classes.
    """
    split, key, member = item
    keys = sorted_keys[split]
    n = len(keys)
    shards = effective_num_shards(num_shards[split], n)
    rank = int(np.searchsorted(keys, np.uint64(key)))
    return (split, rank * shards // n, shards), (key, member)


class WriteShardFn(beam.DoFn):
    """((split, shard, shards), [(key, Member)]) -> shard info dict.

    Reads, checks and re-encodes each image in key order and streams it into the
    shard, so memory does not grow with the shard or the dataset. Also outputs,
    tagged, the rejected images and one `Moments` of the shard's training
    pixels (the colour statistics, in the same pass).
    """

    def __init__(self, config: BuildConfig, output_dir: str):
        self.config, self.output_dir = config, output_dir
        self.label_of = {s: i for i, s in enumerate(config.classes)}
        self.written = Metrics.counter("build_tfrecords", "images_written")
        self.rejected = Metrics.counter("build_tfrecords", "images_rejected")

    def setup(self):
        self.progress = _Progress(self.config.progress)
        self.reader = imagenet_layout.MemberReader()

    def teardown(self):
        self.reader.close()

    def _record(self, member):
        """Serialized example and processed image of one member; raises on bad data."""
        c = self.config
        out = image_processing.process_image(self.reader.read(member), c.image_size, c.resize, c.jpeg_quality)
        label = self.label_of[member.synset]
        example = records.make_example(
            jpeg=out.jpeg,
            height=out.height,
            width=out.width,
            label=label,
            synset=member.synset,
            text=c.names[label],
            filename=os.path.basename(member.name),
        )
        return example, out

    def process(self, element):
        import tensorflow as tf

        (split, shard, shards), items = element
        name = records.shard_name(split, shard, shards)
        final = os.path.join(self.output_dir, name)
        moments = color_stats.Moments()
        count = 0
        # Write then rename: a retried or killed worker never leaves half a shard
        # under the final name.
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        with tf.io.TFRecordWriter(tmp) as w:
            for _, member in sorted(items, key=lambda kv: kv[0]):
                try:
                    example, out = self._record(member)
                except (OSError, image_processing.BadImage) as e:
                    self.rejected.inc()
                    self.progress.tick(True)
                    reason = str(e) if isinstance(e, image_processing.BadImage) else f"unreadable: {e}"
                    yield _rejection(split, member.name, reason)
                    continue
                w.write(example)
                count += 1
                self.written.inc()
                self.progress.tick(False)
                if split == "train":
                    moments.merge(color_stats.Moments.of_image(
                        out.pixels, None if out.square is out.pixels else out.square))
        tf.io.gfile.rename(tmp, final, overwrite=True)
        if moments.num_images:
            yield beam.pvalue.TaggedOutput(MOMENTS, moments)
        yield {"split": split, "index": shard, "num_shards": shards, "file": name, "num_examples": count}


def _make_summary(_, shards, rejected, read, stats, build_dir):
    """Writes the pipeline's findings for the driver; returns the summary path."""
    import tensorflow as tf

    summary, mean_image = color_stats.summarize(stats)
    tf.io.gfile.makedirs(build_dir)
    mean_file = None
    if mean_image is not None:
        mean_file = os.path.join(build_dir, records.MEAN_IMAGE_FILE)
        with tf.io.gfile.GFile(mean_file, "wb") as f:
            np.save(f, mean_image)
    path = os.path.join(build_dir, "summary.json")
    records.write_json_atomically(
        path,
        {
            "shards": sorted(shards, key=lambda s: (s["split"], s["index"])),
            "rejected": sorted(rejected, key=lambda r: (r["split"], r["file"])),
            "read": dict(read),
            "color_stats": summary,
            "mean_image": mean_file,
        },
    )
    return path


class BuildRecords(beam.PTransform):
    """ReadUnits -> shards written under `output_dir` and `<build_dir>/summary.json`."""

    def __init__(self, config: BuildConfig, output_dir: str, build_dir: str):
        super().__init__()
        self.config, self.output_dir, self.build_dir = config, output_dir, build_dir

    def expand(self, units):
        # units: PCollection[ReadUnit]
        listed = (
            units
            # Spread units over workers: listing a class archive is a few KB of I/O.
            | "SpreadUnits" >> beam.Reshuffle()
            | "ListMembers" >> beam.ParDo(ListUnitFn(self.config)).with_outputs(REJECTED, main="items")
        )
        items = listed.items  # PCollection[(split, key, Member)]: names and byte ranges only.
        sorted_keys = (
            items
            | "SplitKey" >> beam.Map(lambda r: (r[0], r[1]))
            | "GroupKeys" >> beam.GroupByKey()
            | "SortKeys" >> beam.Map(_sorted_keys)
        )  # PCollection[(split, np.ndarray[uint64])]
        written = (
            items
            | "AssignShard" >> beam.Map(
                assign_shard,
                sorted_keys=beam.pvalue.AsDict(sorted_keys),
                num_shards=dict(self.config.num_shards),
            )  # PCollection[((split, shard, shards), (key, Member))]
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(WriteShardFn(self.config, self.output_dir)).with_outputs(
                REJECTED, MOMENTS, main="shards"
            )
        )
        shards = written.shards  # PCollection[dict]: one per shard written.
        rejected = (listed.rejected, written.rejected) | "AllRejected" >> beam.Flatten()  # PCollection[dict]
        read = (
            (
                items | "SplitOfItem" >> beam.Map(lambda r: r[0]),
                listed.rejected | "SplitOfListingReject" >> beam.Map(lambda r: r["split"]),
            )
            | "AllRead" >> beam.Flatten()
            | "CountRead" >> beam.combiners.Count.PerElement()
        )  # PCollection[(split, count)]: every image listed, labelled or not.
        stats = written.moments | "ColorStats" >> beam.CombineGlobally(color_stats.ColorStatsFn())
        # PCollection[Moments] (one element)
        return (
            units.pipeline
            | "Once" >> beam.Create([None])
            | "Summarize" >> beam.Map(
                _make_summary,
                shards=beam.pvalue.AsList(shards),
                rejected=beam.pvalue.AsList(rejected),
                read=beam.pvalue.AsList(read),
                stats=beam.pvalue.AsSingleton(stats),
                build_dir=self.build_dir,
            )
        )  # PCollection[str]: the summary path


# ---------------------------------------------------------------------------
# Driver.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.build_tfrecords",
        description="Raw ILSVRC2012 (archives or extracted folders) -> sharded TFRecords + metadata.json. "
        "Unknown arguments go to Apache Beam's PipelineOptions (e.g. --runner=DataflowRunner).",
    )
    p.add_argument("--imagenet_dir", default=None,
                   help="Folder with ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar, or extracted "
                   "train/<synset>/ and val/ (flat or per synset). Default: the embedded sample, "
                   "built into a cache folder on first use.")
    p.add_argument("--val_labels", default=None,
                   help="Validation labels, one synset per line in file-number order. Default: "
                   "<imagenet_dir>/validation_labels.txt if present, else the 50,000-line ILSVRC2012 "
                   "list shipped with tensorflow-datasets.")
    p.add_argument("--output_dir", default="tfrecords", help="Where shards and metadata.json go.")
    p.add_argument("--train_shards", type=int, default=1024)
    p.add_argument("--validation_shards", type=int, default=128)
    p.add_argument("--image_size", type=int, default=256,
                   help="§2 of the paper: shorter side scaled to this, then the central square is stored.")
    p.add_argument("--noresize", dest="resize", action="store_false",
                   help="Keep the original JPEG bytes of valid RGB JPEGs (others are re-encoded at their size).")
    p.add_argument("--jpeg_quality", type=int, default=90, help="Quality of re-encoded JPEGs.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the shuffled training order.")
    p.add_argument("--max_reject_fraction", type=float, default=0.01,
                   help="Fail if more than this fraction of the inputs is rejected.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace a dataset already in --output_dir (whole); without it the run refuses.")
    p.add_argument("--sample_dir", default=None,
                   help="Cache folder of the embedded sample (used without --imagenet_dir).")
    return p


def _check_flags(args) -> None:
    if args.train_shards < 1 or args.validation_shards < 1:
        raise BuildError("--train_shards and --validation_shards must be at least 1")
    if args.image_size < 1:
        raise BuildError(f"--image_size must be positive, got {args.image_size}")
    if not 1 <= args.jpeg_quality <= 100:
        raise BuildError(f"--jpeg_quality must be in 1..100, got {args.jpeg_quality}")
    if not 0.0 <= args.max_reject_fraction <= 1.0:
        raise BuildError(f"--max_reject_fraction must be in [0, 1], got {args.max_reject_fraction}")


def _existing_dataset(output_dir: str) -> list[str]:
    import tensorflow as tf

    if not tf.io.gfile.isdir(output_dir):
        return []
    ours = []
    for name in tf.io.gfile.listdir(output_dir):
        name = name.rstrip("/")
        base = name.split(".tmp-")[0]
        if (
            base in (records.METADATA_FILE, records.MEAN_IMAGE_FILE, BUILD_DIR)
            or records.parse_shard_name(base) is not None
        ):
            ours.append(name)
    return sorted(ours)


def _prepare_output(output_dir: str, overwrite: bool) -> None:
    import tensorflow as tf

    existing = _existing_dataset(output_dir)
    if existing and not overwrite:
        raise BuildError(
            f"--output_dir {output_dir} already holds a dataset ({len(existing)} files, e.g. "
            f"{existing[0]}); pass --overwrite to replace it whole, or choose another folder"
        )
    # metadata.json goes first, so a crash during the rebuild never leaves one
    # that describes shards of which some are gone.
    for name in sorted(existing, key=lambda n: n != records.METADATA_FILE):
        path = os.path.join(output_dir, name)
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        else:
            tf.io.gfile.remove(path)
    tf.io.gfile.makedirs(output_dir)


def _beam_options(beam_args: list[str]) -> PipelineOptions:
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    direct = options.view_as(DirectOptions)
    if runner in LOCAL_RUNNERS:
        if not any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
            # Local workers print straight to this console: progress and problems only.
            options.view_as(WorkerOptions).default_sdk_harness_log_level = "WARNING"
        # All cores by default; the user's own --direct_* flags win.
        if not any(a.startswith("--direct_num_workers") for a in beam_args):
            direct.direct_num_workers = 0
        if not any(a.startswith("--direct_running_mode") for a in beam_args):
            direct.direct_running_mode = "multi_processing"
    else:
        setup = options.view_as(SetupOptions)
        if not (setup.setup_file or setup.extra_packages or setup.requirements_file):
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            pyproject = os.path.join(here, "pyproject.toml")
            if os.path.exists(pyproject):
                # Workers install this project (and its dependencies) from source.
                setup.setup_file = pyproject
                log.info("remote runner %s: staging this project with --setup_file=%s", runner, pyproject)
            else:
                log.warning(
                    "remote runner %s and no --setup_file/--extra_package: workers must already "
                    "have alexnet-tf installed (e.g. --extra_package=dist/alexnet_tf-*.whl)", runner
                )
    return options


def _finalize(output_dir: str, build_dir: str, layout, args, config: BuildConfig,
              started: float) -> records.Metadata:
    """Checks the pipeline's summary, writes mean_image.npy and metadata.json; returns the metadata."""
    import tensorflow as tf

    with tf.io.gfile.GFile(os.path.join(build_dir, "summary.json")) as f:
        summary = json.load(f)
    splits, problems = {}, []
    rejected_by_split: dict[str, int] = {}
    for r in summary["rejected"]:
        rejected_by_split[r["split"]] = rejected_by_split.get(r["split"], 0) + 1
    total_read = total_rejected = 0
    for split in layout.splits:
        shard_list = [s for s in summary["shards"] if s["split"] == split]
        written = sum(s["num_examples"] for s in shard_list)
        read = summary["read"].get(split, 0)
        rejected = rejected_by_split.get(split, 0)
        total_read += read
        total_rejected += rejected
        if read != written + rejected:
            problems.append(f"{split}: read {read} != written {written} + rejected {rejected}")
        for s in shard_list:
            if s["num_examples"] == 0 or not tf.io.gfile.exists(os.path.join(output_dir, s["file"])):
                problems.append(f"{split}: shard {s['file']} is missing or empty")
        if shard_list and sorted(s["index"] for s in shard_list) != list(range(shard_list[0]["num_shards"])):
            problems.append(f"{split}: shard indices are not 0..{shard_list[0]['num_shards'] - 1}")
        splits[split] = records.SplitInfo(
            num_examples=written,
            num_shards=len(shard_list),
            num_read=read,
            num_rejected=rejected,
            source=layout.splits[split].description,
            shards=[records.ShardInfo(s["file"], s["num_examples"]) for s in shard_list],
        )
    if problems:
        raise BuildError("inputs lost during the build: " + "; ".join(problems))
    if total_read and total_rejected / total_read > args.max_reject_fraction:
        examples = "; ".join(f"{r['file']}: {r['reason']}" for r in summary["rejected"][:3])
        raise BuildError(
            f"{total_rejected} of {total_read} inputs rejected ({total_rejected / total_read:.2%}), "
            f"more than --max_reject_fraction={args.max_reject_fraction}; e.g. {examples}. "
            f"metadata.json was not written"
        )
    stats = None
    if summary["color_stats"]:  # {} without training images.
        stats = records.ColorStatsInfo(**summary["color_stats"])
        if summary["mean_image"]:
            tf.io.gfile.rename(summary["mean_image"], os.path.join(output_dir, records.MEAN_IMAGE_FILE),
                               overwrite=True)
            stats = dataclasses.replace(stats, mean_image_file=records.MEAN_IMAGE_FILE,
                                        mean_image_shape=(args.image_size, args.image_size, 3))
    meta = records.Metadata(
        format_version=records.FORMAT_VERSION,
        dataset="ILSVRC2012",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        num_classes=len(config.classes),
        classes=[records.ClassInfo(i, s, n) for i, (s, n) in enumerate(zip(config.classes, config.names))],
        splits=splits,
        image=records.ImageInfo(
            size=args.image_size if args.resize else None,
            resized=args.resize,
            jpeg_quality=args.jpeg_quality,
            colorspace="RGB",
            note="shorter side scaled to size (bicubic), central size x size crop (paper §2)"
            if args.resize else "original JPEG bytes kept where valid RGB JPEG",
        ),
        color_stats=stats,
        rejected=[records.Rejection(r["split"], r["file"], r["reason"]) for r in summary["rejected"]],
        build=records.BuildInfo(
            imagenet_dir=layout.imagenet_dir,
            val_labels=layout.val_labels,
            seed=args.seed,
            train_shards=args.train_shards,
            validation_shards=args.validation_shards,
            max_reject_fraction=args.max_reject_fraction,
            seconds=round(time.time() - started, 1),
        ),
    )
    records.write_metadata(output_dir, meta)
    tf.io.gfile.rmtree(build_dir)
    return meta


def _report(meta: records.Metadata, output_dir: str) -> str:
    lines = [f"wrote {output_dir}/{records.METADATA_FILE} ({meta.num_classes} classes, {meta.build.seconds} s)"]
    for split, info in meta.splits.items():
        lines.append(
            f"  {split}: {info.num_read} read = {info.num_examples} written "
            f"in {info.num_shards} shards + {info.num_rejected} rejected"
        )
    for r in meta.rejected[:10]:
        lines.append(f"  rejected {r.file}: {r.reason}")
    if len(meta.rejected) > 10:
        lines.append(f"  ... {len(meta.rejected) - 10} more rejected, listed in metadata.json")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict:
    """Runs the whole build; returns the metadata written.

    Raises:
      BuildError, imagenet_layout.LayoutError: with a one-line reason.
    """
    args, beam_args = _parser().parse_known_args(argv)
    _check_flags(args)
    started = time.time()
    if args.imagenet_dir is None:
        from pipelines import make_sample

        manifest = make_sample.ensure_sample(args.sample_dir)
        args.imagenet_dir = os.path.dirname(manifest["train_tar"])
        print(f"build_tfrecords: no --imagenet_dir, using the embedded sample in {args.imagenet_dir}",
              file=sys.stderr)
    layout = imagenet_layout.plan(args.imagenet_dir, args.val_labels)
    print(f"build_tfrecords: {layout.describe()}", file=sys.stderr)
    options = _beam_options(beam_args)
    runner = options.view_as(StandardOptions).runner
    _prepare_output(args.output_dir, args.overwrite)

    config = BuildConfig(
        classes=tuple(layout.classes),
        names=tuple(imagenet_layout.class_names(layout.classes)),
        image_size=args.image_size,
        resize=args.resize,
        jpeg_quality=args.jpeg_quality,
        seed=args.seed,
        num_shards=(("train", args.train_shards), ("validation", args.validation_shards)),
        progress=runner in LOCAL_RUNNERS,
    )
    build_dir = os.path.join(args.output_dir, BUILD_DIR)
    units = [u for s in layout.splits.values() for u in s.units]
    with beam.Pipeline(options=options) as p:
        _ = (
            p
            | "Units" >> beam.Create(units)  # PCollection[ReadUnit]
            | "Build" >> BuildRecords(config, args.output_dir, build_dir)
        )
    meta = _finalize(args.output_dir, build_dir, layout, args, config, started)
    print(f"build_tfrecords: {_report(meta, args.output_dir)}", file=sys.stderr)
    return meta


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Beam's local runner relays every worker log line at INFO; keep the console readable.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (BuildError, imagenet_layout.LayoutError) as e:
        print(f"build_tfrecords: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    # Run through the importable module, not __main__, so that the classes the
    # workers unpickle resolve to `pipelines.build_tfrecords.*`.
    from pipelines import build_tfrecords

    build_tfrecords.main()
