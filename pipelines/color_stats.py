"""Training-set colour statistics for the paper's PCA lighting noise (§4.1).

The paper perturbs each training image along the principal components of the
RGB pixel values "throughout the ImageNet training set". These statistics are
computed here from the data, in float64, by a mergeable Beam `CombineFn`, in
the same pass that writes the records.

Merging uses the pairwise update of Chan, Golub and LeVeque for means and
co-moments, which stays accurate over 10^11 pixels where a naive
sum-of-squares would lose digits.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np


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
        """Moments of one (H, W, 3) uint8 image; `square` feeds the mean image."""
        x = pixels.reshape(-1, 3).astype(np.float64)
        mean = x.mean(axis=0)
        d = x - mean
        sq = pixels if square is None else square
        return cls(1, x.shape[0], mean, d.T @ d, sq.astype(np.float64))

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


class ColorStatsFn(beam.CombineFn):
    """Merges `Moments` (of images, or of whole shards) into one `Moments`."""

    def create_accumulator(self) -> Moments:
        return Moments()

    def add_input(self, acc: Moments, element: Moments) -> Moments:
        return acc.merge(element)

    def merge_accumulators(self, accumulators) -> Moments:
        out = Moments()
        for a in accumulators:
            out.merge(a)
        return out

    def extract_output(self, acc: Moments) -> Moments:
        return acc
