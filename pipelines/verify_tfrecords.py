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

import concurrent.futures
import itertools
import json
import os
import sys
import time

from absl import flags

from tfrecords import fileio, framing, integrity, metadata, schema
from toolcli.command import Command

from tfrecords.folder import Records

# Fields of metadata.json that differ between two builds of the same input.
UNCOMPARED = (("created",), ("build", "seconds"))
_CHUNK = 1 << 20


def _check_record(raw: bytes, where: str, classes, size: int | None) -> list[str]:
    """The problems of one record."""
    import tensorflow as tf

    problems = []
    try:
        ex = schema.parse_example(raw)
    except tf.errors.InvalidArgumentError as e:
        return [f"{where}: not a record of this format ({e.message.splitlines()[0]})"]
    label = int(ex[schema.LABEL])
    synset = ex[schema.SYNSET].numpy().decode()
    where = f"{where} ({ex[schema.FILENAME].numpy().decode()})"
    if not 0 <= label < len(classes):
        problems.append(f"{where}: label {label} outside 0..{len(classes) - 1}")
    elif synset != classes[label].synset:
        problems.append(f"{where}: label {label} is {classes[label].synset} but the record says {synset}")
    try:
        image = tf.io.decode_jpeg(ex[schema.ENCODED], channels=0)
        h, w, c = image.shape
        if c != 3:
            problems.append(f"{where}: image has {c} channels, expected 3")
        if (h, w) != (int(ex[schema.HEIGHT]), int(ex[schema.WIDTH])):
            problems.append(f"{where}: image is {h}x{w} but the record says "
                            f"{int(ex[schema.HEIGHT])}x{int(ex[schema.WIDTH])}")
        elif size is not None and (h, w) != (size, size):
            problems.append(f"{where}: image is {h}x{w} but metadata.json says {size}x{size}")
    except tf.errors.InvalidArgumentError as e:
        problems.append(f"{where}: image does not decode as JPEG ({e.message.splitlines()[0]})")
    return problems


def _check_shard(path: str, shard: metadata.ShardInfo, meta: metadata.Metadata, heads: dict) -> tuple[int, list[str]]:
    """Returns (records read, problems) for one shard."""
    import tensorflow as tf

    problems: list[str] = []
    name = os.path.basename(path)
    classes, expected = meta.classes, shard.num_examples
    size = meta.image.square
    digest, count = integrity.ShardDigest(), 0
    try:
        # One read of the file: the records as they stream past, their bytes into the digest.
        with tf.io.gfile.GFile(path, "rb") as f:
            try:
                for raw in framing.read_records(f, tf.io.gfile.stat(path).length, digest):
                    problems.extend(_check_record(raw, f"{name} record {count}", classes, size))
                    count += 1
            except framing.DamagedRecord as e:
                problems.append(f"{name}: unreadable after {count} records ({e})")
            digest.update_from(f)  # What follows a damaged record still counts in the digest.
    except tf.errors.OpError as e:
        problems.append(f"{name}: unreadable after {count} records ({e.message.splitlines()[0]})")
    else:
        wrong = shard.sha256 is not None and integrity.shard_mismatch(shard, digest, heads, full=True)
        if wrong:  # The shard's identity first, then what it holds.
            problems.insert(0, wrong)
    if count != expected:
        problems.append(f"{name}: holds {count} records, metadata.json says {expected}")
    return count, problems


def verify(data_dir: str, workers: int | None = None, progress: bool = True) -> list[str]:
    """Checks a dataset folder; returns the problems found (empty when all is well)."""
    import tensorflow as tf

    try:
        meta = metadata.load_metadata(data_dir)
    except metadata.MetadataError as e:
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
    on_disk = {n for n in tf.io.gfile.listdir(data_dir) if schema.parse_shard_name(n)}
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
                mean = Records(data_dir, meta).mean_image
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


def dataset_files(data_dir: str, partial: bool = False) -> list[str]:
    """The names of a dataset's files in `data_dir`: shards, the mean image, metadata.json.

    Args:
      data_dir: The folder; one that does not exist holds none.
      partial: Also name the partial copies of those files (`<name>.tmp-<id>`) that a killed build
        leaves, as a build replacing the dataset removes them too.

    Returns:
      The names, sorted.
    """
    if not fileio.isdir(data_dir):
        return []
    ours = []
    for name in fileio.listdir(data_dir):
        base = name.split(".tmp-")[0] if partial else name
        if base in (schema.METADATA_FILE, schema.MEAN_IMAGE_FILE) or schema.parse_shard_name(base) is not None:
            ours.append(name)
    return sorted(ours)


def _first_difference(path: str, other: str) -> str | None:
    """None when the two files hold the same bytes, else where they first differ."""
    with fileio.open_file(path) as f, fileio.open_file(other) as g:
        offset = 0
        while True:
            a, b = f.read(_CHUNK), g.read(_CHUNK)
            if a != b:
                common = min(len(a), len(b))
                at = next((i for i in range(common) if a[i] != b[i]), common)
                if at == common and len(a) != len(b):
                    return f"one ends at byte {offset + common}, the other goes on"
                return f"first at byte {offset + at}"
            if not a:
                return None
            offset += len(a)


def _json_differences(a, b, path: tuple, names: tuple[str, str]) -> list[str]:
    """One line per field that differs, named by its JSON path (`splits.train.shards[3].sha256`).

    `names` are the two folders, to say which holds what.
    """
    if path in UNCOMPARED:
        return []
    where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
    if isinstance(a, dict) and isinstance(b, dict):
        lines = []
        for key in sorted(a.keys() | b.keys()):
            if key not in b or key not in a:
                lines.append(f"{where + '.' if where else ''}{key}: only in {names[0] if key in a else names[1]}")
            else:
                lines += _json_differences(a[key], b[key], (*path, key), names)
        return lines
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items in {names[0]}, {len(b)} in {names[1]}"]
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in _json_differences(x, y, (*path, i), names)]
    # As written: 1 and 1.0, or two floats a last bit apart, are different values in the file.
    if json.dumps(a) != json.dumps(b):
        return [f"{where}: {json.dumps(a)[:60]} in {names[0]}, {json.dumps(b)[:60]} in {names[1]}"]
    return []


def _load_json(path: str):
    try:
        with fileio.open_file(path, "r") as f:
            return json.load(f), None
    except (OSError, ValueError) as e:
        return None, f"{schema.METADATA_FILE}: unreadable in {os.path.dirname(path)} ({e})"


def _file_differences(name: str, data_dir: str, other: str) -> list[str]:
    """The differences of one file present in both folders."""
    path, path_other = os.path.join(data_dir, name), os.path.join(other, name)
    if name == schema.METADATA_FILE:
        (meta, error), (meta_other, error_other) = _load_json(path), _load_json(path_other)
        if error or error_other:
            return [e for e in (error, error_other) if e]
        return [f"{name}: {line}" for line in _json_differences(meta, meta_other, (), (data_dir, other))]
    where = _first_difference(path, path_other)
    return [f"{name}: bytes differ ({where})"] if where else []


def compare(data_dir: str, other: str, workers: int | None = None) -> tuple[list[str], int]:
    """Compares two builds' datasets.

    Args:
      data_dir: One dataset folder.
      other: The folder it should equal.
      workers: Files compared in parallel (default: cores).

    Returns:
      (differences, files compared): a line per differing file, and per
      differing metadata.json field (by its JSON path, `created` and
      `build.seconds` not compared); no lines when the two are the same dataset.
    """
    for side in (data_dir, other):
        if not fileio.isdir(side):
            return [f"{side}: no such folder"], 0
    mine, theirs = set(dataset_files(data_dir)), set(dataset_files(other))
    lines = [f"{name}: in {data_dir} only" for name in sorted(mine - theirs)]
    lines += [f"{name}: missing from {data_dir} (in {other})" for name in sorted(theirs - mine)]
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for found in pool.map(_file_differences, sorted(mine & theirs), itertools.repeat(data_dir),
                              itertools.repeat(other)):
            lines += found
    return lines, len(mine | theirs)


def _report(problems: list[str]) -> None:
    for line in problems[:50]:
        print(f"verify_tfrecords: error: {line}", file=sys.stderr)
    if len(problems) > 50:
        print(f"verify_tfrecords: ... and {len(problems) - 50} more problems", file=sys.stderr)


def define_flags() -> flags.FlagValues:
    """The verifier's flags, on a FlagValues of their own."""
    fv = flags.FlagValues()
    flags.DEFINE_string("data_dir", "data", "Folder with the shards and metadata.json.", flag_values=fv)
    flags.DEFINE_integer("workers", None, "Shards checked (or compared) in parallel (default: cores).", flag_values=fv)
    flags.DEFINE_string("same_as", None, "Another build's folder: compare the two (bytes of every shard and the mean "
                        "image, metadata.json but its `created` and `build.seconds`) instead of verifying.",
                        flag_values=fv)
    return fv


COMMAND = Command("verify_tfrecords", "python -m pipelines.verify_tfrecords --data_dir=DIR [--same_as=DIR]", __doc__)


def main(argv: list[str] | None = None) -> None:
    args, _ = COMMAND.parse(define_flags(), argv)
    if args.same_as is not None:
        differences, count = compare(args.data_dir, args.same_as, args.workers)
        if differences:
            _report(differences)
            sys.exit(1)
        print(f"verify_tfrecords: same dataset as {args.same_as} ({count} files)")
        return
    problems = verify(args.data_dir, args.workers)
    if problems:
        _report(problems)
        sys.exit(1)
    meta = metadata.load_metadata(args.data_dir)
    counts = ", ".join(f"{s} {i.num_examples} in {i.num_shards} shards" for s, i in meta.splits.items())
    print(f"verify_tfrecords: OK {args.data_dir}: {counts}; {meta.num_classes} classes")


if __name__ == "__main__":
    main()
