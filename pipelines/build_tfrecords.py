r"""Raw ILSVRC2012 -> sharded TFRecords, colour statistics and metadata.json.

    python -m pipelines.build_tfrecords                       # the embedded sample
    python -m pipelines.build_tfrecords --imagenet_dir=/data/imagenet --output_dir=tfrecords
    python -m pipelines.build_tfrecords --imagenet_dir=gs://b/imagenet --output_dir=gs://b/tfrecords \
        --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp
    python -m pipelines.build_tfrecords --imagenet_dir=/shared/imagenet --output_dir=/shared/tfrecords \
        --runner=DaskRunner --dask_client_address=tcp://scheduler:8786    # pip install 'alexnet-tf[dask]'

Flags below are this pipeline's; every other argument goes to Beam's
`PipelineOptions` (runner, workers, cloud options; `pipelines.runners`). On the
default local runner all cores are used (multi-processing).

This module is the driver: it plans the reading (`imagenet_layout`), runs
`transforms.BuildRecords` (list members -> assign shards -> write shards, with
colour statistics and counts; each step a named composite transform), then
checks read = written + rejected per split and writes mean_image.npy and
metadata.json (typed: `records.Metadata`) last, atomically.

Each build writes into a staging folder of its own inside --output_dir
(marked with the build's id) and moves the checked dataset in at the end: a
failed, killed or out-of-space build leaves the folder's dataset as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

from alexnet_tf import fileio, records
from pipelines import imagenet_layout, members, runners, transforms
from pipelines.runners import BUNDLE_ERROR_LOGGERS, LOCAL_RUNNERS, BuildError

log = logging.getLogger("pipelines.build_tfrecords")

LOCK_FILE = ".build.lock"  # Inside the output folder while a build writes there.
# Every build writes into a folder of its own inside the output folder,
# `.staging-<build id>/`, and moves the dataset out of it only once it is
# complete and checked: a failed or killed build never leaves a partial
# dataset, and the workers of a killed build, which may go on writing for a
# while, write only into their own folder, which no later build uses.
STAGING_PREFIX = ".staging-"
BUILD_DIR = "_build"  # Scratch folder inside the staging folder.
# Marks a folder as made by a build, naming it (JSON: build id, host, pid,
# start time). A build removes only folders whose marker it finds; a folder
# of the same name without one is the user's and is left alone.
MARKER_FILE = ".alexnet-tf-build.json"
# The build's id, set in the driver's environment while it runs, so that the
# local worker processes it starts inherit it: a later build finds the
# workers of a killed one by it (Linux /proc) and waits for them to end
# before removing that build's folder.
BUILD_ENV = "ALEXNET_TF_BUILD"
# How long a build waits for the leftover workers of a killed build to end;
# past it their folder is left in place (named) and the build goes on.
ORPHAN_WAIT_S = 300.0
# --image_size: at least the network's 227x227 input patches (alexnet_tf.preprocessing.CROP;
# the trainer refuses smaller records), at most 1024, 4x the paper's 256: per worker the
# image, its JPEG and the int64 mean-image sum grow with its square (about 25 MB at 1024,
# 1.5 GB at 8000).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 227, 1024
# The pipeline's pieces, re-exported: the driver below only plans and finishes.
BuildConfig, BuildRecords = transforms.BuildConfig, transforms.BuildRecords


# ---------------------------------------------------------------------------
# Driver.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.build_tfrecords",
        description="Raw ILSVRC2012 (archives or extracted folders) -> sharded TFRecords + metadata.json. "
        "Unknown arguments go to Apache Beam's PipelineOptions (e.g. --runner=DataflowRunner, or "
        "--runner=DaskRunner --dask_client_address=tcp://HOST:8786 on a dask.distributed cluster).",
    )
    p.add_argument("--imagenet_dir", default=None,
                   help="Folder with ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar, or extracted "
                   "train/<synset>/ and val/ (flat or per synset). Only regular files (or links to them) of at most "
                   f"{members.MAX_MEMBER_BYTES // 2**20} MiB are read as images; others are rejected. Default: the "
                   "embedded sample, built into a cache folder on first use.")
    p.add_argument("--val_labels", default=None,
                   help="Validation labels, one synset per line in file-number order. Default: "
                   "<imagenet_dir>/validation_labels.txt if present, else the 50,000-line ILSVRC2012 "
                   "list shipped with tensorflow-datasets. UTF-8 (a byte-order mark is allowed) or UTF-16 with "
                   f"its mark, at most {imagenet_layout.MAX_LABEL_FILE_BYTES // 2**20} MiB.")
    p.add_argument("--output_dir", default="tfrecords",
                   help="Where shards and metadata.json go; outside --imagenet_dir.")
    p.add_argument("--train_shards", type=int, default=1024)
    p.add_argument("--validation_shards", type=int, default=128)
    p.add_argument("--image_size", type=int, default=256,
                   help="§2 of the paper: shorter side scaled to this, then the central square is stored; "
                   f"{MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (the network's {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} patches "
                   "are cut from it).")
    p.add_argument("--noresize", dest="resize", action="store_false",
                   help="Keep the original JPEG bytes of valid RGB JPEGs (others are re-encoded at their size).")
    p.add_argument("--jpeg_quality", type=int, default=90, help="Quality of re-encoded JPEGs.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the shuffled training order.")
    p.add_argument("--max_reject_fraction", type=float, default=0.01,
                   help="Fail if more than this fraction of the inputs is rejected.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace a dataset already in --output_dir (whole); without it the run refuses.")
    p.add_argument("--sample_dir", default=None,
                   help="Cache folder of the embedded sample (used without --imagenet_dir).")
    return p


def _check_flags(args) -> None:
    if args.train_shards < 1 or args.validation_shards < 1:
        raise BuildError("--train_shards and --validation_shards must be at least 1")
    if not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        raise BuildError(f"--image_size must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (at least the network's "
                         f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} input patches; the paper's is 256), got {args.image_size}")
    if not 1 <= args.jpeg_quality <= 100:
        raise BuildError(f"--jpeg_quality must be in 1..100, got {args.jpeg_quality}")
    if not 0.0 <= args.max_reject_fraction <= 1.0:
        raise BuildError(f"--max_reject_fraction must be in [0, 1], got {args.max_reject_fraction}")


def _existing_dataset(output_dir: str) -> list[str]:
    if not fileio.isdir(output_dir):
        return []
    ours = []
    for name in fileio.listdir(output_dir):
        base = name.split(".tmp-")[0]
        if base in (records.METADATA_FILE, records.MEAN_IMAGE_FILE) or records.parse_shard_name(base) is not None:
            ours.append(name)
    return sorted(ours)


class BuildLock:
    """Holds `<output_dir>/.build.lock` while a build writes into the folder.

    A second build into the same folder stops, naming the holder (host, pid,
    start time). A lock left by a killed build on this host (its pid is gone)
    is stale: it is reported and taken over. On a local disk the lock is
    created atomically (O_EXCL); on gs:// and other remote stores it is a
    check-then-write, which closes all but a race of a few milliseconds.
    """

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.output_dir = output_dir
        now = time.gmtime()
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", now), "argv": sys.argv[1:],
                   "build": f"{time.strftime('%Y%m%dT%H%M%SZ', now)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"}

    def _holder(self) -> dict | None:
        if not fileio.exists(self.path):
            return None
        try:
            with fileio.open_file(self.path, "rb") as f:
                return json.loads(f.read() or b"{}")
        except FileNotFoundError:  # Released meanwhile.
            return None
        except ValueError:  # Half written: its holder is starting.
            return {}

    def _create(self) -> bool:
        body = json.dumps(self.me).encode()
        if fileio.is_remote(self.path):
            if fileio.exists(self.path):
                return False
            with fileio.open_file(self.path, "wb") as f:
                f.write(body)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
        except BaseException:  # A full disk: no empty lock left to stop every later build.
            os.remove(self.path)
            raise
        return True

    def __enter__(self) -> "BuildLock":
        fileio.makedirs(self.output_dir)
        for _ in range(2):
            if self._create():
                return self
            holder = self._holder() or {}
            if holder and holder.get("host") == self.me["host"] and not _alive(holder.get("pid")):
                print(f"build_tfrecords: removing the stale lock of a build that is gone (pid {holder.get('pid')}, "
                      f"started {holder.get('started')})", file=sys.stderr)
                fileio.remove(self.path)
                continue
            raise BuildError(
                f"--output_dir {self.output_dir} is being written by another build (host {holder.get('host', '?')}, "
                f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')}); wait for it to end, or "
                f"remove {self.path} if that build is gone")
        raise BuildError(f"cannot take the lock {self.path}: another build keeps taking it")

    def __exit__(self, *exc) -> None:
        if (self._holder() or {}).get("pid") == self.me["pid"]:
            fileio.remove(self.path)


def _alive(pid) -> bool:
    """Whether a process of this host has `pid` (a malformed pid counts as alive: never steal on doubt)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare_output(output_dir: str, overwrite: bool) -> list[str]:
    """The files of a dataset already in `output_dir` (refused without --overwrite).

    Nothing is removed here: the new dataset is built in the build's own
    staging folder and replaces the old one only when complete (`_swap_in`).
    """
    existing = _existing_dataset(output_dir)
    if existing and not overwrite:
        raise BuildError(
            f"--output_dir {output_dir} already holds a dataset ({len(existing)} files, e.g. "
            f"{existing[0]}); pass --overwrite to replace it whole, or choose another folder"
        )
    return existing


def _read_marker(folder: str) -> dict | None:
    """The marker of a folder a build made, or None (no marker, or not one a build wrote)."""
    path = os.path.join(folder, MARKER_FILE)
    try:
        with fileio.open_file(path, "rb") as f:
            marker = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("build"), str) else None


def _make_staging(output_dir: str, me: dict) -> str:
    """Creates this build's staging folder, marked with `me`; refuses a folder of that name already there."""
    path = os.path.join(output_dir, STAGING_PREFIX + me["build"])
    if fileio.exists(path):
        raise BuildError(f"{path} already exists and has no marker of this build; it is left alone: "
                         "remove it, or choose another --output_dir")
    fileio.makedirs(path)
    try:
        with fileio.open_file(os.path.join(path, MARKER_FILE), "wb") as f:
            f.write(json.dumps(me).encode())
    except BaseException:
        fileio.rmtree(path)  # Made just now, by this process: holds at most a part of the marker.
        raise
    return path


def _remove_build_folder(folder: str, build: str) -> None:
    """Removes a folder that the build `build` made; refuses one whose marker does not name it."""
    marker = _read_marker(folder)
    if marker is None or marker["build"] != build:
        raise BuildError(f"{folder} has no {MARKER_FILE} naming build {build}: not removed, as this build did not "
                         "make it (remove it yourself if it is not yours)")
    fileio.rmtree(folder)


def build_processes(build: str) -> list[int]:
    """Pids of this host's processes that the build `build` started (its local workers).

    Found by `BUILD_ENV` in the environment they were started with (Linux
    /proc; [] where there is none). The driver itself is found by its pid.
    """
    needle = f"{BUILD_ENV}={build}".encode()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # Gone meanwhile, or not ours to read.
            continue
    return sorted(found)


def _wait_for_processes(build: str, timeout_s: float, quiet: bool = False) -> list[int]:
    """Waits until no process of the build `build` runs; returns those still running after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    pids = build_processes(build)
    if pids and not quiet:
        print(f"build_tfrecords: waiting for {len(pids)} process(es) of build {build} to end (pids "
              f"{', '.join(map(str, pids[:10]))}; at most {timeout_s:.0f} s)", file=sys.stderr)
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = build_processes(build)
    return pids


def _clear_gone_builds(output_dir: str, me: dict) -> None:
    """Removes the staging folders of builds that were killed on this host, once their processes are gone.

    Runs under the lock. Only folders with a build's marker are touched; one of
    a build whose driver still runs, or that ran on another host (whose
    processes cannot be seen from here), is left in place and named.
    """
    for name in sorted(fileio.listdir(output_dir)):
        folder = os.path.join(output_dir, name.rstrip("/"))
        if not name.startswith(STAGING_PREFIX) or not fileio.isdir(folder):
            continue
        marker = _read_marker(folder)
        if marker is None or marker["build"] == me["build"]:
            continue  # Not a build's: the user's, left alone.
        build = marker["build"]
        elsewhere = marker.get("host") != me["host"]
        if elsewhere or _alive(marker.get("pid")):
            where = f"on host {marker.get('host')}" if elsewhere else "still running"
            print(f"build_tfrecords: note: {folder} belongs to build {build} ({where}, pid {marker.get('pid')}); "
                  "left in place, remove it once that build is gone", file=sys.stderr)
            continue
        left = _wait_for_processes(build, ORPHAN_WAIT_S)
        if left:
            print(f"build_tfrecords: note: {len(left)} process(es) of build {build} still run after "
                  f"{ORPHAN_WAIT_S:.0f} s (pids {', '.join(map(str, left[:10]))}); {folder} is left in place",
                  file=sys.stderr)
            continue
        fileio.rmtree(folder)
        print(f"build_tfrecords: removed {folder}, left by build {build} (pid {marker.get('pid')}, started "
              f"{marker.get('started')}), which is gone", file=sys.stderr)


def _swap_in(staging: str, output_dir: str, existing: list[str], build: str) -> None:
    """Replaces the old dataset in `output_dir` with the complete one in `staging`, then removes `staging`.

    The old metadata.json goes first and the new one comes last, so a crash in
    between never leaves a metadata.json that describes files of two builds.
    """
    for name in sorted(existing, key=lambda n: n != records.METADATA_FILE):
        path = os.path.join(output_dir, name)
        if fileio.isdir(path):
            fileio.rmtree(path)
        else:
            fileio.remove(path)
    names = [n for n in fileio.listdir(staging)
             if n in (records.METADATA_FILE, records.MEAN_IMAGE_FILE) or records.parse_shard_name(n)]
    for name in sorted(names, key=lambda n: n == records.METADATA_FILE):
        fileio.rename(os.path.join(staging, name), os.path.join(output_dir, name))
    _remove_build_folder(staging, build)


def _disk_full(error: BaseException) -> str | None:
    """"no space left on device" (or "disk quota exceeded") when `error` comes from a full disk, else None.

    Beam hands a worker's error to the driver as text (a RuntimeError naming
    the OSError), so the errno is looked for in the exception chain and in
    the message.
    """
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for code in (errno.ENOSPC, errno.EDQUOT):
            if (isinstance(e, OSError) and e.errno == code) or f"[Errno {code}] {os.strerror(code)}" in str(e):
                return os.strerror(code).lower()
        e = e.__cause__ or e.__context__
    return None


def _beam_options(beam_args: list[str]):
    return runners.beam_options(beam_args, [a.option_strings[-1] for a in _parser()._actions if a.option_strings])


def _finalize(output_dir: str, build_dir: str, layout, args, config: BuildConfig,
              started: float) -> records.Metadata:
    """Checks the pipeline's summary, writes mean_image.npy and metadata.json.

    Returns:
      (metadata, workers): the metadata written, and the worker processes
      (host:pid) that wrote its shards.
    """
    try:
        summary = transforms.read_summary(build_dir)
    except FileNotFoundError:
        raise BuildError("the pipeline ended without writing its summary: the runner skipped its last step; "
                         "nothing was kept") from None
    splits, problems = {}, []
    rejected_by_split: dict[str, int] = {}
    for r in summary["rejected"]:
        rejected_by_split[r["split"]] = rejected_by_split.get(r["split"], 0) + 1
    total_read = total_rejected = 0
    for split in layout.splits:
        shard_list = [s for s in summary["shards"] if s["split"] == split]
        written = sum(s["num_examples"] for s in shard_list)
        read = summary["read"].get(split, 0)
        rejected = rejected_by_split.get(split, 0)
        total_read += read
        total_rejected += rejected
        if split not in summary["read"]:  # Each branch of the pipeline must have run.
            problems.append(f"{split}: no count of the images read (a step of the pipeline did not run)")
        elif read != written + rejected:
            problems.append(f"{split}: read {read} != written {written} + rejected {rejected}")
        for s in shard_list:
            if s["num_examples"] == 0 or not fileio.exists(os.path.join(output_dir, s["file"])):
                problems.append(f"{split}: shard {s['file']} is missing or empty")
        if shard_list and sorted(s["index"] for s in shard_list) != list(range(shard_list[0]["num_shards"])):
            problems.append(f"{split}: shard indices are not 0..{shard_list[0]['num_shards'] - 1}")
        splits[split] = records.SplitInfo(
            num_examples=written,
            num_shards=len(shard_list),
            num_read=read,
            num_rejected=rejected,
            source=layout.splits[split].description,
            shards=[records.ShardInfo(s["file"], s["num_examples"], s.get("bytes"), s.get("sha256"),
                                      s.get("head_sha256")) for s in shard_list],
            num_upscaled=sum(s["num_upscaled"] for s in shard_list),
        )
    if any(s["split"] == "train" and s["num_examples"] for s in summary["shards"]) and not summary["pixel_sums"]:
        problems.append("train: no colour statistics (a step of the pipeline did not run)")
    if problems:
        raise BuildError("inputs lost during the build: " + "; ".join(problems))
    for r in summary["rejected"]:  # A class archive cut at a member boundary: its images are missing.
        if members.TRUNCATED in r["reason"]:
            raise BuildError(r["reason"][r["reason"].index("truncated: "):] + "; metadata.json was not written")
    if total_read and total_rejected / total_read > args.max_reject_fraction:
        examples = "; ".join(f"{r['file']}: {r['reason']}" for r in summary["rejected"][:3])
        raise BuildError(
            f"{total_rejected} of {total_read} inputs rejected ({total_rejected / total_read:.2%}), "
            f"more than --max_reject_fraction={args.max_reject_fraction}; e.g. {examples}. "
            f"metadata.json was not written"
        )
    stats = None
    if summary["color_stats"]:  # {} without training images.
        stats = records.ColorStatsInfo(**summary["color_stats"])
        if summary["mean_image"] is not None:
            tmp = os.path.join(build_dir, records.MEAN_IMAGE_FILE)
            with fileio.open_file(tmp, "wb") as f:
                np.save(f, summary["mean_image"])
            fileio.rename(tmp, os.path.join(output_dir, records.MEAN_IMAGE_FILE))
            stats = dataclasses.replace(stats, mean_image_file=records.MEAN_IMAGE_FILE,
                                        mean_image_shape=(args.image_size, args.image_size, 3))
    meta = records.Metadata(
        format_version=records.FORMAT_VERSION,
        dataset="ILSVRC2012",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        num_classes=len(config.classes),
        classes=[records.ClassInfo(i, s, n) for i, (s, n) in enumerate(zip(config.classes, config.names))],
        splits=splits,
        image=records.ImageInfo(
            size=args.image_size if args.resize else None,
            resized=args.resize,
            jpeg_quality=args.jpeg_quality,
            colorspace="RGB",
            note="shorter side scaled to size (bicubic), central size x size crop (paper §2)"
            if args.resize else "original JPEG bytes kept where valid RGB JPEG",
        ),
        color_stats=stats,
        rejected=[records.Rejection(r["split"], r["file"], r["reason"]) for r in summary["rejected"]],
        build=records.BuildInfo(
            imagenet_dir=layout.imagenet_dir,
            val_labels=layout.val_labels,
            seed=args.seed,
            train_shards=args.train_shards,
            validation_shards=args.validation_shards,
            max_reject_fraction=args.max_reject_fraction,
            seconds=round(time.time() - started, 1),
        ),
    )
    records.write_metadata(output_dir, meta)
    fileio.rmtree(build_dir)
    return meta, sorted({s["worker"] for s in summary["shards"] if s.get("worker")})


def _report(meta: records.Metadata, output_dir: str, skipped: list[str] = (), workers: list[str] = ()) -> str:
    lines = [f"wrote {output_dir}/{records.METADATA_FILE} ({meta.num_classes} classes, {meta.build.seconds} s)"]
    if workers:
        hosts = len({w.rsplit(":", 1)[0] for w in workers})
        shards = sum(info.num_shards for info in meta.splits.values())
        lines.append(f"  workers: {len(workers)} process{'es' * (len(workers) > 1)} on {hosts} "
                     f"host{'s' * (hosts > 1)} wrote the {shards} shards")
    for split, info in meta.splits.items():
        lines.append(
            f"  {split}: {info.num_read} read = {info.num_examples} written "
            f"in {info.num_shards} shards + {info.num_rejected} rejected"
        )
        if info.num_upscaled:
            lines.append(f"  {split}: {info.num_upscaled} of the {info.num_examples} images scaled up (shorter side "
                         f"below {meta.image.size})")
    for r in meta.rejected[:10]:
        lines.append(f"  rejected {r.file}: {r.reason}")
    if len(meta.rejected) > 10:
        lines.append(f"  ... {len(meta.rejected) - 10} more rejected, listed in metadata.json")
    lines += [f"  {line}" for line in skipped]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> records.Metadata:
    """Runs the whole build; returns the metadata written.

    Raises:
      BuildError, imagenet_layout.LayoutError: with a one-line reason.
    """
    args, beam_args = _parser().parse_known_args(argv)
    _check_flags(args)
    started = time.time()
    if args.imagenet_dir is None:
        from pipelines import make_sample

        manifest = make_sample.ensure_sample(args.sample_dir)
        args.imagenet_dir = os.path.dirname(manifest["train_tar"])
        print(f"build_tfrecords: no --imagenet_dir, using the embedded sample in {args.imagenet_dir}",
              file=sys.stderr)
    layout = imagenet_layout.plan(args.imagenet_dir, args.val_labels)
    imagenet_layout.check_output_outside(args.imagenet_dir, args.output_dir)
    print(f"build_tfrecords: {layout.describe()}", file=sys.stderr)
    _check_class_text(layout.classes)
    options = _beam_options(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runners.is_dask(runner):
        print(f"build_tfrecords: runner DaskRunner on {runners.DaskCluster(options).check()}", file=sys.stderr)
    created = not fileio.exists(args.output_dir)
    try:
        with BuildLock(args.output_dir) as lock:
            meta, workers = _build_locked(args, layout, options, runner, started, lock.me)
    except BaseException as e:
        # A folder this run created and left empty goes too.
        if created and fileio.isdir(args.output_dir) and not fileio.listdir(args.output_dir):
            fileio.rmtree(args.output_dir)
        full = None if isinstance(e, BuildError) else _disk_full(e)
        if full:  # Before the pipeline: the lock, the staging folder's marker.
            raise BuildError(f"{full} in --output_dir {args.output_dir}: the build stopped before writing any "
                             "records; free some space (or choose another --output_dir) and run it again") from None
        raise
    print(f"build_tfrecords: {_report(meta, args.output_dir, layout.skipped, workers)}", file=sys.stderr)
    return meta


def _build_locked(args, layout, options, runner, started, me: dict) -> tuple[records.Metadata, list[str]]:
    """The build under the lock: into a staging folder of its own, then swapped in whole.

    On any failure the staging folder is removed and the folder's earlier
    dataset, if any, stays as it was.
    """
    _clear_gone_builds(args.output_dir, me)
    existing = _prepare_output(args.output_dir, args.overwrite)
    staging = _make_staging(args.output_dir, me)
    before = os.environ.get(BUILD_ENV)
    os.environ[BUILD_ENV] = me["build"]  # Inherited by the local workers.
    try:
        built = _build(args, layout, options, runner, started, staging)
    except BaseException as e:
        # Workers the runner started may still be finishing a bundle: let them end first.
        _wait_for_processes(me["build"], 30.0, quiet=True)
        try:
            _remove_build_folder(staging, me["build"])
        except BuildError as unmarked:
            print(f"build_tfrecords: note: {unmarked}", file=sys.stderr)
        full = _disk_full(e)
        if full:
            kept = "; the dataset already there is intact" if existing else ""
            raise BuildError(f"{full} in --output_dir {args.output_dir}: the build stopped and removed what it had "
                             f"written{kept}; free some space (or choose another --output_dir) and run it again"
                             ) from None
        raise
    finally:
        if before is None:
            os.environ.pop(BUILD_ENV, None)
        else:
            os.environ[BUILD_ENV] = before
    _swap_in(staging, args.output_dir, existing, me["build"])
    return built


class TracebackFilter:
    """Drops Python tracebacks from a stream of lines, keeping every other line.

    Beam's SDK worker prints the traceback of every failing bundle to its
    stderr, unconditionally; on the local runner those are this console, and
    the driver reports the same failure once (in one line where it knows it).
    """

    START = "Traceback (most recent call last):"
    CHAINED = ("During handling of the above exception, another exception occurred:",
               "The above exception was the direct cause of the following exception:")

    def __init__(self):
        self.inside = self.ended = False

    def keep(self, line: str) -> bool:
        text = line.rstrip("\r\n")
        if text == self.START or text in self.CHAINED:
            self.inside, self.ended = True, False
            return False
        if self.inside:
            if not text or text.startswith(" "):  # Frames, source lines, carets.
                return False
            self.inside, self.ended = False, True  # The exception's own line ends it.
            return False
        if self.ended and not text:  # The blank line printed after one.
            return False
        self.ended = False
        return True


@contextlib.contextmanager
def _tracebacks_dropped(join_s: float = 10.0):
    """Routes this process's stderr (fd 2), which the local workers inherit, through a `TracebackFilter`."""
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    console = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def relay():
        keep, pending = TracebackFilter(), b""
        while chunk := os.read(read_end, 1 << 16):  # Until every writer (the workers too) has closed.
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if keep.keep(line.decode(errors="replace")):
                    os.write(console, line + b"\n")
        if pending and keep.keep(pending.decode(errors="replace")):
            os.write(console, pending)
        os.close(read_end)

    thread = threading.Thread(target=relay, name="stderr-relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)  # Back to the console; the workers' copies close as they exit.
        thread.join(join_s)
        if not thread.is_alive():  # Otherwise still relaying a worker that is finishing.
            os.close(console)


def _check_class_text(synsets) -> None:
    """Stops on a class whose synset or name is not one line of text (a tab, newline or other control character).

    Such a class would train and export, and then break the exported model's
    class table (one class a line, tab-separated).
    """
    for label, (synset, name) in enumerate(zip(synsets, imagenet_layout.class_names(synsets))):
        for what, text in (("synset", synset), ("name", name)):
            bad = records.control_character(text)
            if bad:
                raise BuildError(f"class {label} (synset {json.dumps(synset)}) has a control character ({bad}) in its "
                                 f"{what} {json.dumps(text)}: synsets and class names must be one line of text; "
                                 "rename its folder or archive")


def _build(args, layout, options, runner, started, target: str) -> tuple[records.Metadata, list[str]]:
    """Runs the pipeline into `target` and writes its metadata.json there (see `_finalize`)."""
    config = BuildConfig(
        classes=tuple(layout.classes),
        names=tuple(imagenet_layout.class_names(layout.classes)),
        image_size=args.image_size,
        resize=args.resize,
        jpeg_quality=args.jpeg_quality,
        seed=args.seed,
        num_shards=(("train", args.train_shards), ("validation", args.validation_shards)),
        progress=runner in LOCAL_RUNNERS,
    )
    fileio.makedirs(target)
    build_dir = os.path.join(target, BUILD_DIR)
    units = [u for s in layout.splits.values() for u in s.units]
    local_processes = (runner in LOCAL_RUNNERS
                       and options.view_as(DirectOptions).direct_running_mode == "multi_processing")
    # Local workers print their own progress; elsewhere it is read off the shards written.
    watch = contextlib.nullcontext() if runner in LOCAL_RUNNERS else runners.ShardWatch(target)
    with _tracebacks_dropped() if local_processes else contextlib.nullcontext(), watch:
        p = beam.Pipeline(options=options)
        _ = (
            p
            # ListMembers spreads the units itself.
            | "Units" >> beam.Create(units, reshuffle=False)  # PCollection[ReadUnit]
            | "Build" >> BuildRecords(config, target, build_dir)
        )
        runners.run(p)
    return _finalize(target, build_dir, layout, args, config, started)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Beam's local runner relays every worker log line at INFO; keep the console readable.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)  # A Dask client's and local cluster's chatter.
    for name in BUNDLE_ERROR_LOGGERS:  # In-process workers: the failure is reported once, below.
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (BuildError, imagenet_layout.LayoutError) as e:
        print(f"build_tfrecords: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # The folders themselves: a read-only or full disk, a file where a folder should be.
        where = f"{e.filename}: " if e.filename else ""
        print(f"build_tfrecords: error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    # Run through the importable module, not __main__, so that the classes the
    # workers unpickle resolve to `pipelines.build_tfrecords.*`.
    from pipelines import build_tfrecords

    build_tfrecords.main()
