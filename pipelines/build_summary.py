"""The build's summary file: every branch's results written by one writer, and read back by the driver.

`WriteSummary` gathers the shards written, the rejected inputs, the units'
read counts and the partial pixel sums into `<build_dir>/summary.jsonl`, a JSON
object a line; `read_summary` reads it after the pipeline has finished.
"""

from __future__ import annotations

import base64
import io
import json
import os
import uuid

import apache_beam as beam
import numpy as np

from pipelines import color_stats
from pipelines.transforms import READ, REJECTED, SHARD, SUMS
from tfrecords import fileio

SUMMARY_FILE = "summary.jsonl"


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

