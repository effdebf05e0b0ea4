"""The tables of docs/performance.md, generated from benchmarks/results/*.json.

    python -m benchmarks.tables            # rewrites the generated blocks of docs/performance.md
    python -m benchmarks.tables --check    # exit 1, naming the blocks, when the page and the JSON differ

Each table sits between `<!-- generated: NAME -->` and `<!-- end -->` on the
page; the prose between blocks is written by hand and left alone. Every block
opens with what its JSON records of where it was measured: date, machine, CPU
flags (AVX-512, AVX512_BF16) or GPU, and commit, "not recorded" where the JSON
lacks one.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
PAGE = os.path.join(REPO, "docs", "performance.md")
BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end -->)", re.S)
NOT_RECORDED = "not recorded"


def load(results_dir: str = RESULTS) -> dict[str, dict]:
    """Every result file of `results_dir`, by file name."""
    found = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            found[os.path.basename(path)] = json.load(f)
    return found


def _yes(flag) -> str:
    return NOT_RECORDED if flag is None else ("yes" if flag else "no")


def provenance(result: dict, source: str) -> str:
    """One line: where and when a result was measured, as far as its JSON says."""
    machine = result.get("machine") or {}
    cores = machine.get("cores") or machine.get("cpus") or result.get("cores") or result.get("cpus")
    parts = [f"{cores} cores" if cores else "cores " + NOT_RECORDED]
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']:.0f} GiB")
    if machine.get("platform"):
        parts.append(machine["platform"])
    cpu = machine.get("cpu")
    if cpu:
        flags = f"CPU {cpu.get('model') or NOT_RECORDED}, AVX-512: {_yes(cpu.get('avx512'))}, " \
                f"AVX512_BF16: {_yes(cpu.get('avx512_bf16'))}"
    else:
        flags = f"CPU flags (AVX-512, AVX512_BF16): {NOT_RECORDED}"
    device = result.get("device")
    if not device:
        gpu = NOT_RECORDED
    else:
        gpu = f"{device['count']}x {device['name']}" if device.get("count") else "none (CPU)"
    date = (result.get("date") or "")[:10] or NOT_RECORDED
    commit = machine.get("commit") or result.get("commit") or NOT_RECORDED
    tf = machine.get("tensorflow") or result.get("tensorflow")
    tf_part = f"; TensorFlow {tf}" if tf else ""
    return (f"*`benchmarks/results/{source}`: date {date}; machine {', '.join(parts)}; {flags}; GPU {gpu}; "
            f"commit {commit}{tf_part}.*")


def _table(head: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(head) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _n(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _mib(x) -> str:
    return f"{x:,.0f}"


def bench(results: dict) -> str:
    """`make bench` (benchmarks/run.py): input stream, training step and export against peers."""
    r = results["latest.json"]
    i, t, e = r["input"], r["train"], r["export"]
    rows = [
        ["input: ours vs decode-only tf.data (img/s)", _n(i["ours_images_per_second"]),
         _n(i["decode_only_images_per_second"]), f"{i['ratio_vs_decode_only']:.2f}", "≥ 0.8"],
        ["input: ours vs PyTorch DataLoader (img/s)", _n(i["ours_images_per_second"]),
         _n(i["torch_images_per_second"]), f"{i['ratio_vs_torch']:.2f}", "≥ 2"],
        ["input, float part on the CPU too, vs decode-only", _n(i["ours_with_float_part_on_cpu_images_per_second"]),
         _n(i["decode_only_images_per_second"]), f"{i['ratio_with_float_part_vs_decode_only']:.2f}", ""],
        ["input, float part on the CPU too, vs PyTorch", _n(i["ours_with_float_part_on_cpu_images_per_second"]),
         _n(i["torch_images_per_second"]), f"{i['ratio_with_float_part_vs_torch']:.2f}", ""],
        ["train: grouped AlexNet vs PyTorch (img/s)", _n(t["ours_grouped"]), _n(t["torch_grouped"]),
         f"{t['ratio_grouped_vs_torch']:.2f}", "≥ 1.5"],
        ["train: ungrouped AlexNet vs PyTorch (img/s)", _n(t["ours_ungrouped"]), _n(t["torch_ungrouped"]),
         f"{t['ratio_ungrouped_vs_torch']:.2f}", ""],
        ["train: grouped, ours vs Keras `Conv2D(groups=2)` (img/s)", _n(t["ours_grouped"]),
         _n(t["keras_conv2d_groups"]), f"{t['ratio_grouped_vs_keras_conv2d_groups']:.2f}", ""],
    ]
    table = _table(["measure", "ours", "peer", "ratio", "target"], rows, "lrrrl")
    serving = (f"Export: `serving_default` latency at batch 1 {_n(e['latency_ms_batch1_median'])} ms (median); "
               f"{_n(e['images_per_second_batch32'])} images/s at batch 32.")
    return f"{provenance(r, 'latest.json')}\n\n{table}\n\n{serving}"


def build(results: dict) -> str:
    """`make bench-build`: the pipeline against its bare loop, tensorflow-datasets, and its own memory."""
    r = results["build.json"]
    lim, tfds, mem = r["limit"], r["tfds"], r["memory"]
    rows = [
        [f"pipeline vs bare loop, {lim['images']:,} images (img/s, median of {len(lim['pipeline']['runs_seconds'])})",
         _n(lim["pipeline"]["images_per_second"]), _n(lim["bare_loop"]["images_per_second"]),
         f"{lim['ratio']:.2f}", "≥ 0.9"],
        [f"`--noresize` vs tfds `imagenet2012` builder, {tfds['images']:,} images (img/s)",
         _n(tfds["noresize"]["images_per_second"]), _n(tfds["tfds"]["images_per_second"]),
         f"{tfds['ratio_noresize']:.2f}", "≥ 1.5"],
        ["default build (resize to 256) vs tfds, same images (img/s)", _n(tfds["default"]["images_per_second"]),
         _n(tfds["tfds"]["images_per_second"]), f"{tfds['ratio_default']:.2f}", ""],
        [f"peak memory (process tree), {mem['16M']['images']:,} vs {mem['M']['images']:,} images (MiB)",
         _mib(mem["16M"]["peak_rss_mib"]), _mib(mem["M"]["peak_rss_mib"]), f"{mem['ratio']:.2f}", "≤ 1.1"],
    ]
    # These three rows come from an earlier run than the file's top-level date; each names its own.
    return (f"{provenance(lim, 'build.json')} (the `limit`, `tfds` and `memory` sections)\n\n"
            + _table(["measure", "ours", "peer", "ratio", "target"], rows, "lrrrl"))


def dask(results: dict) -> str:
    """`make bench-build` (`--only dask`): the DaskRunner on 2 local workers against the local runner."""
    r = results["build.json"]
    d = r["dask"]
    loc, dk = d["local"], d["dask"]
    secs = lambda runs: ", ".join(f"{s:.1f}" for s in runs)  # noqa: E731
    rows = [
        [f"local (multi-processing, {r['machine']['cores']} cores)", _n(loc["images_per_second"]),
         secs(loc["runs_seconds"]), f"{_mib(loc['peak_rss_mib'])} (process tree)"],
        [f"DaskRunner, {d['workers']} local workers", _n(dk["images_per_second"]), secs(dk["runs_seconds"]),
         f"{_mib(dk['driver_peak_rss_mib'])} driver; "
         + " and ".join(_mib(m) for m in dk["worker_peak_rss_mib"]) + " workers"],
    ]
    return (f"{provenance(r, 'build.json')} (the `dask` section: {d['images']:,} images)\n\n"
            + _table(["runner", "images/s (median)", "runs (s)", "peak memory (MiB)"], rows, "lrll")
            + f"\n\nRatio DaskRunner / local: {d['ratio']:.2f} (target ≥ 0.9).")


def cluster_build(results: dict) -> str:
    """`make cluster-build`: one build with each runner, the two datasets compared byte for byte."""
    r = results["cluster-build.json"]
    loc, dk = r["local"], r["dask"]
    rows = [
        [f"local (multi-processing, {r['machine']['cores']} cores)", _n(loc["seconds"]),
         _n(loc["images_per_second"]), f"{_mib(loc['peak_rss_mib'])} (process tree)"],
        [f"DaskRunner, {r['workers']} local workers", _n(dk["seconds"]), _n(dk["images_per_second"]),
         f"{_mib(dk['peak_rss_mib'])} driver; " + " + ".join(_mib(m) for m in dk["workers_peak_rss_mib"])
         + " workers"],
    ]
    same = "the same" if r["same"] else "NOT the same"
    return (f"{provenance(r, 'cluster-build.json')}\n\n"
            + _table(["runner", "seconds", "images/s", "peak memory (MiB)"], rows, "lrrl")
            + f"\n\n{loc['images']:,} images, {r['train_shards']} + {r['validation_shards']} shards; both builds "
              f"wrote {same} {r['files']} files; the DaskRunner's summary counted {dk['workers_in_summary']} "
              "worker processes writing shards.")


STAGES = ("sample", "build", "verify", "train", "evaluate", "export", "serve")


def rehearsal(results: dict) -> str:
    """`make rehearsal`: every stage of the chain at ImageNet's shape."""
    r = results["rehearsal.json"]
    rows = []
    for name in STAGES:
        s = r["stages"][name]
        label = {"build": f"build ({r['shards']['train']} + {r['shards']['validation']} shards)",
                 "train": "train (start-up, validation and export included)"}.get(name, name)
        rate = s["images_per_second"] if name not in ("export", "serve") else None
        rows.append([label, f"{s['seconds']:.1f} s", f"{s['images']:,}" if s["images"] else "–", _n(rate),
                     _mib(s["peak_rss_mib"])])
    table = _table(["stage", "wall", "images", "images/s", "peak memory (MiB, process tree)"], rows, "lrrrr")
    hours = ", ".join(f"{h:.1f} h on {c}" for c, h in r["projected_build_hours"].items())
    ev = r["evaluation"]["central_crop"]
    return (f"{provenance(r, 'rehearsal.json')}\n\n{r['train_images']:,} training and {r['val_images']:,} validation "
            f"images; batch {r['batch_size']} for {r['steps']} steps at learning rate {r['learning_rate']}.\n\n{table}"
            f"\n\nBuild cost: {r['build_core_ms_per_image']:.1f} core-ms per image, start-up included; scaled "
            f"linearly to ILSVRC2012's 1,331,167 images (an estimate, not a measurement): {hours} cores. "
            f"Validation loss after training: {ev['loss']:.2f} (top-1 error {ev['top1_error']:.1%}).")


def figures(results: dict) -> str:
    """`make bench-figures`: what `--figures` adds to an epoch of the sample preset."""
    r = results["figures-cpu.json"]
    rows = [
        [f"training ({r['train_images_per_epoch']} images)", f"{r['train_epoch_seconds']:.2f}"],
        [f"validation ({r['validation_images']} images), plain sums", f"{r['validation_seconds']:.2f}"],
        ["validation with per-class sums", f"{r['validation_with_per_class_seconds']:.2f}"],
        [f"figures: kernels, top-5, fc7 neighbours over {r['figure_pool']} images, written",
         f"{r['figures_seconds']:.2f}"],
        ["**added by `--figures`**", f"**{r['added_seconds_per_epoch']:.2f} ({r['share_of_epoch']:.1%} of the "
                                     "epoch)**"],
        ["once per run: reading the fixed images", f"{r['fixed_images_setup_seconds']:.2f}"],
    ]
    return f"{provenance(r, 'figures-cpu.json')}\n\n" + _table(["per epoch, sample preset", "seconds"], rows)


def histograms(results: dict) -> str:
    """`make bench-histograms`: tf.summary.histogram against the trainer's own, AlexNet's every weight."""
    r = results["histograms-cpu.json"]
    tb, ours = r["tensorboard"], r["numpy"]
    rows = [
        ["`tf.summary.histogram`", f"{tb['seconds']:.2f}", _mib(tb["peak_extra_mb"])],
        ["`summaries.write_histogram` (what training uses)", f"{ours['seconds']:.2f}", _mib(ours["peak_extra_mb"])],
        ["ratio (tf.summary / ours)", f"{r['speedup']:.1f}x", f"{r['memory_ratio']:.1f}x"],
    ]
    return (f"{provenance(r, 'histograms-cpu.json')}\n\n{r['values']:,} values in {tb['variables']} variables.\n\n"
            + _table(["way", "seconds per write of all", "peak memory added (MB)"], rows))


def recipes(results: dict) -> str:
    """`make bench-recipes`: the three recipes' loss curves, final errors and stall warnings."""
    r = results["recipes.json"]
    rows = []
    for name, run in r["runs"].items():
        problem, recipe = name.split("/")
        curve = run["curve"]
        losses = " ".join(f"{c['train_loss']:.2f}" for c in curve)
        step = re.search(r"after (\d+) steps", run["warning"] or "")
        warned = "no" if not run["warning"] else f"yes, step {step.group(1)}" if step else "yes"
        rows.append([f"{problem} / {recipe}", len(curve), losses, f"{curve[-1]['val_top1_error']:.0%}",
                     f"{curve[-1]['val_top5_error']:.0%}", f"{run['seconds']:.0f}", warned])
    return (f"{provenance(r, 'recipes.json')}\n\n"
            + _table(["problem / recipe", "epochs", "training loss by epoch", "final val top-1 error",
                      "top-5 error", "seconds", "warned"], rows, "lrlrrrl"))


def loop(results: dict) -> str:
    """`make bench-loop`: the training loop's own overhead against a bare tf.function loop."""
    r = results["loop-cpu.json"]
    ips = r["images_per_second"]
    rows = [
        ["bare `tf.function` loop, one call a step", _n(ips["bare"], 0), "1.00x", ""],
        [f"ours, `--steps_per_loop={r['steps_per_loop']}`", _n(ips["ours"], 0), f"{r['ratio_ours_to_bare']:.2f}x",
         r["target"]],
        ["ours, `--steps_per_loop=1` (a host round trip every step)", _n(ips["ours_steps_per_loop_1"], 0),
         f"{r['ratio_steps_per_loop_1_to_bare']:.2f}x", ""],
    ]
    return (f"{provenance(r, 'loop-cpu.json')}\n\n{r['steps']:,} steps of batch {r['batch']}, a tiny model, "
            f"median of {len(r['runs']['bare'])}.\n\n"
            + _table(["loop", "images/s", "vs bare", "target"], rows, "lrrl"))


def determinism(results: dict) -> str:
    """`python -m benchmarks.input_determinism`: the fixed-order stream against an unordered one, and skipping."""
    r = results["input-determinism.json"]
    ips = r["images_per_second"]
    rows = [
        ["fixed order (what training uses)", _n(ips["deterministic"], 0), f"{r['ratio']:.2f}x", r["target"]],
        ["results handed on as they finish", _n(ips["nondeterministic"], 0), "1.00x", ""],
    ]
    return (f"{provenance(r, 'input-determinism.json')}\n\nBatch {r['batch']}, {r['steps']} steps, median of "
            f"{len(r['runs']['deterministic'])} alternating runs.\n\n"
            + _table(["input stream", "images/s", "ratio", "target"], rows, "lrrl")
            + f"\n\nSkipping on resume (read, not decoded): {_n(r['skip_rate_median'], 0)} records/s "
              f"(median, {r['skip']:,} records skipped); a whole ImageNet epoch of skipping at that rate: "
              f"{r['imagenet_epoch_skip_seconds']:.0f} s.")


def data_service(results: dict) -> str:
    """`make bench-service`: the tf.data service with 1 and 2 local workers against the local stream."""
    r = results["data-service.json"]
    rows = [["local (`train_dataset`, this process)", _n(r["local"]["images_per_second"], 0), "1.00", "",
             f"{r['local']['reader_cpu_ms_per_image']:.2f}"]]
    for n in (1, 2):
        s = r[f"service_{n}_workers"]
        rows.append([f"tf.data service, {n} worker{'s' if n > 1 else ''}", _n(s["images_per_second"], 0),
                     f"{r[f'ratio_service_{n}_workers_vs_local']:.2f}", _n(s["images_per_worker_cpu_second"], 0),
                     f"{s['reader_cpu_ms_per_image']:.2f}"])
    cores = r.get("cores_per_gpu") or []
    note = ("No `gpu-*.json` was present, so no cores-per-GPU division was made." if not cores
            else "Cores per GPU: " + json.dumps(cores))
    return (f"{provenance(r, 'data-service.json')}\n\nBatch {r['batch']}, {r['train_records']} training records, "
            f"median of {len(r['local']['windows'])} windows.\n\n"
            + _table(["stream", "images/s", "vs local", "images/s per service worker core",
                      "reader CPU ms/image"], rows)
            + f"\n\n{note}")


def gpu(results: dict) -> str:
    """`make bench-gpu`: one table per `gpu-*.json`, as benchmarks/gpu.py draws it."""
    found = sorted(name for name in results if name.startswith("gpu-"))
    if not found:
        return "No `benchmarks/results/gpu-*.json` has been recorded: nothing here is measured on a GPU yet."
    from benchmarks import gpu_report

    return "\n\n".join(f"{provenance(results[n], n)}\n\n{gpu_report.table(results[n])}" for n in found)


TABLES = {
    "bench": bench, "build": build, "dask": dask, "cluster-build": cluster_build, "rehearsal": rehearsal,
    "figures": figures, "histograms": histograms, "recipes": recipes, "loop": loop,
    "input-determinism": determinism, "data-service": data_service, "gpu": gpu,
}


def render(page: str, results: dict) -> str:
    """`page` with every generated block rewritten from `results`; an unknown block name is an error."""
    unknown = [m.group(2) for m in BLOCK.finditer(page) if m.group(2) not in TABLES]
    if unknown:
        raise KeyError(f"docs/performance.md has blocks no table makes: {unknown}")
    return BLOCK.sub(lambda m: f"{m.group(1)}{TABLES[m.group(2)](results)}\n{m.group(4)}", page)


def stale_blocks(page: str, results: dict) -> list[str]:
    """Names of the blocks whose text differs from what `results` generate."""
    fresh = {m.group(2): m.group(3) for m in BLOCK.finditer(render(page, results))}
    return [m.group(2) for m in BLOCK.finditer(page) if fresh[m.group(2)] != m.group(3)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    p.add_argument("--page", default=PAGE)
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args(argv)
    with open(args.page) as f:
        page = f.read()
    results = load(args.results)
    stale = stale_blocks(page, results)
    if args.check:
        print(f"stale blocks in {args.page}: {', '.join(stale)}" if stale else f"{args.page} is up to date")
        return 1 if stale else 0
    with open(args.page, "w") as f:
        f.write(render(page, results))
    print(f"rewrote {len(stale)} block(s) of {args.page}" + (f": {', '.join(stale)}" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
