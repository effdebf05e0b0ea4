"""From the pipeline's summary to the build's account: checks, mean_image.npy, metadata.json, the report.

`finalize` checks read = written + rejected per split (and the rejection
limit) on the summary the pipeline wrote, then writes mean_image.npy and
metadata.json (typed: `metadata.Metadata`) last; `report` is the lines the
build prints at its end.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from pipelines import build_summary, members
from pipelines.runners import BuildError
from pipelines.transforms import BuildConfig
from tfrecords import classes, fileio, metadata, schema


def finalize(output_dir: str, build_dir: str, layout, args, config: BuildConfig,
             started: float) -> tuple[metadata.Metadata, list[str]]:
    """Checks the pipeline's summary, writes mean_image.npy and metadata.json.

    Returns:
      (metadata, workers): the metadata written, and the worker processes
      (host:pid) that wrote its shards.
    """
    try:
        summary = build_summary.read_summary(build_dir)
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
        splits[split] = metadata.SplitInfo(
            num_examples=written,
            num_shards=len(shard_list),
            num_read=read,
            num_rejected=rejected,
            source=layout.splits[split].description,
            shards=[metadata.ShardInfo(s["file"], s["num_examples"], s.get("bytes"), s.get("sha256"),
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
        stats = metadata.ColorStatsInfo(**summary["color_stats"])
        if summary["mean_image"] is not None:
            tmp = os.path.join(build_dir, schema.MEAN_IMAGE_FILE)
            with fileio.open_file(tmp, "wb") as f:
                np.save(f, summary["mean_image"])
            fileio.rename(tmp, os.path.join(output_dir, schema.MEAN_IMAGE_FILE))
            stats = dataclasses.replace(stats, mean_image_file=schema.MEAN_IMAGE_FILE,
                                        mean_image_shape=(args.image_size, args.image_size, 3))
    meta = metadata.Metadata(
        format_version=schema.FORMAT_VERSION,
        dataset="ILSVRC2012",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        num_classes=len(config.classes),
        classes=[classes.ClassInfo(i, s, n) for i, (s, n) in enumerate(zip(config.classes, config.names))],
        splits=splits,
        image=metadata.ImageInfo(
            size=args.image_size if args.resize else None,
            resized=args.resize,
            jpeg_quality=args.jpeg_quality,
            colorspace="RGB",
            note="shorter side scaled to size (bicubic), central size x size crop (paper §2)"
            if args.resize else "original JPEG bytes kept where valid RGB JPEG",
        ),
        color_stats=stats,
        rejected=[metadata.Rejection(r["split"], r["file"], r["reason"]) for r in summary["rejected"]],
        build=metadata.BuildInfo(
            imagenet_dir=layout.imagenet_dir,
            val_labels=layout.val_labels,
            seed=args.seed,
            train_shards=args.train_shards,
            validation_shards=args.validation_shards,
            max_reject_fraction=args.max_reject_fraction,
            seconds=round(time.time() - started, 1),
        ),
    )
    metadata.write_metadata(output_dir, meta)
    fileio.rmtree(build_dir)
    return meta, sorted({s["worker"] for s in summary["shards"] if s.get("worker")})


def report(meta: metadata.Metadata, output_dir: str, skipped: list[str] = (), workers: list[str] = ()) -> str:
    """The build's closing lines: metadata.json written, read = written + rejected per split, the first rejections.

    Args:
      meta: The metadata written.
      output_dir: The folder it was written to.
      skipped: Lines on inputs not built (the test set), as the layout reports them.
      workers: The worker processes (host:pid) that wrote the shards.

    Returns:
      The lines, joined by newlines.
    """
    lines = [f"wrote {output_dir}/{schema.METADATA_FILE} ({meta.num_classes} classes, {meta.build.seconds} s)"]
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
