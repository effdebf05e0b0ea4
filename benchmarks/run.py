r"""Side-by-side measurements against peers, each figure a ratio from one run.

    make bench                                   # installs the bench extras, then:
    python -m benchmarks.run --images 2000       # ~10 minutes on 2 cores

1. build (`benchmarks.build`): `pipelines.build_tfrecords` at 4N ImageNet-shaped
   images vs the same per-image work in a bare loop; `--noresize` vs
   tensorflow-datasets' `imagenet2012` builder on the same images; peak memory (all
   processes) at 16M vs M small images (M = N/2).
2. input: training images/s of the input stream vs a decode-only tf.data
   stream and a PyTorch DataLoader (PIL decoding, same augmentations, float
   output). The stream hands uint8 patches and their augmentation parameters to
   the training step, which does the float part (mean, lighting) on the
   accelerator; it is also measured with that part on the CPU.
3. train: images/s of one training step, batch 64: the paper's grouped AlexNet
   here vs the same network in PyTorch; the ungrouped variants too; and Keras'
   own `Conv2D(groups=2)` for reference.
4. export: latency and images/s of the SavedModel's `serving_default` on JPEG bytes.
5. service (`benchmarks.data_service`): the input stream through the tf.data
   service with 1 and 2 local service workers against the local stream, and
   images/s per service worker core.

Prints one table and writes JSON to benchmarks/results/ (with the machine's
cores and memory). Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from tfrecords.folder import Records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def bench_build(work: str, images: int) -> dict:
    """`benchmarks.build`: the build against its bare per-image loop, tfds, and its own memory at 16M."""
    from benchmarks import build

    return build.bench(work, images, max(10, images // 2), {"limit", "tfds", "memory"},
                       keep_records=os.path.join(work, "records-N"))


# -- input stream ---------------------------------------------------------------


def _rate(iterator, batch: int, warmup: int = 3, steps: int = 20) -> float:
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return batch * steps / (time.perf_counter() - start)


def bench_input(data_dir: str, work: str, batch: int = 64) -> dict:
    import tensorflow as tf

    from alexnet_tf import input_pipeline as ip
    from alexnet_tf import preprocessing
    from tfrecords import metadata, schema

    meta = metadata.load_metadata(data_dir)
    stats = preprocessing.ColorStats.from_records(Records(data_dir, meta))
    stream = ip.train_dataset(Records(data_dir, meta), stats, batch, shuffle_buffer=1000)
    ours = _rate(iter(stream), batch)
    # The same with the step's float part (mean, lighting) also on the CPU, as on a CPU-only machine.
    whole = stream.map(lambda x, y: (preprocessing.finish_batch(*x, stats), y), num_parallel_calls=tf.data.AUTOTUNE)
    ours_whole = _rate(iter(whole), batch)
    files = Records(data_dir, meta).shard_paths("train")
    bare = (tf.data.Dataset.from_tensor_slices(files).repeat()
            .interleave(tf.data.TFRecordDataset, cycle_length=16, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=False)
            .map(lambda s: tf.io.decode_jpeg(schema.parse_example(s)[schema.ENCODED], channels=3),
                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
            .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    decode_only = _rate(iter(bare), batch)

    # The PyTorch peer reads the same JPEGs as files, the usual ImageFolder layout.
    jpeg_dir = os.path.join(work, "jpegs")
    os.makedirs(jpeg_dir, exist_ok=True)
    paths = []
    for i, raw in enumerate(tf.data.TFRecordDataset(files)):
        ex = schema.parse_example(raw)
        path = os.path.join(jpeg_dir, f"{i}_{int(ex[schema.LABEL])}.JPEG")
        with open(path, "wb") as f:
            f.write(ex[schema.ENCODED].numpy())
        paths.append(path)
    torch_rate = _torch_loader_rate(paths, stats, batch)
    return {
        "ours_images_per_second": ours, "ours_with_float_part_on_cpu_images_per_second": ours_whole,
        "decode_only_images_per_second": decode_only,
        "torch_images_per_second": torch_rate,
        "ratio_vs_decode_only": ours / decode_only, "ratio_vs_torch": ours / torch_rate,
        "ratio_with_float_part_vs_decode_only": ours_whole / decode_only,
        "ratio_with_float_part_vs_torch": ours_whole / torch_rate,
    }


def _torch_loader_rate(paths: list[str], stats, batch: int) -> float:
    code = f"""
import sys, time, numpy as np, torch
from PIL import Image
paths = {paths!r}
mean = np.load({_save_tmp(stats.mean)!r}); vals = np.load({_save_tmp(stats.eigenvalues)!r})
vecs = np.load({_save_tmp(stats.eigenvectors)!r})
class DS(torch.utils.data.Dataset):
    def __len__(self): return 10**9
    def __getitem__(self, i):
        p = paths[i % len(paths)]
        img = np.asarray(Image.open(p).convert("RGB"), np.float32)
        t, l = np.random.randint(0, img.shape[0] - 226), np.random.randint(0, img.shape[1] - 226)
        x = img[t:t+227, l:l+227] - mean[t:t+227, l:l+227]
        x = x + vecs @ (np.random.normal(0, 0.1, 3) * vals / 255**2) * 255
        if np.random.rand() < 0.5: x = x[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), int(p.rsplit("_", 1)[1].split(".")[0])
loader = torch.utils.data.DataLoader(DS(), batch_size={batch}, num_workers={os.cpu_count()}, prefetch_factor=4)
it = iter(loader)
for _ in range(3): next(it)
t = time.perf_counter()
for _ in range(20): next(it)
print({batch} * 20 / (time.perf_counter() - t))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


_TMP = tempfile.mkdtemp(prefix="bench-")


def _save_tmp(array) -> str:
    path = os.path.join(_TMP, f"{len(os.listdir(_TMP))}.npy")
    np.save(path, np.asarray(array))
    return path


# -- training step --------------------------------------------------------------


def _keras_step_rate(grouped: str, batch: int, steps: int) -> float:
    import keras
    import tensorflow as tf

    from alexnet_tf import model as model_lib

    if grouped == "keras_groups":  # Keras' own grouped convolution, for reference.
        net = _with_keras_groups()
    else:
        net = model_lib.build_alexnet(1000, grouped=grouped == "grouped")
    opt = keras.optimizers.SGD(0.01, momentum=0.9)
    x = tf.random.normal((batch, 227, 227, 3)) * 50
    y = tf.random.uniform((batch,), 0, 1000, tf.int32)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = net(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        opt.apply_gradients(zip(tape.gradient(loss, net.trainable_variables), net.trainable_variables))
        return loss

    for _ in range(2):
        step().numpy()
    start = time.perf_counter()
    for _ in range(steps):
        step().numpy()
    return batch * steps / (time.perf_counter() - start)


def _with_keras_groups():
    """The paper's net with keras.layers.Conv2D(groups=2) for conv2/4/5."""
    import keras

    from alexnet_tf import model as model_lib

    x = inputs = keras.Input((227, 227, 3))
    x = keras.layers.Conv2D(96, 11, 4, activation="relu")(x)
    x = model_lib.LocalResponseNormalization()(x)
    x = keras.layers.MaxPooling2D(3, 2)(x)
    x = keras.layers.Conv2D(256, 5, padding="same", groups=2, activation="relu")(x)
    x = model_lib.LocalResponseNormalization()(x)
    x = keras.layers.MaxPooling2D(3, 2)(x)
    x = keras.layers.Conv2D(384, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(384, 3, padding="same", groups=2, activation="relu")(x)
    x = keras.layers.Conv2D(256, 3, padding="same", groups=2, activation="relu")(x)
    x = keras.layers.MaxPooling2D(3, 2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(4096, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.Dense(4096, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    return keras.Model(inputs, keras.layers.Dense(1000)(x))


TORCH_STEP = """
import sys, time, torch, torch.nn as nn
torch.set_num_threads({threads})
g = {groups}
net = nn.Sequential(
    nn.Conv2d(3, 96, 11, 4), nn.ReLU(), nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0), nn.MaxPool2d(3, 2),
    nn.Conv2d(96, 256, 5, padding=2, groups=g), nn.ReLU(), nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0),
    nn.MaxPool2d(3, 2),
    nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
    nn.Conv2d(384, 384, 3, padding=1, groups=g), nn.ReLU(),
    nn.Conv2d(384, 256, 3, padding=1, groups=g), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(),
    nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
    nn.Linear(4096, 1000))
assert sum(p.numel() for p in net.parameters()) == {params}
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
x = torch.randn({batch}, 3, 227, 227) * 50; y = torch.randint(0, 1000, ({batch},))
def step():
    opt.zero_grad(); loss = nn.functional.cross_entropy(net(x), y); loss.backward(); opt.step()
for _ in range(2): step()
t = time.perf_counter()
for _ in range({steps}): step()
print({batch} * {steps} / (time.perf_counter() - t))
"""


def _torch_step_rate(groups: int, batch: int, steps: int) -> float:
    params = 60_965_224 if groups == 2 else 62_378_344
    code = TORCH_STEP.format(threads=os.cpu_count(), groups=groups, params=params, batch=batch, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def bench_train(batch: int = 64, steps: int = 5) -> dict:
    r = {
        "ours_grouped": _keras_step_rate("grouped", batch, steps),
        "torch_grouped": _torch_step_rate(2, batch, steps),
        "ours_ungrouped": _keras_step_rate("ungrouped", batch, steps),
        "torch_ungrouped": _torch_step_rate(1, batch, steps),
        "keras_conv2d_groups": _keras_step_rate("keras_groups", batch, 2),
    }
    r["ratio_grouped_vs_torch"] = r["ours_grouped"] / r["torch_grouped"]
    r["ratio_ungrouped_vs_torch"] = r["ours_ungrouped"] / r["torch_ungrouped"]
    r["ratio_grouped_vs_keras_conv2d_groups"] = r["ours_grouped"] / r["keras_conv2d_groups"]
    return r


# -- export ---------------------------------------------------------------------


def bench_export(data_dir: str, work: str) -> dict:
    import tensorflow as tf

    from alexnet_tf import export, model as model_lib, preprocessing
    from tfrecords import metadata, schema

    meta = metadata.load_metadata(data_dir)
    stats = preprocessing.ColorStats.from_records(Records(data_dir, meta))
    info = {"num_classes": meta.num_classes, "grouped": True, "dropout": 0.5,
            "classes": [c.to_json() for c in meta.classes],
            "mean": "image", "square_size": 256}
    path = export.export(model_lib.build_alexnet(meta.num_classes), info, stats.mean,
                         os.path.join(work, "saved_model"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    jpegs = [schema.parse_example(r)[schema.ENCODED].numpy()
             for r in tf.data.TFRecordDataset(Records(data_dir, meta).shard_paths("validation")).take(32)]
    one = tf.constant(jpegs[:1])
    many = tf.constant(jpegs)
    for _ in range(3):
        serve(images=one)
        serve(images=many)
    latencies = []
    for _ in range(20):
        t = time.perf_counter()
        serve(images=one)["probabilities"].numpy()
        latencies.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(5):
        serve(images=many)["probabilities"].numpy()
    return {"latency_ms_batch1_median": 1000 * float(np.median(latencies)),
            "images_per_second_batch32": 32 * 5 / (time.perf_counter() - t)}


# -- report ---------------------------------------------------------------------


def table(r: dict) -> str:
    b, i, t, e = r["build"], r["input"], r["train"], r["export"]
    rows = [
        ("build, 4N ImageNet-shaped: pipeline vs bare loop (img/s)", b["limit"]["pipeline"]["images_per_second"],
         b["limit"]["bare_loop"]["images_per_second"], b["limit"]["ratio"], ">= 0.9"),
        ("build --noresize, 4N: vs tfds imagenet2012 (img/s)", b["tfds"]["noresize"]["images_per_second"],
         b["tfds"]["tfds"]["images_per_second"], b["tfds"]["ratio_noresize"], ">= 1.5"),
        ("build (resize to 256), 4N: vs tfds (img/s)", b["tfds"]["default"]["images_per_second"],
         b["tfds"]["tfds"]["images_per_second"], b["tfds"]["ratio_default"], ""),
        ("build: peak memory 16M vs M (MiB)", b["memory"]["16M"]["peak_rss_mib"], b["memory"]["M"]["peak_rss_mib"],
         b["memory"]["ratio"], "<= 1.1"),
        ("input: ours vs decode-only tf.data (img/s)", i["ours_images_per_second"],
         i["decode_only_images_per_second"], i["ratio_vs_decode_only"], ">= 0.8"),
        ("input: ours vs PyTorch DataLoader (img/s)", i["ours_images_per_second"], i["torch_images_per_second"],
         i["ratio_vs_torch"], ">= 2"),
        ("input, float part on CPU too, vs decode-only", i["ours_with_float_part_on_cpu_images_per_second"],
         i["decode_only_images_per_second"], i["ratio_with_float_part_vs_decode_only"], ""),
        ("input, float part on CPU too, vs PyTorch", i["ours_with_float_part_on_cpu_images_per_second"],
         i["torch_images_per_second"], i["ratio_with_float_part_vs_torch"], ""),
        ("train: grouped AlexNet vs PyTorch (img/s)", t["ours_grouped"], t["torch_grouped"],
         t["ratio_grouped_vs_torch"], ">= 1.5"),
        ("train: ungrouped AlexNet vs PyTorch (img/s)", t["ours_ungrouped"], t["torch_ungrouped"],
         t["ratio_ungrouped_vs_torch"], ""),
        ("train: grouped, ours vs Keras Conv2D(groups=2)", t["ours_grouped"], t["keras_conv2d_groups"],
         t["ratio_grouped_vs_keras_conv2d_groups"], ""),
    ]
    lines = [f"{'measure':50s}{'ours':>10s}{'peer':>10s}{'ratio':>8s}  target",
             *[f"{n:50s}{a:>10.1f}{p:>10.1f}{q:>8.2f}  {tg}" for n, a, p, q, tg in rows],
             f"export: serving_default latency, batch 1: {e['latency_ms_batch1_median']:.1f} ms; "
             f"batch 32: {e['images_per_second_batch32']:.1f} images/s"]
    m = r["machine"]
    lines.append(f"machine: {m['cores']} cores, {m['memory_gib']:.0f} GiB, {m['platform']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="N: training images of the generated sample.")
    p.add_argument("--only", default="build,input,train,export,service", help="Comma-separated sections.")
    args = p.parse_args(argv)

    import psutil

    sections = set(args.only.split(","))
    work = tempfile.mkdtemp(prefix="alexnet-bench-")
    result = {"machine": {"cores": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30,
                          "platform": platform.platform(), "python": platform.python_version()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "images": args.images}
    try:
        if sections & {"build", "input", "export", "service"}:
            result["build"] = bench_build(work, args.images)
            print(json.dumps({"build": result["build"]}), flush=True)
        data = os.path.join(work, "records-N")
        if "input" in sections:
            result["input"] = bench_input(data, work)
            print(json.dumps({"input": result["input"]}), flush=True)
        if "train" in sections:
            result["train"] = bench_train()
            print(json.dumps({"train": result["train"]}), flush=True)
        if "export" in sections:
            result["export"] = bench_export(data, work)
            print(json.dumps({"export": result["export"]}), flush=True)
        if "service" in sections:
            from benchmarks import data_service as service_bench

            result["service"] = service_bench.run(["--data_dir", data])
            print(service_bench.table(result["service"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(_TMP, ignore_errors=True)
    os.makedirs(RESULTS, exist_ok=True)
    for name in (f"{result['date'][:10]}.json", "latest.json"):
        with open(os.path.join(RESULTS, name), "w") as f:
            json.dump(result, f, indent=1)
    if {"build", "input", "train", "export"} <= set(result):
        print(table(result))


if __name__ == "__main__":
    main()
