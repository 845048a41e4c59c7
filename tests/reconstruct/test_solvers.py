"""The solvers keep `X W` closer to the original than rounding / magnitude pruning alone, and
their results are exactly what they claim: on the integer grid, at the sparsity, in N:M."""

import numpy as np
import pytest

from kshrink.reconstruct.solvers import (
    choose_scales,
    gptq,
    gptq_codebook,
    refit_centroids,
    sparsegpt,
    wanda,
)

ROWS, COLUMNS, SAMPLES = 192, 24, 2048


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(ROWS, ROWS)) / np.sqrt(ROWS)  # correlated inputs, as in a net
    x = rng.normal(size=(SAMPLES, ROWS)) @ mixing + 0.3 * rng.normal(size=(SAMPLES, ROWS))
    w = rng.normal(size=(ROWS, COLUMNS)) * 0.1
    return x, w, (x.T @ x)[None] / SAMPLES


def relative_error(x, w, new):
    return np.sum((x @ (new - w)) ** 2) / np.sum((x @ w) ** 2)


@pytest.mark.parametrize("group_size", [None, 64])
def test_gptq_lands_on_the_grid_and_beats_rounding(problem, group_size):
    x, w, h = problem
    scales = choose_scales(w, 7, group_size, np.diag(h[0])[:, None])
    per_row = np.repeat(scales, group_size or ROWS, axis=0)[:ROWS]
    q = gptq(w[None], h, per_row[None].astype("float64"), 7)[0]
    integers = q / per_row
    np.testing.assert_allclose(integers, np.round(integers), atol=1e-6)
    assert np.abs(np.round(integers)).max() <= 7
    rounded = np.clip(np.round(w / per_row), -7, 7) * per_row
    assert relative_error(x, w, q) < 0.7 * relative_error(x, w, rounded)


def test_sparsegpt_reaches_the_sparsity_and_beats_magnitude(problem):
    x, w, h = problem
    pruned = sparsegpt(w[None], h, 0.5)[0]
    assert abs(np.mean(pruned == 0) - 0.5) < 0.01
    threshold = np.quantile(np.abs(w), 0.5)
    magnitude = np.where(np.abs(w) > threshold, w, 0.0)
    assert relative_error(x, w, pruned) < 0.8 * relative_error(x, w, magnitude)


@pytest.mark.parametrize("solver", [sparsegpt, wanda])
def test_n_of_m_keeps_at_most_n_of_every_m_rows(problem, solver):
    x, w, h = problem
    pruned = solver(w[None], h, 0.5, n_of_m=(2, 4))[0]
    kept = (pruned.reshape(ROWS // 4, 4, COLUMNS) != 0).sum(axis=1)
    assert kept.max() <= 2 and np.mean(pruned == 0) >= 0.5


def test_wanda_prunes_each_column_to_the_sparsity(problem):
    _, w, h = problem
    pruned = wanda(w[None], h, 0.25)[0]
    np.testing.assert_array_equal((pruned == 0).sum(axis=0), round(ROWS * 0.25))


def test_rows_whose_input_is_always_zero_are_handled(problem):
    x, w, h = problem
    h = h.copy()
    h[0, 5, :] = h[0, :, 5] = 0.0  # input 5 never fires (a dead ReLU channel)
    scales = np.repeat(choose_scales(w, 127, None), ROWS, axis=0)[None].astype("float64")
    q = gptq(w[None], h, scales, 127)[0]
    assert np.isfinite(q).all() and (q[5] == 0).all()


@pytest.mark.parametrize("pooled", [False, True])
def test_refit_centroids_solve_the_least_squares_of_the_assignment(problem, pooled):
    x, w, h = problem
    k = 8
    start = np.quantile(w, np.linspace(0.05, 0.95, k), axis=0).T  # (columns, k)
    if pooled:
        start = np.broadcast_to(np.quantile(w, np.linspace(0.05, 0.95, k)), start.shape)
    start = start.astype("float32").astype("float64")
    swept = gptq_codebook(w[None], h, start[None].copy())[0]
    shared, centroids = (part[0] for part in refit_centroids(w[None], h, swept[None],
                                                             start[None], pooled=pooled))
    # Every weight stays on the centroid it took, the centroids moved to fit X W better.
    index = np.abs(swept[..., None] - start[None]).argmin(axis=2)
    np.testing.assert_array_equal(shared, np.take_along_axis(centroids[None], index[..., None],
                                                             axis=2)[..., 0])
    assert relative_error(x, w, shared) < relative_error(x, w, swept)
    # Exactly the least squares over the centroids, per column (or over all of them).
    onehot = (index[..., None] == np.arange(k)).astype("float64")  # (rows, columns, k)
    if pooled:
        design = np.einsum("sr,rck->sck", x, onehot).transpose(1, 0, 2).reshape(-1, k)
        best = np.linalg.lstsq(design, (x @ w).T.reshape(-1), rcond=None)[0]
        np.testing.assert_allclose(centroids, np.broadcast_to(best, centroids.shape),
                                   rtol=1e-4, atol=1e-6)
    else:
        for c in range(COLUMNS):
            used = onehot[:, c].any(axis=0)
            best = np.linalg.lstsq(x @ onehot[:, c][:, used], x @ w[:, c], rcond=None)[0]
            np.testing.assert_allclose(centroids[c, used], best, rtol=1e-4, atol=1e-6)
