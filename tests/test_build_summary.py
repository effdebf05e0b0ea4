"""Tests of `pipelines.build_summary`: the summary file, from the pipeline to the driver."""

from __future__ import annotations


import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from tfrecords import schema
from conftest import blocky_image as _image
from pipelines import build_summary, color_stats


def test_summary_reaches_the_driver_through_a_beam_sink(tmp_path):
    pixels, other = _image(40, 50), _image(30, 20, seed=3)
    parts = [color_stats.PixelSums.of_image(pixels, pixels[:8, :8]), color_stats.PixelSums.of_image(other, other[:8, :8])]
    shards = [{"split": "train", "index": i, "num_shards": 2, "file": schema.shard_name("train", i, 2),
               "num_examples": 3} for i in (1, 0)]
    rejected = [{"split": "train", "file": "b", "reason": "r2"}, {"split": "train", "file": "a", "reason": "r1"}]
    with BeamTestPipeline() as p:
        _ = (
            p | "S" >> beam.Create(shards),
            p | "R" >> beam.Create(rejected),
            p | "C" >> beam.Create([("train", 8), ("validation", 2), ("train", 1)]),  # A line a read unit.
            p | "M" >> beam.Create(parts),  # Partial sums.
        ) | build_summary.WriteSummary(str(tmp_path))
    summary = build_summary.read_summary(str(tmp_path))
    assert [s["index"] for s in summary["shards"]] == [0, 1]
    assert [r["file"] for r in summary["rejected"]] == ["a", "b"]
    assert summary["read"] == {"train": 9, "validation": 2}
    expected, mean_image = color_stats.summarize(color_stats.PixelSums().merge(parts[1]).merge(parts[0]))
    assert summary["pixel_sums"].num_images == 2
    assert summary["color_stats"] == expected
    np.testing.assert_array_equal(summary["mean_image"], mean_image)
