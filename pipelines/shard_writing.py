"""The build's writing side: shards written in key order, and their pixel sums added into colour statistics.

`WriteShards` reads, checks and re-encodes each image and streams it into its
shard (records framed by `tfrecords.framing.write_record`);
`ComputeColorStats` adds the training shards' exact integer sums in keyed
groups. Both take and give the `(kind, value)` elements of
`pipelines.transforms`.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipelines import color_stats, image_processing, members
from pipelines.transforms import REJECTED, SHARD, SUMS, BuildConfig, pick, rejection
from tfrecords import fileio, framing, integrity, schema

# ComputeColorStats adds the shards' sums in this many keyed groups; the driver
# adds the groups' sums. No task gathers every shard's mean-image sum.
STATS_FAN_IN = 32


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
                    yield rejection(split, member.name, reason)
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
    """PCollection[PixelSums] -> at most `STATS_FAN_IN` partial sums; the driver adds them (`build_summary.read_summary`).

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


