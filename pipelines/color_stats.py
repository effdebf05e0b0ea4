"""Training-set colour statistics for the paper's PCA lighting noise (§4.1).

The paper perturbs each training image along the principal components of the
RGB pixel values "throughout the ImageNet training set". These statistics are
computed here from the data, in float64, by a mergeable Beam `CombineFn`, in
the same pass that writes the records.

Two levels, both exact where it matters:

* `PixelSums` adds images up in integers (pixel sums, sums of products, the
  square images' sum): under 1 ms per 256x256 image, no rounding at all.
* `Moments` holds the mean and co-moments of many images in float64 and merges
  with the pairwise update of Chan, Golub and LeVeque, which stays accurate over
  10^11 pixels where a naive sum-of-squares would lose digits. A shard's
  `PixelSums` becomes one `Moments` (exactly, through Python integers).

Pure NumPy: nothing here imports Beam or TensorFlow (the Beam `CombineFn` is in
`pipelines.transforms`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# A PixelSums turns itself into Moments before its int64 sums could overflow:
# 2^40 pixels x 255^2 < 2^63.
_MAX_PIXELS = 1 << 40


@dataclasses.dataclass
class Moments:
    """Running statistics of RGB pixels (and of whole square images)."""

    num_images: int = 0
    num_pixels: int = 0
    mean: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))
    comoment: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((3, 3)))
    image_sum: np.ndarray | None = None  # Sum of the square images, float64.

    @classmethod
    def of_image(cls, pixels: np.ndarray, square: np.ndarray | None = None) -> "Moments":
        """Moments of one (H, W, 3) uint8 image; `square` (if any) feeds the mean image."""
        sums = PixelSums()
        sums.add(pixels, square)
        return sums.moments()

    def merge(self, other: "Moments") -> "Moments":
        """Combines two disjoint sets of images (in place, returns self)."""
        if other.num_pixels == 0:
            return self
        if self.num_pixels == 0:
            self.num_images, self.num_pixels = other.num_images, other.num_pixels
            self.mean, self.comoment = other.mean.copy(), other.comoment.copy()
            self.image_sum = None if other.image_sum is None else other.image_sum.copy()
            return self
        na, nb = self.num_pixels, other.num_pixels
        n = na + nb
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.comoment = self.comoment + other.comoment + np.outer(delta, delta) * (na * nb / n)
        self.num_pixels = n
        self.num_images += other.num_images
        if other.image_sum is not None:
            if self.image_sum is None:
                self.image_sum = other.image_sum.copy()
            elif self.image_sum.shape != other.image_sum.shape:
                raise ValueError(
                    f"mean image shapes differ: {self.image_sum.shape} vs {other.image_sum.shape}"
                )
            else:
                self.image_sum += other.image_sum
        return self


def summarize(m: Moments) -> tuple[dict, np.ndarray | None]:
    """Turns moments into the `color_stats` of metadata.json and the mean image.

    Returns:
      (stats, mean_image): stats holds `mean_rgb`, `covariance` (population),
      `eigenvalues` (descending) and `eigenvectors` (unit columns, matching the
      eigenvalues; each column's sign is chosen so its components sum to >= 0),
      all in 0..255 pixel units; mean_image is float32 (S, S, 3) or None.
    """
    if m.num_pixels == 0:
        return {}, None
    cov = m.comoment / m.num_pixels
    values, vectors = np.linalg.eigh(cov)  # Ascending; symmetric input.
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    vectors = vectors * np.where(vectors.sum(axis=0) < 0, -1.0, 1.0)
    stats = {
        "pixel_scale": 255,
        "num_images": m.num_images,
        "num_pixels": m.num_pixels,
        "mean_rgb": m.mean.tolist(),
        "std_rgb": np.sqrt(np.diag(cov)).tolist(),
        "covariance": cov.tolist(),
        "eigenvalues": values.tolist(),
        "eigenvectors": vectors.tolist(),
    }
    mean_image = None
    if m.image_sum is not None:
        mean_image = (m.image_sum / m.num_images).astype(np.float32)
    return stats, mean_image


class PixelSums:
    """Integer sums of many RGB images; `moments()` turns them into `Moments`.

    Per image: one int64 product of the (pixels, 3) matrix with itself, one
    column sum, and one add of the square image into an int64 sum.
    """

    def __init__(self):
        self.num_images = self.num_pixels = 0
        self.sum = np.zeros(3, np.int64)
        self.products = np.zeros((3, 3), np.int64)
        self.image_sum: np.ndarray | None = None
        self._done = Moments()  # What was folded in before the sums could overflow.

    def add(self, pixels: np.ndarray, square: np.ndarray | None = None) -> None:
        """Adds one (H, W, 3) uint8 image; `square` (if any) feeds the mean image."""
        x = pixels.reshape(-1, 3).astype(np.int64)
        if self.num_pixels + len(x) > _MAX_PIXELS:
            self._fold()
        self.num_images += 1
        self.num_pixels += len(x)
        # Per channel: far faster than an axis-0 reduction of the (pixels, 3) matrix.
        self.sum += [int(pixels[..., c].sum(dtype=np.uint64)) for c in range(3)]
        self.products += x.T @ x
        if square is None:
            return
        if self.image_sum is None:
            self.image_sum = square.astype(np.int64)
        elif self.image_sum.shape != square.shape:
            raise ValueError(f"mean image shapes differ: {self.image_sum.shape} vs {square.shape}")
        else:
            self.image_sum += square

    def _exact_moments(self) -> Moments:
        n = self.num_pixels
        if n == 0:
            return Moments()
        s = [int(v) for v in self.sum]
        p = [[int(v) for v in row] for row in self.products]
        # Co-moment sum((x - mean)(y - mean)) = P - S S^T / n, formed in exact integers.
        comoment = np.array([[(p[i][j] * n - s[i] * s[j]) / n for j in range(3)] for i in range(3)])
        image_sum = None if self.image_sum is None else self.image_sum.astype(np.float64)
        return Moments(self.num_images, n, np.array(s, np.float64) / n, comoment, image_sum)

    def _fold(self) -> None:
        done = self._done.merge(self._exact_moments())
        PixelSums.__init__(self)
        self._done = done

    def moments(self) -> Moments:
        """Everything added, as `Moments` (a new object)."""
        return Moments().merge(self._done).merge(self._exact_moments())
