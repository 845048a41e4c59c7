"""One-dimensional k-means for weight sharing: deterministic, numpy only."""

from __future__ import annotations

import numpy as np

INITS = ("linear", "density", "kmeans++")


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", iterations: int = 50,
              seed: int = 0, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clusters scalar values into at most `k` centroids.

    Args:
        values: 1-D float array.
        k: number of clusters.
        init: `"linear"` (evenly spaced between min and max, which Deep Compression found to
            keep the rare large weights best), `"density"` (evenly spaced quantiles) or
            `"kmeans++"` (seeded).
        iterations: Lloyd iterations at most (stops early when assignments settle).
        weights: per value, how much its error counts (each centroid is the weighted mean
            of its values); None for all alike.

    Returns:
        `(centroids, labels)`: sorted float32 centroids and, per value, its centroid index.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    weights = np.ones_like(values) if weights is None else np.maximum(
        np.asarray(weights, dtype=np.float64).reshape(-1), 1e-12)
    unique = np.unique(values)
    if len(unique) <= k:
        return unique.astype(np.float32), np.searchsorted(unique, values).astype(np.int32)
    centroids = _initial(values, k, init, seed)
    labels = None
    for _ in range(iterations):
        new_labels = _nearest(values, centroids)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        sums = np.bincount(labels, weights=values * weights, minlength=len(centroids))
        counts = np.bincount(labels, weights=weights, minlength=len(centroids))
        moved = counts > 0  # an empty cluster keeps its centroid
        centroids = np.where(moved, sums / np.where(moved, counts, 1), centroids)
        centroids = np.sort(centroids)
    labels = _nearest(values, centroids)
    return centroids.astype(np.float32), labels.astype(np.int32)


def _nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    boundaries = (centroids[1:] + centroids[:-1]) / 2  # centroids are sorted
    return np.searchsorted(boundaries, values)


def _initial(values: np.ndarray, k: int, init: str, seed: int) -> np.ndarray:
    if init == "linear":
        return np.linspace(values.min(), values.max(), k)
    if init == "density":
        return np.quantile(values, (np.arange(k) + 0.5) / k)
    rng = np.random.default_rng(seed)
    chosen = [values[rng.integers(len(values))]]
    distance = (values - chosen[0]) ** 2
    for _ in range(k - 1):
        total = distance.sum()
        pick = values[rng.choice(len(values), p=distance / total)] if total > 0 else values[0]
        chosen.append(pick)
        distance = np.minimum(distance, (values - pick) ** 2)
    return np.sort(np.array(chosen))
