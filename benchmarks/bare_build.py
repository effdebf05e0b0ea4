"""The build's per-image work as a bare loop: the limit `build_tfrecords` is measured against.

    python -m benchmarks.bare_build RAW_DIR [--processes N] [--noresize]

One process per core (multiprocessing), no Beam, no TensorFlow: list the
archives' members with `tarfile`, then for every image read its bytes, decode,
convert, scale and crop to 256, encode, and add its pixels to the colour
statistics, with the same functions the pipeline calls
(`image_processing.process_image`, `color_stats.PixelSums`). Nothing is written:
the records' framing and the file writes are the pipeline's extra work.

Prints one JSON line: images, rejected, seconds (from the first import to the
end), the colour statistics' mean (a check that the work was done) and which
of TensorFlow and Beam were loaded (none).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tarfile
import time

_START = time.perf_counter()

from pipelines import color_stats, image_processing  # noqa: E402

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"


def list_members(raw_dir: str) -> list[tuple[str, str, int, int]]:
    """(split, archive, offset, size) of every image in the two archives, by headers only."""
    out = []
    train = os.path.join(raw_dir, TRAIN_TAR)
    with open(train, "rb") as f, tarfile.open(fileobj=f, mode="r:") as outer:
        for info in outer:
            with tarfile.open(fileobj=_Slice(f, info.offset_data, info.size), mode="r:") as inner:
                out += [("train", train, info.offset_data + m.offset_data, m.size) for m in inner if m.isfile()]
    val = os.path.join(raw_dir, VAL_TAR)
    with tarfile.open(val, mode="r:") as tar:
        out += [("validation", val, m.offset_data, m.size) for m in tar if m.isfile()]
    return out


class _Slice:
    """Bytes [start, start + size) of an open file, as a seekable file for tarfile."""

    def __init__(self, f, start, size):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def read(self, n=-1):
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(max(n, 0))
        self.pos += len(data)
        return data


def _work(args):
    chunk, resize = args
    sums, rejected, files = color_stats.PixelSums(), 0, {}
    for split, path, offset, size in chunk:
        f = files.get(path) or files.setdefault(path, open(path, "rb"))
        f.seek(offset)
        try:
            out = image_processing.process_image(f.read(size), 256, resize, 90)
        except image_processing.BadImage:
            rejected += 1
            continue
        if split == "train":
            sums.add(out.pixels, out.square)
    return sums.moments(), len(chunk), rejected


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bare_build", description=__doc__.splitlines()[0])
    p.add_argument("raw_dir")
    p.add_argument("--processes", type=int, default=os.cpu_count())
    p.add_argument("--noresize", dest="resize", action="store_false")
    p.add_argument("--chunk", type=int, default=32, help="Images a task.")
    args = p.parse_args(argv)
    members = list_members(args.raw_dir)
    chunks = [(members[i:i + args.chunk], args.resize) for i in range(0, len(members), args.chunk)]
    total, images, rejected = color_stats.Moments(), 0, 0
    with multiprocessing.Pool(args.processes) as pool:
        for moments, n, bad in pool.imap_unordered(_work, chunks):
            total.merge(moments)
            images += n
            rejected += bad
    print(json.dumps({"images": images, "rejected": rejected, "seconds": time.perf_counter() - _START,
                      "mean_rgb": total.mean.tolist(), "processes": args.processes,
                      "frameworks_loaded": sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "apache_beam"})}))


if __name__ == "__main__":
    main()
