"""The build's per-image work as a bare loop: the limit `build_tfrecords` is measured against.

    python -m benchmarks.bare_build RAW_DIR [--processes N] [--noresize]

One process per core (multiprocessing), no Beam, no TensorFlow: list the
images with the pipeline's own planning and listing (`imagenet_layout`,
`members`: headers and names only), then for every image read its bytes, decode,
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
import time

_START = time.perf_counter()

from pipelines import color_stats, image_processing, imagenet_layout, members  # noqa: E402


def list_members(raw_dir: str) -> list[tuple[str, members.Member]]:
    """(split, member) of every image, listed by headers and names only: the pipeline's own
    planning and listing, here in this one process."""
    layout = imagenet_layout.plan(raw_dir)
    return [(unit.split, m) for s in layout.splits.values() for unit in s.units for m in members.list_unit(unit)]


def _work(args):
    chunk, resize = args
    image_processing.keep_large_blocks()  # As the build's workers do.
    sums, rejected, reader = color_stats.PixelSums(), 0, members.MemberReader()
    for split, member in chunk:
        try:
            out = image_processing.process_image(reader.read(member), 256, resize, 90)
        except image_processing.BadImage:
            rejected += 1
            continue
        if split == "train":
            sums.add(out.pixels, out.square)
    reader.close()
    return sums, len(chunk), rejected


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bare_build", description=__doc__.splitlines()[0])
    p.add_argument("raw_dir")
    p.add_argument("--processes", type=int, default=os.cpu_count())
    p.add_argument("--noresize", dest="resize", action="store_false")
    p.add_argument("--chunk", type=int, default=32, help="Images a task.")
    args = p.parse_args(argv)
    members = list_members(args.raw_dir)
    chunks = [(members[i:i + args.chunk], args.resize) for i in range(0, len(members), args.chunk)]
    total, images, rejected = color_stats.PixelSums(), 0, 0
    with multiprocessing.Pool(args.processes) as pool:
        for sums, n, bad in pool.imap_unordered(_work, chunks):
            total.merge(sums)
            images += n
            rejected += bad
    print(json.dumps({"images": images, "rejected": rejected, "seconds": time.perf_counter() - _START,
                      "mean_rgb": color_stats.summarize(total)[0].get("mean_rgb"), "processes": args.processes,
                      "frameworks_loaded": sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "apache_beam"})}))


if __name__ == "__main__":
    main()
