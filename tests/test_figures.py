"""The paper's figures (alexnet_tf.figures), per-class sums, and the evaluation report."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from alexnet_tf import evaluation, figures
from tfrecords.classes import ClassInfo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- Figure 3 -----------------------------------------------------------------


def test_kernel_grid_lays_out_groups_in_bands_each_kernel_at_its_own_range():
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 0.01, (11, 11, 3, 96)).astype(np.float32)
    kernel[..., 5] *= 100  # One large kernel must not wash out the others.
    kernel[..., 60] = 0.3  # A constant kernel is grey.
    grid = figures.kernel_grid(kernel, groups=2, columns=16, scale=1, gap=1, group_gap=8)
    band = 3 * 12 + 1
    assert grid.dtype == np.uint8 and grid.shape == (2 * band + 8, 16 * 12 + 1, 3)

    def tile(i):
        g, j = divmod(i, 48)
        r, c = divmod(j, 16)
        top, left = g * (band + 8) + 1 + r * 12, 1 + c * 12
        return grid[top:top + 11, left:left + 11]

    for i in (0, 5, 47, 48, 95):
        assert tile(i).min() == 0 and tile(i).max() == 255  # Scaled to its own range.
    assert (tile(60) == 128).all()
    # Kernel 48 (the second group's first) starts the second band, below the gap between groups.
    np.testing.assert_array_equal(tile(48), np.round((kernel[..., 48] - kernel[..., 48].min())
                                                     / np.ptp(kernel[..., 48]) * 255).astype(np.uint8))
    assert (grid[band:band + 8] == 255).all()  # The white gap between the bands.
    assert figures.kernel_grid(kernel, groups=1, scale=1).shape == (6 * 12 + 1, 16 * 12 + 1, 3)
    with pytest.raises(ValueError, match="96 kernels do not split into 5 groups"):
        figures.kernel_grid(kernel, groups=5)


# -- Figure 4 -----------------------------------------------------------------


def _red(image):
    return int(np.all(image == figures.TRUE_BAR, axis=-1).sum())


def test_prediction_bars_are_red_only_for_the_true_class():
    images = np.full((2, 227, 227, 3), 90, np.uint8)
    names = [f"class {i}, other name" for i in range(10)]
    top = np.array([[3, 1, 2, 0, 4], [5, 6, 7, 8, 9]])
    probs = np.array([[0.9, 0.04, 0.03, 0.02, 0.01]] * 2)
    hit = figures.predictions_figure(images[:1], [3], top[:1], probs[:1], names)
    miss = figures.predictions_figure(images[1:], [3], top[1:], probs[1:], names)
    assert _red(hit) > 500 and _red(miss) == 0
    both = figures.predictions_figure(images, [3, 3], top, probs, names, columns=4)
    assert both.shape[1] == 2 * hit.shape[1] and both.shape[0] == hit.shape[0]


def test_nearest_is_euclidean_and_skips_the_query_itself():
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(50, 16))
    queries = [3, 10]
    got = figures.nearest(pool[queries], pool, 4, exclude=queries)
    for row, q in zip(got, queries):
        d = np.linalg.norm(pool - pool[q], axis=1)
        d[q] = np.inf
        np.testing.assert_array_equal(row, np.argsort(d)[:4])
    assert figures.nearest(pool[:1], pool[:3], 6, exclude=[0]).shape == (1, 2)  # No more than the pool has.


def test_fixed_images_show_distinct_classes_first():
    assert figures._distinct_first([0, 0, 1, 1, 2, 0], 4) == [0, 2, 4, 1]


# -- per-class sums -------------------------------------------------------------


def test_per_class_sums_and_confusion_match_a_count_by_hand():
    rng = np.random.default_rng(2)
    c, n = 7, 200
    probs = rng.dirichlet(np.ones(c), n).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    loss = -np.log(probs[np.arange(n), labels])
    sums = evaluation.exact_sums(tf.constant(loss), tf.constant(probs), tf.constant(labels), c, confusion=True)
    assert sums.shape == (evaluation.sums_size(c, True),)
    rates, per_class = evaluation.split_sums(sums.numpy(), c)
    top5 = np.argsort(-probs, axis=1)[:, :5]
    for k in range(c):
        mine = labels == k
        assert per_class["count"][k] == mine.sum()
        assert per_class["top1_error"][k] == pytest.approx(1 - (probs[mine].argmax(1) == k).mean())
        assert per_class["top5_error"][k] == pytest.approx(1 - (top5[mine] == k).any(1).mean())
    expected = np.zeros((c, c), np.int64)
    np.add.at(expected, (labels, probs.argmax(1)), 1)
    np.testing.assert_array_equal(per_class["confusion"], expected)
    assert rates["top1_error"] == pytest.approx(1 - (probs.argmax(1) == labels).mean())


def test_ties_and_underflow_count_against_the_label():
    # A dead network (every logit equal), a saturated one (softmax underflows to exact zeros),
    # a diverged one (NaN) and a healthy one, 10 classes, label 3.
    logits = np.zeros((4, 10), np.float32)
    logits[1, 0] = 200.0
    logits[2] = np.nan
    logits[3, 3], logits[3, 0] = 2.0, 1.0
    labels = tf.constant([3, 3, 3, 3])
    assert tf.math.in_top_k(labels, tf.nn.softmax(logits), 5).numpy().tolist() == [True, True, False, True]
    assert evaluation.top_k_hits(logits, labels, 5).numpy().tolist() == [False, False, False, True]
    assert evaluation.top_k_hits(tf.nn.log_softmax(logits), labels, 1).numpy().tolist() == [False, False, False, True]
    logp = tf.nn.log_softmax(logits)
    sums = evaluation.exact_sums(-tf.gather(logp, labels, batch_dims=1), logp, labels).numpy()
    assert sums[1:5].tolist() == [1, 1, 4, 1]  # Top-1 and top-5 hits: only the healthy row; one NaN loss.
    rates = evaluation.exact_rates(sums)
    assert np.isnan(rates["loss"]) and rates["top5_error"] == 0.75
    # The saturated row's loss is its true 200 nats, not a capped -log(1e-12) = 27.6.
    assert -logp[1, 3].numpy() == pytest.approx(200.0)


def test_tables_order_worst_first_and_most_confused_first():
    classes = [ClassInfo(i, f"n{i:08d}", f"name {i}") for i in range(3)]
    per_class = {"count": [4, 4, 0], "top1_error": [0.25, 0.75, 1.0], "top5_error": [0.0, 0.25, 1.0]}
    rows = figures.per_class_table(per_class, classes)
    assert [r["label"] for r in rows] == [1, 0]  # The class without images is left out.
    pairs = figures.confused_pairs([[3, 1, 0], [2, 1, 1], [0, 0, 0]], classes)
    assert [(p["true"], p["predicted"], p["images"]) for p in pairs] == [
        ("name 1", "name 0", 2), ("name 0", "name 1", 1), ("name 1", "name 2", 1)]
    assert pairs[0]["share"] == pytest.approx(0.5)


# -- the report -----------------------------------------------------------------


class _Page(html.parser.HTMLParser):
    """Ids, images (decoded), table rows per table and svg count of a page."""

    def __init__(self):
        super().__init__()
        self.ids, self.images, self.tables, self.svgs, self.text = set(), [], [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            assert a["src"].startswith("data:image/png;base64,")  # Inline: readable offline.
            self.images.append((a["alt"], Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])))))
        elif tag == "table":
            self.tables.append(0)
        elif tag == "tr":
            self.tables[-1] += 1
        elif tag == "svg":
            self.svgs += 1
        elif tag in ("script", "link", "iframe"):
            raise AssertionError(f"<{tag}> in a self-contained report")

    def handle_data(self, data):
        self.text.append(data)


def _evaluate(*args):
    return subprocess.run([sys.executable, "-m", "alexnet_tf.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def run_folder(model_folder, built, tmp_path_factory):
    """The shared model folder, copied, with a history.json."""
    src, _, _ = model_folder
    dest = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("exported"))
    history = [{"epoch": e, "train_loss": 2.3 - 0.2 * e, "val_loss": 2.35 - 0.15 * e, "learning_rate": 0.01,
                "train_top1_error": 0.9 - 0.05 * e, "val_top1_error": 0.92 - 0.04 * e,
                "train_top5_error": 0.5 - 0.05 * e, "val_top5_error": 0.52 - 0.04 * e} for e in (1, 2, 3)]
    (dest / "history.json").write_text(json.dumps(history))
    return str(dest)


@pytest.mark.slow
def test_report_of_a_model_folder_is_one_self_contained_page(run_folder, built, tmp_path):
    out, meta = built
    r = _evaluate("--model_dir", run_folder, "--data_dir", out, "--noten_crops", "--report", str(tmp_path / "rep"),
                  "--output_json", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(tmp_path / "rep") == ["report.html"]
    page = _Page()
    page.feed((tmp_path / "rep" / "report.html").read_text())
    assert {"errors", "figure3", "figure4", "per-class", "confused", "curves"} <= page.ids
    images = dict(page.images)
    assert set(images) == {"conv1 kernels", "top-5 predictions", "fc7 nearest neighbours"}
    kernels = np.asarray(images["conv1 kernels"])
    assert kernels.shape == figures.kernel_grid(np.zeros((11, 11, 3, 96)), 2).shape
    for im in images.values():
        assert np.asarray(im).std() > 10  # Pictures, not blank.
    assert page.tables[0] == 3  # Header, central patch, paper.
    per_class_rows = page.tables[1] - 1
    assert per_class_rows == meta.num_classes  # Every class of the split (each has images).
    assert page.svgs == 3  # Loss, error, learning rate.
    text = " ".join(page.text)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert "per_class" not in result["central_crop"]  # The JSON keeps its shape.
    assert f"{result['central_crop']['top1_error']:.1%}" in text and "40.7%" in text  # Ours beside the paper's.
    # The worst class comes first; its error is the largest in the table.
    assert meta.classes[0].name in text


@pytest.mark.slow  # The SavedModel's fc7 and kernels are checked in test_export; this is the CLI around them.
def test_report_of_a_saved_model_has_its_figures_and_no_curves(model_folder, built, tmp_path):
    out, meta = built
    model_dir, model, _ = model_folder
    saved = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "alexnet_tf.export", "--model_dir", model_dir, "--export_dir",
                        str(saved)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _evaluate("--saved_model", str(saved), "--data_dir", out, "--noten_crops", "--report", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    page = _Page()
    page.feed((tmp_path / "rep" / "report.html").read_text())
    assert {"conv1 kernels", "top-5 predictions", "fc7 nearest neighbours"} == {a for a, _ in page.images}
    assert "curves" not in page.ids and page.svgs == 0


def test_report_into_a_file_is_refused(model_folder, built, tmp_path):
    (tmp_path / "taken").write_text("x")
    r = _evaluate("--model_dir", model_folder[0], "--data_dir", built[0], "--report", str(tmp_path / "taken"))
    assert r.returncode == 2 and "is a file; it takes a folder" in r.stderr
    assert (tmp_path / "taken").read_text() == "x"


# -- TensorBoard, as a user sees it -----------------------------------------------


@pytest.fixture(scope="module")
def trained_run(built, tmp_path_factory):
    """A short training run (2 epochs of 1 step) with the figures on: its model folder."""
    from alexnet_tf import trainer
    from alexnet_tf.config import TrainConfig

    out, _ = built
    model_dir = tmp_path_factory.mktemp("trained")
    config = TrainConfig(data_dir=out, batch_size=8, eval_batch_size=16, epochs=2, steps_per_epoch=1,
                         log_images=2, histograms=False, export=False, seed=0, verbose=False, figure_pool=24)
    trainer.train_and_evaluate(config, str(model_dir), tf.distribute.OneDeviceStrategy("/cpu:0"))
    return str(model_dir)


def _get(url: str, timeout: float = 10):
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@pytest.fixture(scope="module")
def tensorboard(trained_run):
    """`tensorboard --logdir` on the run's logs, on a free loopback port: its base URL."""
    import cluster
    import time

    (port,) = cluster.free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                             os.path.join(trained_run, "tensorboard"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:  # Up, and done with its first load of the event files.
        try:
            tags = json.loads(_get(f"{url}/data/plugin/images/tags"))
            if {"train", "validation"} <= set(tags) and "top5_predictions" in tags["validation"]:
                break
        except OSError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "tensorboard did not serve the run's images within 120 s"
        time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_tensorboard_serves_the_scalars_and_the_papers_figures(tensorboard, trained_run, built):
    scalars = json.loads(_get(f"{tensorboard}/data/plugin/scalars/tags"))
    assert {"loss", "top1_error", "top5_error", "learning_rate", "images_per_second"} <= set(scalars["train"])
    assert {"loss", "top1_error", "top5_error"} <= set(scalars["validation"])
    images = json.loads(_get(f"{tensorboard}/data/plugin/images/tags"))
    assert {"conv1_kernels", "augmented_training_images"} <= set(images["train"])
    assert {"top5_predictions", "fc7_nearest_neighbours"} <= set(images["validation"])
    for run, tag in [("train", "conv1_kernels"), ("validation", "top5_predictions"),
                     ("validation", "fc7_nearest_neighbours")]:
        entries = json.loads(_get(f"{tensorboard}/data/plugin/images/images?run={run}&tag={tag}"))
        assert [e["step"] for e in entries] == [1, 2]  # One per epoch.
        picture = Image.open(io.BytesIO(_get(f"{tensorboard}/data/plugin/images/individualImage?"
                                             f"{entries[-1]['query']}")))
        assert np.asarray(picture).std() > 10
        if tag == "conv1_kernels":
            assert picture.size[::-1] == figures.kernel_grid(np.zeros((11, 11, 3, 96)), 2).shape[:2]
    histograms = json.loads(_get(f"{tensorboard}/data/plugin/histograms/tags"))
    assert {"per_class_top1_error", "per_class_top5_error"} <= set(histograms["validation"])
    text = json.loads(_get(f"{tensorboard}/data/plugin/text/tags"))
    assert "worst_classes" in text["validation"]
    worst = json.loads(_get(f"{tensorboard}/data/plugin/text/text?run=validation&tag=worst_classes"))
    assert [w["step"] for w in worst] == [1, 2]
    table = worst[-1]["text"]  # The Markdown table, rendered to HTML by TensorBoard: every class (10 < 20).
    assert table.count("<tr>") == 1 + built[1].num_classes
    assert all(c.synset in table for c in built[1].classes)


# -- a real browser (slow) ---------------------------------------------------------


def _browser():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _screenshot(url: str, path, size="1200,1600") -> np.ndarray:
    r = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={size}", "--virtual-time-budget=15000", f"--screenshot={path}", url],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and os.path.exists(path), r.stderr[-2000:]
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
@pytest.mark.skipif(_browser() is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_report_and_tensorboard_render_in_a_real_browser(trained_run, tensorboard, built, tmp_path):
    r = _evaluate("--model_dir", trained_run, "--data_dir", built[0], "--noten_crops", "--figure_pool=24",
                  "--report", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    shot = _screenshot(f"file://{tmp_path / 'rep' / 'report.html'}", tmp_path / "report.png", "1200,4000")
    # Not blank: many distinct colours (figures), and the page's height in use.
    colours = len(np.unique(shot.reshape(-1, 3), axis=0))
    assert colours > 1000, colours
    rows_used = np.flatnonzero((shot != 255).any(axis=(1, 2)))
    assert rows_used.max() - rows_used.min() > 2000
    board = _screenshot(f"{tensorboard}/?darkMode=false#images", tmp_path / "tensorboard.png")
    assert len(np.unique(board.reshape(-1, 3), axis=0)) > 200  # The dashboard drew its images and charts.
    assert board.std() > 20


def test_report_of_an_older_export_says_what_it_lacks():
    from alexnet_tf import report

    classes = [ClassInfo(i, f"n{i:08d}", f"name {i} & co") for i in range(2)]
    result = {"split": "validation", "num_examples": 4, "central_crop": {"top1_error": 0.5, "top5_error": 0.0},
              "paper_one_cnn_validation": {"top1_error": 0.407, "top5_error": 0.182}}
    per_class = {"count": [2, 2], "top1_error": [0.5, 0.5], "top5_error": [0.0, 0.0],
                 "confusion": np.array([[1, 1], [1, 1]])}
    drawn = figures.Figures(None, np.full((10, 10, 3), 128, np.uint8), None)
    page = _Page()
    page.feed(report.build(result, per_class, classes, drawn, source="m", data_dir="d"))
    text = " ".join(page.text)
    assert "does not carry its conv1 kernels" in text and "has no fc7 output" in text
    assert [a for a, _ in page.images] == ["top-5 predictions"]
    assert "name 0 & co" in text  # Escaped in the page, read back whole.


@pytest.mark.slow  # Trains the sample preset for 2 epochs: a few minutes on 2 cores.
def test_bench_figures_measures_the_added_cost(built, tmp_path):
    from benchmarks import figures as bench

    out = tmp_path / "figures.json"
    bench.main(["--data_dir", built[0], "--runs", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["train_epoch_seconds"] > 0 and r["validation_seconds"] > 0 and r["figures_seconds"] > 0
    assert r["figure_pool"] == built[1].split("validation").num_examples  # The whole (small) split.
    assert r["share_of_epoch"] == pytest.approx(
        r["added_seconds_per_epoch"] / (r["train_epoch_seconds"] + r["validation_seconds"]))
