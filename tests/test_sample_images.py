"""Tests for pipelines/sample_images.py: the image sizes, formats and quirks it draws."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # Lets plain `pytest` import the package too.
    sys.path.insert(0, str(REPO))

from pipelines import sample_images  # noqa: E402


def test_imagenet_sizes_follow_imagenets_mix():
    rng = np.random.default_rng(0)
    sizes = [sample_images.imagenet_size(rng) for _ in range(5000)]
    long_sides = np.array([max(s) for s in sizes])
    assert 0.75 < np.mean(long_sides == 500) < 0.85  # Most are 500 px on the long side ...
    assert (np.array(sizes) == (375, 500)).all(axis=1).mean() > 0.2  # ... many 500x375 ...
    assert 0.01 < np.mean(long_sides > 800) < 0.05 and long_sides.max() > 2000  # ... a few far larger.
    assert np.mean([h > w for h, w in sizes]) > 0.15  # Portrait ones too.


def test_random_sizes_are_imagenet_like():
    rng = np.random.default_rng(0)
    sizes = [sample_images.random_size(rng) for _ in range(500)]
    assert all(150 <= min(s) and max(s) <= 500 for s in sizes)
    assert 0.5 < np.mean([h < w for h, w in sizes]) < 0.9  # Mostly landscape.


@pytest.mark.parametrize("quirk, mode, fmt", [(None, "RGB", "JPEG"), ("cmyk", "CMYK", "JPEG"),
                                              ("grayscale", "L", "JPEG"), ("png", "RGB", "PNG")])
def test_encode_honours_the_quirk(quirk, mode, fmt):
    img = sample_images.render_sized(3, np.random.default_rng(0), (40, 60))
    decoded = Image.open(io.BytesIO(sample_images.encode(img, quirk)))
    assert (decoded.mode, decoded.format, decoded.size) == (mode, fmt, (60, 40))


def test_truncated_opens_but_does_not_decode(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    img = sample_images.render_sized(0, np.random.default_rng(0), (64, 64))
    data = sample_images.encode(img, "truncated")
    assert len(data) == len(sample_images.encode(img, None)) // 2
    decoded = Image.open(io.BytesIO(data))
    with pytest.raises(OSError):
        decoded.load()
