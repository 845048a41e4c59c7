"""Depth pruning: which Adds are removable residual blocks, the least useful block goes first,
the result is a plain Keras model, and bad input gets a clear error."""

import keras
import numpy as np
import pytest

import kshrink
from kshrink.prune import Block, residual_blocks

layers = keras.layers


def blocks_model(zero_block: str | None = None) -> keras.Model:
    """A stem, two identity blocks `b1`/`b2`, a strided projection block `p`, and an Add
    whose branch output is also read elsewhere (`shared`, not removable)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="stem")(inputs)
    for name in ("b1", "b2"):
        y = layers.Conv2D(6, 3, padding="same", activation="relu", name=f"{name}_a")(x)
        y = layers.Conv2D(6, 3, padding="same", name=f"{name}_b")(y)
        x = layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([x, y]))
    y = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="p_a")(x)
    y = layers.Conv2D(8, 3, padding="same", name="p_b")(y)
    shortcut = layers.Conv2D(8, 1, strides=2, name="p_proj")(x)
    x = layers.Add(name="p_add")([shortcut, y])
    y = layers.Conv2D(8, 1, name="shared")(x)
    x = layers.Concatenate(name="cat")([layers.Add(name="s_add")([x, y]), y])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, layers.Dense(3, name="head")(x))
    if zero_block:
        conv = model.get_layer(f"{zero_block}_b")
        conv.set_weights([np.zeros_like(w) for w in conv.get_weights()])
    return model


def data(n=64):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 2)).astype("float32"), rng.integers(0, 3, size=n)


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_identity_and_projection_blocks_are_found_and_a_shared_branch_is_not():
    blocks = residual_blocks(blocks_model())
    assert blocks == [
        Block("b1_add", 0, ("b1_a", "b1_b"), blocks[0].macs),
        Block("b2_add", 0, ("b2_a", "b2_b"), blocks[1].macs),
        Block("p_add", 0, ("p_a", "p_b"), blocks[2].macs),  # the projection stays
    ]
    assert blocks[0].macs == 2 * 8 * 8 * 9 * 6 * 6
    assert residual_blocks(keras.Sequential([keras.Input((3,)), layers.Dense(2)])) == []


def test_a_block_whose_branch_adds_nothing_goes_first_and_outputs_do_not_change(tmp_path):
    model = blocks_model(zero_block="b2")
    x, y = data()
    small, report = kshrink.compress(model, kshrink.DepthPrune(blocks=1), data=(x, y))
    names = {layer.name for layer in small.layers}
    assert {"b2_a", "b2_b", "b2_add"}.isdisjoint(names) and {"b1_a", "p_a"} <= names
    np.testing.assert_allclose(outputs(small, x), outputs(model, x), rtol=1e-6, atol=1e-6)
    details = {r.layer: (r.action, r.detail) for r in report.steps[0].layers}
    assert details["b2_b"][0] == "applied" and "outputs changed by 0.00%" in details["b2_b"][1]
    assert details["b1_a"][0] == "skipped" and "'b1_add' kept" in details["b1_a"][1]
    assert details["shared"] == ("skipped", "not in a removable residual block")
    small.save(tmp_path / "small.keras")
    loaded = keras.saving.load_model(tmp_path / "small.keras")
    np.testing.assert_array_equal(outputs(loaded, x), outputs(small, x))


def test_removal_is_greedy_and_respects_the_selection():
    model = blocks_model(zero_block="b2")
    x, y = data()
    small, _ = kshrink.compress(
        model, kshrink.DepthPrune(blocks=1, exclude=kshrink.Select(names=("b2_a",))),
        data=(x, y))
    names = {layer.name for layer in small.layers}
    assert "b2_add" in names and len({"b1_add", "p_add"} & names) == 1
    only, _ = kshrink.compress(
        model, kshrink.DepthPrune(layers=kshrink.Select(pattern="p_.*")), data=(x, y))
    assert "p_add" not in {layer.name for layer in only.layers}


def test_then_fold_drops_the_relu_left_on_a_relu_output():
    model = blocks_model()
    x, y = data()
    small, _ = kshrink.compress(
        model, [kshrink.DepthPrune(blocks=1, layers=kshrink.Select(names=("b1_add",))),
                kshrink.Fold()], data=(x, y))
    assert "b1_out" not in {layer.name for layer in small.layers}  # stem already ends in ReLU
    assert "b2_out" in {layer.name for layer in small.layers}


def test_too_many_blocks_or_no_data_is_a_clear_error():
    x, y = data()
    with pytest.raises(kshrink.KshrinkError, match="blocks=4, but .* has 3 removable residual "
                                                    "blocks .*b1_add, b2_add, p_add"):
        kshrink.compress(blocks_model(), kshrink.DepthPrune(blocks=4), data=(x, y))
    with pytest.raises(kshrink.KshrinkError, match="pass data"):
        kshrink.compress(blocks_model(), kshrink.DepthPrune())
    with pytest.raises(kshrink.KshrinkError, match="blocks"):
        kshrink.DepthPrune(blocks=0)
