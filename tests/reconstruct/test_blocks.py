"""Block reconstruction: where blocks are cut, and learned rounding / refit of pruned weights
bringing a block's output closer to the original's than rounding to nearest / pruning alone,
on every backend."""

import keras
import numpy as np
import pytest

import kshrink
from kshrink.errors import RecipeError
from kshrink.core.graph import copy_model
from kshrink.reconstruct.blocks import find_blocks, reconstruct_blocks, Rounding
from tests.conftest import small_cnn


def _residual_net(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    for k in range(2):
        y = keras.layers.Conv2D(16, 1, activation="relu", name=f"b{k}_expand")(x)
        y = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name=f"b{k}_dw")(y)
        y = keras.layers.Conv2D(8, 1, name=f"b{k}_project")(y)
        x = keras.layers.Add(name=f"b{k}_add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))


def _fitted(layer):
    return int(bool(layer.weights))


def test_blocks_end_at_residual_adds_and_keep_each_residual_block_whole():
    blocks, inputs = find_blocks(_residual_net(), _fitted)
    # the stem joins the first residual block; the pooling, with nothing to fit, runs alone
    assert [b.name for b in blocks] == ["b0_add", "b1_add", "pool", "head"]
    assert [b.fitted for b in blocks] == [4, 3, 0, 1]
    assert [len(b.inputs) for b in blocks] == [1, 1, 1, 1]
    assert blocks[0].inputs[0] is inputs[0]


def test_a_side_input_alive_throughout_does_not_stop_cuts():
    # a mask read by every layer (as a transformer's padding mask is): still one block a layer
    tokens, mask = keras.Input((6, 4), name="tokens"), keras.Input((6, 1), name="mask")
    x = tokens
    for k in range(3):
        x = keras.layers.Dense(4, name=f"dense_{k}")(x)
        x = keras.layers.Multiply(name=f"masked_{k}")([x, mask])
    model = keras.Model([tokens, mask], x)
    blocks, _ = find_blocks(model, _fitted)
    assert [b.name for b in blocks] == ["masked_0", "masked_1", "masked_2"]
    assert all(len(b.inputs) == 2 for b in blocks)


def _error(model, original, x):
    a, b = (np.asarray(keras.ops.convert_to_numpy(m(x)), "float64") for m in (model, original))
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


def _rounding_fits(layers_scales):
    def fits(layer):
        return [Rounding(layer.kernel, layers_scales[layer.name], 7)] \
            if layer.name in layers_scales else []
    return fits


@pytest.mark.every_backend
def test_learned_rounding_beats_rounding_to_nearest_and_stays_on_the_grid():
    model = _residual_net()
    original = copy_model(model)
    rng = np.random.default_rng(0)
    x, held_out = (rng.normal(size=(n, 8, 8, 3)).astype("float32") for n in (128, 128))
    scales = {}
    for layer in model.layers:
        if layer.weights:
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            axes = tuple(range(kernel.ndim - 1)) if "dw" not in layer.name else (0, 1, 3)
            scales[layer.name] = np.abs(kernel).max(axis=axes, keepdims=True) / 7
    nearest = copy_model(model)
    for layer in nearest.layers:
        if layer.name in scales:
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            layer.kernel.assign(np.round(kernel / scales[layer.name]) * scales[layer.name])

    rows = reconstruct_blocks(model, original, x, _rounding_fits(scales), steps=150)

    assert len(rows) == 3
    assert all(r["error_after"] < r["error_before"] for r in rows)
    assert _error(model, original, held_out) < 0.7 * _error(nearest, original, held_out)
    for layer in model.layers:
        if layer.name in scales:
            codes = keras.ops.convert_to_numpy(layer.kernel) / scales[layer.name]
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
            assert np.abs(codes).max() <= 7 + 1e-4


def test_quantize_adaround_beats_rtn_and_reports_its_blocks():
    model = small_cnn()
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(96, 8, 8)).astype("float32")
    held_out = rng.integers(0, 256, size=(96, 8, 8)).astype("float32")
    options = dict(mode="int4", group_size=None, keep_int8=False)
    rtn, _ = kshrink.compress(model, kshrink.Quantize(**options))
    ada, report = kshrink.compress(
        model, kshrink.Quantize(**options, method="adaround", iterations=100,
                                calibration_samples=64), data=x)
    assert _error(ada, model, held_out) < 0.8 * _error(rtn, model, held_out)
    step = report.steps[-1]
    assert "AdaRound: " in step.summary and "blocks fitted, 100 steps each" in step.summary
    assert any("AdaRound" in r.detail for r in step.layers)


def test_refit_keeps_the_masks_and_brings_outputs_closer():
    model = small_cnn()
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(96, 8, 8)).astype("float32")
    held_out = rng.integers(0, 256, size=(96, 8, 8)).astype("float32")
    options = dict(sparsity=0.5, schedule="one_shot", skip_first_last=False, min_fan_in=0,
                   method="sparsegpt", calibration_samples=64)
    plain, _ = kshrink.compress(model, kshrink.Prune(**options), data=x)
    refit, report = kshrink.compress(model, kshrink.Prune(**options, refit=True,
                                                          iterations=100), data=x)
    assert _error(refit, model, held_out) < _error(plain, model, held_out)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        mask = keras.ops.convert_to_numpy(plain.get_layer(name).kernel) != 0
        kept = keras.ops.convert_to_numpy(refit.get_layer(name).kernel) != 0
        assert not np.any(kept & ~mask)  # nothing pruned came back
    assert "refit: " in report.steps[-1].summary


@pytest.mark.parametrize("options, message", [
    (dict(method="adaround", mode="float16"), "takes neither qat nor float modes"),
    (dict(method="adaround", iterations=0), "iterations"),
    (dict(method="adaroud"), "method"),
])
def test_bad_quantize_options_are_refused(options, message):
    with pytest.raises(RecipeError, match=message):
        kshrink.Quantize(**options)


def test_refit_needs_masks_chosen_at_once_and_enough_data():
    with pytest.raises(RecipeError, match="refit fits the weights kept"):
        kshrink.Prune(sparsity=0.5, refit=True)
    with pytest.raises(kshrink.KshrinkError, match="at least 8 calibration examples"):
        kshrink.compress(small_cnn(), kshrink.Prune(sparsity=0.5, schedule="one_shot",
                                                    refit=True),
                         data=np.zeros((4, 8, 8), "float32"))


def test_a_block_that_fitting_leaves_worse_keeps_its_start():
    model = _residual_net()
    original = copy_model(model)
    x = np.random.default_rng(3).normal(size=(64, 8, 8, 3)).astype("float32")
    scales = {l.name: np.abs(keras.ops.convert_to_numpy(l.kernel)).max() / 7
              for l in model.layers if l.weights}
    rows = reconstruct_blocks(model, original, x, _rounding_fits(scales), steps=3)
    assert all(r["error_after"] <= r["error_before"] for r in rows)
    assert any(r["kept_start"] for r in rows)  # 3 steps leave the rounding undecided
