"""Tests of `pipelines.image_processing`: any decodable input to an RGB JPEG, in bounded memory."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from tfrecords import schema
from conftest import blocky_image as _image, encode_array as _encode
from pipelines import image_processing


# -- image_processing ---------------------------------------------------------


def test_shorter_side_scaled_then_central_crop():
    # 300 wide, 600 high: scaled to 256x512, the central 256 rows are kept.
    a = np.zeros((600, 300, 3), np.uint8)
    a[:150] = (255, 0, 0)  # Top quarter red: cropped away.
    a[150:450] = (0, 255, 0)  # Middle half green: exactly the kept part.
    a[450:] = (0, 0, 255)
    out = image_processing.process_image(_encode(a, quality=95))
    assert out.pixels.shape == (256, 256, 3) and (out.height, out.width) == (256, 256)
    mean = out.pixels[8:-8].reshape(-1, 3).mean(axis=0)
    assert mean[1] > 240 and mean[0] < 15 and mean[2] < 15


def test_small_images_are_scaled_up_and_say_so():
    out = image_processing.process_image(_encode(_image(100, 180)))
    assert out.pixels.shape == (256, 256, 3) and out.upscaled
    # Upscaled: the shorter side below the stored size, whatever the format; not at or above it.
    for (h, w), fmt, upscaled in [((1, 1), "PNG", True), ((255, 900), "JPEG", True), ((256, 300), "JPEG", False),
                                  ((2000, 3000), "JPEG", False), ((600, 300), "PNG", False)]:
        assert image_processing.process_image(_encode(_image(h, w), fmt)).upscaled is upscaled, (h, w)
    assert image_processing.process_image(_encode(_image(100, 180)), image_size=64).upscaled is False
    assert image_processing.process_image(_encode(_image(100, 180)), resize=False).upscaled is False  # Kept size.


@pytest.mark.parametrize(
    "fmt, mode", [("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("BMP", "RGB")]
)
def test_any_decodable_content_becomes_an_rgb_jpeg(fmt, mode):
    out = image_processing.process_image(_encode(_image(200, 300), fmt, mode))
    img = Image.open(io.BytesIO(out.jpeg))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (256, 256))
    assert (out.source_format, out.source_mode) == (fmt, mode)
    # `pixels` are the image before encoding: the stored JPEG is them up to JPEG noise.
    assert out.pixels.shape == (256, 256, 3) and out.pixels.dtype == np.uint8
    stored = np.asarray(img).reshape(-1, 3).astype(float)
    np.testing.assert_allclose(stored.mean(axis=0), out.pixels.reshape(-1, 3).mean(axis=0), atol=2)
    assert np.abs(stored - out.pixels.reshape(-1, 3)).mean() < 16  # Random colour blocks: chroma loss.


def test_cmyk_colours_survive_conversion():
    a = np.zeros((64, 64, 3), np.uint8)
    a[:] = (200, 30, 30)
    out = image_processing.process_image(_encode(a, "JPEG", "CMYK", quality=95))
    r, g, b = out.pixels.reshape(-1, 3).mean(axis=0)
    assert r > 150 and g < 80 and b < 80, (r, g, b)


def _png16(array) -> bytes:
    """A 16-bit PNG of a (h, w, c) uint16 array (c: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA); PIL writes only gray."""
    import struct
    import zlib

    h, w, c = array.shape
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_pngs_become_the_8_bits_tensorflow_decodes(channels):
    import tensorflow as tf

    # 0, 257 (1 in the high byte), 2000 (7), 65535 and the edges between 8-bit levels,
    # then random values; 256x256 so the stored square is the decoded image itself.
    edges = [0, 1, 255, 256, 257, 383, 384, 2000, 32767, 32768, 65279, 65280, 65534, 65535]
    array = np.random.default_rng(channels).integers(0, 65536, (256, 256, channels)).astype(np.uint16)
    array[0, :len(edges), 0] = edges
    if channels in (2, 4):
        array[..., -1] = 65535  # Opaque: TensorFlow drops alpha, the build puts it on white.
    data = _png16(array)
    served = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    assert list(served[0, [0, 4, 7, 13], 0]) == [0, 1, 7, 255]  # 2000 -> 7 (high byte), not 8 (rounded).
    out = image_processing.process_image(data)
    np.testing.assert_array_equal(out.square, served)
    if channels == 1:
        assert out.source_mode == "I;16"


def test_transparent_areas_become_white():
    a = np.zeros((64, 64, 4), np.uint8)  # Fully transparent black.
    out = image_processing.process_image(_encode(a, "PNG"))
    assert out.pixels.min() > 245


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"<html>not found</html>", "not an image"),
        (_encode(_image(300, 300))[:2000], "truncated"),
    ],
)
def test_undecodable_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(image_processing.BadImage, match=reason):
        image_processing.process_image(data)


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF"])
@pytest.mark.parametrize("resize", [True, False])
def test_formats_serving_does_not_decode_are_rejected_with_the_list(fmt, resize):
    # PIL opens them; the exported model refuses them (schema.IMAGE_MAGIC), so the build must too.
    with pytest.raises(image_processing.BadImage) as e:
        image_processing.process_image(_encode(_image(300, 300), fmt), resize=resize)
    assert str(e.value) == f"{fmt} is not one of the formats serving decodes: JPEG, PNG, GIF, BMP"
    assert schema.IMAGE_FORMATS == ("JPEG", "PNG", "GIF", "BMP")  # The one list, both sides.
    for served in ("JPEG", "PNG", "GIF", "BMP"):
        assert image_processing.served_format(_encode(_image(16, 16), served)) == served


@pytest.mark.parametrize("side", [12_000, 30_000])  # 1.07x and 6.7x the limit (PIL refuses at 2x itself).
def test_images_above_the_decoded_pixel_limit_are_rejected_before_decoding(side):
    from conftest import png_claiming

    with pytest.raises(image_processing.BadImage, match="above the limit of 134,217,728 decoded pixels"):
        image_processing.process_image(png_claiming(side, side))


def test_noresize_keeps_rgb_jpeg_bytes_and_converts_others():
    jpeg = _encode(_image(200, 300))
    out = image_processing.process_image(jpeg, resize=False)
    # Kept bytes; the statistics see the image at 1/8 scale (8x8 block means); no mean-image square.
    assert out.jpeg == jpeg and (out.height, out.width) == (200, 300) and out.square is None
    assert out.pixels.shape == (25, 38, 3)
    full = np.asarray(Image.open(io.BytesIO(jpeg))).astype(float)
    np.testing.assert_allclose(out.pixels.reshape(-1, 3).mean(axis=0), full.reshape(-1, 3).mean(axis=0), atol=1.5)
    gray = image_processing.process_image(_encode(_image(200, 300), mode="L"), resize=False)
    assert Image.open(io.BytesIO(gray.jpeg)).mode == "RGB" and (gray.height, gray.width) == (200, 300)
    assert gray.pixels.shape == (25, 38, 3)
    with pytest.raises(image_processing.BadImage, match="truncated"):
        image_processing.process_image(jpeg[: len(jpeg) // 2], resize=False)  # Checked though kept.


def test_long_thin_images_take_bounded_memory():
    # Cropped in source coordinates before scaling: a 20000x1 PNG (about 100 bytes)
    # would otherwise be scaled to 5,120,000x256 first (about 4 GB).
    import subprocess
    import sys

    code = (
        "import io, re, numpy as np\n"
        "from PIL import Image\n"
        "from pipelines import image_processing\n"
        "buf = io.BytesIO()\n"
        "Image.fromarray(np.full((1, 20000, 3), 200, np.uint8)).save(buf, format='PNG')\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # Resets the peak (VmHWM) to the current size.\n"
        "out = image_processing.process_image(buf.getvalue())\n"
        "peak = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
        "print(out.pixels.shape, int(out.pixels.mean()), peak)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    shape, mean, peak_mib = proc.stdout.rsplit(" ", 2)
    assert shape == "(256, 256, 3)" and int(mean) in (199, 200, 201)
    assert int(peak_mib) < 300, f"peak {peak_mib} MiB"


_PEAK_CODE = """
import gc, io, re, sys, numpy as np
from PIL import Image
from pipelines import image_processing
fmt, mode, (width, height) = sys.argv[1], sys.argv[2], map(int, sys.argv[3].split("x"))
x, y = np.linspace(0, 255, width).astype(np.uint8), np.linspace(0, 255, height).astype(np.uint8)
a = np.stack([np.add.outer(y // 2, x // 2), np.add.outer(y // 4, x // 2), np.add.outer(y // 2, x // 4)], -1)
a[::7, ::5] = 90  # Some detail.
buf = io.BytesIO()
Image.fromarray(a).convert(mode).save(buf, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
data = buf.getvalue()
del a, buf
gc.collect()
def kib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")  # Resets the peak (VmHWM) to the current size.
before = kib("VmRSS")
out = image_processing.process_image(data, resize=sys.argv[4] == "resize")
print(out.width, out.height, (kib("VmHWM") - before) * 1024 / (width * height))
"""


# 9 million pixels, and a long thin 17 million; the bounds are per input pixel (schema.MAX_PIXELS at most).
@pytest.mark.parametrize("fmt, mode, size, resize, bytes_per_pixel", [
    ("JPEG", "CMYK", "3000x3000", "resize", 0.5),  # Decoded at 1/8 scale: 8 bytes a pixel before (CMYK, RGB).
    ("JPEG", "L", "3000x3000", "resize", 0.5),
    ("PNG", "RGBA", "3000x3000", "resize", 6.0),  # Decoded whole (4 bytes a pixel), reduced as it becomes RGB; 13.
    ("PNG", "P", "3000x3000", "resize", 2.0),  # Decoded whole (1 byte a pixel).
    ("PNG", "RGBA", "17000x1000", "resize", 5.0),  # Long thin: only the central square becomes RGB; 13 before.
    ("PNG", "RGBA", "3000x3000", "noresize", 10.0),  # Own size: decoded, its RGB copy (8) and bands; 13 before.
])
def test_per_image_memory_is_bounded(fmt, mode, size, resize, bytes_per_pixel):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PEAK_CODE, fmt, mode, size, resize], capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    width, height, per_pixel = proc.stdout.split()
    assert f"{width}x{height}" == ("256x256" if resize == "resize" else size)
    assert float(per_pixel) < bytes_per_pixel, f"{float(per_pixel):.2f} bytes a pixel at the peak"


def test_banded_and_reduced_conversion_gives_the_whole_images_pixels():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (700, 301, 4), dtype=np.uint8)  # Taller than a band, not a whole number of them.
    rgba = Image.fromarray(a, "RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    for img, whole in [(rgba, white), (Image.fromarray(a[..., :3]).convert("P"), None),
                       (Image.fromarray(a[..., :3]).convert("CMYK"), None), (Image.fromarray(a[..., 0]), None)]:
        whole = whole or img.convert("RGB")
        for factor in (1, 2, 3, 7):
            expected = whole.reduce(factor) if factor > 1 else whole
            assert np.array_equal(np.asarray(image_processing._to_rgb(img, factor)), np.asarray(expected)), (
                img.mode, factor)
    # Far larger than needed: reduced to a shorter side of at least 2 x 256 first, close to resampling the whole.
    big = _image(1600, 1100)
    out = image_processing.process_image(_encode(big, "PNG"))
    full = np.asarray(Image.fromarray(big).resize((256, 256), Image.Resampling.BICUBIC, box=(0, 250, 1100, 1350)))
    assert np.abs(out.square.astype(int) - full).mean() < 2
    # A long thin one, from READ_BOX_PIXELS on: converted only where the scaling reads it, as if whole.
    rgba = np.random.default_rng(1).integers(0, 256, (80, 38, 4), dtype=np.uint8)
    a = np.kron(rgba, np.ones((12, 480, 1), np.uint8))  # 960 x 18240 (not reduced), 17.5 million pixels.
    assert a.shape[0] * a.shape[1] >= image_processing.READ_BOX_PIXELS
    whole = Image.new("RGB", (a.shape[1], a.shape[0]), (255, 255, 255))
    whole.paste(Image.fromarray(a, "RGBA"), mask=Image.fromarray(a[..., 3]))
    left = (a.shape[1] - a.shape[0]) / 2
    expected = whole.resize((256, 256), Image.Resampling.BICUBIC, box=(left, 0, left + a.shape[0], a.shape[0]))
    out = image_processing.process_image(_encode(a, "PNG", compress_level=1))
    assert np.abs(out.square.astype(int) - np.asarray(expected)).max() <= 1
