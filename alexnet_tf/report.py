"""The evaluation report: one self-contained HTML file (pictures inline), readable offline.

Written by `python -m alexnet_tf.evaluate --report DIR` into `DIR/report.html`:
the errors beside the paper's, the paper's Figures 3 and 4 drawn from the
evaluated model, per-class errors worst first, the most confused class pairs
and, for a model folder, the learning curves of its `history.json`.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os

import tensorflow as tf

from alexnet_tf import figures

REPORT_FILE = "report.html"

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: 2px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f5f5f5; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figcaption { color: #555; max-width: 900px; } img { max-width: 100%; }
.scroll { max-height: 420px; overflow-y: auto; display: inline-block; } .note { color: #777; }
"""


def _img(image, alt: str) -> str:
    data = base64.b64encode(figures.png(image)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _figure(image, alt: str, caption: str, missing: str) -> str:
    if image is None:
        return f'<p class="note">{html.escape(missing)}</p>'
    return f"<figure>{_img(image, alt)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def _table(header, rows, numeric=()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{html.escape(str(v))}</td>' if i in numeric else
                         f"<td>{html.escape(str(v))}</td>" for i, v in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def line_chart(series: dict, title: str, y_label: str, width: int = 520, height: int = 300) -> str:
    """An inline SVG chart of {name: [(x, y), ...]} (no script, no external file)."""
    points = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    if not points:
        return f'<p class="note">{html.escape(title)}: nothing to plot.</p>'
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 66, 130, 28, 40
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + ph - (y - y0) / (y1 - y0) * ph

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="18" font-weight="bold">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="11">{y:.3g}</text>')
    for x in sorted({p[0] for p in points}):
        if len({p[0] for p in points}) <= 12 or x in (x0, x1):
            parts.append(f'<text x="{sx(x):.1f}" y="{top + ph + 15}" text-anchor="middle" font-size="11">{x:g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="12">epoch</text>')
    parts.append(f'<text x="12" y="{top + ph / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 12 {top + ph / 2})">{html.escape(y_label)}</text>')
    for i, (name, s) in enumerate(series.items()):
        pts = [(x, y) for x, y in s if y is not None and math.isfinite(y)]
        if not pts:
            continue
        c = colours[i % len(colours)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{path}"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{c}"/>' for x, y in pts]
        ly = top + 14 + 18 * i
        parts.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 30}" y1="{ly}" y2="{ly}" stroke="{c}" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{left + pw + 34}" y="{ly + 4}" font-size="12">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def learning_curves(history: list[dict]) -> str:
    """Loss and error charts of a run's history.json."""
    def series(key):
        return [(h["epoch"], h.get(key)) for h in history]

    loss = line_chart({"train": series("train_loss"), "validation": series("val_loss")}, "Loss", "loss")
    errors = line_chart({"train top-1": series("train_top1_error"), "val top-1": series("val_top1_error"),
                         "train top-5": series("train_top5_error"), "val top-5": series("val_top5_error")},
                        "Error", "error")
    lr = line_chart({"learning rate": series("learning_rate")}, "Learning rate", "learning rate")
    return loss + errors + lr


def build(result: dict, per_class: dict, classes, drawn: figures.Figures, *, source: str, data_dir: str,
          history: list[dict] | None = None) -> str:
    """The report's HTML.

    Args:
      result: `evaluate.evaluate`'s result.
      per_class: The central patch's per-class sums with the confusion matrix (`evaluation.split_sums`).
      classes: The records' classes (`tfrecords.classes.ClassInfo`), by label.
      drawn: The figures of the evaluated model.
      source: The model evaluated (a path).
      data_dir: The records evaluated on.
      history: The run's history.json, when a model folder was evaluated.
    """
    e = html.escape
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = [("central 227×227 patch", result["central_crop"])]
    if result.get("ten_crops"):
        rows.append(("10 patches, softmax averaged", result["ten_crops"]))
    rows.append(("paper, 1 CNN (ILSVRC-2012 validation, 10 patches)", result["paper_one_cnn_validation"]))
    errors = _table(["", "top-1 error", "top-5 error"],
                    [(name, _pct(r["top1_error"]), _pct(r["top5_error"])) for name, r in rows], numeric=(1, 2))

    worst = figures.per_class_table(per_class, classes)
    per_class_html = _table(
        ["#", "class", "synset", "images", "top-1 error", "top-5 error"],
        [(i + 1, r["name"], r["synset"], r["images"], _pct(r["top1_error"]), _pct(r["top5_error"]))
         for i, r in enumerate(worst)], numeric=(0, 3, 4, 5))
    pairs = figures.confused_pairs(per_class["confusion"], classes)
    pairs_html = (_table(["true class", "predicted as", "images", "share of the true class"],
                         [(p["true"], p["predicted"], p["images"], _pct(p["share"])) for p in pairs],
                         numeric=(2, 3))
                  if pairs else '<p class="note">No image was misclassified.</p>')

    sections = [
        f"<h1>AlexNet evaluation: {e(result['split'])}, {result['num_examples']} images</h1>",
        f'<p>Model <code>{e(source)}</code>, records <code>{e(data_dir)}</code>, written {when}.</p>',
        '<h2 id="errors">Errors</h2>', errors,
        '<p class="note">The paper\'s figures are for the 1000 ILSVRC-2012 classes; on other records '
        "(fewer classes, other images) they are a reference point, not a target.</p>",
        '<h2 id="figure3">Figure 3: conv1 kernels</h2>',
    ]
    older = "(exported by an earlier version); export it again to see {}."
    sections += [
        _figure(drawn.kernels, "conv1 kernels", "The 96 kernels of the first layer, one band per group (on the "
                "grouped net the first 48 feed conv2's first group, the paper's GPU 1), each scaled to its own "
                "range.", "This SavedModel does not carry its conv1 kernels " + older.format("them")),
        '<h2 id="figure4">Figure 4: predictions and fc7 neighbours</h2>',
        _figure(drawn.predictions, "top-5 predictions", "Validation images with their true class under them and "
                "the model's five most probable classes; the true class's bar is red when it is among them.", ""),
        _figure(drawn.neighbours, "fc7 nearest neighbours", "Query images (first column) and the validation "
                "images whose fc7 vectors are nearest (Euclidean), nearest first; names in green are of the "
                "query's class.", "This SavedModel has no fc7 output " + older.format("its neighbours")),
    ]
    sections += [
        '<h2 id="per-class">Per-class errors, worst first (central patch)</h2>',
        f'<div class="scroll">{per_class_html}</div>',
        '<h2 id="confused">Most confused class pairs (central patch, top-1)</h2>', pairs_html,
    ]
    if history:
        sections += ['<h2 id="curves">Learning curves</h2>', f"<div>{learning_curves(history)}</div>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>AlexNet evaluation: {e(result['split'])}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(sections)}</body></html>\n")


def write(report_dir: str, page: str) -> str:
    """Writes `page` to `report_dir/report.html` (via a temporary file); returns its path."""
    tf.io.gfile.makedirs(report_dir)
    path = os.path.join(report_dir, REPORT_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(page)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return path
