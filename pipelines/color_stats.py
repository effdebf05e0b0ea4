"""Training-set colour statistics for the paper's PCA lighting noise (§4.1).

The paper perturbs each training image along the principal components of the
RGB pixel values "throughout the ImageNet training set". These statistics are
computed here from the data, in the same pass that writes the records.

Everything is summed in integers, end to end: `PixelSums` holds the pixel
count, the per-channel sums, the 3x3 sums of products (Python integers, which
never overflow) and the sum of the square images (int64: 255 x 2^55 images
before it could). Integer addition is exact and its order does not matter, so
shards merged in any order, by any runner, on any number of workers give the
same sums bit for bit, and `summarize` turns them into the same floats: two
builds of the same images write the same `color_stats` and `mean_image.npy`.

Pure NumPy: nothing here imports Beam or TensorFlow (the Beam `CombineFn` is in
`pipelines.transforms`).
"""

from __future__ import annotations

import numpy as np


class PixelSums:
    """Exact integer sums of many RGB images (and of their square crops, for the mean image).

    Per image: one int64 product of the (pixels, 3) matrix with itself (exact:
    even a 2^32-pixel image stays below 2^63), one sum per channel, and one
    add of the square image into an int64 sum; the image's totals are then
    added to Python integers.
    """

    def __init__(self):
        self.num_images = self.num_pixels = 0
        self.sum = [0, 0, 0]
        self.products = [[0] * 3 for _ in range(3)]
        self.image_sum: np.ndarray | None = None  # int64 (S, S, 3).

    @classmethod
    def of_image(cls, pixels: np.ndarray, square: np.ndarray | None = None) -> "PixelSums":
        sums = cls()
        sums.add(pixels, square)
        return sums

    def add(self, pixels: np.ndarray, square: np.ndarray | None = None) -> None:
        """Adds one (H, W, 3) uint8 image; `square` (if any) feeds the mean image."""
        x = pixels.reshape(-1, 3).astype(np.int64)
        products = x.T @ x
        self.num_images += 1
        self.num_pixels += len(x)
        # Per channel: far faster than an axis-0 reduction of the (pixels, 3) matrix.
        self.sum = [s + int(pixels[..., c].sum(dtype=np.uint64)) for c, s in enumerate(self.sum)]
        self.products = [[p + int(q) for p, q in zip(row, new)] for row, new in zip(self.products, products)]
        if square is not None:
            self._add_image_sum(square.astype(np.int64))

    def _add_image_sum(self, image_sum: np.ndarray) -> None:
        if self.image_sum is None:
            self.image_sum = image_sum.copy()
        elif self.image_sum.shape != image_sum.shape:
            raise ValueError(f"mean image shapes differ: {self.image_sum.shape} vs {image_sum.shape}")
        else:
            self.image_sum += image_sum

    def merge(self, other: "PixelSums") -> "PixelSums":
        """Adds the sums of another, disjoint set of images (in place; returns self)."""
        self.num_images += other.num_images
        self.num_pixels += other.num_pixels
        self.sum = [a + b for a, b in zip(self.sum, other.sum)]
        self.products = [[a + b for a, b in zip(r, s)] for r, s in zip(self.products, other.products)]
        if other.image_sum is not None:
            self._add_image_sum(other.image_sum)
        return self

    def to_json(self) -> dict:
        """The integer sums as JSON (exact: JSON integers have no size limit); the image sum is left out."""
        return {"num_images": self.num_images, "num_pixels": self.num_pixels, "sum": self.sum,
                "products": self.products}

    @classmethod
    def from_json(cls, obj: dict, image_sum: np.ndarray | None = None) -> "PixelSums":
        sums = cls()
        sums.num_images, sums.num_pixels = int(obj["num_images"]), int(obj["num_pixels"])
        sums.sum = [int(v) for v in obj["sum"]]
        sums.products = [[int(v) for v in row] for row in obj["products"]]
        sums.image_sum = None if image_sum is None else image_sum.astype(np.int64)
        return sums


def summarize(s: PixelSums) -> tuple[dict, np.ndarray | None]:
    """Turns the sums into the `color_stats` of metadata.json and the mean image.

    Every float is formed once from exact integers (a correctly rounded
    division), so equal sums give equal bytes.

    Returns:
      (stats, mean_image): stats holds `mean_rgb`, `covariance` (population),
      `eigenvalues` (descending) and `eigenvectors` (unit columns, matching the
      eigenvalues; each column's sign is chosen so its components sum to >= 0),
      all in 0..255 pixel units; mean_image is float32 (S, S, 3) or None.
    """
    n = s.num_pixels
    if n == 0:
        return {}, None
    # Covariance (P - S S^T / n) / n = (n P - S S^T) / n^2, its numerator an exact integer.
    cov = np.array([[(n * s.products[i][j] - s.sum[i] * s.sum[j]) / (n * n) for j in range(3)] for i in range(3)])
    values, vectors = np.linalg.eigh(cov)  # Ascending; symmetric input.
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    vectors = vectors * np.where(vectors.sum(axis=0) < 0, -1.0, 1.0)
    stats = {
        "pixel_scale": 255,
        "num_images": s.num_images,
        "num_pixels": n,
        "mean_rgb": [v / n for v in s.sum],
        "std_rgb": np.sqrt(np.diag(cov)).tolist(),
        "covariance": cov.tolist(),
        "eigenvalues": values.tolist(),
        "eigenvectors": vectors.tolist(),
    }
    mean_image = None
    if s.image_sum is not None:
        mean_image = (s.image_sum / s.num_images).astype(np.float32)
    return stats, mean_image
