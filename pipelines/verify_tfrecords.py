"""Re-reads every shard and checks it against metadata.json.

    python -m pipelines.verify_tfrecords --data_dir=tfrecords

Checks: every listed shard exists and no unlisted shard lies beside them; each
shard is byte for byte the file the build wrote (its size and SHA-256 as
metadata.json records them: a shard of another build, two shards swapped, or
one damaged are each named); each holds the number of records metadata.json
says; every label is in range and matches its synset; every image decodes as
a 3-channel JPEG of the size its record states and, for resized builds, of
metadata.json's size; the mean image is there. Exits non-zero with the
problems found.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

from alexnet_tf import records


def _check_record(raw: bytes, where: str, classes, size: int | None) -> list[str]:
    """The problems of one record."""
    import tensorflow as tf

    problems = []
    try:
        ex = records.parse_example(raw)
    except tf.errors.InvalidArgumentError as e:
        return [f"{where}: not a record of this format ({e.message.splitlines()[0]})"]
    label = int(ex[records.LABEL])
    synset = ex[records.SYNSET].numpy().decode()
    where = f"{where} ({ex[records.FILENAME].numpy().decode()})"
    if not 0 <= label < len(classes):
        problems.append(f"{where}: label {label} outside 0..{len(classes) - 1}")
    elif synset != classes[label].synset:
        problems.append(f"{where}: label {label} is {classes[label].synset} but the record says {synset}")
    try:
        image = tf.io.decode_jpeg(ex[records.ENCODED], channels=0)
        h, w, c = image.shape
        if c != 3:
            problems.append(f"{where}: image has {c} channels, expected 3")
        if (h, w) != (int(ex[records.HEIGHT]), int(ex[records.WIDTH])):
            problems.append(f"{where}: image is {h}x{w} but the record says "
                            f"{int(ex[records.HEIGHT])}x{int(ex[records.WIDTH])}")
        elif size is not None and (h, w) != (size, size):
            problems.append(f"{where}: image is {h}x{w} but metadata.json says {size}x{size}")
    except tf.errors.InvalidArgumentError as e:
        problems.append(f"{where}: image does not decode as JPEG ({e.message.splitlines()[0]})")
    return problems


def _check_shard(path: str, shard: records.ShardInfo, meta: records.Metadata, heads: dict) -> tuple[int, list[str]]:
    """Returns (records read, problems) for one shard."""
    import tensorflow as tf

    problems: list[str] = []
    name = os.path.basename(path)
    classes, expected = meta.classes, shard.num_examples
    size = meta.image.square
    digest, count = records.ShardDigest(), 0
    try:
        # One read of the file: the records as they stream past, their bytes into the digest.
        with tf.io.gfile.GFile(path, "rb") as f:
            try:
                for raw in records.read_records(f, tf.io.gfile.stat(path).length, digest):
                    problems.extend(_check_record(raw, f"{name} record {count}", classes, size))
                    count += 1
            except records.DamagedRecord as e:
                problems.append(f"{name}: unreadable after {count} records ({e})")
            digest.update_from(f)  # What follows a damaged record still counts in the digest.
    except tf.errors.OpError as e:
        problems.append(f"{name}: unreadable after {count} records ({e.message.splitlines()[0]})")
    else:
        wrong = shard.sha256 is not None and records.shard_mismatch(shard, digest, heads, full=True)
        if wrong:  # The shard's identity first, then what it holds.
            problems.insert(0, wrong)
    if count != expected:
        problems.append(f"{name}: holds {count} records, metadata.json says {expected}")
    return count, problems


def verify(data_dir: str, workers: int | None = None, progress: bool = True) -> list[str]:
    """Checks a dataset folder; returns the problems found (empty when all is well)."""
    import tensorflow as tf

    try:
        meta = records.load_metadata(data_dir)
    except records.MetadataError as e:
        return [str(e)]
    problems: list[str] = []
    listed = set()
    jobs = []
    for split, info in meta.splits.items():
        for shard in info.shards:
            listed.add(shard.file)
            path = os.path.join(data_dir, shard.file)
            if not tf.io.gfile.exists(path):
                problems.append(f"{shard.file}: listed in metadata.json but missing")
            else:
                jobs.append((path, shard))
    on_disk = {n for n in tf.io.gfile.listdir(data_dir) if records.parse_shard_name(n)}
    for extra in sorted(on_disk - listed):
        problems.append(f"{extra}: shard file not listed in metadata.json (left from another build?)")
    stats = meta.color_stats
    if "train" in meta.splits:
        if stats is None:
            problems.append("metadata.json: color_stats is empty though there is a training split")
        elif stats.mean_image_file is None:
            if meta.image.resized:  # --noresize builds have none: their images differ in size.
                problems.append("metadata.json: color_stats has no mean_image_file")
        else:
            try:
                mean = records.load_mean_image(data_dir, meta)
                if mean.shape != stats.mean_image_shape:
                    problems.append(f"mean image shape {mean.shape} != {stats.mean_image_shape}")
            except (OSError, ValueError, tf.errors.OpError) as e:
                problems.append(f"mean image {stats.mean_image_file} unreadable: {e}")

    if jobs and all(shard.sha256 is None for _, shard in jobs):
        print("verify_tfrecords: note: metadata.json records no shard digests (built by an earlier version): "
              "the shards' bytes are not checked against the build's; a rebuild records them", file=sys.stderr)
    heads = meta.shards_by_head()
    start, done, total = time.monotonic(), 0, sum(shard.num_examples for _, shard in jobs)
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(_check_shard, path, shard, meta, heads) for path, shard in jobs]
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            count, found = fut.result()
            done += count
            problems.extend(found)
            if progress and (i == len(futures) or i % 50 == 0):
                rate = done / max(time.monotonic() - start, 1e-9)
                print(f"verify_tfrecords: {i}/{len(futures)} shards, {done}/{total} records "
                      f"({rate:.0f} records/s)", file=sys.stderr)
    return problems


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.verify_tfrecords", description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="tfrecords", help="Folder with the shards and metadata.json.")
    p.add_argument("--workers", type=int, default=None, help="Shards checked in parallel (default: cores).")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    problems = verify(args.data_dir, args.workers)
    if problems:
        for line in problems[:50]:
            print(f"verify_tfrecords: error: {line}", file=sys.stderr)
        if len(problems) > 50:
            print(f"verify_tfrecords: ... and {len(problems) - 50} more problems", file=sys.stderr)
        sys.exit(1)
    meta = records.load_metadata(args.data_dir)
    counts = ", ".join(f"{s} {i.num_examples} in {i.num_shards} shards" for s, i in meta.splits.items())
    print(f"verify_tfrecords: OK {args.data_dir}: {counts}; {meta.num_classes} classes")


if __name__ == "__main__":
    main()
