"""The build's Beam transforms: small composites, each testable on `beam.Create` input.

    ReadUnit ─ ListMembers ─┬─ items: (split, key, Member) ─ AssignShards ─ WriteShards ─┬─ shards
                            │                                                            ├─ rejected
                            └─ rejected                                                  └─ moments ─ ComputeColorStats
    items + listing rejects ─ CountRead ─ (split, count)
    shards, rejected, counts, colour statistics ─ WriteSummary ─ <build_dir>/summary.jsonl

`BuildRecords` wires them together. Only names and byte ranges are shuffled,
never pixels: memory stays flat as the dataset grows, on the local runner as
on a cluster. The driver reads the result with `read_summary` after the
pipeline has finished: it reaches the driver through a Beam sink (atomic,
retry-safe), not through files written by hand inside a transform.

Workers import neither TensorFlow nor anything heavy beyond Pillow and NumPy
for local paths (see `alexnet_tf.fileio`); records are framed by
`alexnet_tf.records.write_record`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from alexnet_tf import fileio, records
from pipelines import color_stats, image_processing, members

# With few images, fewer shards than asked for: each holds at least this many
# records (a shard of one or two images would also hold a single class).
MIN_RECORDS_PER_SHARD = 32
REJECTED = "rejected"
MOMENTS = "moments"
SUMMARY_FILE = "summary.jsonl"


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


def _rejection(split: str, name: str, reason: str):
    return beam.pvalue.TaggedOutput(REJECTED, {"split": split, "file": name, "reason": reason})


# -- listing --------------------------------------------------------------------


class ListUnitFn(beam.DoFn):
    """ReadUnit -> (split, key, Member) for each labelled image; tagged 'rejected'."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.known = frozenset(config.classes)

    def process(self, unit: members.ReadUnit):
        count = 0
        try:
            for m in members.list_unit(unit):
                count += 1
                if isinstance(m, members.Skipped):
                    yield _rejection(unit.split, m.name, m.reason)
                elif m.synset is None:
                    yield _rejection(
                        unit.split, m.name,
                        "no validation number in the file name (expected ILSVRC2012_val_NNNNNNNN.JPEG)",
                    )
                elif m.synset not in self.known:
                    yield _rejection(unit.split, m.name, f"synset {m.synset} has no training images")
                else:
                    yield unit.split, sort_key(self.config.seed, unit.split, m.synset, m.name), m
        except members.UnitReadError as e:
            # What follows the damage cannot be listed; it is reported as one
            # rejected input so that read = written + rejected still holds.
            yield _rejection(unit.split, unit.name, f"damaged after {count} images: {e}")


class ListMembers(beam.PTransform):
    """PCollection[ReadUnit] -> outputs `items` (split, key, Member) and `rejected` (dict).

    Only names and byte ranges leave this step: image bytes are read once, by
    the shard writer.
    """

    def __init__(self, config: BuildConfig):
        super().__init__()
        self.config = config

    def expand(self, units):
        return (
            units
            # Spread units over workers: listing a class archive is a few KB of I/O.
            | "Spread" >> beam.Reshuffle()
            | "List" >> beam.ParDo(ListUnitFn(self.config)).with_outputs(REJECTED, main="items")
        )


# -- sharding -------------------------------------------------------------------


def effective_num_shards(requested: int, num_records: int) -> int:
    """The requested count, or fewer so that each shard holds MIN_RECORDS_PER_SHARD."""
    return max(1, min(requested, num_records // MIN_RECORDS_PER_SHARD))


def _sorted_keys(split_keys):
    split, keys = split_keys
    return split, np.sort(np.fromiter(keys, dtype=np.uint64))


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


class AssignShards(beam.PTransform):
    """PCollection[(split, key, Member)] -> PCollection[((split, shard, shards), [(key, Member)])]."""

    def __init__(self, num_shards: dict[str, int]):
        super().__init__()
        self.num_shards = dict(num_shards)

    def expand(self, items):
        sorted_keys = (
            items
            | "SplitKey" >> beam.Map(lambda r: (r[0], r[1]))
            | "GroupKeys" >> beam.GroupByKey()
            | "SortKeys" >> beam.Map(_sorted_keys)
        )  # PCollection[(split, np.ndarray[uint64])]: 8 bytes an image.
        return (
            items
            | "Assign" >> beam.Map(assign_shard, sorted_keys=beam.pvalue.AsDict(sorted_keys),
                                   num_shards=self.num_shards)
            | "Group" >> beam.GroupByKey()
        )


# -- writing --------------------------------------------------------------------


class WriteShardFn(beam.DoFn):
    """((split, shard, shards), [(key, Member)]) -> shard info dict (with its count of upscaled images).

    Reads, checks and re-encodes each image in key order and streams it into the
    shard, so memory does not grow with the shard or the dataset. Also outputs,
    tagged, the rejected images and one `Moments` of the shard's training
    pixels (the colour statistics, from the same pixels, in integers).
    """

    def __init__(self, config: BuildConfig, output_dir: str):
        self.config, self.output_dir = config, output_dir
        self.label_of = {s: i for i, s in enumerate(config.classes)}
        self.written = Metrics.counter("build_tfrecords", "images_written")
        self.rejected = Metrics.counter("build_tfrecords", "images_rejected")

    def setup(self):
        self.progress = _Progress(self.config.progress)
        self.reader = members.MemberReader()

    def teardown(self):
        self.reader.close()

    def _record(self, member: members.Member):
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
        (split, shard, shards), items = element
        name = records.shard_name(split, shard, shards)
        final = os.path.join(self.output_dir, name)
        sums = color_stats.PixelSums()
        count = upscaled = 0
        # Write then rename: a retried or killed worker never leaves half a shard
        # under the final name.
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        with fileio.open_file(tmp, "wb") as raw:
            f = records.DigestingWriter(raw)  # Its size and digests, for metadata.json.
            for _, member in sorted(items, key=lambda kv: kv[0]):
                try:
                    example, out = self._record(member)
                except (OSError, image_processing.BadImage) as e:
                    self.rejected.inc()
                    self.progress.tick(True)
                    reason = str(e) if isinstance(e, image_processing.BadImage) else f"unreadable: {e}"
                    yield _rejection(split, member.name, reason)
                    continue
                records.write_record(f, example)
                count += 1
                upscaled += out.upscaled
                self.written.inc()
                self.progress.tick(False)
                if split == "train":
                    sums.add(out.pixels, out.square)
        fileio.rename(tmp, final)
        if sums.num_images:
            yield beam.pvalue.TaggedOutput(MOMENTS, sums.moments())
        yield {"split": split, "index": shard, "num_shards": shards, "file": name, "num_examples": count,
               "num_upscaled": upscaled, **f.digest.info()}


class WriteShards(beam.PTransform):
    """Grouped members -> outputs `shards` (dict), `rejected` (dict) and `moments` (Moments)."""

    def __init__(self, config: BuildConfig, output_dir: str):
        super().__init__()
        self.config, self.output_dir = config, output_dir

    def expand(self, grouped):
        return grouped | "Write" >> beam.ParDo(WriteShardFn(self.config, self.output_dir)).with_outputs(
            REJECTED, MOMENTS, main="shards")


# -- colour statistics and counts -------------------------------------------------


class ColorStatsFn(beam.CombineFn):
    """Merges `Moments` (of images, or of whole shards) into one `Moments`."""

    def create_accumulator(self) -> color_stats.Moments:
        return color_stats.Moments()

    def add_input(self, acc: color_stats.Moments, element: color_stats.Moments) -> color_stats.Moments:
        return acc.merge(element)

    def merge_accumulators(self, accumulators) -> color_stats.Moments:
        out = color_stats.Moments()
        for a in accumulators:
            out.merge(a)
        return out

    def extract_output(self, acc: color_stats.Moments) -> color_stats.Moments:
        return acc


class ComputeColorStats(beam.PTransform):
    """PCollection[Moments] -> PCollection[Moments] holding one element (empty Moments if none)."""

    def expand(self, moments):
        return moments | "Merge" >> beam.CombineGlobally(ColorStatsFn())


class CountRead(beam.PTransform):
    """(items, listing rejects) -> PCollection[(split, count)] of every image listed."""

    def expand(self, pcolls):
        items, rejected = pcolls
        return (
            (items | "SplitOfItem" >> beam.Map(lambda r: r[0]),
             rejected | "SplitOfReject" >> beam.Map(lambda r: r["split"]))
            | "All" >> beam.Flatten()
            | "Count" >> beam.combiners.Count.PerElement()
        )


# -- summary --------------------------------------------------------------------


def _npy_base64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def stats_line(moments: color_stats.Moments) -> str:
    """The colour statistics (and the mean image, as base64 .npy) as one JSON line."""
    stats, mean_image = color_stats.summarize(moments)
    return json.dumps({"kind": "color_stats", "stats": stats,
                       "mean_image_npy": None if mean_image is None else _npy_base64(mean_image)})


class WriteSummary(beam.PTransform):
    """(shards, rejected, counts, stats) -> `<build_dir>/summary.jsonl`, one JSON object a line."""

    def __init__(self, build_dir: str):
        super().__init__()
        self.build_dir = build_dir

    def expand(self, pcolls):
        shards, rejected, counts, stats = pcolls
        lines = (
            shards | "Shards" >> beam.Map(lambda s: json.dumps({"kind": "shard", **s})),
            rejected | "Rejected" >> beam.Map(lambda r: json.dumps({"kind": "rejected", **r})),
            counts | "Counts" >> beam.MapTuple(lambda s, n: json.dumps({"kind": "read", "split": s, "count": n})),
            stats | "Stats" >> beam.Map(stats_line),
        ) | "Lines" >> beam.Flatten()
        return lines | "Write" >> beam.io.WriteToText(
            os.path.join(self.build_dir, SUMMARY_FILE), shard_name_template="")


def read_summary(build_dir: str) -> dict:
    """The pipeline's summary: shards, rejected, read counts, colour statistics, mean image."""
    summary = {"shards": [], "rejected": [], "read": {}, "color_stats": {}, "mean_image": None}
    with fileio.open_file(os.path.join(build_dir, SUMMARY_FILE), "r") as f:
        for line in f:
            obj = json.loads(line)
            kind = obj.pop("kind")
            if kind == "shard":
                summary["shards"].append(obj)
            elif kind == "rejected":
                summary["rejected"].append(obj)
            elif kind == "read":
                summary["read"][obj["split"]] = obj["count"]
            elif kind == "color_stats":
                summary["color_stats"] = obj["stats"]
                if obj["mean_image_npy"]:
                    summary["mean_image"] = np.load(io.BytesIO(base64.b64decode(obj["mean_image_npy"])))
    summary["shards"].sort(key=lambda s: (s["split"], s["index"]))
    summary["rejected"].sort(key=lambda r: (r["split"], r["file"]))
    return summary


class BuildRecords(beam.PTransform):
    """PCollection[ReadUnit] -> shards written under `output_dir`, and the summary file."""

    def __init__(self, config: BuildConfig, output_dir: str, build_dir: str):
        super().__init__()
        self.config, self.output_dir, self.build_dir = config, output_dir, build_dir

    def expand(self, units):
        listed = units | "ListMembers" >> ListMembers(self.config)
        written = (
            listed.items
            | "AssignShards" >> AssignShards(dict(self.config.num_shards))
            | "WriteShards" >> WriteShards(self.config, self.output_dir)
        )
        rejected = (listed.rejected, written.rejected) | "AllRejected" >> beam.Flatten()
        counts = (listed.items, listed.rejected) | "CountRead" >> CountRead()
        stats = written.moments | "ColorStats" >> ComputeColorStats()
        return (written.shards, rejected, counts, stats) | "WriteSummary" >> WriteSummary(self.build_dir)
