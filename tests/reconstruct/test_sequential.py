"""Layer-wise reconstruction toward the original model: a layer after an earlier layer's
error is solved to undo it, and its bias takes the mean shift."""

import keras
import numpy as np

from kshrink.core.graph import copy_model
from kshrink.reconstruct import reconstruct


def _error(model, original, x):
    a, b = (keras.ops.convert_to_numpy(m(x)) for m in (model, original))
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


def test_a_layer_is_solved_toward_what_the_original_computed():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", name="first")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(8, name="second")(h))
    original = copy_model(model)
    first = model.get_layer("first")
    rng = np.random.default_rng(0)
    noise = rng.normal(scale=0.3, size=first.kernel.shape).astype("float32")
    first.kernel.assign(keras.ops.convert_to_numpy(first.kernel) + noise)  # an earlier error
    x = rng.normal(size=(512, 16)).astype("float32")
    held_out = rng.normal(size=(512, 16)).astype("float32")
    before = _error(model, original, held_out)

    second = model.get_layer("second")
    unchanged = keras.ops.convert_to_numpy(second.kernel)
    reconstruct(model, x, [(second, second)], lambda layer, name, w, h: w)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(second.kernel), unchanged)

    reconstruct(model, x, [(second, second)], lambda layer, name, w, h: w, original=original)
    assert _error(model, original, held_out) < 0.6 * before
    # the bias took the mean shift: on the calibration data the mean output is the original's
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)).mean(0),
                               keras.ops.convert_to_numpy(original(x)).mean(0), atol=1e-4)
