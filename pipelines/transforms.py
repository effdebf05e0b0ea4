"""The build's reading side, listing the inputs and assigning them to shards, and what every step shares.

Small Beam composites, each testable on `beam.Create` input. The whole pipeline:

    ReadUnit ─ ListMembers ─┬─ items: (split, key, Member) ─ AssignShards ─ WriteShards ─┬─ shards
                            ├─ read: (split, count)                                      ├─ rejected
                            └─ rejected                                                  └─ sums ─ ComputeColorStats
    shards, rejected (both steps), read counts, partial pixel sums ─ WriteSummary ─ <build_dir>/summary.jsonl

The driver adds up the units' read counts and the partial sums.

`ListMembers` and `AssignShards` are here; `WriteShards` and `ComputeColorStats` in
`pipelines.shard_writing`, `WriteSummary` in `pipelines.build_summary`;
`pipelines.build_tfrecords.BuildRecords` wires them together. Only names and byte ranges are shuffled,
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

import dataclasses
import hashlib
import os

import apache_beam as beam
import numpy as np

from pipelines import members

# With few images, fewer shards than asked for: each holds at least this many
# records (a shard of one or two images would also hold a single class).
MIN_RECORDS_PER_SHARD = 32
# The kinds of element a step tags its one output with: (kind, value).
ITEM, REJECTED, READ, SHARD, SUMS, BOUNDS = "item", "rejected", "read", "shard", "sums", "bounds"
# AssignShards joins each item with its split's shard bounds in one of this
# many groups (by the key's top bits): each group gets a copy of the bounds.
NUM_BUCKETS = 64



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
BUILD_CODE = ("pipelines.transforms", "pipelines.shard_writing", "pipelines.build_summary", "pipelines.color_stats",
              "pipelines.image_processing", "pipelines.members", "tfrecords.schema", "tfrecords.framing",
              "tfrecords.integrity", "tfrecords.fileio")


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


def rejection(split: str, name: str, reason: str):
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
                    yield rejection(unit.split, m.name, m.reason)
                elif m.synset is None:
                    yield rejection(
                        unit.split, m.name,
                        "no validation number in the file name (expected ILSVRC2012_val_NNNNNNNN.JPEG)",
                    )
                elif m.synset not in self.known:
                    yield rejection(unit.split, m.name, f"synset {m.synset} has no training images")
                else:
                    yield ITEM, (unit.split, sort_key(self.config.seed, unit.split, m.synset, m.name), m)
        except members.UnitReadError as e:
            # What follows the damage cannot be listed; it is reported as one
            # rejected input so that read = written + rejected still holds.
            yield rejection(unit.split, unit.name, f"damaged after {count} images: {e}")

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

