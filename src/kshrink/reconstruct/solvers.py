"""Layer-wise solvers: given a kernel's matrix view and the Hessian `H = X^T X` of the rows that
multiply it, choose compressed weights that keep `X W` close to what it was.

- `gptq` (Frantar et al., ICLR 2023): quantize one row of inputs at a time and spread its
  rounding error over the rows not yet quantized, through the Cholesky factor of `H^-1`.
- `sparsegpt` (Frantar & Alistarh, ICML 2023): the same sweep with pruning instead of rounding,
  the mask chosen block by block from `w^2 / [H^-1]_ii^2`; unstructured or N:M.
- `wanda` (Sun et al., ICLR 2024): prune by `|w| * ||x_i||`, no update.

All work on grouped matrices: `(G, rows, columns)` with one `(rows, rows)` Hessian per group
(`kshrink.layers.rows`), in float64 NumPy.
"""

from __future__ import annotations

import numpy as np

BLOCK = 128  # rows swept together; the rest is updated once per block, as one product
_FACTORS = np.linspace(1.0, 0.55, 19)  # clipping factors tried when choosing scales


def grouped(matrix: np.ndarray, groups: int) -> np.ndarray:
    """(rows, columns) -> (groups, rows, columns / groups): group g owns the g-th block of
    columns."""
    rows, columns = matrix.shape
    return matrix.reshape(rows, groups, columns // groups).transpose(1, 0, 2)


def ungrouped(weights: np.ndarray) -> np.ndarray:
    """The inverse of `grouped`: (groups, rows, columns / groups) -> (rows, columns)."""
    g, rows, columns = weights.shape
    return weights.transpose(1, 0, 2).reshape(rows, g * columns)


def energy_matrix(hessian: np.ndarray, columns_per_group: int) -> np.ndarray:
    """The Hessian diagonal (each input's energy) laid out as the (rows, columns) matrix of
    the weights it multiplies."""
    return np.repeat(np.einsum("gii->ig", hessian), columns_per_group, axis=1)


def choose_scales(matrix: np.ndarray, qmax: int, group_size: int | None,
                  importance: np.ndarray | None = None,
                  factors=_FACTORS) -> np.ndarray:
    """Symmetric scales of shape (row groups, columns), in `quantize_matrix`'s layout: for each
    block of `group_size` rows (all rows without) and column, the clipping of its largest
    magnitude (by one of `factors`) that gives the smallest squared rounding error, each row
    weighted by `importance` (its input's energy, the Hessian diagonal) when given."""
    rows, columns = matrix.shape
    size = group_size or rows
    n = -(-rows // size)
    padded = np.zeros((n * size, columns))
    padded[:rows] = matrix
    blocks = padded.reshape(n, size, columns)
    weight = np.ones_like(padded) if importance is None else np.zeros_like(padded)
    if importance is not None:
        weight[:rows] = importance
    weight = weight.reshape(n, size, columns)
    largest = np.abs(blocks).max(axis=1)
    best, best_error = None, None
    for factor in factors:
        scale = np.where(largest > 0, largest * factor / qmax, 1.0)
        q = np.clip(np.round(blocks / scale[:, None]), -qmax, qmax) * scale[:, None]
        error = (weight * (blocks - q) ** 2).sum(axis=1)
        if best is None:
            best, best_error = scale, error
        else:
            better = error < best_error
            best, best_error = np.where(better, scale, best), np.minimum(error, best_error)
    return best.astype("float32")


def _inverse_factor(hessian: np.ndarray, weights: np.ndarray, damp: float) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U), per group, after zeroing the rows
    whose input is always zero and damping H by `damp` times its mean diagonal."""
    h = hessian.copy()
    g, r, _ = h.shape
    diagonal = np.einsum("gii->gi", h)
    dead = diagonal <= 0
    weights[dead] = 0.0
    h[:, np.arange(r), np.arange(r)] += np.where(dead, 1.0, 0.0)
    mean = np.einsum("gii->gi", h).mean(axis=1)
    h[:, np.arange(r), np.arange(r)] += damp * mean[:, None]
    for attempt in range(6):
        try:
            inverse = np.linalg.inv(np.linalg.cholesky(h))  # L^-1, H^-1 = L^-T L^-1
            h_inv = np.matmul(inverse.transpose(0, 2, 1), inverse)
            return np.linalg.cholesky(h_inv).transpose(0, 2, 1)
        except np.linalg.LinAlgError:  # not positive definite at this damping: damp more
            h[:, np.arange(r), np.arange(r)] += damp * (10 ** attempt) * mean[:, None]
    raise np.linalg.LinAlgError("the Hessian stays singular after damping")


def _sweep(weights: np.ndarray, hessian: np.ndarray, damp: float, step,
           block_rows: int = BLOCK) -> np.ndarray:
    """The GPTQ/OBS sweep: for each row i in order, `step(i, block rows, U block)` replaces
    row i of the working block by its compressed value; the error, scaled by U, is pushed onto
    the rows after it."""
    w = weights.astype("float64").copy()
    u = _inverse_factor(hessian, w, damp)
    g, r, c = w.shape
    out = np.empty_like(w)
    for start in range(0, r, block_rows):
        end = min(start + block_rows, r)
        block = w[:, start:end].copy()
        errors = np.empty_like(block)
        u_block = u[:, start:end, start:end]
        for i in range(end - start):
            original = block[:, i].copy()
            compressed = step(start + i, block, i, u_block)
            out[:, start + i] = compressed
            error = (original - compressed) / u_block[:, i, i][:, None]
            block[:, i:] -= u_block[:, i, i:, None] * error[:, None, :]
            errors[:, i] = error
        w[:, end:] -= np.matmul(u[:, start:end, end:].transpose(0, 2, 1), errors)
    return out


def gptq(weights: np.ndarray, hessian: np.ndarray, scales: np.ndarray, qmax: int, *,
         damp: float = 0.01, act_order: bool = True) -> np.ndarray:
    """GPTQ on grouped weights (G, r, c) with per-element `scales` (G, r, c): the quantized
    weights, as floats on each element's grid (`scale * integer`, integers in [-qmax, qmax]).

    With `act_order`, rows are swept from the largest Hessian diagonal down (the inputs that
    matter most are rounded first, while the most rows remain to absorb their error); the
    scales are fixed beforehand, so the order does not change the grid.
    """
    def snap(rows, values):
        s = scales[rows]
        return np.clip(np.round(values / s), -qmax, qmax) * s

    return _ordered_sweep(weights, hessian, snap, damp, act_order)


def gptq_codebook(weights: np.ndarray, hessian: np.ndarray, centroids: np.ndarray,
                  keep: np.ndarray | None = None, *, damp: float = 0.01,
                  act_order: bool = True) -> np.ndarray:
    """The GPTQ sweep on grouped weights (G, r, c) with a codebook per column instead of an
    integer grid: each weight goes to the nearest of its column's `centroids` (G, c, k), the
    error is spread over the rows not yet shared. Where `keep` (G, r, c) is 0 the weight is
    0 (pruned weights stay pruned)."""
    def snap(rows, values):
        nearest = np.abs(values[:, :, None] - centroids).argmin(axis=2)
        shared = np.take_along_axis(centroids, nearest[:, :, None], axis=2)[:, :, 0]
        return shared if keep is None else shared * keep[rows]

    return _ordered_sweep(weights, hessian, snap, damp, act_order)


def refit_centroids(target: np.ndarray, hessian: np.ndarray, shared: np.ndarray,
                    centroids: np.ndarray, keep: np.ndarray | None = None, *,
                    pooled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`(shared weights, centroids)`: the centroids (G, c, k) that, with every weight of
    `shared` (G, r, c) left on the centroid it took, bring `X Q` closest to `X target`, and
    the weights on them. Per column, the least squares `(M^T H M) c = M^T H w` over its
    assignment `M` (r, k); `pooled`: one codebook for all columns (their systems summed). A
    centroid no weight took keeps its value. The GPTQ sweep chooses the assignment with the
    centroids fixed; this re-fits them with it fixed. Centroids are rounded to float32, the
    values a stored kernel holds."""
    k = centroids.shape[2]
    index = np.abs(shared[..., None] - centroids[:, None]).argmin(axis=3)  # (G, r, c)
    onehot = (index[..., None] == np.arange(k)).astype("float64")  # (G, r, c, k)
    if keep is not None:
        onehot *= keep[..., None]
    hm = np.einsum("gst,gtck->gsck", hessian, onehot)
    a = np.einsum("gsci,gscj->gcij", onehot, hm)
    b = np.einsum("gsck,gsc->gck", hm, target)
    if pooled:
        a = np.broadcast_to(a.sum(axis=(0, 1)), a.shape)
        b = np.broadcast_to(b.sum(axis=(0, 1)), b.shape)
    # A ridge toward the old centroids: unused ones (a zero row) stay where they were.
    ridge = 1e-9 * np.maximum(np.einsum("gcii->gc", a).mean(), 1e-30)
    fitted = np.linalg.solve(a + ridge * np.eye(k), (b + ridge * centroids)[..., None])[..., 0]
    fitted = fitted.astype("float32").astype("float64")
    values = np.take_along_axis(fitted[:, None], index[..., None], axis=3)[..., 0]
    return (values if keep is None else values * keep), fitted


def _ordered_sweep(weights, hessian, snap, damp: float, act_order: bool) -> np.ndarray:
    """`_sweep` with `snap((group, row) index arrays, values (G, c)) -> (G, c)` compressing
    one row of each group, rows taken by decreasing Hessian diagonal if `act_order`."""
    g, r, c = weights.shape
    order = np.argsort(-np.einsum("gii->gi", hessian), axis=1, kind="stable") if act_order \
        else np.tile(np.arange(r), (g, 1))
    take = np.arange(g)[:, None]
    w = weights[take, order]
    h = hessian[take[:, :, None], order[:, :, None], order[:, None, :]]
    groups = np.arange(g)

    def step(row, block, i, _):
        return snap((groups, order[:, row]), block[:, i])

    q = _sweep(w, h, damp, step)
    out = np.empty_like(q)
    out[take, order] = q
    return out


def sparsegpt(weights: np.ndarray, hessian: np.ndarray, sparsity: float, *,
              n_of_m: tuple[int, int] | None = None, damp: float = 0.01) -> np.ndarray:
    """SparseGPT on grouped weights (G, r, c): pruned and updated weights, with exact zeros.

    Unstructured: in each block of rows, the `sparsity` fraction of weights (over the block,
    per group) with the smallest `w^2 / [H^-1]_ii^2` is pruned. `n_of_m=(n, m)`: in every m
    consecutive rows of each column, the n with the largest score are kept.
    """
    pruned = np.zeros(weights.shape, dtype=bool)
    # No N:M group straddles two blocks.
    block_rows = max(n_of_m[1], BLOCK - BLOCK % n_of_m[1]) if n_of_m else BLOCK

    def step(row, block, i, u_block):
        if n_of_m is None and i == 0:  # choose the mask of the whole block
            diag = np.einsum("gii->gi", u_block)[:, :, None]
            score = (block ** 2 / diag ** 2).reshape(len(block), -1)
            k = int(round(score.shape[1] * sparsity))
            rank = np.argsort(np.argsort(score, axis=1, kind="stable"), axis=1)
            pruned[:, row:row + block.shape[1]] = (rank < k).reshape(block.shape)
        elif n_of_m is not None and row % n_of_m[1] == 0:
            n, m = n_of_m
            diag = np.einsum("gii->gi", u_block)[:, i:i + m, None]
            score = block[:, i:i + m] ** 2 / diag ** 2
            rank = np.argsort(np.argsort(-score, axis=1, kind="stable"), axis=1)
            pruned[:, row:row + m] = rank >= n
        return np.where(pruned[:, row], 0.0, block[:, i])

    return _sweep(weights, hessian, damp, step, block_rows)


def wanda(weights: np.ndarray, hessian: np.ndarray, sparsity: float, *,
          n_of_m: tuple[int, int] | None = None) -> np.ndarray:
    """Wanda on grouped weights (G, r, c): the weights with the smallest `|w| * ||x_i||`
    zeroed in each column (the `sparsity` fraction, or all but n of every m rows)."""
    norms = np.sqrt(np.maximum(np.einsum("gii->gi", hessian), 0.0))[:, :, None]
    score = np.abs(weights) * norms
    g, r, c = weights.shape
    if n_of_m is None:
        k = int(round(r * sparsity))
        rank = np.argsort(np.argsort(score, axis=1, kind="stable"), axis=1)
        return np.where(rank < k, 0.0, weights)
    n, m = n_of_m
    blocks = score.reshape(g, r // m, m, c)
    rank = np.argsort(np.argsort(-blocks, axis=2, kind="stable"), axis=2)
    return np.where((rank >= n).reshape(g, r, c), 0.0, weights)
