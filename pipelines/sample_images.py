"""Draws the synthetic sample's images: a texture family per class, ImageNet-like sizes.

Patterns are defined on coordinates normalised by the image's shorter side, so
after the usual "shorter side -> 256" resize every class has the same scale
range regardless of the original size. Colours are drawn from one distribution
for every class, so a CNN has to look at texture and shape, not mean colour.
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

_JPEG_QUALITY = 90
_MIN_SIDE, _MAX_SIDE = 150, 500

# Each pattern returns a mask in [0, 1] that blends a background colour (0) into
# a foreground colour (1).


def _coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    s = float(min(h, w))
    y = (np.arange(h, dtype=np.float32) / s)[:, None]
    x = (np.arange(w, dtype=np.float32) / s)[None, :]
    return y, x


def _wave(t: np.ndarray, sharpness: float) -> np.ndarray:
    """Near-square wave of period 1 with slightly soft (anti-aliased) edges."""
    return np.clip(0.5 + sharpness * np.sin(2 * np.pi * t), 0.0, 1.0)


def _horizontal_stripes(rng, h, w):
    y, _ = _coords(h, w)
    f = rng.uniform(6, 12)  # cycles per shorter side
    m = _wave(f * y + rng.random(), rng.uniform(2, 4))
    return np.broadcast_to(m, (h, w))


def _vertical_stripes(rng, h, w):
    _, x = _coords(h, w)
    f = rng.uniform(6, 12)
    m = _wave(f * x + rng.random(), rng.uniform(2, 4))
    return np.broadcast_to(m, (h, w))


def _checkerboard(rng, h, w):
    y, x = _coords(h, w)
    f = rng.uniform(2.5, 5)
    prod = np.sin(2 * np.pi * (f * x + rng.random())) * np.sin(
        2 * np.pi * (f * y + rng.random())
    )
    return np.clip(0.5 + 4.0 * prod, 0.0, 1.0)


def _random_centre(rng, h, w, margin=0.2):
    s = min(h, w)
    cy = rng.uniform(margin, 1 - margin) * h / s
    cx = rng.uniform(margin, 1 - margin) * w / s
    return cy, cx


def _rings(rng, h, w):
    y, x = _coords(h, w)
    cy, cx = _random_centre(rng, h, w)
    r = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    return _wave(rng.uniform(4, 9) * r + rng.random(), rng.uniform(2, 4))


def _dots(rng, h, w):
    y, x = _coords(h, w)
    f = rng.uniform(5, 9)  # dots per shorter side
    py = np.mod(f * y + rng.random(), 1.0) - 0.5
    px = np.mod(f * x + rng.random(), 1.0) - 0.5
    dist = np.sqrt(py**2 + px**2)  # in lattice-cell units
    radius = rng.uniform(0.2, 0.32)
    return np.clip((radius - dist) * 25.0, 0.0, 1.0)


def _crosshatch(rng, h, w):
    y, x = _coords(h, w)
    # Same frequency on both diagonals so a horizontal flip (which swaps them)
    # yields an image from the same family.
    f = rng.uniform(4, 8)
    width = rng.uniform(0.12, 0.2)
    a = np.abs(np.mod(f * (x + y) + rng.random(), 1.0) - 0.5)
    b = np.abs(np.mod(f * (x - y) + rng.random(), 1.0) - 0.5)
    line_a = np.clip((width - a) * 20.0, 0.0, 1.0)
    line_b = np.clip((width - b) * 20.0, 0.0, 1.0)
    return np.maximum(line_a, line_b)


def _blobs(rng, h, w):
    s = min(h, w)
    cells = rng.uniform(2.5, 4.5)  # blobs per shorter side
    gh = max(2, math.ceil(cells * h / s) + 1)
    gw = max(2, math.ceil(cells * w / s) + 1)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    # Bicubic upsampling of a coarse random grid gives smooth, band-limited blobs.
    smooth = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC))
    smooth = (smooth - smooth.mean()) / (smooth.std() + 1e-6)
    return np.clip(0.5 + 0.6 * smooth, 0.0, 1.0)


def _spokes(rng, h, w):
    y, x = _coords(h, w)
    cy, cx = _random_centre(rng, h, w, margin=0.3)
    theta = np.arctan2(y - cy, x - cx)
    n = int(rng.integers(6, 15))  # whole number so the pattern closes up
    return np.clip(0.5 + 3.0 * np.sin(n * theta + rng.uniform(0, 2 * np.pi)), 0.0, 1.0)


def _triangles(rng, h, w):
    s = min(h, w)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    count = int(rng.integers(8, 16) * (h * w) / (s * s))
    for _ in range(max(count, 6)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        radius = rng.uniform(0.07, 0.16) * s
        # Roughly equilateral, random orientation: thin slivers would look
        # like stripes.
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
        angles = angles + rng.uniform(-0.35, 0.35, size=3)
        pts = [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]
        draw.polygon(pts, fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _speckle(rng, h, w):
    # Cells of 2-4 px once the shorter side is resized to 256: fine grain
    # that survives the resize instead of averaging out to flat grey.
    cell = rng.uniform(2.0, 4.0) * min(h, w) / 256.0
    iy = (np.arange(h) / cell).astype(np.int64)
    ix = (np.arange(w) / cell).astype(np.int64)
    small = rng.random((iy[-1] + 1, ix[-1] + 1)) < 0.5
    return small[iy][:, ix].astype(np.float32)


# Index i draws class i of make_sample.SYNSETS (the texture families).
PATTERNS: tuple[Callable[[np.random.Generator, int, int], np.ndarray], ...] = (
    _horizontal_stripes,
    _vertical_stripes,
    _checkerboard,
    _rings,
    _dots,
    _crosshatch,
    _blobs,
    _spokes,
    _triangles,
    _speckle,
)


def random_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) with ImageNet-like sizes: mostly landscape, 150..500 px."""
    long_side = int(rng.integers(250, _MAX_SIDE + 1))
    short_side = max(_MIN_SIDE, int(round(long_side * rng.uniform(0.5, 1.0))))
    if rng.random() < 0.7:
        return short_side, long_side
    return long_side, short_side


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB, independent of the class.

    Rejection keeps the two far enough apart for the pattern to be visible,
    also in brightness alone (grayscale quirks, JPEG's subsampled chroma);
    the rule is the same for every class, so mean colour carries no label.
    """
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    while True:
        bg, fg = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        if np.linalg.norm(fg - bg) > 100 and abs(luma @ (fg - bg)) > 50:
            return bg, fg


def render(class_index: int, rng: np.random.Generator) -> Image.Image:
    """Draws one RGB image of the given class at a random size."""
    return render_sized(class_index, rng, random_size(rng))


def render_sized(class_index: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Draws one RGB image of the given class (its texture family: the class
    modulo the families) at `size` (height, width)."""
    h, w = size
    bg, fg = _two_colours(rng)
    mask = PATTERNS[class_index % len(PATTERNS)](rng, h, w).astype(np.float32)
    # In-place float32 arithmetic: this function dominates the run time.
    img = mask[..., None] * (fg - bg)
    img += bg + 0.5  # +0.5: round rather than truncate on the cast below.
    # Uniform rather than Gaussian noise: several times faster to draw.
    noise = rng.random((h, w, 3), dtype=np.float32)
    noise -= 0.5
    noise *= np.float32(rng.uniform(10, 40))
    img += noise
    np.clip(img, 0, 255, out=img)
    return Image.fromarray(img.astype(np.uint8))


def encode(img: Image.Image, quirk: str | None) -> bytes:
    """Encodes an image as the bytes of a ``.JPEG`` file, honouring a quirk."""
    buf = io.BytesIO()
    if quirk == "png":
        img.save(buf, format="PNG")
    elif quirk == "cmyk":
        img.convert("CMYK").save(buf, format="JPEG", quality=_JPEG_QUALITY)
    elif quirk == "grayscale":
        img.convert("L").save(buf, format="JPEG", quality=_JPEG_QUALITY)
    else:
        img.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    data = buf.getvalue()
    if quirk == "truncated":
        # Header intact, scan data cut short: opens fine, fails on decode.
        data = data[: len(data) // 2]
    return data


def imagenet_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) in ILSVRC2012's mix: most 500 px on the long side at 4:3
    or 3:2 (500x375, 500x333), some smaller, a few several times larger."""
    r = rng.random()
    if r < 0.8:
        long_side, aspect = 500, float(rng.choice([0.75, 0.666, 0.75, 1.0, 0.8]))
    elif r < 0.97:
        long_side, aspect = int(rng.integers(200, 500)), float(rng.uniform(0.6, 1.0))
    else:
        long_side, aspect = int(rng.integers(800, 2600)), float(rng.uniform(0.6, 0.8))
    short_side = max(_MIN_SIDE // 2, int(round(long_side * aspect)))
    return (short_side, long_side) if rng.random() < 0.75 else (long_side, short_side)
