"""BatchNorm folding and no-op removal: same outputs, fewer layers, refusals with reasons."""

import keras
import numpy as np
import pytest

import kshrink
from kshrink.core.graph import leaf_layers

layers = keras.layers


def randomize_batchnorm(model, seed=0):
    """Trained-looking BN statistics, so folding has something to fold."""
    rng = np.random.default_rng(seed)
    for layer in leaf_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            for variable in layer.weights:
                variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))


def branchy() -> keras.Model:
    """Residual Add, Concatenate, Depthwise, Separable, Dense + BN, Dropout, GlobalPooling."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    y = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=1, name="dw")(x)
    y = layers.BatchNormalization(name="bn_dw")(y)
    x = layers.Add()([x, y])
    z = layers.SeparableConv2D(4, 3, padding="same", name="sep")(x)
    z = layers.BatchNormalization(name="bn_sep")(z)  # folds into the pointwise kernel
    t = layers.Conv2DTranspose(4, 3, padding="same", name="up")(x)
    t = layers.BatchNormalization(name="bn_up")(t)
    x = layers.Concatenate()([x, z, t])
    x = layers.Dropout(0.5, name="drop")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(16, name="fc")(x)
    x = layers.BatchNormalization(name="bn_fc")(x)
    outputs = layers.Activation("linear", name="noop")(x)
    return keras.Model(inputs, outputs)


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_folding_keeps_outputs_and_removes_layers():
    model = branchy()
    randomize_batchnorm(model)
    x = np.random.default_rng(1).normal(size=(8, 12, 12, 3)).astype("float32")
    folded, report = kshrink.compress(model, kshrink.Fold())
    reference = outputs(model, x)
    assert np.abs(outputs(folded, x) - reference).max() <= 1e-5 * np.abs(reference).max()
    names = {layer.name for layer in folded.layers}
    assert not {"bn1", "bn_dw", "bn_sep", "bn_up", "bn_fc", "drop", "noop"} & names
    details = {r.layer: r.detail for r in report.steps[0].layers}
    assert details["bn1"] == "folded into c1" and details["c1"] == "absorbed bn1"
    assert details["bn_sep"] == "folded into sep" and details["bn_up"] == "folded into up"
    assert folded.get_layer("c1").use_bias


def test_folded_model_is_a_plain_keras_file(tmp_path):
    model = branchy()
    randomize_batchnorm(model)
    folded, _ = kshrink.compress(model, kshrink.Fold())
    folded.save(tmp_path / "folded.keras")
    loaded = keras.saving.load_model(tmp_path / "folded.keras")
    x = np.ones((2, 12, 12, 3), "float32")
    np.testing.assert_array_equal(outputs(loaded, x), outputs(folded, x))


def test_batchnorm_after_an_activation_or_a_shared_output_stays():
    inputs = keras.Input((6,))
    a = layers.Dense(4, activation="relu", name="act")(inputs)
    a = layers.BatchNormalization(name="bn_after_relu")(a)
    b = layers.Dense(4, name="shared")(inputs)
    c = layers.BatchNormalization(name="bn_shared")(b)
    model = keras.Model(inputs, layers.Concatenate()([a, b, c]))
    _, report = kshrink.compress(model, kshrink.Fold())
    details = {r.layer: (r.action, r.detail) for r in report.steps[0].layers}
    assert details["bn_after_relu"] == ("skipped", "'act' applies an activation before it")
    assert details["bn_shared"] == ("skipped", "'shared''s output is also read elsewhere")


def test_sequential_models_fold_too():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), layers.Dense(8, name="d"),
                              layers.BatchNormalization(name="bn"), layers.Dropout(0.2),
                              layers.Dense(3, name="out")])
    randomize_batchnorm(model)
    folded, _ = kshrink.compress(model, kshrink.Fold())
    assert [l.name for l in folded.layers] == ["d", "out"]
    x = np.random.default_rng(0).normal(size=(4, 10)).astype("float32")
    np.testing.assert_allclose(outputs(folded, x), outputs(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [{"batchnorm": "yes"}, {"noops": 1}])
def test_bad_options_are_refused(bad):
    with pytest.raises(kshrink.KshrinkError, match="must be true or false"):
        kshrink.Fold.from_config(bad)


def test_a_relu_of_a_relu_output_goes_and_a_capped_one_stays():
    inputs = keras.Input((6,))
    a = layers.Dense(4, activation="relu", name="fc")(inputs)
    b = layers.ReLU(name="again")(a)
    c = layers.Activation("relu", name="and_again")(b)
    d = layers.ReLU(max_value=1.0, name="capped")(c)
    model = keras.Model(inputs, layers.Concatenate()([c, d]))
    folded, _ = kshrink.compress(model, kshrink.Fold())
    assert {"again", "and_again"}.isdisjoint(layer.name for layer in folded.layers)
    assert "capped" in {layer.name for layer in folded.layers}
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    np.testing.assert_array_equal(outputs(folded, x), outputs(model, x))


def mini_xception() -> keras.Model:
    """The shape of Keras' "image classification from scratch" example: SeparableConv2D + BN
    blocks with strided 1x1 residual projections."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(16, 3, strides=2, padding="same")(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    previous = x
    for width in (16, 32):
        x = layers.Activation("relu")(x)
        x = layers.SeparableConv2D(width, 3, padding="same")(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.SeparableConv2D(width, 3, padding="same")(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        residual = layers.Conv2D(width, 1, strides=2, padding="same")(previous)
        x = previous = layers.add([x, residual])
    x = layers.SeparableConv2D(48, 3, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(5)(layers.Dropout(0.25)(x))
    return keras.Model(inputs, outputs)


def test_every_batchnorm_of_a_separable_network_folds():
    model = mini_xception()
    randomize_batchnorm(model)
    x = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype("float32")
    folded, report = kshrink.compress(model, kshrink.Fold())
    assert not [l for l in folded.layers if isinstance(l, layers.BatchNormalization)]
    assert sum("folded into" in r.detail for r in report.steps[0].layers) == 6
    reference = outputs(model, x)
    assert np.abs(outputs(folded, x) - reference).max() <= 1e-4 * np.abs(reference).max()
