"""Tests of `pipelines.color_stats`: exact integer pixel sums and the statistics made from them."""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that

from pipelines import color_stats, shard_writing


# -- colour statistics --------------------------------------------------------


def _numpy_stats(pairs):
    x = np.concatenate([p.reshape(-1, 3) for p, _ in pairs]).astype(np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False, bias=True)


def test_color_stats_combine_fn_matches_numpy_in_a_pipeline():
    rng = np.random.default_rng(1)
    pairs = []
    for i in range(12):  # Images of several sizes; the mean image uses the squares.
        h, w = rng.integers(20, 60, size=2)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pairs.append((pixels, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    mean, cov = _numpy_stats(pairs)
    mean_image = np.mean([s for _, s in pairs], axis=0)

    def check(outputs):
        assert 1 <= len(outputs) <= shard_writing.STATS_FAN_IN  # Partial sums, added by the driver.
        sums = color_stats.PixelSums()
        for partial in outputs:
            sums.merge(partial)
        stats, image = color_stats.summarize(sums)
        np.testing.assert_allclose(stats["mean_rgb"], mean, rtol=1e-12)
        np.testing.assert_allclose(stats["covariance"], cov, rtol=1e-10)
        np.testing.assert_allclose(image, mean_image, rtol=1e-6)
        assert stats["num_images"] == 12

    with BeamTestPipeline() as p:
        result = (
            p
            | beam.Create([color_stats.PixelSums.of_image(p, s) for p, s in pairs], reshuffle=False)
            | beam.Reshuffle()  # Split across bundles, so accumulators are merged.
            | shard_writing.ComputeColorStats()
        )
        assert_that(result, check)


def test_pixel_sums_merge_in_any_order_to_the_same_bytes():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (int(rng.integers(20, 50)), 40, 3), dtype=np.uint8) for _ in range(8)]
    squares = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in images]
    parts = [color_stats.PixelSums.of_image(im, sq) for im, sq in zip(images, squares)]
    results = []
    for order in (range(8), reversed(range(8)), rng.permutation(8)):
        # Merged in another order and grouping each time, as runners and their workers do.
        left, right = color_stats.PixelSums(), color_stats.PixelSums()
        for i, j in enumerate(order):
            (left if i % 3 else right).merge(parts[j])
        stats, mean_image = color_stats.summarize(color_stats.PixelSums().merge(right).merge(left))
        results.append((json.dumps(stats), mean_image.tobytes()))
    assert results[0] == results[1] == results[2]
    mean, cov = _numpy_stats([(im, None) for im in images])
    stats = json.loads(results[0][0])
    np.testing.assert_allclose(stats["mean_rgb"], mean, rtol=1e-14)
    np.testing.assert_allclose(stats["covariance"], cov, rtol=1e-12)


def test_summarize_orders_eigenpairs_and_fixes_signs():
    m = color_stats.PixelSums.of_image(np.random.default_rng(3).integers(0, 256, (50, 50, 3), dtype=np.uint8))
    stats, _ = color_stats.summarize(m)
    vals, vecs = np.array(stats["eigenvalues"]), np.array(stats["eigenvectors"])
    assert list(vals) == sorted(vals, reverse=True)
    assert np.all(vecs.sum(axis=0) >= 0)
    np.testing.assert_allclose(vecs @ np.diag(vals) @ vecs.T, stats["covariance"], atol=1e-8)


# -- exact integer statistics, and records without TensorFlow -----------------------


def test_pixel_sums_are_exact_integers_even_past_int64():
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (int(rng.integers(8, 40)), 33, 3), dtype=np.uint8) for _ in range(9)]
    squares = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in images]
    x = np.concatenate([im.reshape(-1, 3) for im in images]).astype(object)  # Python integers: exact.
    sums = color_stats.PixelSums()
    for im, sq in zip(images, squares):
        sums.add(im, sq)
    assert (sums.num_images, sums.num_pixels) == (9, len(x))
    assert sums.sum == [int(v) for v in x.sum(axis=0)]
    assert sums.products == [[int(v) for v in row] for row in x.T.dot(x)]
    np.testing.assert_array_equal(sums.image_sum, np.sum(squares, axis=0, dtype=np.int64))
    with pytest.raises(ValueError, match="mean image shapes differ"):
        sums.add(images[1], images[1])  # Its own pixels as the square: another shape.
    # 2^40 copies of the same sums: far past what int64 holds, still exact, and the same statistics.
    big = color_stats.PixelSums.from_json(json.loads(json.dumps(sums.to_json())), sums.image_sum)
    for _ in range(40):
        big.merge(color_stats.PixelSums.from_json(big.to_json(), big.image_sum))
    assert big.products[0][0] == sums.products[0][0] << 40 and big.products[0][0] > 2**63
    assert color_stats.summarize(big)[0]["covariance"] == color_stats.summarize(sums)[0]["covariance"]
