r"""The whole chain at ImageNet's shape, on this machine: `make rehearsal`.

    python -m benchmarks.rehearsal                       # about 10 minutes on 2 cores
    python -m benchmarks.rehearsal --train_per_class=40 --val_images=5000 --steps=500 --batch_size=32   # bigger

Stages, each a command of its own, as a user runs them:
  sample    pipelines.make_sample --shape=imagenet (1000 synsets, ImageNet's sizes)
  build     pipelines.build_tfrecords with its default flags (1024/128 shards,
            fewer where each shard would hold under 32 records)
  verify    pipelines.verify_tfrecords
  train     alexnet_tf.train, the paper's 1000-class net, --strategy=mirrored
            (two logical CPU devices here; the GPUs where there are any)
  evaluate  alexnet_tf.evaluate on the validation split (central patch), from the SavedModel
  export    alexnet_tf.export from the last checkpoint
  serve     alexnet_tf.predict: one image through the SavedModel's serving signature

One table row per stage: wall time, images/s, peak resident memory of the
whole process tree (Beam's workers included). Then a projection of the real
ILSVRC2012 build (1,281,167 + 50,000 images) on 2, 16 and 64 cores from the
measured per-image cost (core-seconds per image, start-up included, scaled
linearly: an estimate, not a measurement). Writes
benchmarks/results/rehearsal.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from benchmarks.measure import REPO, run_stage

ILSVRC_IMAGES = 1_281_167 + 50_000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rehearsal", description=__doc__.splitlines()[0])
    p.add_argument("--train_per_class", type=int, default=4, help="Training images per class (x1000).")
    p.add_argument("--val_images", type=int, default=250)
    p.add_argument("--steps", type=int, default=200, help="Training steps.")
    p.add_argument("--batch_size", type=int, default=4, help="Global training batch size.")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="Default: the paper's 0.01 at batch 128, scaled linearly to --batch_size (at 0.01, "
                   "batch 4 diverges to NaN within 200 steps).")
    p.add_argument("--work_dir", default=None, help="Keep everything here (default: a temporary folder).")
    p.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "rehearsal.json"))
    args = p.parse_args(argv)

    py = sys.executable
    work = args.work_dir or tempfile.mkdtemp(prefix="rehearsal-")
    os.makedirs(work, exist_ok=True)
    raw, data, run, exported = (os.path.join(work, n) for n in ("imagenet", "tfrecords", "run", "exported"))
    shutil.rmtree(run, ignore_errors=True)
    train_images = 1000 * args.train_per_class
    learning_rate = args.learning_rate or 0.01 * args.batch_size / 128
    stages = [
        ("sample", [py, "-m", "pipelines.make_sample", "--shape=imagenet", "--output_dir", raw,
                    f"--train_per_class={args.train_per_class}", f"--val_images={args.val_images}"],
         train_images + args.val_images),
        ("build", [py, "-m", "pipelines.build_tfrecords", "--imagenet_dir", raw, "--output_dir", data,
                   "--overwrite"], train_images + args.val_images),
        ("verify", [py, "-m", "pipelines.verify_tfrecords", "--data_dir", data], train_images + args.val_images),
        ("train", [py, "-m", "alexnet_tf.train", "--strategy=mirrored", "--cpu_devices=2", "--data_dir", data,
                   "--model_dir", run, f"--batch_size={args.batch_size}", f"--learning_rate={learning_rate}",
                   "--eval_batch_size=50",
                   f"--steps_per_epoch={args.steps}", "--epochs=1", "--steps_per_loop=20", "--noverbose",
                   "--log_images=4", "--histogram_every=100", "--seed=0"],
         args.steps * args.batch_size),
        ("evaluate", [py, "-m", "alexnet_tf.evaluate", "--saved_model", os.path.join(run, "saved_model"),
                      "--data_dir", data, "--batch_size=50", "--noten_crops"], args.val_images),
        ("export", [py, "-m", "alexnet_tf.export", "--model_dir", run, "--export_dir", exported], 0),
    ]
    results = {}
    for name, cmd, images in stages:
        print(f"rehearsal: {name} ...", flush=True)
        r = run_stage(name, cmd, work)
        r["images"] = images
        r["images_per_second"] = images / r["seconds"] if images else None
        results[name] = r
        print(f"rehearsal: {name} {r['seconds']:.1f} s", flush=True)

    # Serve one image: a validation JPEG from the raw archive, through the export.
    import tarfile

    with tarfile.open(os.path.join(raw, "ILSVRC2012_img_val.tar")) as tar:
        member = tar.next()
        image = os.path.join(work, member.name)
        with open(image, "wb") as f:
            f.write(tar.extractfile(member).read())
    r = run_stage("serve", [py, "-m", "alexnet_tf.predict", "--saved_model", exported, image], work)
    with open(r["log"]) as f:
        r["top5"] = [line.strip() for line in f if line.startswith("  ")][:5]
    r["images"], r["images_per_second"] = 1, 1 / r["seconds"]
    results["serve"] = r

    from tfrecords import metadata, schema  # Without TensorFlow (unlike load_metadata): this process stays light.

    with open(os.path.join(data, schema.METADATA_FILE)) as f:
        meta = metadata.Metadata.from_json(json.load(f), f.name)
    shards = {k: v.num_shards for k, v in meta.splits.items()}
    cores = os.cpu_count() or 1
    per_image_core_seconds = results["build"]["seconds"] * cores / results["build"]["images"]
    projection = {n: ILSVRC_IMAGES * per_image_core_seconds / n / 3600 for n in (2, 16, 64)}
    evaluation = None
    with open(results["evaluate"]["log"]) as f:
        for line in f:
            if line.startswith("{"):
                evaluation = json.loads(line)

    print()
    print(f"ImageNet-shaped rehearsal: {train_images} training + {args.val_images} validation images, "
          f"1000 classes, {cores} cores; shards {shards}")
    print("| stage | wall | images | images/s | peak memory (process tree) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        rate = f"{r['images_per_second']:.1f}" if r["images_per_second"] else "-"
        print(f"| {name} | {r['seconds']:.1f} s | {r['images'] or '-'} | {rate} | {r['peak_rss_mib']:.0f} MiB |")
    print()
    print(f"Build cost: {per_image_core_seconds * 1000:.1f} core-ms per image. The real ILSVRC2012 build "
          f"({ILSVRC_IMAGES:,} images), scaled linearly:")
    print("| cores | projected build |")
    print("|---|---|")
    for n, hours in projection.items():
        print(f"| {n} | {hours:.1f} h |")
    if evaluation:
        central = evaluation["central_crop"]
        print(f"\nValidation after {args.steps} steps at learning rate {learning_rate:g} (central patch): "
              f"loss {central['loss']:.3f}, top-1 error {central['top1_error']:.3f}, "
              f"top-5 error {central['top5_error']:.3f} (chance: 0.999 / 0.995)")
    print(f"Served {os.path.basename(image)}: " + "; ".join(results["serve"]["top5"][:2]))

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"cores": cores, "train_images": train_images, "val_images": args.val_images,
                   "steps": args.steps, "batch_size": args.batch_size, "learning_rate": learning_rate,
                   "shards": shards,
                   "stages": {k: {kk: vv for kk, vv in v.items() if kk != "log"} for k, v in results.items()},
                   "build_core_ms_per_image": per_image_core_seconds * 1000,
                   "projected_build_hours": projection, "evaluation": evaluation}, f, indent=1)
    print(f"wrote {args.output}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
