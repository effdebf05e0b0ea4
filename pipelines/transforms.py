"""The build's Beam transforms: small composites, each testable on `beam.Create` input.

    ReadUnit ─ ListMembers ─┬─ items: (split, key, Member) ─ AssignShards ─ WriteShards ─┬─ shards
                            ├─ read: (split, count)                                      ├─ rejected
                            └─ rejected                                                  └─ sums ─ ComputeColorStats
    shards, rejected (both steps), read counts, partial pixel sums ─ WriteSummary ─ <build_dir>/summary.jsonl

The driver adds up the units' read counts and the partial sums.

`BuildRecords` wires them together. Only names and byte ranges are shuffled,
never pixels: memory stays flat as the dataset grows, on the local runner as
on a cluster. The driver reads the result with `read_summary` after the
pipeline has finished: it reaches the driver through one writer (a temporary
file, then a rename: retry-safe), not through files written by hand inside a
transform.

The shape works on every runner, Beam's DaskRunner included, whose gaps it
avoids: each step has one output (a DoFn tags its elements as `(kind,
value)` and `FlatMap`s pick each kind), nothing is a side input (the shard
bounds reach the items through a GroupByKey), no step emits from
`finish_bundle`, and every branch feeds the summary, so a runner that only
computes what the final write needs computes everything. All sums are
integers, so the result does not depend on the order a runner merges them in.

Workers import neither TensorFlow nor anything heavy beyond Pillow and NumPy
for local paths (see `tfrecords.fileio`); records are framed by
`tfrecords.framing.write_record`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import socket
import sys
import time
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipelines import color_stats, image_processing, members
from tfrecords import fileio, framing, integrity, schema

# With few images, fewer shards than asked for: each holds at least this many
# records (a shard of one or two images would also hold a single class).
MIN_RECORDS_PER_SHARD = 32
# The kinds of element a step tags its one output with: (kind, value).
ITEM, REJECTED, READ, SHARD, SUMS, BOUNDS = "item", "rejected", "read", "shard", "sums", "bounds"
SUMMARY_FILE = "summary.jsonl"
# AssignShards joins each item with its split's shard bounds in one of this
# many groups (by the key's top bits): each group gets a copy of the bounds.
NUM_BUCKETS = 64
# ComputeColorStats adds the shards' sums in this many keyed groups; the driver
# adds the groups' sums. No task gathers every shard's mean-image sum.
STATS_FAN_IN = 32


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


# The modules whose code decides a record's bytes (with the libraries in `worker_facts`).
BUILD_CODE = ("pipelines.transforms", "pipelines.color_stats", "pipelines.image_processing", "pipelines.members",
              "tfrecords.schema", "tfrecords.framing", "tfrecords.integrity", "tfrecords.fileio")


def worker_facts() -> dict:
    """What decides the bytes a worker writes: a digest of the build's code, and the image libraries' versions.

    Run on each worker of a cluster before a build (and here): equal facts, equal bytes.
    """
    import importlib

    import PIL

    digest = hashlib.sha256()
    for name in BUILD_CODE:
        with open(importlib.import_module(name).__file__, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return {"build code": digest.hexdigest()[:16], "Pillow": PIL.__version__, "NumPy": np.__version__}


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
    return REJECTED, {"split": split, "file": name, "reason": reason}


def of_kind(element, kind: str):
    """The value of a `(kind, value)` element of the given kind (for `beam.FlatMap`)."""
    if element[0] == kind:
        yield element[1]


def pick(tagged, *kinds: str) -> dict:
    """{kind: PCollection of that kind's values} of a PCollection of `(kind, value)` elements."""
    return {kind: tagged | f"Pick{kind.title()}" >> beam.FlatMap(of_kind, kind) for kind in kinds}


# -- listing --------------------------------------------------------------------


class ListUnitFn(beam.DoFn):
    """ReadUnit -> ("item", (split, key, Member)) for each labelled image, ("rejected", dict) for the
    others, and last ("read", (split, count)): how many it listed, both kinds together."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.known = frozenset(config.classes)

    def _list(self, unit: members.ReadUnit):
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
                    yield ITEM, (unit.split, sort_key(self.config.seed, unit.split, m.synset, m.name), m)
        except members.UnitReadError as e:
            # What follows the damage cannot be listed; it is reported as one
            # rejected input so that read = written + rejected still holds.
            yield _rejection(unit.split, unit.name, f"damaged after {count} images: {e}")

    def process(self, unit: members.ReadUnit):
        listed = 0
        for element in self._list(unit):
            listed += 1
            yield element
        yield READ, (unit.split, listed)


class ListMembers(beam.PTransform):
    """PCollection[ReadUnit] -> {"items": (split, key, Member), "rejected": dict, "read": (split, count)}.

    Only names and byte ranges leave this step: image bytes are read once, by
    the shard writer.
    """

    def __init__(self, config: BuildConfig):
        super().__init__()
        self.config = config

    def expand(self, units):
        listed = (
            units
            # Spread units over workers: listing a class archive is a few KB of I/O.
            | "Spread" >> beam.Reshuffle()
            | "List" >> beam.ParDo(ListUnitFn(self.config))
        )
        picked = pick(listed, ITEM, REJECTED, READ)
        return {"items": picked[ITEM], "rejected": picked[REJECTED], "read": picked[READ]}


# -- sharding -------------------------------------------------------------------


def effective_num_shards(requested: int, num_records: int) -> int:
    """The requested count, or fewer so that each shard holds MIN_RECORDS_PER_SHARD."""
    return max(1, min(requested, num_records // MIN_RECORDS_PER_SHARD))


def shard_bounds(split_keys, num_shards: dict[str, int]):
    """(split, keys) -> (split, (shards, bounds)): the first key of each shard but the first.

    Shards are contiguous ranges of the hash rank, so each holds floor or ceil
    of N/shards records (none empty) and a random mix of classes: shard s
    starts at rank ceil(s * N / shards).
    """
    split, keys = split_keys
    keys = np.sort(np.fromiter(keys, dtype=np.uint64))
    n = len(keys)
    shards = effective_num_shards(num_shards[split], n)
    return split, (shards, keys[[-(-s * n // shards) for s in range(1, shards)]])


def assign_shard(item, bounds: dict):
    """(split, key, member) -> ((split, shard, shards), (key, member)), given each split's `shard_bounds`."""
    split, key, member = item
    shards, starts = bounds[split]
    return (split, int(np.searchsorted(starts, np.uint64(key), side="right")), shards), (key, member)


def _bucket(key: int) -> int:
    return key * NUM_BUCKETS >> 64  # Keys are uniform 64-bit hashes.


def _assign_bucket(bucket_group):
    """(bucket, [("bounds", (split, bounds)) ..., ("item", item) ...]) -> the bucket's assigned items."""
    _, tagged = bucket_group
    bounds, items = {}, []
    for kind, value in tagged:
        if kind == BOUNDS:
            bounds[value[0]] = value[1]
        else:
            items.append(value)
    for item in items:
        yield assign_shard(item, bounds)


class AssignShards(beam.PTransform):
    """PCollection[(split, key, Member)] -> PCollection[((split, shard, shards), [(key, Member)])].

    The bounds are computed from all keys (8 bytes an image), then joined with
    the items by GroupByKey in `NUM_BUCKETS` groups, each given a copy of
    them: no side input, which some runners evaluate again in every consumer.
    """

    def __init__(self, num_shards: dict[str, int]):
        super().__init__()
        self.num_shards = dict(num_shards)

    def expand(self, items):
        bounds = (
            items
            | "SplitKey" >> beam.Map(lambda r: (r[0], r[1]))
            | "GroupKeys" >> beam.GroupByKey()
            | "Bounds" >> beam.Map(shard_bounds, num_shards=self.num_shards)
            | "ToEveryBucket" >> beam.FlatMap(lambda b: ((i, (BOUNDS, b)) for i in range(NUM_BUCKETS)))
        )
        bucketed = items | "ToBucket" >> beam.Map(lambda r: (_bucket(r[1]), (ITEM, r)))
        return (
            (bounds, bucketed)
            | "Join" >> beam.Flatten()
            | "GroupBuckets" >> beam.GroupByKey()
            | "Assign" >> beam.FlatMap(_assign_bucket)
            | "Group" >> beam.GroupByKey()
        )


# -- writing --------------------------------------------------------------------


class WriteShardFn(beam.DoFn):
    """((split, shard, shards), [(key, Member)]) -> ("shard", info dict) (with its count of upscaled images).

    Reads, checks and re-encodes each image in key order and streams it into the
    shard, so memory does not grow with the shard or the dataset. Also outputs
    ("rejected", dict) for each image it rejects and, for a training shard,
    ("sums", PixelSums) of its pixels (the colour statistics, from the same
    pixels, in integers). The info names the worker process that wrote the
    shard (host:pid), for the build's report.
    """

    def __init__(self, config: BuildConfig, output_dir: str):
        self.config, self.output_dir = config, output_dir
        self.label_of = {s: i for i, s in enumerate(config.classes)}
        self.written = Metrics.counter("build_tfrecords", "images_written")
        self.rejected = Metrics.counter("build_tfrecords", "images_rejected")

    def setup(self):
        image_processing.keep_large_blocks()
        self.progress = _Progress(self.config.progress)
        self.reader = members.MemberReader()

    def teardown(self):
        self.reader.close()

    def _record(self, member: members.Member):
        """Serialized example and processed image of one member; raises on bad data."""
        c = self.config
        out = image_processing.process_image(self.reader.read(member), c.image_size, c.resize, c.jpeg_quality)
        label = self.label_of[member.synset]
        example = schema.make_example(
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
        name = schema.shard_name(split, shard, shards)
        final = os.path.join(self.output_dir, name)
        sums = color_stats.PixelSums()
        count = upscaled = 0
        # Write then rename: a retried or killed worker never leaves half a shard
        # under the final name.
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        with fileio.open_file(tmp, "wb") as raw:
            f = integrity.DigestingWriter(raw)  # Its size and digests, for metadata.json.
            for _, member in sorted(items, key=lambda kv: kv[0]):
                try:
                    example, out = self._record(member)
                except (OSError, image_processing.BadImage) as e:
                    self.rejected.inc()
                    self.progress.tick(True)
                    reason = str(e) if isinstance(e, image_processing.BadImage) else f"unreadable: {e}"
                    yield _rejection(split, member.name, reason)
                    continue
                framing.write_record(f, example)
                count += 1
                upscaled += out.upscaled
                self.written.inc()
                self.progress.tick(False)
                if split == "train":
                    sums.add(out.pixels, out.square)
        fileio.rename(tmp, final)
        if sums.num_images:
            yield SUMS, sums
        yield SHARD, {"split": split, "index": shard, "num_shards": shards, "file": name, "num_examples": count,
                      "num_upscaled": upscaled, "worker": f"{socket.gethostname()}:{os.getpid()}",
                      **f.digest.info()}


class WriteShards(beam.PTransform):
    """Grouped members -> {"shards": info dict, "rejected": dict, "sums": PixelSums}."""

    def __init__(self, config: BuildConfig, output_dir: str):
        super().__init__()
        self.config, self.output_dir = config, output_dir

    def expand(self, grouped):
        written = grouped | "Write" >> beam.ParDo(WriteShardFn(self.config, self.output_dir))
        picked = pick(written, SHARD, REJECTED, SUMS)
        return {"shards": picked[SHARD], "rejected": picked[REJECTED], "sums": picked[SUMS]}


# -- colour statistics and counts -------------------------------------------------


class SumPixelsFn(beam.CombineFn):
    """Adds `PixelSums` (of images, or of whole shards) into one; exact, in any order."""

    def create_accumulator(self) -> color_stats.PixelSums:
        return color_stats.PixelSums()

    def add_input(self, acc: color_stats.PixelSums, element: color_stats.PixelSums) -> color_stats.PixelSums:
        return acc.merge(element)

    def merge_accumulators(self, accumulators) -> color_stats.PixelSums:
        out = color_stats.PixelSums()
        for a in accumulators:
            out.merge(a)
        return out

    def extract_output(self, acc: color_stats.PixelSums) -> color_stats.PixelSums:
        return acc


def _fan_in_key(sums: color_stats.PixelSums):
    return sums.num_pixels % STATS_FAN_IN, sums


class ComputeColorStats(beam.PTransform):
    """PCollection[PixelSums] -> at most `STATS_FAN_IN` partial sums; the driver adds them (`read_summary`).

    Keyed groups rather than one global combine: a runner that does not
    pre-combine before its shuffle still never gathers every shard's
    mean-image sum in one task, and the last addition of a few partial sums
    costs no shuffle of its own.
    """

    def expand(self, sums):
        return (
            sums
            | "FanIn" >> beam.Map(_fan_in_key)
            | "Partial" >> beam.CombinePerKey(SumPixelsFn())
            | "Sums" >> beam.Values()
        )


# -- summary --------------------------------------------------------------------


def _npy_base64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def sums_line(sums: color_stats.PixelSums) -> str:
    """The training pixels' exact sums (and the square images' sum, as base64 .npy) as one JSON line.

    The driver turns them into floats (`color_stats.summarize`): every build,
    on any runner and workers, writes the same statistics from the same sums.
    """
    return json.dumps({"kind": SUMS, **sums.to_json(),
                       "image_sum_npy": None if sums.image_sum is None else _npy_base64(sums.image_sum)})


class WriteLinesFn(beam.DoFn):
    """(None, [line, ...]) -> the lines, sorted, in one file (written as a temporary file, then renamed)."""

    def __init__(self, path: str):
        self.path = path

    def process(self, element):
        _, lines = element
        lines = sorted(lines)
        fileio.makedirs(os.path.dirname(self.path))
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with fileio.open_file(tmp, "w") as f:
            for line in lines:
                f.write(line + "\n")
        fileio.rename(tmp, self.path)
        yield len(lines)


class WriteSummary(beam.PTransform):
    """(shards, rejected, units' read counts, partial pixel sums) -> `<build_dir>/summary.jsonl`, a JSON object a line.

    One writer, reached through a GroupByKey; it outputs the number of lines
    written. Being the pipeline's last step, fed by every branch, it makes any
    runner compute all of them.
    """

    def __init__(self, build_dir: str):
        super().__init__()
        self.build_dir = build_dir

    def expand(self, pcolls):
        shards, rejected, counts, sums = pcolls
        lines = (
            shards | "Shards" >> beam.Map(lambda s: json.dumps({"kind": SHARD, **s})),
            rejected | "Rejected" >> beam.Map(lambda r: json.dumps({"kind": REJECTED, **r})),
            counts | "Counts" >> beam.MapTuple(lambda s, n: json.dumps({"kind": READ, "split": s, "count": n})),
            sums | "Sums" >> beam.Map(sums_line),
        ) | "Lines" >> beam.Flatten()
        return (
            lines
            | "ToOneWriter" >> beam.Map(lambda line: (None, line))
            | "Gather" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteLinesFn(os.path.join(self.build_dir, SUMMARY_FILE)))
        )


def read_summary(build_dir: str) -> dict:
    """The pipeline's summary: shards, rejected, read counts, pixel sums, colour statistics, mean image.

    Raises FileNotFoundError when the pipeline wrote none.
    """
    summary = {"shards": [], "rejected": [], "read": {}, "pixel_sums": None, "color_stats": {}, "mean_image": None}
    with fileio.open_file(os.path.join(build_dir, SUMMARY_FILE), "r") as f:
        for line in f:
            obj = json.loads(line)
            kind = obj.pop("kind")
            if kind == SHARD:
                summary["shards"].append(obj)
            elif kind == REJECTED:
                summary["rejected"].append(obj)
            elif kind == READ:  # One line a read unit.
                summary["read"][obj["split"]] = summary["read"].get(obj["split"], 0) + obj["count"]
            elif kind == SUMS:  # Partial sums, added here in integers: any order gives the same sums.
                npy = obj.pop("image_sum_npy")
                image_sum = np.load(io.BytesIO(base64.b64decode(npy))) if npy else None
                partial = color_stats.PixelSums.from_json(obj, image_sum)
                summary["pixel_sums"] = partial if summary["pixel_sums"] is None else summary["pixel_sums"].merge(partial)
    if summary["pixel_sums"] is not None:
        summary["color_stats"], summary["mean_image"] = color_stats.summarize(summary["pixel_sums"])
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
            listed["items"]
            | "AssignShards" >> AssignShards(dict(self.config.num_shards))
            | "WriteShards" >> WriteShards(self.config, self.output_dir)
        )
        rejected = (listed["rejected"], written["rejected"]) | "AllRejected" >> beam.Flatten()
        sums = written["sums"] | "ColorStats" >> ComputeColorStats()
        return (written["shards"], rejected, listed["read"], sums) | "WriteSummary" >> WriteSummary(self.build_dir)
