import numpy as np
import pytest

from kshrink.errors import RecipeError
from kshrink.layers import as_matrix, from_matrix
from kshrink.prune.masks import Pattern, check_fits, magnitude_masks

rng = np.random.default_rng(0)


def ones_like(ws):
    return [np.ones_like(w) for w in ws]


def test_unstructured_per_layer_prunes_the_smallest_exactly():
    w = rng.normal(size=(40, 10)).astype(np.float32)
    (mask,) = magnitude_masks([w], ones_like([w]), 0.7, Pattern(), "layer")
    assert mask.sum() == 120
    assert np.abs(w[mask == 1]).min() >= np.abs(w[mask == 0]).max()


def test_previously_pruned_weights_stay_pruned():
    w = rng.normal(size=(20, 5)).astype(np.float32)
    previous = np.ones_like(w)
    previous[0] = 0  # pruned earlier, whatever its magnitude now
    w[0] = 100.0
    (mask,) = magnitude_masks([w], [previous], 0.3, Pattern(), "layer")
    assert np.all(mask[0] == 0) and mask.sum() == 70


def test_global_scope_uses_one_threshold_and_empties_no_layer():
    big = rng.normal(size=(100, 10)).astype(np.float32)
    tiny = (0.001 * rng.normal(size=(10, 10))).astype(np.float32)
    masks = magnitude_masks([big, tiny], ones_like([big, tiny]), 0.5, Pattern(), "global",
                            max_layer_sparsity=0.9)
    assert sum(m.size - m.sum() for m in masks) == 550
    assert masks[1].sum() == 10  # capped at 90% sparsity, not emptied
    kept_big = np.abs(big[masks[0] == 1])
    assert kept_big.min() >= np.abs(big[masks[0] == 0]).max()


def test_block_masks_are_constant_over_blocks():
    w = rng.normal(size=(16, 8)).astype(np.float32)
    (mask,) = magnitude_masks([w], ones_like([w]), 0.5, Pattern(block=(4, 2)), "layer")
    blocks = mask.reshape(4, 4, 4, 2)
    assert np.all(blocks.min(axis=(1, 3)) == blocks.max(axis=(1, 3)))
    assert mask.mean() == 0.5


def test_n_of_m_keeps_n_largest_in_every_group_along_inputs():
    w = rng.normal(size=(12, 3)).astype(np.float32)
    (mask,) = magnitude_masks([w], ones_like([w]), 0.0, Pattern(n=2, m=4), "layer")
    groups = mask.T.reshape(3, 3, 4)
    assert np.all(groups.sum(-1) == 2)
    mags = np.abs(w).T.reshape(3, 3, 4)
    kept_min = np.where(groups == 1, mags, np.inf).min(-1)
    dropped_max = np.where(groups == 0, mags, -np.inf).max(-1)
    assert np.all(kept_min >= dropped_max)


def test_masks_are_deterministic_under_ties():
    w = np.ones((8, 4), dtype=np.float32)
    a = magnitude_masks([w], ones_like([w]), 0.5, Pattern(), "layer")[0]
    b = magnitude_masks([w.copy()], ones_like([w]), 0.5, Pattern(), "layer")[0]
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 16


def test_matrix_view_round_trips_and_puts_outputs_last():
    conv = rng.normal(size=(3, 3, 4, 8))
    m = as_matrix(conv)
    assert m.shape == (36, 8)
    np.testing.assert_array_equal(from_matrix(m, conv.shape), conv)
    transposed = rng.normal(size=(3, 3, 8, 4))  # Conv2DTranspose: (kh, kw, out, in)
    m = as_matrix(transposed, (-2,))
    assert m.shape == (36, 8)
    np.testing.assert_array_equal(from_matrix(m, transposed.shape, (-2,)), transposed)


@pytest.mark.parametrize("text, expected", [
    ("unstructured", Pattern()), ("1x4", Pattern(block=(1, 4))), ("2:4", Pattern(n=2, m=4)),
])
def test_parse_patterns(text, expected):
    assert Pattern.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text, message", [
    ("4:2", "needs 0 < N < M"), ("2:2", "needs 0 < N < M"), ("0x4", "sides must be >= 1"),
    ("diagonal", "must be 'unstructured'"),
])
def test_bad_patterns(text, message):
    with pytest.raises(RecipeError, match=message):
        Pattern.parse(text)


def test_fit_checks_name_the_layer():
    with pytest.raises(RecipeError, match=r"block 3x1 does not divide layer 'fc' .*10x5"):
        check_fits(Pattern(block=(3, 1)), (10, 5), (-1,), "layer 'fc'")
    with pytest.raises(RecipeError, match="multiple of 4; it is 25"):
        check_fits(Pattern(n=2, m=4), (5, 5, 1, 20), (-1,), "layer 'conv1'")
    check_fits(Pattern(n=2, m=4), (5, 5, 20, 50), (-1,), "layer 'conv2'")
