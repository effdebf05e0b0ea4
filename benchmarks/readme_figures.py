"""The README's pictures: the paper's Figures 3 and 4 drawn by the product from a trained model folder.

    python -m benchmarks.readme_figures --model_dir=runs/demo --data_dir=data --output_dir=docs/images

Writes `conv1_kernels.png` (Figure 3) and `top5_predictions.png` (Figure 4,
left) with the same code that draws them for TensorBoard and for
`python -m alexnet_tf.evaluate --report`, so a real run remakes them.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def draw(model_dir: str, data_dir: str, output_dir: str, pool: int = 100) -> list[str]:
    """Draws the figures of `model_dir`'s latest checkpoint on `data_dir`'s validation images.

    Returns:
      The paths written.
    """
    from alexnet_tf import evaluate, figures, preprocessing
    from tfrecords.folder import Records

    loaded = evaluate.load(None, model_dir)
    records = Records.open(data_dir, splits=["validation"])
    stats = preprocessing.ColorStats.for_evaluation(np.asarray(loaded.mean, np.float32), records.meta.image.square)
    fixed = figures.FixedImages(records, stats, pool)
    drawn = fixed.draw(loaded.forward, [c.name for c in records.classes], loaded.kernel, loaded.groups)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for name, image in (("conv1_kernels.png", drawn.kernels), ("top5_predictions.png", drawn.predictions)):
        path = os.path.join(output_dir, name)
        with open(path, "wb") as f:
            f.write(figures.png(image))
        written.append(path)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True, help="a training run's folder (its latest checkpoint is drawn)")
    p.add_argument("--data_dir", required=True, help="the records the run was trained on")
    p.add_argument("--output_dir", default=os.path.join("docs", "images"))
    p.add_argument("--figure_pool", type=int, default=100, help="the first N validation images")
    args = p.parse_args(argv)
    for path in draw(args.model_dir, args.data_dir, args.output_dir, args.figure_pool):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
