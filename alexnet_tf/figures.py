"""The paper's figures, drawn from a model: for TensorBoard each epoch and for `evaluate --report`.

- Figure 3: the 96 conv1 kernels, one band per group (on the grouped net the
  first 48 feed conv2's first group, the "GPU 1" of the paper, the last 48 the
  second), each kernel scaled to its own range.
- Figure 4, left: fixed validation images, each with its true class and the
  top-5 classes as bars (the true class's bar in red when it is among them).
- Figure 4, right: fixed query images, each followed by the validation images
  whose fc7 vectors (the last 4096-wide hidden layer, after its ReLU) are
  nearest in Euclidean distance. The paper searched the training set; a fixed
  pool of validation images keeps this cheap enough for every epoch.
- Per-class errors, from the evaluator's per-class sums.

Drawing is Pillow's and numpy's; images come back as uint8 (height, width, 3).
"""

from __future__ import annotations

import dataclasses
import io
import math

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont

from alexnet_tf import preprocessing
from tfrecords.folder import Records

# Figure 4 shows eight images with their top-5 (left) and five queries with
# six neighbours each (right).
PREDICTION_IMAGES = 8
QUERIES = 5
NEIGHBOURS = 6
POOL = 500  # Validation images searched for neighbours; their JPEGs are kept (about 30 KB each).

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
TRUE_BAR = (240, 120, 120)  # The paper draws the correct label's bar in red; light, for the name on it.
OTHER_BAR = (150, 195, 230)
SAME_CLASS = (0, 128, 0)


def _font(size: int):
    return ImageFont.load_default(size=size)


def _fit(text: str, width: int, font, draw: ImageDraw.ImageDraw) -> str:
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def short_name(name: str) -> str:
    """The first of a class's comma-separated names ("tench, Tinca tinca" -> "tench")."""
    return name.split(",")[0].strip()


# ---------------------------------------------------------------------------
# Figure 3.


def conv1_kernel(model) -> np.ndarray:
    """The conv1 kernel of a Keras AlexNet, float32 (11, 11, 3, 96)."""
    return np.asarray(tf.cast(model.get_layer("conv1").kernel, tf.float32))


def kernel_grid(kernel, groups: int = 2, columns: int = 16, scale: int = 3, gap: int = 1,
                group_gap: int = 8) -> np.ndarray:
    """Kernels (h, w, 3, n) laid out as Figure 3: `groups` bands of `columns` kernels a row.

    Each kernel is scaled to its own minimum and maximum, as the paper's
    figure shows them; a kernel that is constant is grey. Pixels are repeated
    `scale` times each way to be seen.
    """
    k = np.asarray(kernel, np.float32)
    if k.ndim != 4 or k.shape[2] != 3:
        raise ValueError(f"expected a kernel of shape (h, w, 3, n), got {k.shape}")
    h, w, _, n = k.shape
    if groups < 1 or n % groups:
        raise ValueError(f"{n} kernels do not split into {groups} groups")
    lo = k.min(axis=(0, 1, 2), keepdims=True)
    span = k.max(axis=(0, 1, 2), keepdims=True) - lo
    k = np.where(span > 0, (k - lo) / np.where(span > 0, span, 1), 0.5)
    tiles = np.transpose(k, (3, 0, 1, 2))  # (n, h, w, 3)
    per_group = n // groups
    rows = math.ceil(per_group / columns)
    band_h = rows * (h + gap) + gap
    canvas = np.ones((groups * band_h + (groups - 1) * group_gap, columns * (w + gap) + gap, 3), np.float32)
    for i in range(n):
        g, j = divmod(i, per_group)
        r, c = divmod(j, columns)
        top = g * (band_h + group_gap) + gap + r * (h + gap)
        left = gap + c * (w + gap)
        canvas[top:top + h, left:left + w] = tiles[i]
    canvas = np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)
    return np.round(canvas * 255).astype(np.uint8)


def conv1_groups(grouped: bool) -> int:
    """Groups conv1's kernels fall into: conv2's input groups on the grouped net."""
    return 2 if grouped else 1


# ---------------------------------------------------------------------------
# Figure 4.


def predictions_figure(images, labels, top_labels, top_probs, names, columns: int = 4,
                       thumb: int = 150) -> np.ndarray:
    """Figure 4, left: each image with its true class under it and its top-5 as bars.

    Args:
      images: uint8 (n, h, w, 3).
      labels: True labels (n,).
      top_labels, top_probs: (n, k) classes and probabilities, most probable first.
      names: Class names by label.
    """
    n, k = np.shape(top_labels)
    font, small = _font(13), _font(11)
    line = 15
    panel_w, panel_h = thumb + 60, thumb + 24 + k * line + 10
    rows = math.ceil(n / columns)
    out = Image.new("RGB", (min(n, columns) * panel_w, rows * panel_h), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for i in range(n):
        x0, y0 = (i % columns) * panel_w, (i // columns) * panel_h
        im = Image.fromarray(np.asarray(images[i], np.uint8)).resize((thumb, thumb), Image.BILINEAR)
        out.paste(im, (x0 + 30, y0 + 4))
        title = _fit(short_name(names[int(labels[i])]), panel_w - 8, font, draw)
        draw.text((x0 + panel_w / 2, y0 + thumb + 6), title, fill=TEXT, font=font, anchor="ma")
        for j in range(k):
            y = y0 + thumb + 26 + j * line
            c, p = int(top_labels[i][j]), float(top_probs[i][j])
            width = max(1, round(p * (panel_w - 12)))
            draw.rectangle([x0 + 6, y, x0 + 6 + width, y + line - 3],
                           fill=TRUE_BAR if c == int(labels[i]) else OTHER_BAR)
            draw.text((x0 + 8, y + 1), _fit(short_name(names[c]), panel_w - 14, small, draw),
                      fill=TEXT, font=small)
    return np.asarray(out)


def nearest(query_features, pool_features, count: int, exclude=None) -> np.ndarray:
    """Indices into the pool of the `count` nearest (Euclidean) vectors to each query, nearest first.

    `exclude[i]` is a pool index query i may not match (itself), or -1.
    """
    q = np.asarray(query_features, np.float64)
    p = np.asarray(pool_features, np.float64)
    d = (q * q).sum(1)[:, None] - 2 * q @ p.T + (p * p).sum(1)[None, :]
    if exclude is not None:
        for i, j in enumerate(exclude):
            if j >= 0:
                d[i, j] = np.inf
    count = min(count, p.shape[0] - (0 if exclude is None else 1))
    return np.argsort(d, axis=1, kind="stable")[:, :count]


def neighbours_figure(queries, neighbours, query_labels, neighbour_labels, names, thumb: int = 96) -> np.ndarray:
    """Figure 4, right: one row per query, the query first, then its neighbours, nearest first.

    Names are in green where a neighbour is of the query's class.
    """
    queries = np.asarray(queries, np.uint8)
    q, k = len(queries), len(neighbours[0]) if len(neighbours) else 0
    font = _font(10)
    gap, sep, cell_h = 4, 12, thumb + 16
    out = Image.new("RGB", (gap + (thumb + gap) * (k + 1) + sep, q * cell_h + gap), BACKGROUND)
    draw = ImageDraw.Draw(out)

    def put(image, x, y, label, colour):
        out.paste(Image.fromarray(np.asarray(image, np.uint8)).resize((thumb, thumb), Image.BILINEAR), (x, y))
        draw.text((x + thumb / 2, y + thumb + 2), _fit(short_name(names[int(label)]), thumb, font, draw),
                  fill=colour, font=font, anchor="ma")

    for i in range(q):
        y = gap + i * cell_h
        put(queries[i], gap, y, query_labels[i], TEXT)
        for j in range(k):
            same = int(neighbour_labels[i][j]) == int(query_labels[i])
            put(neighbours[i][j], gap + sep + (thumb + gap) * (j + 1), y, neighbour_labels[i][j],
                SAME_CLASS if same else TEXT)
    x = gap + thumb + sep // 2 + gap // 2
    draw.line([x, 0, x, out.height], fill=(160, 160, 160), width=2)
    return np.asarray(out)


# ---------------------------------------------------------------------------
# Per-class errors.


def per_class_table(per_class: dict, classes, worst: int | None = None) -> list[dict]:
    """Rows {label, synset, name, images, top1_error, top5_error}, worst top-1 first (then top-5, label)."""
    rows = [
        {"label": c.label, "synset": c.synset, "name": c.name, "images": int(n),
         "top1_error": float(e1), "top5_error": float(e5)}
        for c, n, e1, e5 in zip(classes, per_class["count"], per_class["top1_error"], per_class["top5_error"])
        if n > 0
    ]
    rows.sort(key=lambda r: (-r["top1_error"], -r["top5_error"], r["label"]))
    return rows[:worst] if worst else rows


def confused_pairs(confusion, classes, count: int = 20) -> list[dict]:
    """The most frequent (true class, predicted class) mistakes: rows {true, predicted, images, share}."""
    m = np.array(confusion, np.int64)
    np.fill_diagonal(m, 0)
    order = np.argsort(-m, axis=None, kind="stable")[:count]
    totals = np.asarray(confusion, np.int64).sum(axis=1)
    rows = []
    for flat in order:
        t, p = divmod(int(flat), m.shape[1])
        if m[t, p] == 0:
            break
        rows.append({"true": classes[t].name, "true_synset": classes[t].synset, "predicted": classes[p].name,
                     "predicted_synset": classes[p].synset, "images": int(m[t, p]),
                     "share": float(m[t, p] / max(totals[t], 1))})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Per-class rows as a Markdown table (TensorBoard's text plugin renders it)."""
    lines = ["| class | synset | images | top-1 error | top-5 error |", "|---|---|---:|---:|---:|"]
    lines += [f"| {short_name(r['name'])} | {r['synset']} | {r['images']} | {r['top1_error']:.1%} "
              f"| {r['top5_error']:.1%} |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The fixed validation images and the model's view of them.


def _distinct_first(labels, count: int) -> list[int]:
    """Indices of `count` images: the first of each class in order, then the rest in order."""
    seen, first, rest = set(), [], []
    for i, y in enumerate(labels):
        (rest if int(y) in seen else first).append(i)
        seen.add(int(y))
    return (first + rest)[:count]


def feature_model(model):
    """A Keras model (images -> (fc7, logits)) sharing `model`'s layers and weights."""
    return keras.Model(model.inputs, [model.get_layer("fc7").output, model.output], name="alexnet_fc7")


@dataclasses.dataclass
class Figures:
    """The pictures and tables of one model on the fixed images."""

    kernels: np.ndarray | None  # Figure 3, uint8.
    predictions: np.ndarray  # Figure 4 left, uint8.
    neighbours: np.ndarray | None  # Figure 4 right, uint8 (None without fc7).


class FixedImages:
    """The first `pool` validation images, kept as JPEGs: the same images every epoch.

    The prediction images and the queries are the first image of each class
    in the pool, in order (so they show different classes), then the rest.
    """

    def __init__(self, records: Records, stats: preprocessing.ColorStats,
                 pool: int = POOL, split: str = "validation"):
        self.stats = stats
        ds = tf.data.TFRecordDataset(records.shard_paths(split)).take(pool)
        pairs = [preprocessing.parse_record(s) for s in ds]
        if not pairs:
            raise ValueError(f"the {split} split has no images to draw figures from")
        self.jpegs = tf.stack([p[0] for p in pairs])
        self.labels = np.array([int(p[1]) for p in pairs], np.int64)
        self.shown = _distinct_first(self.labels, PREDICTION_IMAGES)
        self.queries = _distinct_first(self.labels, QUERIES)
        self._inputs: dict = {}

    def display(self, indices) -> np.ndarray:
        """The central crop the model sees, as uint8 (len, crop, crop, 3)."""
        off = (self.stats.square_size - preprocessing.CROP) // 2
        squares = [preprocessing.decode_square(self.jpegs[i], self.stats.square_size) for i in indices]
        return np.stack([s[off:off + preprocessing.CROP, off:off + preprocessing.CROP].numpy() for s in squares])

    def inputs(self, batch_size: int = 50) -> tf.data.Dataset:
        """The pool preprocessed as evaluation does, in batches (made once: figures are drawn every epoch)."""
        if batch_size not in self._inputs:
            stats = self.stats
            self._inputs[batch_size] = (
                tf.data.Dataset.from_tensor_slices(self.jpegs)
                .map(lambda b: preprocessing.preprocess_for_eval(b, stats), num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch_size))
        return self._inputs[batch_size]

    def draw(self, forward, names, kernels=None, groups: int = 2) -> Figures:
        """The figures of a model.

        Args:
          forward: images -> (fc7 or None, logits), on preprocessed batches.
          names: Class names by label.
          kernels: conv1's kernel (h, w, 3, n), or None to leave Figure 3 out.
          groups: Bands of Figure 3.
        """
        features, probs = [], []
        for x in self.inputs():
            f, logits = forward(x)
            probs.append(tf.nn.softmax(tf.cast(logits, tf.float32)).numpy())
            if f is not None:
                features.append(tf.cast(f, tf.float32).numpy())
        probs = np.concatenate(probs)
        k = min(5, probs.shape[1])
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        shown = self.shown
        predictions = predictions_figure(self.display(shown), self.labels[shown], top[shown],
                                         np.take_along_axis(probs, top, 1)[shown], names)
        neighbours = None
        if features:
            features = np.concatenate(features)
            idx = nearest(features[self.queries], features, NEIGHBOURS, exclude=self.queries)
            if idx.shape[1]:
                needed = sorted(set(idx.ravel().tolist()) | set(self.queries))
                pics = dict(zip(needed, self.display(needed)))
                neighbours = neighbours_figure(
                    [pics[q] for q in self.queries], [[pics[j] for j in row] for row in idx],
                    self.labels[self.queries], [self.labels[row] for row in idx], names)
        grid = kernel_grid(kernels, groups) if kernels is not None else None
        return Figures(grid, predictions, neighbours)


def keras_forward(model):
    """`forward` for `FixedImages.draw` from a Keras AlexNet (under any strategy, in any precision)."""
    both = feature_model(model)
    return tf.function(lambda x: both(x, training=False))


def png(image) -> bytes:
    """PNG bytes of a uint8 (h, w, 3) array."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
