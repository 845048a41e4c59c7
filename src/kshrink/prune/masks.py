"""Pruning masks from weight magnitudes: unstructured, block and N:M, per layer or global.

Pure numpy and deterministic (stable sorts, ties broken by position), so the same weights give
the same masks on every backend. A kernel is seen as a matrix (inputs, outputs): the output axis
last, every other axis (spatial, input channels) flattened into rows, so blocks span input and
output channels and N:M groups run along the input (reduction) axis.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from kshrink.layers.specs import as_matrix
from kshrink.errors import RecipeError


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Which weights are pruned together.

    Attributes:
        block: (rows, cols) pruned as a unit; (1, 1) is unstructured.
        n, m: for N:M, keep `n` of every `m` consecutive weights along the input axis.
    """

    block: tuple[int, int] = (1, 1)
    n: int | None = None
    m: int | None = None

    @property
    def is_n_of_m(self) -> bool:
        return self.m is not None

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """`"unstructured"`, `"RxC"` (a block, e.g. `"1x4"`) or `"N:M"` (e.g. `"2:4"`)."""
        text = str(text).strip().lower()
        if text == "unstructured":
            return cls()
        if match := re.fullmatch(r"(\d+)x(\d+)", text):
            rows, cols = int(match[1]), int(match[2])
            if rows < 1 or cols < 1:
                raise RecipeError(f"prune: pattern block sides must be >= 1. Received: pattern={text!r}")
            return cls(block=(rows, cols))
        if match := re.fullmatch(r"(\d+):(\d+)", text):
            n, m = int(match[1]), int(match[2])
            if not 0 < n < m:
                raise RecipeError(
                    f"prune: pattern N:M needs 0 < N < M. Received: pattern={text!r}")
            return cls(n=n, m=m)
        raise RecipeError(
            "prune: pattern must be 'unstructured', a block 'RxC' (e.g. '1x4') or 'N:M' "
            f"(e.g. '2:4'). Received: pattern={text!r}"
        )

    def __str__(self) -> str:
        if self.is_n_of_m:
            return f"{self.n}:{self.m}"
        return "unstructured" if self.block == (1, 1) else f"{self.block[0]}x{self.block[1]}"


def check_fits(pattern: Pattern, shape: tuple, output_axes: tuple, where: str) -> None:
    """Raises `RecipeError` if `pattern` does not tile a weight of this shape."""
    rows, cols = as_matrix(np.empty(shape, dtype=np.int8), output_axes).shape
    if pattern.is_n_of_m:
        if rows % pattern.m:
            raise RecipeError(
                f"prune: pattern {pattern} needs the input size of {where} to be a multiple of "
                f"{pattern.m}; it is {rows}. Exclude the layer or choose another pattern"
            )
    elif rows % pattern.block[0] or cols % pattern.block[1]:
        raise RecipeError(
            f"prune: block {pattern} does not divide {where} (inputs x outputs = {rows}x{cols}). "
            "Exclude the layer or choose a block that divides it"
        )


def unit_scores(matrix: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Mean magnitude of each block, one score per unit, in row-major block order."""
    r, c = pattern.block
    rows, cols = matrix.shape
    blocks = np.abs(matrix).reshape(rows // r, r, cols // c, c)
    return blocks.mean(axis=(1, 3)).reshape(-1)


def expand_units(unit_mask: np.ndarray, matrix_shape: tuple, pattern: Pattern) -> np.ndarray:
    """A mask of one value per block (`unit_scores` order) as a mask of the whole matrix."""
    r, c = pattern.block
    rows, cols = matrix_shape
    grid = unit_mask.reshape(rows // r, cols // c)
    return np.repeat(np.repeat(grid, r, axis=0), c, axis=1)


def n_of_m_mask(matrix: np.ndarray, previous: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Keeps the `n` largest of each `m` consecutive weights along the input axis."""
    rows, cols = matrix.shape
    scores = np.where(previous > 0, np.abs(matrix), -np.inf)
    groups = scores.T.reshape(cols, rows // pattern.m, pattern.m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., : pattern.n], True, axis=-1)
    return keep.reshape(cols, rows).T.astype(matrix.dtype)


def magnitude_masks(matrices: list[np.ndarray], previous: list[np.ndarray],
                    sparsity: float | list[float], pattern: Pattern, scope: str,
                    max_layer_sparsity: float = 0.99) -> list[np.ndarray]:
    """Masks (1 keep, 0 prune) for weight matrices at a target sparsity.

    Weights pruned before (0 in `previous`) stay pruned, so masks only grow sparser as a
    schedule raises the target.

    Args:
        matrices: (inputs, outputs) views of the weights.
        previous: the current masks, same shapes.
        sparsity: target fraction of zeros (layer scope: or one per matrix).
        pattern: unstructured, block or N:M (N:M ignores `sparsity` and `scope`).
        scope: `"layer"` (each matrix reaches `sparsity`) or `"global"` (one threshold across
            all, each matrix capped at `max_layer_sparsity` so none is emptied).
    """
    if pattern.is_n_of_m:
        return [n_of_m_mask(w, p, pattern) for w, p in zip(matrices, previous)]
    scores = []
    for w, p in zip(matrices, previous):
        s = unit_scores(w, pattern)
        was_pruned = unit_scores(p, pattern) < 1  # any pruned weight marks its unit pruned
        scores.append(np.where(was_pruned, -np.inf, s))
    if scope == "layer":
        targets = sparsity if isinstance(sparsity, list) else [sparsity] * len(scores)
        counts = [round(t * len(s)) for t, s in zip(targets, scores)]
    else:
        counts = _global_counts(scores, sparsity, max_layer_sparsity)
    masks = []
    for w, s, k in zip(matrices, scores, counts):
        unit_mask = np.ones(len(s), dtype=w.dtype)
        unit_mask[np.argsort(s, kind="stable")[:k]] = 0
        masks.append(expand_units(unit_mask, w.shape, pattern))
    return masks


def _global_counts(scores: list[np.ndarray], sparsity: float, cap: float) -> list[int]:
    """Units to prune per layer: lowest scores first across all layers, each under its cap."""
    total = sum(len(s) for s in scores)
    target = round(sparsity * total)
    caps = [max(0, min(len(s) - 1, math.floor(cap * len(s)))) for s in scores]
    ordered = [np.sort(s, kind="stable") for s in scores]

    def pruned_at(threshold):  # units strictly below threshold, capped per layer
        return [min(int(np.searchsorted(o, threshold, side="left")), c)
                for o, c in zip(ordered, caps)]

    candidates = np.unique(np.concatenate(ordered + [np.array([np.inf])]))
    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # smallest threshold that reaches the target
        mid = (lo + hi) // 2
        if sum(pruned_at(candidates[mid])) >= target:
            hi = mid
        else:
            lo = mid + 1
    counts = pruned_at(candidates[lo])
    excess = sum(counts) - target
    # Ties at the threshold can overshoot: give units back, largest layers first.
    for i in sorted(range(len(counts)), key=lambda i: -counts[i]):
        if excess <= 0:
            break
        below = pruned_at(candidates[lo - 1])[i] if lo > 0 else 0
        give = min(excess, counts[i] - below)
        counts[i] -= give
        excess -= give
    return counts
