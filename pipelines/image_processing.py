"""Decoding, checking and re-encoding of one input image (pure functions, no Beam).

Content decides the format, never the file name: ILSVRC2012 holds CMYK JPEGs,
a PNG and grayscale JPEGs under `.JPEG` names, and every one of them must
become an RGB JPEG. Only the formats serving decodes are stored
(`schema.IMAGE_FORMATS`: JPEG, PNG, GIF, BMP); others (WebP, TIFF, ...) and
undecodable inputs raise `BadImage` with the reason.

Memory per image, beyond the file's bytes (what a worker needs per image it
processes at once): a JPEG is decoded by libjpeg at the 1/2, 1/4 or 1/8 scale
that keeps its shorter side at least `image_size`, so a large one is never
decoded whole (10000x10000 decodes to 1250x1250, 6 MB); kept with
`--noresize`, at 1/8. PNG, GIF and BMP decode whole, at most `MAX_PIXELS`
pixels at up to 4 bytes each (512 MiB), and become RGB in bands of
`BAND_ROWS` rows, reduced by a whole factor to a shorter side of at least
2 x `image_size`, or (a long thin one, from `READ_BOX_PIXELS` on) only where
the scaling reads it: about one decoded copy, 4 bytes a pixel. Where the
whole RGB image is needed (an input re-encoded at its own size with
`--noresize`), the decoded image and its RGB copy: at most 8 bytes a pixel,
1 GiB at the limit. The band being converted adds about 13 x `BAND_ROWS`
bytes per column.
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import math
import warnings

import numpy as np
from PIL import Image

from tfrecords import schema

# The image work allocates and frees arrays of 0.2-50 MB for every image. glibc
# gives blocks above its mmap threshold (128 KiB at first; fixed there in Dask's
# workers, whose nanny sets MALLOC_TRIM_THRESHOLD_) straight back to the system,
# and the next image faults their pages in again: measured, a quarter of the
# per-image CPU time under Dask's setting and a tenth under glibc's default.
# Blocks below this size stay in the worker's heap instead.
MMAP_THRESHOLD = 32 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc malloc.h).


def keep_large_blocks() -> bool:
    """Raises glibc's mmap threshold of this process to `MMAP_THRESHOLD`; False where there is no glibc."""
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # Not glibc (macOS has no mallopt).
        return False


# Decompression bombs are rejected by PIL above this; ImageNet's largest images
# are far below it, and a larger input is almost surely damaged or hostile.
MAX_PIXELS = schema.MAX_PIXELS
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadImage(ValueError):
    """The input cannot be used as an image; str() is the reason."""


@dataclasses.dataclass
class Processed:
    """The record image and the pixels the colour statistics need.

    Attributes:
      jpeg: RGB JPEG bytes to store.
      height, width: Size of the stored image.
      pixels: The colour statistics' input, (h, w, 3) uint8: the stored image
        before JPEG encoding; with the original size kept (`resize=False`),
        the image at 1/8 scale (8x8 block means).
      square: The stored image again, for the mean image; None when the
        original size is kept (images of many sizes have no mean image).
      source_format: What the content turned out to be (JPEG, PNG, ...).
      source_mode: PIL mode of the input (RGB, CMYK, L, RGBA, ...).
      upscaled: The input's shorter side was below the stored size: it was
        scaled up (a 1x1 input becomes a flat square). False without resizing.
    """

    jpeg: bytes
    height: int
    width: int
    pixels: np.ndarray
    square: np.ndarray
    source_format: str
    source_mode: str
    upscaled: bool = False


def _open(data: bytes) -> Image.Image:
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():  # Sizes between the limit and twice it: process_image refuses them.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised content)") from None
    except Image.DecompressionBombError:  # Twice the limit: PIL refuses to open it.
        raise BadImage(f"above the limit of {MAX_PIXELS:,} decoded pixels (a decompression bomb, or "
                       "damaged)") from None
    except (OSError, ValueError) as e:
        raise BadImage(f"corrupt or truncated image header: {e}") from None
    return img


def served_format(data: bytes) -> str | None:
    """The format serving reads `data` as, by its first bytes (`schema.IMAGE_MAGIC`); None if it refuses it.

    The same test as the exported model's, so that the build stores only what
    serving decodes: by content, as PIL opens WebP, TIFF and others too.
    """
    return next((name for magic, name in schema.IMAGE_MAGIC.items() if data.startswith(magic)), None)


# The colour conversions below are per pixel; they run on bands of this many
# rows, so that besides the decoded image only the RGB result is held whole.
BAND_ROWS = 256
# From this many pixels on, a long thin PNG, GIF or BMP (not reduced) becomes
# RGB only where the scaling reads it: images this large are far from
# ImageNet's (which are converted whole, as they always were).
READ_BOX_PIXELS = 1 << 24


def _band_to_rgb(img: Image.Image) -> Image.Image:
    """The RGB image serving decodes from the same bytes (`tf.io.decode_image(..., channels=3)`)."""
    if img.mode == "RGB":
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit grayscale PNG. TensorFlow decodes to 8 bits by keeping the high
        # byte (libpng's png_set_strip_16: v >> 8, 2000 -> 7); PIL's own
        # conversion would clip (2000 -> 255). 16-bit RGB(A) and gray+alpha PNGs
        # already open as 8-bit RGB(A) in PIL, high byte kept, as in TensorFlow.
        high = np.right_shift(np.asarray(img), 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(high, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent areas become white, as a viewer would show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # CMYK (Adobe inversion handled by PIL), L, P, YCbCr...


def _to_rgb(img: Image.Image, factor: int = 1, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The decoded image (or its `box`) in RGB, reduced `factor` times (box means of factor x factor blocks).

    Converted band by band (pixels as a whole-image conversion gives them):
    the copies of a whole-image conversion (an RGBA input took 13 bytes a
    pixel, 1.3 GB at 10000x10000) are not made; only the result (reduced,
    or of `box`) is held beside the decoded image.
    """
    x0, y0, x1, y1 = box or (0, 0, *img.size)
    if img.mode == "RGB":
        part = img.crop(box) if box else img
        return part.reduce(factor) if factor > 1 else part
    if y1 - y0 <= BAND_ROWS:
        rgb = _band_to_rgb(img.crop(box) if box else img)
        return rgb.reduce(factor) if factor > 1 else rgb
    rows = max(factor, BAND_ROWS - BAND_ROWS % factor)  # Whole blocks per band: the same means as whole.
    out = Image.new("RGB", (-(-(x1 - x0) // factor), -(-(y1 - y0) // factor)))
    for top in range(y0, y1, rows):
        band = _band_to_rgb(img.crop((x0, top, x1, min(y1, top + rows))))
        out.paste(band.reduce(factor) if factor > 1 else band, (0, (top - y0) // factor))
    return out


def _central_square(size: tuple[int, int]) -> tuple[float, float, int]:
    """(left, top, side) of the central square of a (width, height) image."""
    w, h = size
    side = min(w, h)
    return (w - side) / 2, (h - side) / 2, side


def _read_box(size: tuple[int, int], out_size: int) -> tuple[int, int, int, int]:
    """The pixels `_scale_and_crop` reads: the central square and the bicubic filter's reach beyond it."""
    w, h = size
    left, top, side = _central_square(size)
    reach = 2 * max(1.0, side / out_size) + 2  # Bicubic support (2), in source pixels, and rounding.
    return (max(0, math.floor(left - reach)), max(0, math.floor(top - reach)),
            min(w, math.ceil(left + side + reach)), min(h, math.ceil(top + side + reach)))


def _scale_and_crop(img: Image.Image, size: int, square: tuple[float, float, int] | None = None) -> Image.Image:
    """§2: the central size x size of the image rescaled so its shorter side is `size`.

    Cropped in source coordinates, then scaled (one resampling of the central
    square, the filter reading past its edges as a full rescale would): work
    and memory are bounded by size², whatever the shape. A 20000x1 image would
    otherwise be scaled to 5,120,000x256 (about 4 GB) before the crop.
    `square` is (left, top, side) of that square in `img` when `img` holds
    only the part of the image read (`_read_box`).
    """
    left, top, side = square or _central_square(img.size)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def _encode(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def process_image(data: bytes, image_size: int = 256, resize: bool = True, quality: int = 90) -> Processed:
    """Decodes and checks one input; returns the image to store.

    Args:
      data: Raw file bytes.
      image_size: Side of the square the paper stores (256).
      resize: If True, store the central `image_size` square of the image with
        its shorter side scaled to `image_size`. If False, keep the original
        bytes when the input already is a valid RGB JPEG, after checking that
        the whole stream decodes (others are re-encoded at their own size).
      quality: JPEG quality of re-encoded images.

    Returns:
      A `Processed`.

    Raises:
      BadImage: the input is empty, not an image, truncated or corrupt, or of
        a format serving does not decode (only `schema.IMAGE_FORMATS`).
    """
    img = _open(data)
    fmt, mode = img.format or "unknown", img.mode
    if served_format(data) is None:
        # Stored, it would train on images that the exported model refuses.
        raise BadImage(f"{fmt} is not one of the formats serving decodes: {', '.join(schema.IMAGE_FORMATS)}")
    size = source_size = img.size  # (width, height) of the input.
    if size[0] * size[1] > MAX_PIXELS:
        raise BadImage(f"{size[0]}x{size[1]} {fmt}: {size[0] * size[1]:,} pixels, above the limit of "
                       f"{MAX_PIXELS:,} decoded pixels (a decompression bomb, or damaged)")
    keep = not resize and fmt == "JPEG" and mode == "RGB"
    drafted = False
    if keep:
        # The bytes are kept: decoding at 1/8 scale still reads every entropy-coded
        # byte (a truncated or corrupt stream fails), skips the inverse DCTs, and
        # gives the 8x8 block means the colour statistics take in this mode.
        img.draft(mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
    elif resize and served_format(data) == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale when the image is far larger
        # than needed (any JPEG: RGB, grayscale, CMYK): a huge JPEG is never
        # decoded whole; several times faster, and the result is still resampled down.
        scale = image_size / min(size)
        drafted = img.draft(mode, (int(size[0] * scale) + 1, int(size[1] * scale) + 1)) is not None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise BadImage(f"corrupt or truncated {fmt}: {e}") from None
    # PNG, GIF and BMP decode whole (at most MAX_PIXELS); one far larger than
    # needed is reduced by a whole factor, to a shorter side of at least twice
    # `image_size` (as libjpeg's scaling does for JPEGs), as it becomes RGB.
    factor = max(1, min(img.size) // (2 * image_size)) if resize and not drafted else 1
    box = square = None
    if resize and factor == 1 and img.width * img.height >= READ_BOX_PIXELS:
        # A long thin one, not reduced: only the part the scaling reads becomes RGB.
        box = _read_box(img.size, image_size)
        left, top, side = _central_square(img.size)
        square = (left - box[0], top - box[1], side)
    rgb = _to_rgb(img, factor, box)
    if rgb is not img:
        img.close()  # The decoded image's memory, before encoding.
    # The statistics take the pixels as they are before encoding: decoding the
    # JPEG just written would cost a tenth of the work, for a difference far
    # below the lighting noise these statistics scale.
    if resize:
        out = _scale_and_crop(rgb, image_size, square)
        jpeg = _encode(out, quality)
        pixels = square = np.asarray(out)
        size = out.size
    elif keep:
        jpeg, pixels, square = data, np.asarray(rgb), None
    else:
        jpeg = _encode(rgb, quality)
        pixels, square = np.asarray(rgb.reduce(8) if min(size) >= 8 else rgb), None
    return Processed(
        jpeg=jpeg,
        height=size[1],
        width=size[0],
        pixels=pixels,
        square=square,
        source_format=fmt,
        source_mode=mode,
        upscaled=resize and min(source_size) < image_size,
    )
